from __future__ import annotations

import zlib

import pytest
from pydicom.data import get_testdata_file
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edged.dicom.header import HeaderError, read_header


def encode(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR = implicit
    buf.is_little_endian = little
    write_dataset(buf, ds)
    return buf.getvalue()


def sample() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01" * 64
    return ds


@pytest.mark.parametrize("ts, implicit, little", [
    (ExplicitVRLittleEndian, False, True),
    (ImplicitVRLittleEndian, True, True),
    (ExplicitVRBigEndian, False, False),
])
def test_reads_identifiers(ts: str, implicit: bool, little: bool) -> None:
    h = read_header(encode(sample(), implicit, little), ts)
    assert (h.sop_class_uid, h.sop_instance_uid, h.series_instance_uid, h.modality) == (
        CTImageStorage, "1.2.3.4", "1.2.3.5", "CT")


def test_deflated() -> None:
    path = get_testdata_file("image_dfl.dcm")
    ds = dcmread(path)
    raw = open(path, "rb").read()
    offset = 132 + 12 + int.from_bytes(raw[140:144], "little")
    h = read_header(raw[offset:], ds.file_meta.TransferSyntaxUID)
    assert h.sop_instance_uid == ds.SOPInstanceUID


def test_truncated_element_is_refused() -> None:
    raw = encode(sample())
    with pytest.raises(HeaderError, match="runs past the end"):
        read_header(raw[:-10], ExplicitVRLittleEndian)  # pixel data cut short


def test_garbage_deflate_is_refused() -> None:
    with pytest.raises(HeaderError):
        read_header(b"\xff" * 100, "1.2.840.10008.1.2.1.99")


def test_missing_uid_reads_empty() -> None:
    ds = sample()
    del ds.SOPInstanceUID
    assert read_header(encode(ds), ExplicitVRLittleEndian).sop_instance_uid == ""


def test_compressed_deflate_roundtrip() -> None:
    body = encode(sample())
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(body) + c.flush()
    assert read_header(deflated, "1.2.840.10008.1.2.1.99").sop_instance_uid == "1.2.3.4"
