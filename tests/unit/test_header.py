from __future__ import annotations

import os

import zlib

import pytest
from support import part10_dataset
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


def test_a_spooled_data_set_reads_as_the_same_bytes_in_memory(tmp_path) -> None:
    """read_header_at (the streamed path: from the spool file, or from the head of the data set the
    stream kept in memory) gives what read_header (in memory) gives, Header or refusal, for the pydicom
    corpus whole, cut short and with a few bytes changed."""
    import random
    from pathlib import Path

    from pydicom.data import get_testdata_files

    from functools import partial

    from edged.dicom.header import HeaderError, read_header, read_header_at
    from edged.dicom.stream import HEAD

    def outcome(read, *args):
        try:
            return read(*args)
        except HeaderError as exc:
            return exc.reason

    rng = random.Random(7)
    compared = 0
    spool = tmp_path / "spooled"
    for f in get_testdata_files():
        split = part10_dataset(Path(f).read_bytes() if Path(f).is_file() else b"")
        if split is None:
            continue
        data, ts = split
        for cut in (len(data), rng.randrange(max(1, min(len(data), 3000)))):
            sample = bytearray(data[:cut])
            if sample and cut != len(data):
                sample[rng.randrange(len(sample))] = rng.randrange(256)
            spool.write_bytes(b"M" * 200 + sample)
            fd = os.open(spool, os.O_RDONLY)
            try:
                streamed = outcome(read_header_at, fd, 200, 200 + len(sample), ts)
                with_head = outcome(partial(read_header_at, head=bytearray(sample[:HEAD])), fd, 200,
                                    200 + len(sample), ts)
            finally:
                os.close(fd)
            assert streamed == with_head == outcome(read_header, bytes(sample), ts), (Path(f).name, cut)
            compared += 1
    assert compared > 200


def test_values_decoded_from_raw_bytes_are_what_pydicom_decodes() -> None:
    """_raw_text/_raw_us (UIDs, CS, US decoded directly) against pydicom's own conversion (_text/_int),
    for padding, several values, empty values, other VRs, odd lengths, all three uncompressed syntaxes."""
    import struct
    from io import BytesIO

    from pydicom.filereader import read_dataset

    from edged.dicom import header as H

    def el(tag: int, vr: str, value: bytes, explicit: bool, little: bool) -> bytes:
        g, e, en = tag >> 16, tag & 0xFFFF, "<" if little else ">"
        if len(value) % 2:
            value += b" " if vr != "UI" else b"\x00"
        if not explicit:
            return struct.pack(en + "HHI", g, e, len(value)) + value
        if vr == "UN":
            return struct.pack(en + "HH2sHI", g, e, vr.encode(), 0, len(value)) + value
        return struct.pack(en + "HH2sH", g, e, vr.encode(), len(value)) + value

    def outcome(fn, *args):
        try:
            return fn(*args)
        except H.HeaderError as exc:
            return exc.reason

    checked = 0
    for explicit, little in ((True, True), (False, True), (True, False)):
        for text in (b"CT", b"CT\\MR", b"", b" CT ", b"CT\x00", b"\xe9T", b"CT\\", b"1.2.3\x00", b"1.2.3 \x00 \x00",
                     b" 1.2 ", b"\x001.2"):
            for vr in ("CS", "LO", "UN", "UI"):
                for rows in (struct.pack("<H" if little else ">H", 512), b"\x00\x02\x00\x02", b"", b"\x05\x00\x00"):
                    data = (el(0x00080018, vr if vr == "UI" else "UI", text, explicit, little)
                            + el(0x00080060, "CS" if vr == "UI" else vr, text, explicit, little)
                            + el(0x00280010, "US" if vr != "UN" else "UN", rows, explicit, little))
                    ds = read_dataset(BytesIO(data), not explicit, little)
                    for tag in (0x00080018, 0x00080060):
                        keyword = H._RAW_TEXT[tag][0]
                        assert outcome(H._raw_text, ds, tag) == outcome(H._text, ds, keyword), (data, keyword)
                    assert outcome(H._raw_us, ds, 0x00280010) == outcome(H._int, ds, "Rows"), data
                    checked += 1
    assert checked > 300
