"""``edged engines list | build | verify | bench``: what the CLI prints, over the inference modules."""

from __future__ import annotations

import argparse
import json
import sys
import time

from edged.config import Config
from edged.errors import EngineError
from edged.inference import precision as precision_mod
from edged.inference.build import PLAN_KIND, build_model
from edged.inference.cache import ArtifactCache
from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import Repository
from edged.inference.select import resolve_backend, start_engine
from edged.inference.tools import TOLERANCE, bench, compare, reference_batch, run_batches

EXIT_OK, EXIT_FAILURE = 0, 1


def _out(line: str) -> None:
    print(line, flush=True)


def _models(cfg: Config, names: list[str] | None = None) -> dict:
    return Repository(cfg.engines.dir).load(names or cfg.engines.models or None)


def cmd_list(cfg: Config, cache: ArtifactCache) -> int:
    backend, reason, plans = resolve_backend(cfg.engines.backend)
    _out(f"backend: {backend} ({reason})")
    _out(f"{'model':<20} {'version':<10} {'task':<15} {'level':<9} {'precision':<9} state")
    for name, spec in _models(cfg).items():
        prec = spec.tensorrt.precision
        if plans is not None:
            onnx = precision_mod.cached_onnx(spec, prec, cache)
            state = "missing" if onnx is None else cache.state(name, PLAN_KIND, plans.key(spec, onnx, prec))
            what = "plan"
        elif prec == "fp32":
            state, what = "built", "onnx"
        else:
            state = "built" if precision_mod.cached_onnx(spec, prec, cache) else cache.state(
                name, precision_mod.onnx_kind(prec), precision_mod.source_key(spec, prec), ignore=("calibration_sha256",))
            what = f"{prec} onnx"
        _out(f"{name:<20} {spec.version:<10} {spec.task:<15} {spec.level:<9} {prec:<9} {what} {state}")
    if plans is not None:
        plans.close()
    return EXIT_OK


def cmd_build(args: argparse.Namespace, cfg: Config, cache: ArtifactCache) -> int:
    backend, reason, plans = resolve_backend(cfg.engines.backend if cfg.engines.backend != "onnxruntime" else "auto")
    _out(f"TensorRT: {'yes, ' + reason if plans else 'no (' + reason.removeprefix('auto: ') + ')'}")
    try:
        for name, spec in _models(cfg, args.models).items():
            t0 = time.monotonic()
            result = build_model(spec, cache, precision=args.precision, calibration=args.calibration,
                                 force=args.force, plans=plans, progress=lambda m: _out(f"  {m} ..."))
            _out(f"{name}: {result.precision} {result.note}; onnx {result.onnx}"
                 + (f"; plan {result.plan}" if result.plan else "") + f" ({time.monotonic() - t0:.1f} s)")
    finally:
        if plans is not None:
            plans.close()
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, cfg: Config, cache: ArtifactCache) -> int:
    spec = _models(cfg, [args.model])[args.model]
    prec = args.precision or spec.tensorrt.precision
    backend, reason, plans = resolve_backend(cfg.engines.backend)
    x = reference_batch(spec, args.batch)
    with OnnxRuntimeEngine(spec, intra_op_threads=cfg.engines.intra_op_threads) as ref:
        expected = run_batches(ref, x)
    engine = start_engine(spec, backend, cache, cfg.engines, plans, precision=prec, triton=cfg.triton)
    try:
        got = run_batches(engine, x)
    finally:
        engine.deactivate()
        if plans is not None:
            plans.close()
    _out(f"{spec.name} {spec.version}: {backend} {prec} against onnxruntime fp32 (CPU), {len(x)} reference inputs")
    ok = True
    for c in compare(spec, got, expected, prec):
        ok &= c.ok
        op = "<=" if c.metric.startswith("max") else ">="
        _out(f"  {c.output}: {c.metric} = {c.value:.6g} (limit {op} {c.limit:g}) {'ok' if c.ok else 'MISMATCH'}")
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_bench(args: argparse.Namespace, cfg: Config, cache: ArtifactCache) -> int:
    spec = _models(cfg, [args.model])[args.model]
    prec = args.precision or spec.tensorrt.precision
    backend, reason, plans = resolve_backend(cfg.engines.backend)
    too_big = [b for b in args.batch if not 1 <= b <= spec.batching.max_batch]
    if too_big:
        raise EngineError(spec.name, f"batch sizes {too_big} outside 1..max_batch ({spec.batching.max_batch})")
    engine = start_engine(spec, backend, cache, cfg.engines, plans, precision=prec, triton=cfg.triton)
    try:
        if not args.json:
            _out(f"{spec.name} {spec.version} on {backend} ({reason}), {prec}; {args.seconds:g} s per batch size")
            _out(f"{'batch':>5} {'images/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'runs':>6}")
        for b in args.batch:
            r = bench(engine, b, args.seconds)
            if args.json:
                _out(json.dumps({"model": spec.name, "backend": backend, "precision": prec, "batch": b,
                                 "images_per_s": r.images_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                                 "runs": r.runs}))
            else:
                _out(f"{b:>5} {r.images_per_s:>10.1f} {r.p50_ms:>9.2f} {r.p99_ms:>9.2f} {r.runs:>6}")
    finally:
        engine.deactivate()
        if plans is not None:
            plans.close()
    return EXIT_OK


def cmd_export_triton(args: argparse.Namespace, cfg: Config, cache: ArtifactCache) -> int:
    from edged.inference.export import export_model

    for name, spec in _models(cfg, args.models).items():
        done = export_model(spec, args.dir, cache, cfg.triton)
        _out(f"{name}: {done.served} version {done.version}: {done.config} + {done.artifact.name}")
    return EXIT_OK


def run(args: argparse.Namespace, cfg: Config) -> int:
    cache = ArtifactCache(cfg.engines.cache(cfg.storage.dir))
    action = args.engines_command
    if action == "list":
        return cmd_list(cfg, cache)
    if action == "build":
        return cmd_build(args, cfg, cache)
    if action == "verify":
        return cmd_verify(args, cfg, cache)
    if action == "bench":
        return cmd_bench(args, cfg, cache)
    if action == "export-triton":
        return cmd_export_triton(args, cfg, cache)
    print(f"unknown action {action}", file=sys.stderr)  # pragma: no cover - argparse prevents it
    return 2
