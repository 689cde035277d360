"""Train the two demo engines on synthetic chest CT phantoms and export them to ONNX.

    .venv-train/bin/python engines/train_demo_models.py            # both models
    .venv-train/bin/python engines/train_demo_models.py --only cls # ct-nodule-cls only

Writes ``engines/ct-nodule-cls/model.onnx`` (nodule present: one logit) and
``engines/lesion-seg/model.onnx`` (nodule mask: logits per pixel). Needs torch (a separate venv,
.venv-train); edged itself never imports this file and runs the ONNX files with onnxruntime.

Data: 512x512 phantoms from :func:`edged.synthetic.chest_phantom` (500 mm field of view), stored as
16-bit values (HU + 1024, Rescale Intercept -1024), then turned into model inputs by edged's own
:func:`edged.pipeline.preprocess.prepare_slice` (lung window -600/1500, 2x2 averaging to 256x256) so
training sees exactly the numbers inference sees. Train / validation / held-out test sets come from
disjoint seeds; the validation set picks the epoch, the test set is only used for the final metrics.

Reproducible: fixed seeds, CPU only, 2 threads, deterministic torch algorithms.

DEMONSTRATION MODELS trained on synthetic phantoms: NOT for diagnosis.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.pipeline.preprocess import PreprocessSpec, prepare_slice, resize  # noqa: E402
from edged.synthetic import FOV_MM, chest_phantom, hu_to_stored  # noqa: E402

SEED = 20260101
MATRIX = 512  # phantoms are generated like a scanner's slices, 512x512
SPEC = PreprocessSpec(size=(256, 256), window=(-600.0, 1500.0))
SLOPE, INTERCEPT = 1.0, -1024.0
SPLITS = {"train": 0, "val": 1, "test": 2}
OPSET = 17


# ------------------------------------------------------------------------------------------ data


def make_sample(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One phantom -> (model input float32 (256, 256), nodule mask bool (256, 256))."""
    split, index = args
    rng = np.random.default_rng([SEED, split, index])
    # half the slices without a nodule, the other half with 1..3
    count = 0 if rng.random() < 0.5 else int(rng.integers(1, 4))
    hu, mask = chest_phantom(rng, size=MATRIX, nodules=count)
    stored = hu_to_stored(hu)  # what a CT series on disk holds
    spacing = (FOV_MM / MATRIX, FOV_MM / MATRIX)
    x = prepare_slice(stored, SPEC, slope=SLOPE, intercept=INTERCEPT, pixel_spacing=spacing)
    # the target goes through the same resampling as the image (2x2 averaging), then >= half
    target = resize(mask.astype(np.float32), SPEC.size) >= 0.5
    return x, target


def make_split(name: str, count: int, workers: int, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    path = cache / f"{name}-{count}.npz" if cache else None
    if path is not None and path.exists():
        data = np.load(path)
        return data["x"], data["y"]
    t0 = time.perf_counter()
    jobs = [(SPLITS[name], i) for i in range(count)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            samples = pool.map(make_sample, jobs, chunksize=16)
    else:
        samples = [make_sample(j) for j in jobs]
    x = np.stack([s[0] for s in samples])[:, None]  # (n, 1, 256, 256) float32
    y = np.stack([s[1] for s in samples])[:, None]  # (n, 1, 256, 256) bool
    print(f"  {name}: {count} phantoms in {time.perf_counter() - t0:.0f} s, "
          f"{int(y.reshape(count, -1).any(1).sum())} with nodules", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x, y=y)
    return x, y


# --------------------------------------------------------------------------------------- metrics


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half), numpy only."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def dice_stats(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice over the whole set, mean per-image Dice on images with nodules, false-positive images."""
    n = len(pred)
    p, t = pred.reshape(n, -1), truth.reshape(n, -1)
    inter = (p & t).sum(1).astype(np.float64)
    ps, ts = p.sum(1).astype(np.float64), t.sum(1).astype(np.float64)
    positive = ts > 0
    per_image = 2 * inter[positive] / np.maximum(ps[positive] + ts[positive], 1)
    return {
        "dice": float(2 * inter.sum() / max(ps.sum() + ts.sum(), 1)),
        "mean_dice_pos": float(per_image.mean()) if positive.any() else float("nan"),
        "fp_image_rate": float((ps[~positive] > 0).mean()) if (~positive).any() else float("nan"),
        "n": n,
        "n_pos": int(positive.sum()),
    }


# ---------------------------------------------------------------------------------------- models


def build_models():
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class NoduleClassifier(nn.Module):
        """Plain CNN, 256 -> 16 by strided convolutions; global max + mean pooling; one logit."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                cbr(1, 16, 2),              # 128
                cbr(16, 24, 2), cbr(24, 24),  # 64
                cbr(24, 32, 2), cbr(32, 32),  # 32
                cbr(32, 48, 2), cbr(48, 48),  # 16
            )
            self.head = nn.Linear(96, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            pooled = torch.cat([torch.amax(f, dim=(2, 3)), torch.mean(f, dim=(2, 3))], dim=1)
            return self.head(pooled)

    class UNet(nn.Module):
        """3-level U-Net (8, 16, 32 channels), transposed-conv upsampling, concatenated skips."""

        def __init__(self, ch: tuple[int, int, int] = (8, 16, 32)) -> None:
            super().__init__()
            c1, c2, c3 = ch
            self.enc1 = nn.Sequential(cbr(1, c1), cbr(c1, c1))
            self.enc2 = nn.Sequential(cbr(c1, c2), cbr(c2, c2))
            self.bott = nn.Sequential(cbr(c2, c3), cbr(c3, c3))
            self.pool = nn.MaxPool2d(2)
            self.up2 = nn.ConvTranspose2d(c3, c2, 2, 2)
            self.dec2 = cbr(2 * c2, c2)
            self.up1 = nn.ConvTranspose2d(c2, c1, 2, 2)
            self.dec1 = cbr(2 * c1, c1)
            self.out = nn.Conv2d(c1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e1 = self.enc1(x)
            e2 = self.enc2(self.pool(e1))
            b = self.bott(self.pool(e2))
            d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
            d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
            return self.out(d1)

    return NoduleClassifier, UNet


def predict(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch])).numpy())
    return np.concatenate(out)


# -------------------------------------------------------------------------------------- training


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def train_classifier(data: dict, epochs: int, batch: int, lr: float):
    import torch
    from torch import nn

    NoduleClassifier, _ = build_models()
    torch.manual_seed(SEED)
    model = NoduleClassifier()
    x_tr, y_tr = data["train"]
    labels_tr = y_tr.reshape(len(y_tr), -1).any(1).astype(np.float32)
    x_va, y_va = data["val"]
    labels_va = y_va.reshape(len(y_va), -1).any(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng([SEED, 10])
    steps = epochs * (len(x_tr) // batch)
    step, best = 0, (-1.0, None, -1)
    for epoch in range(epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        order = rng.permutation(len(x_tr))
        for b in range(len(x_tr) // batch):
            idx = np.sort(order[b * batch:(b + 1) * batch])
            xb = x_tr[idx].copy()
            flip = rng.random(len(idx)) < 0.5  # left-right mirror
            xb[flip] = xb[flip][..., ::-1]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, lr, warmup=len(x_tr) // batch)
            logits = model(torch.from_numpy(xb))
            loss = loss_fn(logits[:, 0], torch.from_numpy(labels_tr[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            step += 1
        auc = roc_auc(labels_va, predict(model, x_va)[:, 0])
        print(f"  cls epoch {epoch + 1}/{epochs}: loss {total / ((len(x_tr) // batch) * batch):.4f} "
              f"val AUC {auc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if auc > best[0]:
            best = (auc, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
    model.load_state_dict(best[1])
    print(f"  cls: best validation AUC {best[0]:.4f} at epoch {best[2]}", flush=True)
    return model.eval()


def random_crops(x, y, idx, crop, rng, p_lesion=0.7):
    """Training crops for the fully convolutional U-Net; most of them around a nodule."""
    size = x.shape[-1]
    xs, ys = [], []
    for i in idx:
        pts = np.argwhere(y[i, 0])
        if len(pts) and rng.random() < p_lesion:
            cy, cx = pts[rng.integers(len(pts))] + rng.integers(-crop // 3, crop // 3 + 1, size=2)
        else:
            cy, cx = rng.integers(crop // 2, size - crop // 2 + 1, size=2)
        y0 = int(np.clip(cy - crop // 2, 0, size - crop))
        x0 = int(np.clip(cx - crop // 2, 0, size - crop))
        xc, yc = x[i, :, y0:y0 + crop, x0:x0 + crop], y[i, :, y0:y0 + crop, x0:x0 + crop]
        if rng.random() < 0.5:
            xc, yc = xc[..., ::-1], yc[..., ::-1]
        xs.append(xc)
        ys.append(yc)
    return np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(ys)).astype(np.float32)


def train_segmenter(data: dict, epochs: int, batch: int, lr: float, crop: int, per_epoch: int):
    import torch
    import torch.nn.functional as F

    _, UNet = build_models()
    torch.manual_seed(SEED + 1)
    model = UNet()
    x_tr, y_tr = data["train"]
    x_va, y_va = data["val"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng([SEED, 20])
    per_epoch = min(per_epoch, len(x_tr) // batch)
    steps = epochs * per_epoch
    step, best = 0, (-1.0, None, -1)
    for epoch in range(epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        order = rng.permutation(len(x_tr))
        for b in range(per_epoch):
            xb, yb = random_crops(x_tr, y_tr, order[b * batch:(b + 1) * batch], crop, rng)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, lr, warmup=per_epoch)
            logits = model(torch.from_numpy(xb))
            target = torch.from_numpy(yb)
            prob = torch.sigmoid(logits)
            soft_dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, target) + soft_dice
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            step += 1
        stats = dice_stats(predict(model, x_va, 16) > 0.0, y_va)
        print(f"  seg epoch {epoch + 1}/{epochs}: loss {total / per_epoch:.4f} val Dice {stats['dice']:.4f} "
              f"(per image {stats['mean_dice_pos']:.4f}, FP images {stats['fp_image_rate']:.3f}) "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if stats["dice"] > best[0]:
            best = (stats["dice"], {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
    model.load_state_dict(best[1])
    print(f"  seg: best validation Dice {best[0]:.4f} at epoch {best[2]}", flush=True)
    return model.eval()


# ---------------------------------------------------------------------------------------- export


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def export_onnx(model, path: Path, output_name: str, x_check: np.ndarray, description: str) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    dummy = torch.from_numpy(x_check[:1])
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
        input_names=["image"], output_names=[output_name],
        dynamic_axes={"image": {0: "batch"}, output_name: {0: "batch"}},
    )
    proto = onnx.load(str(path))
    proto.doc_string = description
    proto.producer_name = "edged engines/train_demo_models.py"
    for key, value in {
        "warning": "Demonstration model trained on synthetic phantoms. NOT for diagnosis.",
        "preprocess": "stored pixels * RescaleSlope + RescaleIntercept (HU); window center -600 width 1500 "
                      "(DICOM linear) -> [0, 1]; 512 -> 256 by 2x2 averaging; no further normalisation",
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for n in (1, 4):
        xb = np.ascontiguousarray(x_check[:n])
        with torch.no_grad():
            want = model(torch.from_numpy(xb)).numpy()
        got = session.run([output_name], {"image": xb})[0]
        diff = float(np.abs(got - want).max())
        print(f"  {_show(path)}: batch {n} output {got.shape}, max |onnx - torch| = {diff:.2e}", flush=True)
        if got.shape != want.shape or not diff < 1e-4:
            raise SystemExit(f"ONNX output differs from torch for batch {n}: {diff}")
    print(f"  {_show(path)}: {path.stat().st_size / 1e6:.3f} MB", flush=True)


def onnx_predict(path: Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_outputs()[0].name
    return np.concatenate([session.run([name], {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def benchmark(path: Path, x: np.ndarray, seconds: float = 5.0) -> dict[int, float]:
    """onnxruntime CPU throughput (images/s) with 2 intra-op threads at batch 1 and 16."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_outputs()[0].name
    result = {}
    for n in (1, 16):
        xb = np.ascontiguousarray(x[:n])
        for _ in range(3):
            session.run([name], {"image": xb})
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            session.run([name], {"image": xb})
            runs += 1
        result[n] = runs * n / (time.perf_counter() - t0)
    return result


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["cls", "seg"], help="train one model only")
    parser.add_argument("--train", type=int, default=4000, help="training phantoms (default 4000)")
    parser.add_argument("--val", type=int, default=500, help="validation phantoms (default 500)")
    parser.add_argument("--test", type=int, default=1000, help="held-out test phantoms (default 1000)")
    parser.add_argument("--cls-epochs", type=int, default=12)
    parser.add_argument("--seg-epochs", type=int, default=12)
    parser.add_argument("--seg-steps", type=int, default=160, help="U-Net batches (16 crops of 96x96) per epoch")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    parser.add_argument("--cache", type=Path, help="folder to keep the generated sets in (reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "engines", help="model repository")
    parser.add_argument("--no-bench", action="store_true", help="skip the onnxruntime speed measurement")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    start = time.perf_counter()

    print(f"generating phantoms ({MATRIX}x{MATRIX}, prepared to {SPEC.size[0]}x{SPEC.size[1]}) ...", flush=True)
    data = {
        name: make_split(name, count, args.workers, args.cache)
        for name, count in (("train", args.train), ("val", args.val), ("test", args.test))
    }
    x_te, y_te = data["test"]
    labels_te = y_te.reshape(len(y_te), -1).any(1)
    print(f"data ready after {time.perf_counter() - start:.0f} s", flush=True)

    if args.only in (None, "cls"):
        t0 = time.perf_counter()
        print("training ct-nodule-cls ...", flush=True)
        model = train_classifier(data, args.cls_epochs, batch=32, lr=3e-3)
        train_s = time.perf_counter() - t0
        path = args.out / "ct-nodule-cls" / "model.onnx"
        export_onnx(model, path, "logit", x_te, "ct-nodule-cls: lung nodule present on an axial chest CT "
                    "slice (1 raw logit). Demonstration model trained on synthetic phantoms, NOT for diagnosis.")
        scores = onnx_predict(path, x_te)[:, 0]
        auc = roc_auc(labels_te, scores)
        pred = scores > 0.0
        sens, spec = pred[labels_te].mean(), (~pred[~labels_te]).mean()
        print(f"ct-nodule-cls held-out test (ONNX): AUC {auc:.4f} on {len(labels_te)} slices "
              f"({int(labels_te.sum())} with nodules); at p=0.5 sensitivity {sens:.3f} specificity {spec:.3f} "
              f"accuracy {(pred == labels_te).mean():.3f}; training {train_s / 60:.1f} min", flush=True)
        # sensitivity by size: equivalent diameter of the slice's nodule area (all its nodules)
        area_mm2 = y_te.reshape(len(y_te), -1).sum(1) * (FOV_MM / SPEC.size[0]) * (FOV_MM / SPEC.size[1])
        diameter = 2 * np.sqrt(area_mm2 / np.pi)
        parts = []
        for lo, hi in ((0, 6), (6, 10), (10, 1000)):
            sel = labels_te & (diameter >= lo) & (diameter < hi)
            parts.append(f"{lo}-{hi if hi < 1000 else ''} mm: {pred[sel].mean():.3f} (n={int(sel.sum())})")
        print("  sensitivity by nodule size (equivalent diameter): " + ", ".join(parts), flush=True)
        if not args.no_bench:
            speed = benchmark(path, x_te)
            print(f"ct-nodule-cls onnxruntime CPU (2 threads): {speed[1]:.0f} images/s at batch 1, "
                  f"{speed[16]:.0f} images/s at batch 16", flush=True)

    if args.only in (None, "seg"):
        t0 = time.perf_counter()
        print("training lesion-seg ...", flush=True)
        model = train_segmenter(data, args.seg_epochs, batch=16, lr=3e-3, crop=96, per_epoch=args.seg_steps)
        train_s = time.perf_counter() - t0
        path = args.out / "lesion-seg" / "model.onnx"
        export_onnx(model, path, "mask_logit", x_te, "lesion-seg: lung nodule mask on an axial chest CT slice "
                    "(raw logits per pixel). Demonstration model trained on synthetic phantoms, NOT for diagnosis.")
        stats = dice_stats(onnx_predict(path, x_te) > 0.0, y_te)
        print(f"lesion-seg held-out test (ONNX, p>0.5): Dice {stats['dice']:.4f} over {stats['n']} slices "
              f"({stats['n_pos']} with nodules); mean per-slice Dice on slices with nodules "
              f"{stats['mean_dice_pos']:.4f}; slices without nodules given any mask pixel "
              f"{stats['fp_image_rate']:.3f}; training {train_s / 60:.1f} min", flush=True)
        if not args.no_bench:
            speed = benchmark(path, x_te)
            print(f"lesion-seg onnxruntime CPU (2 threads): {speed[1]:.1f} images/s at batch 1, "
                  f"{speed[16]:.1f} images/s at batch 16", flush=True)

    print(f"total {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
