"""Compressed and MONOCHROME1 inputs give the model the same tensor as the uncompressed original.

Compressed copies are made by the real encoders: DCMTK's dcmcjpeg (JPEG lossless, process 14 SV1),
dcmcrle (RLE) and dcmcjpls (JPEG-LS lossless), and OpenJPEG through pydicom (JPEG 2000 lossless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless
from support import require_tool, run

from edged.pipeline.preprocess import PreprocessSpec, prepare_dataset
from edged.synthetic import chest_phantom, ct_slice

SPEC = PreprocessSpec(size=(256, 256), window=(-600.0, 1500.0))


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hu, _ = chest_phantom(np.random.default_rng(5), nodules=2)
    path = tmp_path_factory.mktemp("codec") / "orig.dcm"
    ct_slice(0, study_uid="1.2.3", series_uid="1.2.3.4", hu=hu).save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("tool, args, ts", [
    ("dcmcjpeg", ["+e1"], JPEGLosslessSV1),
    ("dcmcrle", [], RLELossless),
    ("dcmcjpls", ["+el"], JPEGLSLossless),
])
def test_dcmtk_lossless_codecs_decode_exactly(original: Path, tmp_path: Path, tool: str, args: list, ts: str) -> None:
    out = tmp_path / f"{tool}.dcm"
    res = run([require_tool(tool), *args, str(original), str(out)])
    assert res.returncode == 0, res.stderr
    compressed = pydicom.dcmread(out)
    assert compressed.file_meta.TransferSyntaxUID == ts
    assert out.stat().st_size < original.stat().st_size
    np.testing.assert_array_equal(prepare_dataset(compressed, SPEC), prepare_dataset(pydicom.dcmread(original), SPEC))


def test_jpeg2000_lossless_decodes_exactly(original: Path) -> None:
    ds = pydicom.dcmread(original)
    ds.compress(JPEG2000Lossless)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(ds)))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(prepare_dataset(ds, SPEC), prepare_dataset(pydicom.dcmread(original), SPEC))


def test_monochrome1_is_inverted_back(original: Path) -> None:
    ds = pydicom.dcmread(original)
    mono1 = pydicom.dcmread(original)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    mono1.PixelData = (65535 - ds.pixel_array.astype(np.int64)).astype("<u2").tobytes()
    np.testing.assert_array_equal(prepare_dataset(mono1, SPEC), prepare_dataset(ds, SPEC))


def _encode(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
