from __future__ import annotations

import random

import numpy as np

from edged.pipeline.assembler import Geometry, SliceInfo, assemble

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def sl(uid: str, z: float, arrival: int, acq: int | None = 1, inum: int | None = None,
       orientation: tuple = AXIAL) -> SliceInfo:
    return SliceInfo(uid, arrival, Geometry((-100.0, -100.0, z), orientation, (0.5, 0.5), 512, 512), inum, acq)


def test_orders_by_position_along_the_normal_not_instance_number() -> None:
    # InstanceNumber runs the other way from the positions (feet-first numbering).
    slices = [sl(f"u{i}", z=-float(i) * 2.5, arrival=i, inum=i + 1) for i in range(10)]
    random.Random(7).shuffle(slices)
    vol = assemble(slices)
    assert [s.sop_instance_uid for s in vol.slices] == [f"u{i}" for i in reversed(range(10))]
    assert vol.slice_spacing == 2.5


def test_oblique_orientation_uses_the_normal() -> None:
    c, s_ = np.cos(0.3), np.sin(0.3)
    ori = (1.0, 0.0, 0.0, 0.0, c, s_)
    normal = np.cross(ori[:3], ori[3:])
    slices = [SliceInfo(f"u{i}", i, Geometry(tuple(float(v) for v in normal * i * 3.0), ori, (1.0, 1.0), 64, 64))
              for i in (3, 0, 2, 1)]
    vol = assemble(slices)
    assert [s.sop_instance_uid for s in vol.slices] == ["u0", "u1", "u2", "u3"]
    assert abs(vol.slice_spacing - 3.0) < 1e-9


def test_duplicates_keep_higher_acquisition_then_later_arrival() -> None:
    slices = [sl("a", 0.0, 0, acq=1), sl("b", 1.0, 1, acq=1), sl("b-rescan", 1.0, 2, acq=2),
              sl("c", 2.0, 3, acq=1), sl("c-resent-later", 2.0, 4, acq=1), sl("c-older-acq", 2.0, 5, acq=0)]
    vol = assemble(slices)
    assert [s.sop_instance_uid for s in vol.slices] == ["a", "b-rescan", "c-resent-later"]
    assert sorted(vol.dropped_duplicates) == ["b", "c", "c-older-acq"]
    # Same answer whatever the arrival order of the list itself.
    assert [s.sop_instance_uid for s in assemble(list(reversed(slices))).slices] == ["a", "b-rescan", "c-resent-later"]


def test_without_geometry_falls_back_to_instance_number() -> None:
    slices = [SliceInfo(f"u{i}", 10 - i, Geometry(None, None, None, 8, 8), instance_number=i) for i in (2, 0, 1)]
    vol = assemble(slices)
    assert vol.ordered_by == "instance_number"
    assert [s.sop_instance_uid for s in vol.slices] == ["u0", "u1", "u2"]
    assert vol.slice_spacing is None


def test_to_patient_follows_dicom_geometry() -> None:
    g = Geometry((10.0, 20.0, 30.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (2.0, 0.5), 4, 4)
    # column index moves along the row cosine with column spacing (0.5); row index along column cosine (2.0)
    assert g.to_patient(row=3, column=4) == (10.0, 22.0, 24.0)
