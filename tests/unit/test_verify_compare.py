from __future__ import annotations

from pathlib import Path

import numpy as np
from tinymodels import write_model

from edged.inference.repository import load_model
from edged.inference.tools import TOLERANCE, compare


def test_classification_within_and_beyond_tolerance(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path))
    ref = {"logit": np.array([[0.0], [2.0], [-3.0]], np.float32)}
    close = {"logit": ref["logit"] + 1e-6}
    far = {"logit": ref["logit"] + np.array([[0.0], [0.0], [1.0]], np.float32)}
    assert all(c.ok for c in compare(spec, close, ref, "fp32"))
    bad = compare(spec, far, ref, "fp32")
    assert not bad[0].ok and bad[0].value > TOLERANCE["fp32"]["max_abs_prob"]


def test_segmentation_uses_dice(tmp_path: Path) -> None:
    spec = load_model(write_model(tmp_path, "tiny-seg", task="segmentation"))
    ref = np.full((2, 1, 32, 32), -5.0, np.float32)
    ref[:, :, 8:24, 8:24] = 5.0
    same = compare(spec, {"mask_logit": ref.copy()}, {"mask_logit": ref}, "int8")
    assert same[0].ok and same[0].value == 1.0
    shifted = np.roll(ref, 6, axis=3)
    worse = compare(spec, {"mask_logit": shifted}, {"mask_logit": ref}, "int8")
    assert not worse[0].ok and worse[0].metric == "min Dice"
