"""A per-model dynamic batcher: one thread that owns the model's engine.

Requests (one input plane each) wait in a bounded queue; the batcher takes the first, then gathers
more until ``max_batch`` or until ``max_delay_ms`` has passed since the first, runs one batch and hands
each request its own slice of the outputs. If a batch fails, its requests are retried one by one, so
one bad input fails only its own job. A local engine is used from this one thread only; an engine that
takes several batches at once (``engine.max_in_flight``, a Triton server) gets that many threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edged import logs
from edged.inference.base import Engine

log = logging.getLogger("edged.batcher")

Outputs = dict[str, np.ndarray]


@dataclass
class Request:
    """One input plane ``(channels, rows, columns)``; ``done`` gets its outputs or the error."""

    tensor: np.ndarray
    done: Callable[[Outputs | None, BaseException | None], None]
    enqueued: float = 0.0


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, max_delay_ms: float, queue_size: int,
                 on_batch: Callable[[int, float, float], None] | None = None,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.max_batch = max(1, min(max_batch, engine.max_batch))
        self.max_delay = max_delay_ms / 1000.0
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self.on_batch = on_batch  # (batch size, seconds of inference, oldest queue wait)
        self.on_failure = on_failure  # an input whose inference failed
        self.batch_sizes: Counter[int] = Counter()
        self._sizes_lock = threading.Lock()
        self._stop = threading.Event()
        n = max(1, int(getattr(engine, "max_in_flight", 1)))
        self._threads = [threading.Thread(target=self._run, name=f"batcher-{engine.name}-{i}", daemon=True)
                         for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, request: Request, timeout: float | None = None) -> None:
        """Queue a request; blocks while the queue is full (back-pressure)."""
        request.enqueued = time.monotonic()
        self.queue.put(request, timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _gather(self) -> list[Request]:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_delay
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if not batch:
                if self._stop.is_set():
                    return
                continue
            self._run_batch(batch)

    def _run_batch(self, batch: list[Request]) -> None:
        t0 = time.monotonic()
        waited = t0 - min(r.enqueued for r in batch)
        try:
            outputs = self.engine.infer(np.stack([r.tensor for r in batch]))
        except Exception as exc:
            if len(batch) > 1:
                logs.event(log, logging.WARNING, "batch.failed_retrying_singly", model=self.engine.name,
                           size=len(batch), error=type(exc).__name__)
                for r in batch:
                    self._run_batch([r])
                return
            if self.on_failure is not None:
                self.on_failure()
            batch[0].done(None, exc)
            return
        seconds = time.monotonic() - t0
        with self._sizes_lock:
            self.batch_sizes[len(batch)] += 1
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds, waited)
        for i, r in enumerate(batch):
            try:
                r.done({k: v[i : i + 1] for k, v in outputs.items()}, None)
            except Exception:  # a callback's bug must not kill the batcher
                log.exception("request callback failed")
