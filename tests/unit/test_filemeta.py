"""edged's direct File Meta encoder gives the bytes pynetdicom and pydicom give (~0.5 s)."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta as pynetdicom_encode

from edged.dicom.filemeta import PREAMBLE, encode_file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.3.4", "2.25.123456789012345678901234567890123456789"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
def test_same_bytes_as_pynetdicom(sop_instance_uid: str, ts: str) -> None:
    expected = pynetdicom_encode(create_file_meta(sop_class_uid=CT, sop_instance_uid=sop_instance_uid,
                                                  transfer_syntax=ts))
    assert encode_file_meta(CT, sop_instance_uid, ts) == PREAMBLE + expected


def test_pydicom_reads_it_back() -> None:
    body = b"\x08\x00\x16\x00\x04\x00\x00\x00" + b"1.2\x00"  # (0008,0016) implicit VR, any value
    ds = dcmread(BytesIO(encode_file_meta(CT, "1.2.3.4.5", ImplicitVRLittleEndian) + body))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == CT
