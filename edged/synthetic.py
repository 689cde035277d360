"""Synthetic CT series (no real patient) for demos, tests and benchmarks.

``write_ct_series`` writes CT Image Storage files like a scanner's: 16-bit slices with rescale,
geometry (position, orientation, spacing) and a phantom (a water disc with a denser insert) so that
later stages have something to find.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1557.1"  # edged's implementation class (pydicom's root)


def ct_slice(
    index: int,
    *,
    study_uid: str,
    series_uid: str,
    rows: int = 512,
    columns: int = 512,
    slice_thickness: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """One CT slice as a pydicom Dataset with file meta (Explicit VR Little Endian)."""
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(index)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    today = _dt.date(2026, 1, 1).strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "SYN0001"
    ds.Modality = "CT"
    ds.Manufacturer = "edged synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic phantom"
    ds.SeriesDescription = "Phantom axial 1mm"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [-250.0, -250.0, -float(index) * slice_thickness]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = -float(index) * slice_thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [500.0 / rows, 500.0 / columns]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"

    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:rows, 0:columns]
    cy, cx = rows / 2, columns / 2
    body = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.4 * rows) ** 2
    insert = ((yy - cy * 0.8) ** 2 + (xx - cx * 1.2) ** 2) < (0.06 * rows) ** 2
    hu = np.full((rows, columns), -1000.0)
    hu[body] = 0.0
    hu[insert] = 60.0
    hu += rng.normal(0, 10, size=hu.shape)
    ds.PixelData = np.clip(hu + 1024, 0, 65535).astype("<u2").tobytes()
    return ds


def write_ct_series(folder: Path, count: int, *, rows: int = 512, columns: int = 512, seed: int = 0) -> list[Path]:
    """Write ``count`` slices of one new series to ``folder``; returns the file paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=[str(folder), str(seed), "study"])
    series_uid = generate_uid(entropy_srcs=[str(folder), str(seed), "series"])
    paths = []
    for i in range(count):
        ds = ct_slice(i, study_uid=study_uid, series_uid=series_uid, rows=rows, columns=columns, seed=seed)
        path = folder / f"ct{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
