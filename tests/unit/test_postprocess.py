from __future__ import annotations

import numpy as np

from edged.inference.repository import Code, Label
from edged.pipeline.assembler import Geometry
from edged.pipeline.postprocess import activate, classify, dice, segment

NODULE = Label("nodule", Code("27925004", "SCT", "Nodule"), Code("49755003", "SCT", "Morph"), 0.5, 0)


def test_classification_threshold_and_probability() -> None:
    logits = np.array([[-2.0], [0.0], [3.0]], np.float32)
    (f,) = classify(logits[2:], "sigmoid", [NODULE])
    assert f.present and abs(f.probability - 1 / (1 + np.exp(-3))) < 1e-6
    (g,) = classify(logits[:1], "sigmoid", [NODULE])
    assert not g.present and g.probability < 0.5
    (multi,) = classify(logits, "sigmoid", [NODULE])  # frames: the highest counts
    assert multi.measurements["plane"] == 2


def test_softmax_sums_to_one() -> None:
    p = activate(np.array([[1.0, 2.0, 3.0]]), "softmax")
    assert abs(float(p.sum()) - 1.0) < 1e-6


def test_segmentation_area_bbox_centroid_at_source_resolution() -> None:
    geom = Geometry((-100.0, -50.0, 7.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.5, 0.5), 8, 8)
    logits = np.full((1, 1, 4, 4), -10.0, np.float32)  # model runs at half resolution
    logits[0, 0, 1, 2] = 10.0
    (f,) = segment(logits, "sigmoid", [NODULE], [geom], None)
    assert f.present and f.mask.shape == (1, 8, 8)
    assert f.mask.sum() == 4  # one model pixel = 2x2 source pixels
    assert f.measurements["area_mm2"] == 4 * 0.25
    assert f.measurements["bbox"] == {"planes": [0, 0], "rows": [2, 3], "columns": [4, 5]}
    # centre of rows 2..3 and columns 4..5 = (2.5, 4.5) -> x = -100 + 4.5 * 0.5, y = -50 + 2.5 * 0.5
    assert f.measurements["centroid_mm"] == [-97.75, -48.75, 7.0]


def test_segmentation_volume_over_slices() -> None:
    geoms = [Geometry((0.0, 0.0, float(z)), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (1.0, 1.0), 4, 4) for z in (0, 2, 4)]
    logits = np.full((3, 1, 4, 4), -10.0, np.float32)
    logits[0:2, 0, 0, 0] = 10.0
    (f,) = segment(logits, "sigmoid", [NODULE], geoms, 2.0)
    assert f.measurements["volume_mm3"] == 2 * 1.0 * 2.0
    assert f.measurements["centroid_mm"] == [0.0, 0.0, 1.0]


def test_empty_mask_is_absent() -> None:
    geom = Geometry(None, None, None, 4, 4)
    (f,) = segment(np.full((1, 1, 4, 4), -5.0, np.float32), "sigmoid", [NODULE], [geom], None)
    assert not f.present and "bbox" not in f.measurements


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_non_finite_outputs_are_refused_not_recorded() -> None:
    # Found by the fuzz test: a NaN probability made the journal's findings insert fail (NOT NULL),
    # which sank the writer's whole batch and left its jobs running until their lease ran out.
    import pytest

    with pytest.raises(ValueError, match="finite"):
        classify(np.array([[np.nan]], dtype=np.float32), "sigmoid", [NODULE])
    geometry = Geometry(None, None, None, 4, 4)
    with pytest.raises(ValueError, match="finite"):
        segment(np.full((1, 1, 4, 4), np.nan, dtype=np.float32), "sigmoid", [NODULE], [geometry], None)


def test_segmentation_measurements_match_a_pixel_by_pixel_count() -> None:
    """Bounding box, pixel count, probability and centroid equal a brute-force computation over every
    mask pixel, for a multi-plane volume upsampled by a non-integer factor (64 -> 100)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(-4.0, 1.0, size=(6, 1, 64, 64)).astype(np.float32)
    logits[1:4, 0, 10:20, 30:41] += 8.0
    geoms = [Geometry((-120.0, -90.0, 10.0 + 2.0 * i), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.8, 0.6), 100, 100)
             for i in range(6)]
    (f,) = segment(logits, "sigmoid", [NODULE], geoms, 2.0)
    probs = activate(logits, "sigmoid")[:, 0]
    ri, ci = (np.arange(100) * 64) // 100, (np.arange(100) * 64) // 100
    up = probs[:, ri][:, :, ci]
    mask = up >= 0.5
    assert np.array_equal(f.mask, mask)
    s, r, c = np.nonzero(mask)
    assert f.measurements["pixels"] == len(s)
    assert f.measurements["bbox"] == {"planes": [s.min(), s.max()], "rows": [r.min(), r.max()],
                                      "columns": [c.min(), c.max()]}
    assert f.probability == float(up[mask].max())
    assert abs(f.measurements["volume_mm3"] - len(s) * 0.8 * 0.6 * 2.0) < 1e-9
    points = np.array([geoms[k].to_patient(r[s == k].mean(), c[s == k].mean()) for k in np.unique(s)])
    expected = np.average(points, axis=0, weights=[np.sum(s == k) for k in np.unique(s)])
    np.testing.assert_allclose(f.measurements["centroid_mm"], expected, atol=1e-3)
