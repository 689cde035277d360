"""Every Prometheus metric edged exports, in one place.

Metrics live on a :class:`Metrics` object built around a registry, so each test (and each daemon) gets
its own. Label values come only from small fixed sets (model, stage, destination, status, reason,
state), never from a UID or a patient attribute. Names follow Prometheus conventions: ``edged_`` prefix,
``_total`` for counters, ``_seconds`` and ``_bytes`` units.

Gauges that describe state (instances, jobs and deliveries per state, free disk, oldest pending job,
GPU use) are read when Prometheus scrapes, by collectors, so they are never stale.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("edged.metrics")

#: Fixed label values for rejected associations.
REJECT_REASONS = ("calling_ae", "called_ae", "busy", "other")
#: Pipeline stages timed by ``edged_stage_seconds``.
STAGES = ("preprocess", "queue_wait", "inference", "postprocess", "commit", "object_write", "delivery")
#: Stages whose thread CPU time ``edged_stage_cpu_seconds_total`` counts (no queue_wait: waiting is not work).
#: ``receive``: the C-STORE handler; ``control``: the pipeline's control step (series completion, lease
#: recovery, claiming jobs: journal work); ``inference``: the batcher thread (batching, the engine call);
#: ``object_write``: report authoring (SR/SEG), including the SR's per-image items built as findings are made.
CPU_STAGES = ("receive", "control", "preprocess", "inference", "postprocess", "commit", "object_write", "delivery")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
#: Steps of a streamed C-STORE, from ~0.1 ms (a check) to seconds (an fsync on a failing disk).
_STEP = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0)
#: The steps of ``edged_store_step_seconds``, in the order a data set meets them.
STORE_STEPS = ("receive", "checks", "fsync", "commit", "respond")
_END_TO_END = (0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800)


class StateCollector(Collector):
    """Journal and spool state at scrape time: ``snapshot()`` returns the counts (see Journal.snapshot)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            snap = self.snapshot()
        except Exception:  # a scrape must not fail because the journal is busy or closing
            log.debug("state snapshot failed", exc_info=True)
            snap = None
        if not snap:
            return
        for name, key, doc in (("edged_instances", "instances", "Instances in the journal, by state."),
                               ("edged_jobs", "jobs", "Jobs in the journal, by state."),
                               ("edged_deliveries", "deliveries", "Deliveries in the outbox, by state.")):
            g = GaugeMetricFamily(name, doc, labels=["state"])
            for state, n in snap[key].items():
                g.add_metric([state], n)
            yield g
        g = GaugeMetricFamily("edged_model_jobs", "Jobs per model and state.", labels=["model", "state"])
        for model, states in snap["models"].items():
            for state, n in states.items():
                g.add_metric([model, state], n)
        yield g
        yield GaugeMetricFamily("edged_oldest_pending_job_seconds", "Age of the oldest job waiting to run.",
                                value=snap["oldest_pending_job_seconds"] or 0.0)
        yield GaugeMetricFamily("edged_spool_free_bytes", "Free bytes on the spool's filesystem.",
                                value=snap["free_bytes"])


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not Linux
        return 100


def native_threads_cpu_seconds(task_dir: Path = Path("/proc/self/task")) -> float | None:
    """CPU seconds (user + system) of this process's live threads that Python's ``threading`` did not start.

    Those are the engines' runtime pools (ONNX Runtime's intra-op threads) and numeric libraries' (BLAS):
    work done on behalf of inference that the calling thread's CPU time does not include. ``None`` where
    ``/proc`` is not there. A thread that ended takes its CPU time with it, so the value can drop.
    """
    python = {t.native_id for t in threading.enumerate()}
    try:
        entries = list(os.scandir(task_dir))
    except OSError:
        return None
    ticks = 0
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in python:
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "tid (comm) ": fields[0] is the state
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _clock_ticks()


class NativeThreadsCollector(Collector):
    """``edged_native_threads_cpu_seconds`` at scrape time (see :func:`native_threads_cpu_seconds`)."""

    def __init__(self, task_dir: Path = Path("/proc/self/task")) -> None:
        self.task_dir = task_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value = native_threads_cpu_seconds(self.task_dir)
        if value is not None:
            yield GaugeMetricFamily(
                "edged_native_threads_cpu_seconds",
                "CPU seconds of live threads not started by Python (ONNX Runtime's pool, BLAS): inference work "
                "outside the batcher thread. Drops if such a thread ends.", value=value)


class GpuCollector(Collector):
    """GPU utilisation and memory per device through NVML (nvidia-ml-py); yields nothing without them."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no library, no driver, no GPU: the metrics are simply absent
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml is None:
            return
        n = self._nvml
        util = GaugeMetricFamily("edged_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["gpu"])
        used = GaugeMetricFamily("edged_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"])
        total = GaugeMetricFamily("edged_gpu_memory_total_bytes", "GPU memory (NVML).", labels=["gpu"])
        try:
            for i in range(n.nvmlDeviceGetCount()):
                h = n.nvmlDeviceGetHandleByIndex(i)
                rates = n.nvmlDeviceGetUtilizationRates(h)
                mem = n.nvmlDeviceGetMemoryInfo(h)
                util.add_metric([str(i)], rates.gpu / 100.0)
                used.add_metric([str(i)], float(mem.used))
                total.add_metric([str(i)], float(mem.total))
        except Exception:
            log.debug("NVML query failed", exc_info=True)
            return
        yield util
        yield used
        yield total


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # -- receive
        self.associations = Counter(
            "edged_associations_total",
            "DICOM associations requested, by result (accepted, or rejected:<reason>).", ["result"], registry=r)
        self.instances_received = Counter(
            "edged_instances_received_total",
            "C-STORE requests answered, by status (success, duplicate, out_of_resources, ...).", ["status"],
            registry=r)
        self.protocol_violations = Counter(
            "edged_protocol_violations_total",
            "Associations aborted for breaking the DICOM upper layer protocol or edged's bounds, by reason"
            " (pdu_too_long, message_too_long, unknown_pdu, unexpected_pdu, invalid_pdu, slow_pdu).", ["reason"],
            registry=r)
        self.bytes_received = Counter("edged_received_bytes_total", "Bytes of datasets stored in the spool.",
                                      registry=r)
        self.store_seconds = Histogram(
            "edged_store_seconds",
            "Time to answer a received C-STORE data set (decode header, write, fsync, journal commit; "
            "a data set streamed to the spool was written as it arrived, before this starts).",
            buckets=_LATENCY, registry=r)
        self.store_step_seconds = Histogram(
            "edged_store_step_seconds",
            "Wall time of each step of a streamed C-STORE that was stored and answered Success: receive (from"
            " the command set to the data set's last fragment, written to a temp file as it arrived),"
            " checks (header, duplicate lookup, free space), fsync (rename into the spool and the file's"
            " fsync), commit (waiting for and running the group commit: directory fsync, journal"
            " transaction; then the audit line), respond (until the response is sent, or queued behind"
            " another message of the association's).",
            ["step"], buckets=_STEP, registry=r)
        # -- pipeline
        self.jobs = Counter("edged_jobs_total", "Jobs finished, by model and result (done, failed, dead).",
                            ["model", "result"], registry=r)
        self.inference_requests = Counter("edged_inference_requests_total", "Inputs run through an engine.",
                                          ["model"], registry=r)
        self.inference_failures = Counter("edged_inference_failures_total", "Inputs whose inference failed.",
                                          ["model"], registry=r)
        self.batch_size = Histogram("edged_batch_size", "Inputs per inference batch.", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.stage_seconds = Histogram(
            "edged_stage_seconds",
            "Time spent per pipeline stage (preprocess, queue_wait, inference, postprocess, commit, object_write,"
            " delivery).", ["model", "stage"], buckets=_LATENCY + (60.0,), registry=r)
        self.stage_cpu_seconds = Counter(
            "edged_stage_cpu_seconds",
            "CPU time (time.thread_time) of the thread that ran a stage: receive (C-STORE handler), control (series"
            " completion, job claims), preprocess, inference (the batcher thread), postprocess, commit,"
            " object_write, delivery. Engine pools' threads: edged_native_threads_cpu_seconds.",
            ["model", "stage"], registry=r)
        self.engine_info = Gauge("edged_engine_info", "Active engines (value 1), with their model version, backend"
                                 " and precision.", ["model", "version", "backend", "precision"], registry=r)
        self.engine_available = Gauge(
            "edged_engine_available", "1 while a model's engine can run batches, 0 while its backend is"
            " unavailable (Triton unreachable or the model not ready): its jobs wait.", ["model", "backend"],
            registry=r)
        self.reports = Counter("edged_reports_total", "Report jobs (SR/SEG) finished, by model and result.",
                               ["model", "result"], registry=r)
        # -- delivery
        self.deliveries = Counter(
            "edged_deliveries_total",
            "Delivery attempts' outcomes per destination (delivered, warning, failed, dead).",
            ["destination", "result"], registry=r)
        self.end_to_end = Histogram(
            "edged_end_to_end_seconds",
            "From the last instance of a series received to its result delivered, per model.", ["model"],
            buckets=_END_TO_END, registry=r)
        self.gpu = GpuCollector()
        r.register(self.gpu)
        r.register(NativeThreadsCollector())

    def add_cpu(self, model: str, stage: str, since: float) -> None:
        """Count the calling thread's CPU time since ``since`` (a ``time.thread_time()``) for ``stage``."""
        self.stage_cpu_seconds.labels(model, stage).inc(max(0.0, time.thread_time() - since))

    def watch_state(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        """Export journal and spool state read by ``snapshot`` at each scrape."""
        self.registry.register(StateCollector(snapshot))
