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
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

IMPLEMENTATION_UID = PYDICOM_IMPLEMENTATION_UID


def ct_slice(
    index: int,
    *,
    study_uid: str,
    series_uid: str,
    rows: int = 512,
    columns: int = 512,
    slice_thickness: float = 1.0,
    seed: int = 0,
    hu: np.ndarray | None = None,
) -> Dataset:
    """One CT slice as a pydicom Dataset with file meta (Explicit VR Little Endian).

    ``hu``: a (rows, columns) image in HU to store instead of the built-in phantom (for example
    from :func:`chest_phantom`); stored as ``HU + 1024`` (Rescale Intercept -1024).
    """
    if hu is not None and np.shape(hu) != (rows, columns):
        raise ValueError(f"hu has shape {np.shape(hu)}, expected ({rows}, {columns})")
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

    if hu is None:
        rng = np.random.default_rng([seed, index])
        yy, xx = np.mgrid[0:rows, 0:columns]
        cy, cx = rows / 2, columns / 2
        body = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.4 * rows) ** 2
        insert = ((yy - cy * 0.8) ** 2 + (xx - cx * 1.2) ** 2) < (0.06 * rows) ** 2
        hu = np.full((rows, columns), -1000.0)
        hu[body] = 0.0
        hu[insert] = 60.0
        hu += rng.normal(0, 10, size=hu.shape)
    ds.PixelData = hu_to_stored(np.asarray(hu)).tobytes()
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


# ---------------------------------------------------------------------------------------------------
# Chest phantoms with lung nodules (numpy only: used by tests and the daemon without torch, and by
# engines/train_demo_models.py to train the demo models ct-nodule-cls and lesion-seg).
# ---------------------------------------------------------------------------------------------------

FOV_MM = 500.0  # reconstruction field of view of the phantoms (and of ct_slice's PixelSpacing)


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    """HU to the stored 16-bit values ct_slice writes (Rescale Intercept -1024, Slope 1)."""
    return np.clip(hu + 1024, 0, 65535).astype("<u2")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-replicating), float32."""
    if sigma <= 0:
        return img.astype(np.float32, copy=True)
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    out = img.astype(np.float32, copy=False)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * (padded[i:i + n, :] if axis == 0 else padded[:, i:i + n])
        out = acc
    return out


def _box(cy: float, cx: float, reach: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    y0, y1 = max(0, int(np.floor(cy - reach)) - 2), min(shape[0], int(np.ceil(cy + reach)) + 3)
    x0, x1 = max(0, int(np.floor(cx - reach)) - 2), min(shape[1], int(np.ceil(cx + reach)) + 3)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _ellipse(shape, cy, cx, ry, rx, angle=0.0, *, harmonics=(), edge=1.0):
    """Anti-aliased fraction (0..1) of each pixel inside an ellipse, with an optionally wavy outline.

    ``harmonics``: (order, amplitude, phase) terms modulating the radius (1 + sum a cos(k t + p)).
    ``edge``: width in pixels of the linear ramp at the border (partial volume).
    Returns (box, fraction) where fraction covers ``box`` only.
    """
    amp = sum(abs(a) for _, a, _ in harmonics)
    box = _box(cy, cx, max(ry, rx) * (1 + amp) + edge, shape)
    yy = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = xx * c + yy * s
    v = -xx * s + yy * c
    rho = np.sqrt((u / np.float32(rx)) ** 2 + (v / np.float32(ry)) ** 2)
    if harmonics:
        t = np.arctan2(v * np.float32(rx), u * np.float32(ry))
        mod = np.ones_like(rho)
        for k, a, p in harmonics:
            mod += np.float32(a) * np.cos(np.float32(k) * t + np.float32(p))
        rho = rho / mod
    # signed distance to the border, approximately in pixels
    dist = (1.0 - rho) * np.float32(np.sqrt(rx * ry))
    frac = np.clip(0.5 + dist / np.float32(edge), 0.0, 1.0)
    return box, frac


def _segment(shape, y0, x0, y1, x1, r0, r1):
    """Anti-aliased fraction of a tapered tube from (y0, x0) radius r0 to (y1, x1) radius r1."""
    box = _box((y0 + y1) / 2, (x0 + x1) / 2, np.hypot(y1 - y0, x1 - x0) / 2 + max(r0, r1) + 1, shape)
    yy = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None]
    xx = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :]
    dy, dx = y1 - y0, x1 - x0
    length2 = max(dy * dy + dx * dx, 1e-6)
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / np.float32(length2), 0.0, 1.0)
    d = np.sqrt((yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2)
    r = r0 + (r1 - r0) * t
    frac = np.clip(r + 0.5 - d, 0.0, 1.0)
    return box, frac


def _paint(img: np.ndarray, box, frac: np.ndarray, value) -> None:
    """Blend ``value`` (scalar or array over box) into ``img`` with weights ``frac``."""
    region = img[box]
    region += frac * (np.asarray(value, dtype=np.float32) - region)


def _smooth_field(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency texture (zero mean, std ``amplitude``): coarse noise smoothly interpolated."""
    coarse = rng.normal(0.0, 1.0, size=(cells, cells))
    pos = (np.arange(size) + 0.5) * (cells / size) - 0.5
    weights = np.exp(-0.5 * ((pos[:, None] - np.arange(cells)[None, :]) / 0.7) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    field = (weights @ coarse @ weights.T).astype(np.float32)
    std = float(field.std()) or 1.0
    return field * np.float32(amplitude / std)


def chest_phantom(
    rng: np.random.Generator,
    size: int = 512,
    nodules: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic axial chest CT slice in HU, and the mask of its lung nodules.

    Field of view 500 mm (``size`` 512: about 0.98 mm per pixel). Air, table, body outline with
    subcutaneous fat (~-100 HU) around soft tissue (~40 HU), ribs, sternum and a vertebra (bone
    ~700 HU cortex), mediastinum (heart, aorta, sometimes the trachea), two lungs (~-850 HU) with
    vessels in and through the plane, ``nodules`` lung nodules (0..3 at random when None; radius
    2-15 mm, -100..+100 HU, soft partial-volume edges), blur (reconstruction kernel) and correlated
    Gaussian noise (sigma 10-30 HU). Deterministic for a given ``rng`` state.

    Returns ``(hu, mask)``: float32 (size, size) HU image and bool (size, size) nodule mask (pixels at
    least half inside a nodule). Nodules lie wholly inside a lung; if a requested nodule cannot be
    placed (very rare) it is left out, so use ``mask.any()`` as the label.
    """
    if nodules is None:
        nodules = int(rng.integers(0, 4))
    if nodules < 0:
        raise ValueError("nodules must be >= 0")
    shape = (size, size)
    px = size / 512.0  # pixels per "reference pixel" (512 matrix)
    mm = size / FOV_MM  # pixels per mm
    u = rng.uniform

    hu = np.full(shape, -1000.0, dtype=np.float32)

    # body outline
    cy, cx = size / 2 + rng.normal(0, 8) * px, size / 2 + rng.normal(0, 5) * px
    brx, bry = u(150, 205) * px, u(105, 145) * px
    wav = tuple((k, u(-0.03, 0.03), u(0, 2 * np.pi)) for k in (2, 3, 4))

    # table under the patient
    if rng.random() < 0.8:
        ty = cy + bry + u(4, 20) * px
        th = u(4, 8) * px
        yy = np.arange(size, dtype=np.float32)[:, None]
        xx = np.arange(size, dtype=np.float32)[None, :]
        curve = ty + 0.0004 / px * (xx - cx) ** 2 * 0.3
        frac = np.clip(0.5 + np.minimum(yy - curve, curve + th - yy), 0.0, 1.0)
        frac *= (np.abs(xx - cx) < 215 * px)
        hu += frac * (np.float32(u(-300, 0)) - hu)
        frac2 = np.clip(0.5 + np.minimum(yy - curve, curve + 1.5 * px - yy), 0.0, 1.0) * (np.abs(xx - cx) < 215 * px)
        hu += frac2 * (np.float32(u(100, 300)) - hu)

    box, frac = _ellipse(shape, cy, cx, bry, brx, harmonics=wav, edge=1.0)
    fat_hu = u(-120, -80)
    _paint(hu, box, frac, fat_hu)
    fat = u(6, 25) * px
    irx, iry = brx - fat, bry - fat * u(0.7, 1.0)
    box, frac = _ellipse(shape, cy, cx, iry, irx, harmonics=wav, edge=1.5)
    tissue = u(30, 50) + _smooth_field(rng, size, 24, u(5, 15))
    _paint(hu, box, frac, tissue[box])

    # thoracic cavity and lungs
    crx, cry = irx - u(8, 18) * px, iry - u(6, 14) * px
    ccy = cy + u(-4, 4) * px
    lung = np.zeros(shape, dtype=np.float32)
    for side in (-1, 1):
        lrx = crx * u(0.40, 0.47)
        lry = cry * u(0.78, 0.92)
        lcx = cx + side * crx * u(0.48, 0.56)
        lcy = ccy + u(-0.06, 0.06) * cry
        lw = tuple((k, u(-0.04, 0.04), u(0, 2 * np.pi)) for k in (2, 3, 5))
        box, frac = _ellipse(shape, lcy, lcx, lry, lrx, u(-0.15, 0.15), harmonics=lw, edge=1.0)
        lung[box] = np.maximum(lung[box], frac)

    # mediastinum: heart (patient's left = image right, anterior = top), spine, aorta
    heart_scale = u(0.0, 1.0)
    holes = np.zeros(shape, dtype=np.float32)
    blood = u(30, 50) if rng.random() < 0.6 else u(150, 300)  # without / with contrast
    structures = []
    if heart_scale > 0.25:
        hrx, hry = crx * 0.42 * heart_scale, cry * 0.55 * heart_scale
        structures.append((ccy - cry * u(0.05, 0.25), cx + crx * u(0.05, 0.2), hry, hrx, u(-0.6, -0.2), u(30, 45)))
    vcy, vr = ccy + cry * u(0.72, 0.85), u(15, 22) * px
    structures.append((vcy, cx, vr * 1.05, vr * 1.15, 0.0, None))  # vertebral body (bone, below)
    acy, acx, ar = vcy - vr * u(0.9, 1.4), cx + vr * u(1.1, 1.6), u(9, 14) * px
    structures.append((acy, acx, ar, ar, 0.0, blood))  # descending aorta
    mediastinum_rx = crx * u(0.10, 0.16)
    structures.append((ccy - cry * 0.1, cx, cry * 0.85, mediastinum_rx, 0.0, u(20, 45)))
    for scy, scx, sry, srx, ang, value in structures:
        box, frac = _ellipse(shape, scy, scx, sry + 2 * px, srx + 2 * px, ang, edge=1.0)
        holes[box] = np.maximum(holes[box], frac)
        if value is not None:
            box, frac = _ellipse(shape, scy, scx, sry, srx, ang, edge=1.0)
            _paint(hu, box, frac, value)
    lung *= 1.0 - holes

    # lung parenchyma: -850 HU with a gravity gradient (posterior denser) and faint texture
    yy = np.arange(size, dtype=np.float32)[:, None]
    grad = (yy - ccy) / np.float32(cry) * np.float32(u(10, 40))
    parenchyma = np.float32(u(-880, -820)) + grad + _smooth_field(rng, size, 48, u(5, 20))
    hu += lung * (parenchyma - hu)

    # trachea / main bronchus (upper slices)
    if heart_scale < 0.5:
        tr = u(7, 11) * px
        tcy = ccy - cry * u(0.2, 0.45)
        box, frac = _ellipse(shape, tcy, cx, tr + 2 * px, tr + 2 * px, edge=1.0)
        _paint(hu, box, frac, 40.0)
        box, frac = _ellipse(shape, tcy, cx, tr, tr * u(0.85, 1.1), edge=1.0)
        _paint(hu, box, frac, u(-1000, -960))

    # vertebra: cortex, cancellous bone, spinal canal, spinous and transverse processes
    bone = u(600, 850)
    box, frac = _ellipse(shape, vcy, cx, vr, vr * 1.1, edge=1.0)
    _paint(hu, box, frac, bone)
    box, frac = _ellipse(shape, vcy, cx, vr - 3 * px, vr * 1.1 - 3 * px, edge=1.0)
    _paint(hu, box, frac, u(180, 300))
    can_cy = vcy + vr + 8 * px
    box, frac = _ellipse(shape, can_cy, cx, 13 * px, 11 * px, edge=1.0)
    _paint(hu, box, frac, bone)
    box, frac = _ellipse(shape, can_cy - 1 * px, cx, 8 * px, 7.5 * px, edge=1.0)
    _paint(hu, box, frac, u(10, 30))
    box, frac = _ellipse(shape, can_cy + 20 * px, cx, 12 * px, 3.5 * px, edge=1.0)
    _paint(hu, box, frac, bone)
    for side in (-1, 1):
        box, frac = _segment(shape, can_cy, cx + side * 8 * px, can_cy + 4 * px, cx + side * 30 * px, 4 * px, 3 * px)
        _paint(hu, box, frac, bone)

    # sternum
    box, frac = _ellipse(shape, ccy - cry - u(2, 8) * px, cx, u(5, 8) * px, u(10, 18) * px, edge=1.0)
    _paint(hu, box, frac, u(300, 500))

    # ribs around the cavity (tangential ellipses, cortical shell and marrow)
    n_ribs = int(rng.integers(8, 14))
    for t in rng.uniform(0, 2 * np.pi, size=n_ribs):
        if abs(np.sin(t)) > 0.85 and np.sin(t) < 0:  # fewer ribs right at the front (cartilage)
            continue
        rr = u(1.0, 1.08)
        ry_, rx_ = cry * rr + 6 * px, crx * rr + 6 * px
        pcy, pcx = ccy + ry_ * np.sin(t), cx + rx_ * np.cos(t)
        ang = np.arctan2(ry_ * np.cos(t), -rx_ * np.sin(t))  # tangent direction
        length, width = u(8, 18) * px, u(3.5, 5) * px
        box, frac = _ellipse(shape, pcy, pcx, width, length, ang, edge=1.0)
        _paint(hu, box, frac, u(500, 800))
        box, frac = _ellipse(shape, pcy, pcx, width - 1.5 * px, length - 1.5 * px, ang, edge=1.0)
        _paint(hu, box, frac, u(100, 250))

    # lung vessels: branching tubes from the hila, and cross-sections of through-plane vessels
    vessel_layer = np.zeros(shape, dtype=np.float32)
    for side in (-1, 1):
        hy, hx = ccy - cry * u(0.0, 0.15), cx + side * (mediastinum_rx + u(5, 20) * px)
        stack = []
        for _ in range(int(rng.integers(4, 8))):
            stack.append((hy, hx, (0.0 if side > 0 else np.pi) + u(-1.4, 1.4), u(1.6, 2.8) * px, 0))
        while stack:
            y0, x0, ang, r0, depth = stack.pop()
            length = u(10, 35) * px
            y1, x1 = y0 + length * np.sin(ang), x0 + length * np.cos(ang)
            r1 = max(0.4 * px, r0 * u(0.55, 0.8))
            box, frac = _segment(shape, y0, x0, y1, x1, r0, r1)
            vessel_layer[box] = np.maximum(vessel_layer[box], frac)
            if depth < 4 and r1 > 0.6 * px:
                for _ in range(int(rng.integers(1, 3))):
                    stack.append((y1, x1, ang + u(-0.6, 0.6), r1, depth + 1))
    lung_points = np.argwhere(lung[::4, ::4] > 0.99) * 4
    if len(lung_points):
        n_dots = int(rng.integers(25, 80))
        for idx in rng.integers(0, len(lung_points), size=n_dots):
            py, pxx = lung_points[idx] + rng.uniform(0, 4, size=2)
            central = 1.0 - min(1.0, abs(pxx - cx) / max(crx, 1.0))
            r = (u(0.6, 1.6) + u(0, 1.6) * central) * px
            box, frac = _ellipse(shape, py, pxx, r, r * u(1.0, 1.8), u(0, np.pi), edge=1.0)
            vessel_layer[box] = np.maximum(vessel_layer[box], frac)
    vessel_layer *= lung
    hu += vessel_layer * (np.float32(blood if blood < 100 else u(60, 150)) - hu)

    # nodules
    mask = np.zeros(shape, dtype=bool)
    placed: list[tuple[float, float, float]] = []
    inside = lung > 0.99
    for _ in range(nodules):
        radius_mm = u(2.0, 15.0)
        for attempt in range(60):
            r = radius_mm * mm * (1.0 if attempt < 30 else 0.6)
            pts = np.argwhere(inside[::2, ::2]) * 2
            if not len(pts):
                break
            ny, nx = pts[rng.integers(0, len(pts))] + rng.uniform(0, 2, size=2)
            ring = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            ry_ = np.clip(np.round(ny + (r + 3) * np.sin(ring)).astype(int), 0, size - 1)
            rx_ = np.clip(np.round(nx + (r + 3) * np.cos(ring)).astype(int), 0, size - 1)
            if not inside[ry_, rx_].all():
                continue
            if any(np.hypot(ny - py, nx - pxx) < r + pr + 4 * px for py, pxx, pr in placed):
                continue
            placed.append((ny, nx, r))
            elong = u(0.75, 1.0)
            lob = tuple((k, u(-0.04, 0.04), u(0, 2 * np.pi)) for k in (3, 5))
            ang = u(0, np.pi)
            box, frac = _ellipse(shape, ny, nx, r * elong, r, ang, harmonics=lob, edge=1.0)
            # partial volume: the sphere is thinner than the slice towards its edge
            box_pv, frac_pv = _ellipse(shape, ny, nx, r * elong, r, ang, harmonics=lob, edge=max(1.0, r * u(0.3, 0.6)))
            _paint(hu, box_pv, frac_pv, u(-100.0, 100.0))
            mask[box] |= frac >= 0.5
            break

    hu = _blur(hu, u(0.5, 0.9) * px)
    noise = _blur(rng.normal(0.0, 1.0, size=shape).astype(np.float32), 0.7 * px)
    noise *= np.float32(u(10.0, 30.0) / max(float(noise.std()), 1e-6))
    hu += noise
    return hu.astype(np.float32, copy=False), mask
