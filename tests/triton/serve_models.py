"""A real Triton Inference Server (PyTriton's bundled tritonserver) serving edged's demo models.

Runs under the separate environment made by scripts/install-triton-server (Debian's python3, numpy < 2),
never under edged's own. Each model is served through ONNX Runtime inside a PyTriton inference function
(this tritonserver has no ONNX Runtime backend), with Triton's dynamic batcher on. Prints one line
``TRITON READY`` when every model is loaded, then serves until SIGTERM / SIGINT.

    python serve_models.py --engines DIR --grpc-port P --http-port P --metrics-port P
        [--model NAME ...] [--mismatch NAME:MODEL]   (MODEL served under NAME with its input renamed)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def _model_toml(engines: Path, name: str) -> dict:
    return tomllib.loads((engines / name / "model.toml").read_text())


def _bind(triton: Triton, engines: Path, model: str, served_as: str, input_name: str | None = None) -> None:
    toml = _model_toml(engines, model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(engines / model / "model.onnx"), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    onnx_in = session.get_inputs()[0].name
    outs = session.get_outputs()
    served_in = input_name or toml["input"]["name"]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = inputs[served_in].astype(np.float32)
        results = session.run([o.name for o in outs], {onnx_in: x})
        return {o.name: np.asarray(r, dtype=np.float32) for o, r in zip(outs, results)}

    def dims(shape: list) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in shape[1:])

    max_batch = int(toml.get("batching", {}).get("max_batch", 8))
    delay_ms = float(toml.get("batching", {}).get("max_delay_ms", 10))
    triton.bind(
        model_name=served_as,
        model_version=int(str(toml["version"]).split(".")[0]),
        infer_func=infer,
        inputs=[Tensor(name=served_in, dtype=np.float32, shape=tuple(toml["input"]["shape"][1:]))],
        outputs=[Tensor(name=o.name, dtype=np.float32, shape=dims(o.shape)) for o in outs],
        config=ModelConfig(max_batch_size=max_batch,
                           batcher=DynamicBatcher(max_queue_delay_microseconds=int(max(delay_ms, 50) * 1000))),
        strict=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--mismatch", action="append", default=[], metavar="NAME:MODEL")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--workspace", type=Path, default=None)
    args = ap.parse_args()
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_address="127.0.0.1", metrics_port=args.metrics_port,
                          allow_gpu_metrics=False, exit_timeout_secs=5)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # No access token: the tests read Triton's statistics API, and the server listens on 127.0.0.1 only.
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, workspace=str(args.workspace) if args.workspace else None,
                security_config=security) as triton:
        for model in args.model:
            _bind(triton, args.engines, model, model)
        for item in args.mismatch:
            name, model = item.split(":", 1)
            _bind(triton, args.engines, model, name, input_name="pixels")
        triton.run()
        print("TRITON READY", flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                print("tritonserver exited", file=sys.stderr, flush=True)
                sys.exit(1)


if __name__ == "__main__":
    main()
