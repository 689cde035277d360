"""The Triton backend: a model's batches run on an NVIDIA Triton Inference Server, over gRPC or HTTP.

It implements the same :class:`~edged.inference.base.Engine` interface as the local backends, so the
pipeline, batcher and results do not know where inference ran. ``tritonclient`` (the ``triton`` extra) is
imported lazily, here only.

Activation checks that the server is live, the mapped model ready, and its inputs and outputs those of
model.toml (names, FP32, shapes with the dynamic batch axis): a mismatch is an :class:`EngineError`
naming the model and the tensor, and edged does not start. A server that cannot be reached at start is
not fatal: the engine starts *unavailable*, and checks the model when the server comes.

Unreachable server, model not loaded or not ready, request timed out: :meth:`TritonEngine.infer` waits
with exponential back-off (capped at ``[triton] retry_max_seconds``) and tries again, re-checking the
model before it resumes; the job is neither failed nor lost. Only :meth:`deactivate` (shutdown) ends the
wait, with :class:`EngineUnavailableError`, which the scheduler never counts as a failed attempt.
Any other error from a live server with a ready model is the batch's own (an :class:`EngineError`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Callable

import numpy as np

from edged import logs
from edged.config import TritonConfig
from edged.errors import BackendUnavailableError, EngineError, EngineUnavailableError
from edged.inference.base import Engine
from edged.inference.repository import ModelSpec

log = logging.getLogger("edged.triton")

#: Triton's datatype names for the dtypes model.toml may name.
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16"}


def load_client(protocol: str) -> Any:
    """The tritonclient module for ``protocol`` (grpc or http)."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as exc:
        raise BackendUnavailableError("(all)", f"tritonclient is not installed ({exc}); install edged[triton]") from None
    return client


def make_client(cfg: TritonConfig) -> Any:
    """A new client for ``cfg`` (one per thread: the HTTP client is not thread-safe)."""
    mod = load_client(cfg.protocol)
    tls = cfg.tls
    if cfg.protocol == "grpc":
        kwargs: dict[str, Any] = {}
        if tls.enabled:
            kwargs = {"ssl": True, "root_certificates": str(tls.ca) if tls.ca else None,
                      "private_key": str(tls.key) if tls.key else None,
                      "certificate_chain": str(tls.cert) if tls.cert else None}
        return mod.InferenceServerClient(cfg.url, **kwargs)
    kwargs = {"connection_timeout": cfg.request_timeout, "network_timeout": cfg.request_timeout}
    if tls.enabled:
        options: dict[str, Any] = {}
        if tls.ca:
            options["ca_certs"] = str(tls.ca)
        if tls.cert:
            options["certfile"], options["keyfile"] = str(tls.cert), str(tls.key)
        kwargs.update(ssl=True, ssl_options=options)
    return mod.InferenceServerClient(cfg.url, **kwargs)


def _dims(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def check_metadata(spec: ModelSpec, served: str, metadata: dict[str, Any]) -> None:
    """Raise EngineError (naming the model and tensor) unless Triton's metadata matches model.toml."""
    where = f"Triton model {served!r}"
    inputs = {t["name"]: t for t in metadata.get("inputs", [])}
    want = spec.input
    if set(inputs) != {want.name}:
        raise EngineError(spec.name, f"{where} has inputs {sorted(inputs)}, model.toml says [{want.name!r}]",
                          tensor=want.name)
    got = inputs[want.name]
    if got.get("datatype") != TRITON_DTYPES.get(want.dtype):
        raise EngineError(spec.name, f"{where} input is {got.get('datatype')}, model.toml says {want.dtype}",
                          tensor=want.name)
    dims = _dims(got.get("shape", []))
    if dims != list(want.shape):
        raise EngineError(spec.name, f"{where} input shape {dims} does not match model.toml {list(want.shape)}"
                                     " (the first axis must be the dynamic batch axis, -1)", tensor=want.name)
    outputs = {t["name"]: t for t in metadata.get("outputs", [])}
    for out in spec.outputs:
        if out.name not in outputs:
            raise EngineError(spec.name, f"{where} has no such output (it has {sorted(outputs)})", tensor=out.name)
        t = outputs[out.name]
        if t.get("datatype") not in ("FP32", "FP16"):
            raise EngineError(spec.name, f"{where} output is {t.get('datatype')}, edged needs FP32 or FP16",
                              tensor=out.name)
        odims = _dims(t.get("shape", []))
        if not odims or odims[0] != -1:
            raise EngineError(spec.name, f"{where} output shape {odims} has no dynamic batch axis", tensor=out.name)


class TritonEngine(Engine):
    backend = "triton"

    def __init__(self, spec: ModelSpec, cfg: TritonConfig,
                 client_factory: Callable[[TritonConfig], Any] = make_client) -> None:
        super().__init__(spec, "remote")
        self.cfg = cfg
        self.served, self.served_version = cfg.mapping(spec.name, spec.version)
        self.max_in_flight = cfg.max_in_flight
        self.available = False
        self.unavailable_reason: str | None = "not checked yet"
        #: Called with (available, reason) whenever availability changes.
        self.on_availability: Callable[[bool, str | None], None] | None = None
        self._factory = client_factory
        self._local = threading.local()
        self._closing = threading.Event()
        self._verified = False
        self._state_lock = threading.Lock()
        # Health probes run on one thread of their own: the HTTP client (gevent) must stay on the thread
        # that made it, and /readyz asks from a new thread each time.
        self._health: ThreadPoolExecutor | None = None
        self._mod: Any = None

    # -- clients and checks -------------------------------------------------------------------------

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._factory(self.cfg)
        return client

    def _set_available(self, available: bool, reason: str | None) -> None:
        with self._state_lock:
            changed = available != self.available
            self.available = available
            self.unavailable_reason = None if available else reason
        if changed:
            if available:
                logs.event(log, logging.INFO, "triton.available", model=self.name, served=self.served)
            else:
                logs.event(log, logging.WARNING, "triton.unavailable", model=self.name, served=self.served,
                           reason=reason)
            if self.on_availability is not None:
                self.on_availability(available, reason)

    def _probe(self, client: Any) -> str | None:
        """None when the server is live and the model ready; else why not. Raises EngineError on a mismatch."""
        # gRPC calls take a deadline; the HTTP client has its connection and network timeouts.
        quick = {"client_timeout": min(5.0, self.cfg.request_timeout)} if self.cfg.protocol == "grpc" else {}
        try:
            if not client.is_server_live(**quick):
                return "server not live"
            if not client.is_model_ready(self.served, self.served_version, **quick):
                return f"model {self.served!r} not ready"
            kwargs = {"as_json": True, **quick} if self.cfg.protocol == "grpc" else {}
            metadata = client.get_model_metadata(self.served, self.served_version, **kwargs)
            config = client.get_model_config(self.served, self.served_version, **kwargs)
        except Exception as exc:  # connection refused, timeouts, NOT_FOUND ...: all mean "not now"
            return f"unreachable ({type(exc).__name__})"
        check_metadata(self.spec, self.served, metadata)
        config = config.get("config", config)
        served_max = int(config.get("max_batch_size", 0) or 0)
        if served_max < 1:
            raise EngineError(self.name, f"Triton model {self.served!r} has max_batch_size 0: edged sends batches",
                              tensor=self.spec.input.name)
        self.max_batch = min(self.spec.batching.max_batch, served_max)
        self._verified = True
        return None

    def health(self) -> str | None:
        """For /readyz: None when the model can take requests now."""
        def probe() -> str | None:
            try:
                return self._probe(self._client())
            except EngineError as exc:
                return f"mismatch: {exc}"

        if self._health is None:
            return "inactive"
        try:
            problem = self._health.submit(probe).result(timeout=self.cfg.request_timeout + 5)
        except FuturesTimeout:
            problem = "health check timed out"
        self._set_available(problem is None, problem)
        return None if problem is None else f"triton {self.served}: {problem}"

    # -- Engine -------------------------------------------------------------------------------------

    def activate(self) -> None:
        if self.active:
            return
        self._mod = load_client(self.cfg.protocol)
        self._closing.clear()
        self._health = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"triton-health-{self.name}")
        problem = self._probe(self._client())  # EngineError (mismatch) propagates: edged does not start
        self.active = True
        self._set_available(problem is None, problem)
        if problem is not None:
            logs.event(log, logging.WARNING, "triton.waiting", model=self.name, reason=problem,
                       note="jobs wait until the server and model are ready")

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.active and batch.ndim and batch.shape[0] > self.max_batch:
            # the server's max_batch_size, learnt after the batcher was sized (it was away at start)
            parts = [self.infer(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        x = self.check_batch(batch)
        delay = 0.25
        while True:
            client = self._client()
            if self._verified:
                try:
                    return self._request(client, x)
                except EngineError:
                    raise
                except Exception as exc:
                    problem = self._probe(client)  # EngineError: the model changed under us
                    if problem is None:
                        raise EngineError(self.name, f"Triton refused the batch: {_message(exc)}") from None
            else:
                try:
                    problem = self._probe(client)
                except EngineError as exc:
                    problem = f"mismatch: {exc.reason}"
                    log.error("%s", exc)
                if problem is None:
                    continue
            self._set_available(False, problem)
            if self._closing.wait(delay):
                raise EngineUnavailableError(self.name, f"stopped while waiting for Triton ({problem})")
            delay = min(delay * 2, self.cfg.retry_max_seconds)
            self._verified = False

    def _request(self, client: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        mod = self._mod
        inp = mod.InferInput(self.spec.input.name, list(x.shape), TRITON_DTYPES[self.spec.input.dtype])
        inp.set_data_from_numpy(x)
        outputs = [mod.InferRequestedOutput(o.name) for o in self.spec.outputs]
        kwargs: dict[str, Any] = {}
        if self.cfg.protocol == "grpc":
            kwargs["client_timeout"] = self.cfg.request_timeout
        t0 = time.monotonic()
        result = client.infer(self.served, [inp], model_version=self.served_version, outputs=outputs, **kwargs)
        out = {}
        for o in self.spec.outputs:
            arr = result.as_numpy(o.name)
            if arr is None or arr.shape[:1] != x.shape[:1]:
                raise EngineError(self.name, f"Triton returned {None if arr is None else arr.shape} for a batch of "
                                             f"{x.shape[0]}", tensor=o.name)
            out[o.name] = np.asarray(arr, dtype=np.float32)
        if not self.available:
            self._set_available(True, None)
        log.debug("triton %s: batch %d in %.1f ms", self.name, x.shape[0], 1000 * (time.monotonic() - t0))
        return out

    def deactivate(self) -> None:
        self._closing.set()
        if self._health is not None:
            self._health.shutdown(wait=False, cancel_futures=True)
        self.active = False


def _message(exc: BaseException) -> str:
    msg = getattr(exc, "message", None)
    text = msg() if callable(msg) else str(exc)
    return f"{type(exc).__name__}: {text}"[:300]
