"""Postprocessing: pure numpy functions from output tensors to probabilities and findings. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.inference.repository import Label
from edged.pipeline.assembler import Geometry


def activate(values: np.ndarray, activation: str, class_axis: int = 1) -> np.ndarray:
    """Raw outputs to probabilities: ``sigmoid``, ``softmax`` (over ``class_axis``) or ``none``."""
    x = values.astype(np.float32, copy=False)
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-np.clip(x, -88.0, 88.0)))).astype(np.float32)
    if activation == "softmax":
        shifted = x - x.max(axis=class_axis, keepdims=True)
        e = np.exp(shifted)
        return (e / e.sum(axis=class_axis, keepdims=True)).astype(np.float32)
    if activation == "none":
        return x
    raise ValueError(f"unknown activation {activation!r}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    a = a.astype(bool)
    b = b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass(frozen=True)
class Finding:
    """One label's result: present/absent with probability, and for segmentation the mask and measurements."""

    label: str
    present: bool
    probability: float
    measurements: dict[str, Any]
    mask: np.ndarray | None = None  # bool (slices, rows, columns) at source resolution


def _finite(probs: np.ndarray) -> np.ndarray:
    """Probabilities, refused with ValueError when any is NaN or infinite (a finding must have a number)."""
    if not np.isfinite(probs).all():
        raise ValueError("model output is not a finite number")
    return probs


def classify(outputs: np.ndarray, activation: str, labels: list[Label]) -> list[Finding]:
    """Classification outputs ``(planes, classes)`` to findings; over several planes (frames) the
    highest probability counts, and the plane it came from is noted."""
    probs = _finite(activate(outputs.reshape(outputs.shape[0], -1), activation))
    findings = []
    for label in labels:
        p = probs[:, label.channel]
        best = int(np.argmax(p))
        prob = float(p[best])
        findings.append(Finding(label.name, prob >= label.threshold, prob,
                                {"threshold": label.threshold, "plane": best}))
    return findings


def _upsample(mask: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Nearest-neighbour resize of (planes, h, w) masks to (planes, rows, columns)."""
    _, h, w = mask.shape
    if (h, w) == (rows, columns):
        return mask
    ri = (np.arange(rows) * h) // rows
    ci = (np.arange(columns) * w) // columns
    return mask[:, ri][:, :, ci]


def _max_under_mask(p: np.ndarray, low: np.ndarray, rows: int, columns: int) -> float:
    """The highest probability under the source-resolution mask: the nearest-neighbour upsampling only
    repeats model pixels, so it is the highest over the model pixels it uses that pass the threshold."""
    _, h, w = p.shape
    ri = np.unique((np.arange(rows) * h) // rows)
    ci = np.unique((np.arange(columns) * w) // columns)
    used = p[:, ri][:, :, ci]
    return float(used[low[:, ri][:, :, ci]].max())


def segment(outputs: np.ndarray, activation: str, labels: list[Label], geometries: list[Geometry],
            slice_spacing: float | None) -> list[Finding]:
    """Segmentation outputs ``(planes, classes, h, w)`` to masks at source resolution with measurements:
    area (mm², one plane) or volume (mm³, several planes, needs the slice spacing), bounding box in
    pixels, centroid in patient coordinates (mm)."""
    probs = _finite(activate(outputs, activation))
    g0 = geometries[0]
    rows, cols = g0.rows, g0.columns
    findings = []
    for label in labels:
        p = probs[:, label.channel]
        low = p >= label.threshold
        mask = _upsample(low, rows, cols)
        present = bool(low.any()) and bool(mask.any())
        prob = float(p.max()) if p.size else 0.0
        m: dict[str, Any] = {"threshold": label.threshold}
        # Per-plane row and column counts of the mask: area, bounding box and centroids from them in
        # integer arithmetic, without listing every mask pixel or upsampling the probabilities.
        per_row = mask.sum(axis=2, dtype=np.int64)  # (planes, rows)
        per_col = mask.sum(axis=1, dtype=np.int64)  # (planes, columns)
        per_plane = per_row.sum(axis=1)
        total = int(per_plane.sum())
        m["pixels"] = total
        if present:
            planes = np.flatnonzero(per_plane)
            rows_hit = np.flatnonzero(per_row.any(axis=0))
            cols_hit = np.flatnonzero(per_col.any(axis=0))
            m["bbox"] = {"planes": [int(planes[0]), int(planes[-1])], "rows": [int(rows_hit[0]), int(rows_hit[-1])],
                         "columns": [int(cols_hit[0]), int(cols_hit[-1])]}
            prob = _max_under_mask(p, low, rows, cols)
            spacing = g0.spacing
            if spacing is not None:
                pixel_mm2 = spacing[0] * spacing[1]
                if mask.shape[0] == 1:
                    m["area_mm2"] = float(total * pixel_mm2)
                elif slice_spacing:
                    m["volume_mm3"] = float(total * pixel_mm2 * slice_spacing)
            row_sums = per_row @ np.arange(rows, dtype=np.int64)
            col_sums = per_col @ np.arange(cols, dtype=np.int64)
            points, weights = [], []
            for s in planes:
                n = int(per_plane[s])
                pt = geometries[min(int(s), len(geometries) - 1)].to_patient(float(row_sums[s] / n),
                                                                              float(col_sums[s] / n))
                if pt is not None:
                    points.append(pt)
                    weights.append(n)
            if points and len(points) == len(planes):
                c = np.average(np.array(points), axis=0, weights=weights)
                m["centroid_mm"] = [round(float(v), 3) for v in c]
        findings.append(Finding(label.name, present, prob, m, mask))
    return findings
