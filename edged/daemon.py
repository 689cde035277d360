"""The daemon: start-up, the main loop and an ordered shutdown.

Start-up opens the journal, reconciles the spool with it (a crash may have left temp files or files
that were never acknowledged), then binds the listener. Signal handlers only set a flag (as uvicorn's
server does); the main loop notices it and shuts down in order: stop accepting, let running
associations finish within ``[daemon] shutdown_timeout``, abort what is left, close the journal.
A second signal skips the wait.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from types import FrameType

from edged import logs, sdnotify
from edged.audit import AuditLog
from edged.config import Config
from edged.errors import ConfigError
from edged.dicom.scp import Listener, StoreHandler
from edged.http import HttpServer
from edged.inference.base import Engine
from edged.inference.cache import ArtifactCache
from edged.inference.repository import Repository
from edged.inference.repository import ModelSpec
from edged.inference.select import resolve_backend, start_engine
from edged.pipeline.router import Router
from edged.pipeline.scheduler import Pipeline
from edged.results.outbox import Outbox
from edged.metrics import Metrics
from edged.spool.journal import Journal
from edged.spool.store import MASKS_DIR, RESULTS_DIR, Spool

#: Engines' availability, written by the running daemon for ``edged status`` (in the storage dir).
ENGINES_STATE = "engines.json"

log = logging.getLogger("edged.daemon")


class Daemon:
    def __init__(self, cfg: Config, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.should_exit = threading.Event()
        self.force_exit = False
        self.journal: Journal | None = None
        self.spool: Spool | None = None
        self.listener: Listener | None = None
        self.engines: dict[str, Engine] = {}
        self.models: dict[str, ModelSpec] = {}
        self.pipeline: Pipeline | None = None
        self.http: HttpServer | None = None
        self.outbox: Outbox | None = None
        self.audit: AuditLog | None = None
        self._engine_state: dict[str, dict] = {}
        self._engine_state_lock = threading.Lock()

    # -- signals ------------------------------------------------------------------------------------

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.should_exit.is_set():
            self.force_exit = True
        self.should_exit.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle_signal)

    # -- lifecycle ----------------------------------------------------------------------------------

    def startup(self) -> None:
        storage = self.cfg.storage
        spool = self.spool = Spool(storage.dir)
        self.journal = Journal.open(storage.dir)
        self.audit = AuditLog(self.cfg.daemon.audit_path(storage.dir), storage.dir)
        self.metrics.watch_state(self.state_snapshot)
        self.start_http()
        report = spool.reconcile(self.journal.instance_paths())
        flagged = self.journal.mark_missing(report.missing)
        stale_masks = spool.remove_unrecorded(MASKS_DIR, self.journal.mask_paths())
        stale_masks += spool.remove_unrecorded(RESULTS_DIR, self.journal.result_paths())
        logs.event(log, logging.WARNING if (report.removed_unrecorded or flagged) else logging.INFO,
                   "spool.reconciled", removed_temp=report.removed_temp,
                   removed_unacknowledged=report.removed_unrecorded, missing_files=flagged, stale_masks=stale_masks,
                   pending=self.journal.pending)
        self.start_engines()
        router = None
        if self.engines:
            router = Router(self.models)
            self.outbox = Outbox(self.cfg.destinations, self.journal, spool, self.cfg.outbox, self.metrics,
                                 self.cfg.dicom.ae_title, self.audit)
            self.pipeline = Pipeline(self.journal, spool, self.models, self.engines, self.cfg.pipeline, self.metrics,
                                     destinations=self.outbox.names, on_results=self.outbox.notify)
            self.pipeline.start()
            self.outbox.start()
        handler = StoreHandler(spool, self.journal, self.cfg.dicom, min_free_bytes=storage.min_free_bytes,
                               max_pending=storage.max_pending, metrics=self.metrics, router=router,
                               on_stored=self.pipeline.notify if self.pipeline else None, audit=self.audit)
        self.listener = Listener(self.cfg.dicom, handler)
        # What start-up made (libraries' tables, models, the SR templates, the supported contexts) lives as
        # long as the daemon: frozen, the cyclic collector no longer walks it. A full collection (pynetdicom
        # forces one every 60 turns of its accept loop) took ~100 ms holding the GIL, stalling every
        # association in flight; now it walks only what was made since.
        gc.freeze()
        self.listener.start()
        host, port = self.listener.address
        logs.event(log, logging.INFO, "listening", host=host, port=port, ae_title=self.cfg.dicom.ae_title,
                   tls=self.cfg.dicom.tls.enabled, storage=str(storage.dir))
        sdnotify.notify(f"READY=1\nSTATUS=listening on {host}:{port}")

    def state_snapshot(self) -> dict | None:
        if self.journal is None or not self.journal.is_open or self.spool is None:
            return None
        return {**self.journal.counts(), "free_bytes": self.spool.free_bytes()}

    def readiness_checks(self) -> dict:
        def journal() -> str | None:
            return None if self.journal is not None and self.journal.is_open else "journal closed"

        def engines() -> str | None:
            idle = [name for name, e in self.engines.items() if not e.active]
            if self.models and len(self.engines) < len(self.models):
                return "engines starting"
            if idle:
                return f"inactive: {', '.join(idle)}"
            problems = [p for p in (e.health() for e in self.engines.values()) if p]
            return "; ".join(problems) if problems else None

        def listener() -> str | None:
            return None if self.listener is not None and self.listener.bound else "listener not bound"

        return {"journal": journal, "engines": engines, "listener": listener}

    def start_http(self) -> None:
        h = self.cfg.http
        self.http = HttpServer(h.host, h.port, self.metrics.registry, self.readiness_checks())
        self.http.start()
        host, port = self.http.address
        logs.event(log, logging.INFO, "http.listening", host=host, port=port)

    def start_engines(self) -> None:
        """Load the model repository and activate every model's engine on the chosen backend."""
        engines_cfg = self.cfg.engines
        specs = Repository(engines_cfg.dir).load(engines_cfg.models or None)
        self.models = specs
        if not specs:
            logs.event(log, logging.WARNING, "engines.none", dir=str(engines_cfg.dir))
            return
        backend, reason, plans = resolve_backend(engines_cfg.backend)
        if backend == "triton":
            known = Repository(engines_cfg.dir).names()
            for i, m in enumerate(self.cfg.triton.models):
                if m.model not in known:
                    raise ConfigError(f"triton.models[{i}].model", f"no such model {m.model!r} in {engines_cfg.dir}",
                                      self.cfg.source)
            reason = f"{self.cfg.triton.protocol}://{self.cfg.triton.url}"
        logs.event(log, logging.INFO, "engines.backend", backend=backend, reason=reason)
        cache = ArtifactCache(engines_cfg.cache(self.cfg.storage.dir))
        try:
            for name, spec in specs.items():
                engine = start_engine(spec, backend, cache, engines_cfg, plans, triton=self.cfg.triton)
                self.engines[name] = engine
                self.metrics.engine_info.labels(name, spec.version, engine.backend, engine.precision).set(1)
                self._watch_availability(name, engine)
                logs.event(log, logging.INFO, "engine.active", model=name, version=spec.version,
                           backend=engine.backend, precision=engine.precision, max_batch=engine.max_batch)
        finally:
            if plans is not None:
                plans.close()

    def _watch_availability(self, name: str, engine: Engine) -> None:
        """Export an engine's availability (metric, and engines.json for ``edged status``) as it changes."""
        available = bool(getattr(engine, "available", True))
        reason = getattr(engine, "unavailable_reason", None)

        def changed(now_available: bool, why: str | None) -> None:
            self.metrics.engine_available.labels(name, engine.backend).set(1 if now_available else 0)
            with self._engine_state_lock:
                self._engine_state[name] = {"backend": engine.backend, "available": now_available,
                                            "reason": why, "since": time.time()}
                self._write_engine_state()

        if hasattr(engine, "on_availability"):
            engine.on_availability = changed  # type: ignore[attr-defined]
        changed(available, reason)

    def _write_engine_state(self) -> None:
        path = self.cfg.storage.dir / ENGINES_STATE
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"pid": os.getpid(), "engines": self._engine_state}, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            log.warning("could not write %s", path, exc_info=True)

    def check_engines(self) -> None:
        """Ask remote engines whether they can run now (their availability follows, even with no jobs)."""
        for engine in self.engines.values():
            if engine.backend == "triton":
                engine.health()

    def retention(self) -> None:
        """Delete what every destination has (see Journal.purge), once retention has passed."""
        if self.journal is None or self.spool is None:
            return
        instances, results, masks = self.journal.purge(time.time() - self.cfg.outbox.retention_seconds)
        for relpath in instances + results + masks:
            self.spool.remove(relpath)
        if instances or results or masks:
            logs.event(log, logging.INFO, "retention.purged", instances=len(instances), results=len(results),
                       masks=len(masks))
        forgotten = self.journal.forget(time.time() - self.cfg.outbox.history_seconds)
        if forgotten:
            logs.event(log, logging.INFO, "retention.forgotten", series=forgotten)

    def main_loop(self) -> None:
        interval = sdnotify.watchdog_interval()
        tick = min(0.5, interval) if interval else 0.5
        next_retention = time.monotonic() + 5
        if any(e.backend == "triton" for e in self.engines.values()):
            threading.Thread(target=self._health_loop, name="engine-health", daemon=True).start()
        while not self.should_exit.wait(tick):
            if interval:
                sdnotify.notify("WATCHDOG=1")
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + 30
                try:
                    self.retention()
                except Exception:
                    log.exception("retention sweep failed")

    def _health_loop(self) -> None:
        while not self.should_exit.wait(2.0):
            try:
                self.check_engines()
            except Exception:
                log.exception("engine health check failed")

    def shutdown(self) -> None:
        logs.event(log, logging.INFO, "shutdown.begin")
        sdnotify.notify("STOPPING=1")
        deadline = time.monotonic() + self.cfg.daemon.shutdown_timeout
        if self.listener is not None:
            self.listener.stop_accepting()
            while self.listener.active() and not self.force_exit and time.monotonic() < deadline:
                time.sleep(0.05)
            aborted = self.listener.abort_all()
            if aborted:
                logs.event(log, logging.WARNING, "shutdown.aborted_associations", count=aborted)
            self.listener.handler.close()
        if self.pipeline is not None:
            left = 0.0 if self.force_exit else max(0.0, deadline - time.monotonic())
            if not self.pipeline.stop(left):
                logs.event(log, logging.WARNING, "shutdown.jobs_unfinished", note="they resume at the next start")
        if self.outbox is not None:
            self.outbox.stop(timeout=max(1.0, deadline - time.monotonic()))
        for engine in self.engines.values():
            engine.deactivate()
        (self.cfg.storage.dir / ENGINES_STATE).unlink(missing_ok=True)
        if self.journal is not None:
            self.journal.close()
        if self.audit is not None:
            self.audit.close()
        if self.http is not None:
            self.http.stop()
        logs.event(log, logging.INFO, "shutdown.complete")

    def run(self) -> None:
        """Start, serve until a signal arrives, shut down. Raises EdgedError if start-up fails."""
        self.install_signal_handlers()
        try:
            self.startup()
            self.main_loop()
        finally:
            self.shutdown()
