"""Series assembly: from a series' instances to an ordered volume of slices. Pure; no I/O.

Slices are ordered along the slice normal (ImageOrientationPatient row x column cosines) by the
projection of ImagePositionPatient on it, never by InstanceNumber. Slices at the same position are
duplicates: one is kept, deterministically (higher AcquisitionNumber, then the later arrival).
Instances without geometry fall back to InstanceNumber, then arrival order. A multi-frame instance is
a volume of its own: its frames are its slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Positions closer than this (mm) along the normal are the same slice.
SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Where one plane's pixels are in the patient (PS3.3 C.7.6.2): top-left position, direction
    cosines of rows and columns, and spacing (mm between rows, mm between columns)."""

    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None
    rows: int
    columns: int

    def normal(self) -> np.ndarray | None:
        if self.orientation is None or len(self.orientation) != 6:
            return None
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        n = np.cross(row, col)
        norm = np.linalg.norm(n)
        return n / norm if norm > 0 else None

    def to_patient(self, row: float, column: float) -> tuple[float, float, float] | None:
        """Patient coordinates (mm) of a (row, column) pixel position, or None without geometry."""
        if self.position is None or self.orientation is None or self.spacing is None:
            return None
        o = np.array(self.orientation, dtype=np.float64)
        p = (np.array(self.position, dtype=np.float64) + o[:3] * self.spacing[1] * column
             + o[3:] * self.spacing[0] * row)
        return (float(p[0]), float(p[1]), float(p[2]))


@dataclass(frozen=True)
class SliceInfo:
    """One candidate slice: which instance (and frame) it is, with what the ordering needs."""

    sop_instance_uid: str
    arrival: int
    geometry: Geometry
    instance_number: int | None = None
    acquisition_number: int | None = None
    frame: int = 0


@dataclass
class Volume:
    """The assembled series: slices in order along the normal, and what was left out."""

    slices: list[SliceInfo]
    dropped_duplicates: list[str] = field(default_factory=list)
    ordered_by: str = "position"

    @property
    def slice_spacing(self) -> float | None:
        """Median distance (mm) between neighbouring slices along the normal."""
        if len(self.slices) < 2 or self.ordered_by != "position":
            return None
        n = self.slices[0].geometry.normal()
        if n is None:
            return None
        pos = [float(np.dot(s.geometry.position, n)) for s in self.slices if s.geometry.position is not None]
        return float(np.median(np.abs(np.diff(pos)))) if len(pos) >= 2 else None


def assemble(slices: list[SliceInfo]) -> Volume:
    """Order and de-duplicate a series' slices (see the module docstring)."""
    if not slices:
        return Volume([])
    normal = slices[0].geometry.normal()
    if normal is None or any(s.geometry.position is None or s.geometry.normal() is None for s in slices):
        ordered = sorted(slices, key=lambda s: (s.instance_number is None, s.instance_number or 0, s.arrival, s.frame))
        return Volume(ordered, ordered_by="instance_number")
    keyed = sorted(((float(np.dot(s.geometry.position, normal)), s) for s in slices), key=lambda t: t[0])
    kept: list[tuple[float, SliceInfo]] = []
    dropped: list[str] = []
    for pos, s in keyed:
        if kept and abs(pos - kept[-1][0]) < SAME_POSITION_MM:
            prev = kept[-1][1]
            better = ((s.acquisition_number or 0), s.arrival) > ((prev.acquisition_number or 0), prev.arrival)
            if better:
                dropped.append(prev.sop_instance_uid)
                kept[-1] = (pos, s)
            else:
                dropped.append(s.sop_instance_uid)
        else:
            kept.append((pos, s))
    return Volume([s for _, s in kept], dropped)


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def slice_infos(ds: object, arrival: int) -> list[SliceInfo]:
    """The slices of one decoded instance header (one, or one per frame of a multi-frame image)."""
    g = getattr
    rows, cols = int(g(ds, "Rows", 0) or 0), int(g(ds, "Columns", 0) or 0)
    uid = str(g(ds, "SOPInstanceUID", ""))
    inum, anum = _int_or_none(g(ds, "InstanceNumber", None)), _int_or_none(g(ds, "AcquisitionNumber", None))
    frames = int(g(ds, "NumberOfFrames", 1) or 1)
    if frames <= 1:
        geom = Geometry(_floats(g(ds, "ImagePositionPatient", None), 3), _floats(g(ds, "ImageOrientationPatient", None), 6),
                        _floats(g(ds, "PixelSpacing", None), 2), rows, cols)  # type: ignore[arg-type]
        return [SliceInfo(uid, arrival, geom, inum, anum)]
    shared = g(ds, "SharedFunctionalGroupsSequence", None)
    shared0 = shared[0] if shared else None
    per_frame = g(ds, "PerFrameFunctionalGroupsSequence", None) or []

    def item(group: object, seq: str, attr: str, n: int) -> tuple[float, ...] | None:
        s = g(group, seq, None) if group is not None else None
        return _floats(g(s[0], attr, None), n) if s else None

    out = []
    for f in range(frames):
        fg = per_frame[f] if f < len(per_frame) else None
        pos = item(fg, "PlanePositionSequence", "ImagePositionPatient", 3)
        ori = item(fg, "PlaneOrientationSequence", "ImageOrientationPatient", 6) or \
            item(shared0, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        sp = item(fg, "PixelMeasuresSequence", "PixelSpacing", 2) or item(shared0, "PixelMeasuresSequence", "PixelSpacing", 2)
        out.append(SliceInfo(uid, arrival, Geometry(pos, ori, sp, rows, cols), inum, anum, frame=f))  # type: ignore[arg-type]
    return out
