"""The pipeline: from journal jobs to findings, off the listener's threads.

    journal (pending jobs) --claim, lease--> per-model preprocess pool (read file, decode, preprocess)
        --> per-model batcher (bounded queue, dynamic batches, the engine) --> postprocess (pool)
        --> writer (findings + job done, many jobs per transaction) --> journal

The journal is the buffer: jobs are claimed only as fast as a model can take them (``queue_size``
in flight per model), and the listener's ``max_pending`` pushes back on the scanner. Each model has
its own pool and batcher, so a slow model never stalls another. A job's lease protects it: after a
crash every running job returns to pending; a job whose lease expired while it still ran cannot be
completed twice (the journal checks the lease token).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edged import logs
from edged.config import PipelineConfig
from edged.errors import EngineUnavailableError
from edged.inference.base import Engine
from edged.inference.repository import ModelSpec
from edged.metrics import Metrics
from edged.pipeline.assembler import Geometry, SliceInfo, assemble, slice_infos
from edged.pipeline.batcher import Batcher, Outputs, Request
from edged.pipeline.pixels import read_image, read_pixels
from edged.pipeline.postprocess import Finding, classify, segment
from edged.pipeline.preprocess import prepare_dataset
from edged.results.report import build_report, warm_up
from edged.results.sr import PrebuiltItems
from edged.spool.journal import FindingRecord, Job, JobResult, Journal
from edged.spool.store import Spool

log = logging.getLogger("edged.pipeline")


def _reason(exc: BaseException) -> str:
    """A failure reason for the journal: the exception type and message, bounded."""
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text}"[:300]


@dataclass
class Prepared:
    """A job's input planes and what postprocessing needs to place results in the patient."""

    planes: np.ndarray  # (n, channels, rows, columns) float32
    geometries: list[Geometry]
    slice_spacing: float | None
    sources: list[str]
    skipped: int = 0  # instances of a series left out because they could not be decoded
    sop_class_uid: str | None = None  # an instance job's image (for its report's per-image items)


def _instance_input(spool: Spool, journal: Journal, spec: ModelSpec, job: Job) -> Prepared:
    assert job.sop_instance_uid is not None
    relpath = journal.instance_path(job.sop_instance_uid)
    if relpath is None:
        raise FileNotFoundError("instance not in the journal")
    classifier = spec.task == "classification"  # geometry places a mask in the patient; a classifier's findings have none
    # a classifier needs only what preprocessing reads and the SOP Class: read_pixels' element walker, where it can
    ds, pixels = (read_pixels if classifier else read_image)(spool.path(relpath))
    planes = prepare_dataset(ds, spec.preprocess.spec(), pixels)
    sop_class = str(getattr(ds, "SOPClassUID", "") or "") or None
    if classifier:
        return Prepared(planes, [], None, [job.sop_instance_uid], sop_class_uid=sop_class)
    infos = slice_infos(ds, 0)
    spacing = assemble(infos).slice_spacing if len(infos) > 1 else None
    return Prepared(planes, [i.geometry for i in infos], spacing, [job.sop_instance_uid], sop_class_uid=sop_class)


def _series_input(spool: Spool, journal: Journal, spec: ModelSpec, job: Job) -> Prepared:
    pre = spec.preprocess.spec()
    infos: list[SliceInfo] = []
    planes: dict[tuple[str, int], np.ndarray] = {}
    skipped = 0
    for arrival, (uid, relpath) in enumerate(journal.series_sources(job.series_instance_uid)):
        try:
            ds, pixels = read_image(spool.path(relpath))
            frames = prepare_dataset(ds, pre, pixels)
        except Exception as exc:  # one bad slice must not sink the series: leave it out, say so
            skipped += 1
            logs.event(log, logging.WARNING, "series.instance_skipped", job=job.id, model=job.model,
                       error=type(exc).__name__)
            continue
        for info in slice_infos(ds, arrival):
            infos.append(info)
            planes[(uid, info.frame)] = frames[info.frame]
    if not infos:
        raise ValueError(f"no decodable instance in the series ({skipped} skipped)")
    volume = assemble(infos)
    ordered = [planes[(s.sop_instance_uid, s.frame)] for s in volume.slices]
    sources = list(dict.fromkeys(s.sop_instance_uid for s in volume.slices))
    return Prepared(np.stack(ordered), [s.geometry for s in volume.slices], volume.slice_spacing, sources, skipped)


class _Collector:
    """Gathers the per-plane outputs of one job; calls ``complete`` once with them all (or the first error)."""

    def __init__(self, n: int, complete: Callable[[Outputs | None, BaseException | None], None]) -> None:
        self.parts: list[Outputs | None] = [None] * n
        self.left = n
        self.failed = False
        self.lock = threading.Lock()
        self.complete = complete

    def callback(self, i: int) -> Callable[[Outputs | None, BaseException | None], None]:
        def done(out: Outputs | None, err: BaseException | None) -> None:
            with self.lock:
                if self.failed:
                    return
                if err is not None:
                    self.failed = True
                    fire: tuple = (None, err)
                else:
                    self.parts[i] = out
                    self.left -= 1
                    if self.left:
                        return
                    names = self.parts[0].keys()  # type: ignore[union-attr]
                    fire = ({k: np.concatenate([p[k] for p in self.parts]) for k in names}, None)  # type: ignore[index]
            self.complete(*fire)

        return done


class ModelLane:
    """One model's pool, batcher and in-flight accounting."""

    def __init__(self, spec: ModelSpec, engine: Engine, cfg: PipelineConfig, metrics: Metrics) -> None:
        self.spec = spec
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix=f"prep-{spec.name}")
        m = metrics
        counted = [0.0]  # the batcher thread's CPU time already counted (on_batch runs on that thread)

        def on_batch(size: int, seconds: float, waited: float) -> None:
            now = time.thread_time()
            m.stage_cpu_seconds.labels(spec.name, "inference").inc(max(0.0, now - counted[0]))
            counted[0] = now
            m.inference_requests.labels(spec.name).inc(size)
            m.batch_size.labels(spec.name).observe(size)
            m.stage_seconds.labels(spec.name, "inference").observe(seconds)
            m.stage_seconds.labels(spec.name, "queue_wait").observe(waited)

        self.batcher = Batcher(engine, spec.batching.max_batch, spec.batching.max_delay_ms,
                               queue_size=max(cfg.queue_size, spec.batching.max_batch), on_batch=on_batch,
                               on_failure=m.inference_failures.labels(spec.name).inc)
        self.max_in_flight = max(cfg.queue_size // 4, spec.batching.max_batch, 1)
        self.in_flight = 0
        self.lock = threading.Lock()

    def capacity(self) -> int:
        with self.lock:
            return max(0, self.max_in_flight - self.in_flight)

    def add(self, n: int) -> None:
        with self.lock:
            self.in_flight += n

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


class Pipeline:
    def __init__(self, journal: Journal, spool: Spool, models: dict[str, ModelSpec], engines: dict[str, Engine],
                 cfg: PipelineConfig, metrics: Metrics, destinations: list[str] | None = None,
                 on_results: Callable[[], None] | None = None,
                 on_jobs_done: Callable[[list[int]], None] | None = None) -> None:
        self.models = models
        self.destinations = list(destinations or [])
        self.on_results = on_results
        # two report workers: a long SEG report does not hold back another model's SR on the same series
        self.reports = ThreadPoolExecutor(max_workers=2, thread_name_prefix="reports")
        self.reports_in_flight = 0
        # per-image SR items made as each instance job finishes: the report after the quiet period only assembles
        self.prebuilt = PrebuiltItems()
        self._reports_lock = threading.Lock()
        self.journal = journal
        self.spool = spool
        self.cfg = cfg
        self.metrics = metrics
        self.on_jobs_done = on_jobs_done
        self.lanes = {name: ModelLane(models[name], engine, cfg, metrics) for name, engine in engines.items()}
        self.token = uuid.uuid4().hex
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_housekeeping = 0.0
        self._results: queue.Queue[tuple[JobResult, list[str]] | None] = queue.Queue()
        self._control = threading.Thread(target=self._control_loop, name="pipeline-control", daemon=True)
        self._writer = threading.Thread(target=self._writer_loop, name="pipeline-writer", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.journal.recover_jobs(all_running=True)
        if recovered:
            logs.event(log, logging.WARNING, "jobs.recovered", count=recovered)
        for lane in self.lanes.values():
            lane.batcher.start()
        if self.models:  # highdicom's first use, at start-up (before the listener binds), not in a series' report
            self._warm_up_reports()
        self._writer.start()
        self._control.start()

    def _warm_up_reports(self) -> None:
        t0 = time.monotonic()
        try:
            warm_up(next(iter(self.models.values())))
            logs.event(log, logging.INFO, "reports.warmed_up", seconds=round(time.monotonic() - t0, 3))
        except Exception as exc:  # only a cost moved: the first real report pays it instead
            logs.event(log, logging.WARNING, "reports.warm_up_failed", error=type(exc).__name__)

    def notify(self) -> None:
        """New work may be there (called by the listener after it stored an instance)."""
        self._wake.set()

    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self.lanes.values()) + self.reports_in_flight

    def stop(self, timeout: float) -> bool:
        """Stop claiming, let jobs in flight finish within ``timeout``, flush findings. True if all finished."""
        self._stop.set()
        self._wake.set()
        self._control.join(timeout=5)
        deadline = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        drained = self.in_flight() == 0
        self.reports.shutdown(wait=drained, cancel_futures=not drained)
        for name, lane in self.lanes.items():
            lane.batcher.stop(timeout=max(0.1, deadline - time.monotonic()))
            lane.pool.shutdown(wait=drained, cancel_futures=not drained)
            sizes = lane.batcher.batch_sizes
            logs.event(log, logging.INFO, "batcher.stats", model=name, batches=sum(sizes.values()),
                       inputs=sum(n * c for n, c in sizes.items()), largest=max(sizes, default=0))
        self._results.put(None)
        self._writer.join(timeout=10)
        return drained

    # -- control: series completion, lease expiry, claiming ----------------------------------------

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                log.exception("pipeline control step failed")
            self._wake.wait(max(0.0, min(self.cfg.poll_seconds, self._next_housekeeping - time.monotonic())))
            self._wake.clear()

    def _tick(self) -> None:
        c0 = time.thread_time()
        try:
            self._tick_once()
        finally:
            self.metrics.add_cpu("all", "control", c0)

    def _tick_once(self) -> None:
        # Series completion and lease expiry are clocks: check them every poll_seconds, not on every wake
        # (the listener wakes the loop once per stored instance); claiming runs on every wake. The next
        # check comes sooner when an open series falls quiet before then (the journal says when), or when
        # a series opened since the last check can first be quiet: a series completes within milliseconds
        # of its quiet period, whatever poll_seconds is.
        now = time.monotonic()
        self._next_housekeeping = min(self._next_housekeeping,
                                      now + max(0.01, self.cfg.series_quiet_seconds + 0.005))
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self.cfg.poll_seconds
            for uid, created in self.journal.complete_series(self.cfg.series_quiet_seconds):
                if created:
                    logs.event(log, logging.INFO, "series.complete", jobs=created)
            expired = self.journal.recover_jobs()
            if expired:
                logs.event(log, logging.WARNING, "jobs.lease_expired", count=expired)
            due = self.journal.next_series_due(self.cfg.series_quiet_seconds)
            if due is not None:  # a wall-clock time (the journal's); + 5 ms so the series is quiet by then
                self._next_housekeeping = min(self._next_housekeeping,
                                              time.monotonic() + max(0.01, due - time.time() + 0.005))
        for name, lane in self.lanes.items():
            room = lane.capacity()
            if room == 0:
                continue
            jobs = self.journal.claim_jobs(name, room, self.cfg.lease_seconds, self.token)
            lane.add(len(jobs))
            for job in jobs:
                lane.pool.submit(self._prepare, lane, job)
        room = 4 - self.reports_in_flight
        if room > 0:
            for job in self.journal.claim_jobs(None, room, self.cfg.lease_seconds, self.token, reports=True):
                with self._reports_lock:
                    self.reports_in_flight += 1
                self.reports.submit(self._report, job)

    # -- reports (SR / SEG) -----------------------------------------------------------------------

    def _report(self, job: Job) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            spec = self.models.get(job.model)
            if spec is None or spec.version != job.model_version:
                raise LookupError("the model version that made these findings is no longer loaded")
            records = build_report(job, spec, self.journal, self.spool, self.prebuilt)
            if self.journal.finish_report(job, records, self.destinations):
                self.metrics.reports.labels(job.model, "done").inc()
                self.metrics.stage_seconds.labels(job.model, "object_write").observe(time.monotonic() - t0)
                self.metrics.add_cpu(job.model, "object_write", c0)
                logs.event(log, logging.INFO, "report.written", job=job.id, model=job.model,
                           objects=len(records), generation=job.generation)
                if self.on_results is not None:
                    self.on_results()
        except Exception as exc:
            state = self.journal.fail_job(job, _reason(exc), self.cfg.max_attempts, self.cfg.retry_seconds)
            self.metrics.reports.labels(job.model, state).inc()
            logs.event(log, logging.WARNING, "report.failed", job=job.id, model=job.model, state=state,
                       error=type(exc).__name__)
        finally:
            with self._reports_lock:
                self.reports_in_flight -= 1
            self._wake.set()

    # -- one job ----------------------------------------------------------------------------------

    def _prepare(self, lane: ModelLane, job: Job) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            load = _instance_input if job.level == "instance" else _series_input
            prepared = load(self.spool, self.journal, lane.spec, job)
        except Exception as exc:
            self._fail(lane, job, exc)
            return
        self.metrics.stage_seconds.labels(lane.spec.name, "preprocess").observe(time.monotonic() - t0)
        self.metrics.add_cpu(lane.spec.name, "preprocess", c0)

        def complete(outputs: Outputs | None, err: BaseException | None) -> None:
            if err is not None:
                self._fail(lane, job, err)
            else:
                lane.pool.submit(self._postprocess, lane, job, prepared, outputs)

        collector = _Collector(len(prepared.planes), complete)
        for i, plane in enumerate(prepared.planes):
            lane.batcher.submit(Request(plane, collector.callback(i)))

    def _postprocess(self, lane: ModelLane, job: Job, prepared: Prepared, outputs: Outputs) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        spec = lane.spec
        try:
            findings: list[Finding] = []
            for out in spec.outputs:
                if spec.task == "classification":
                    findings += classify(outputs[out.name], out.activation, out.labels)
                else:
                    findings += segment(outputs[out.name], out.activation, out.labels, prepared.geometries,
                                        prepared.slice_spacing)
            records, masks = [], []
            if prepared.skipped or job.level == "series":
                for f in findings:
                    f.measurements["planes"] = len(prepared.planes)
                    f.measurements["skipped_instances"] = prepared.skipped
            for i, f in enumerate(findings):
                mask_path = None
                if f.mask is not None and f.present:
                    mask_path = self.spool.write_mask(f"{job.model}-{job.id}-{job.attempts}-{i}", f.mask)
                    masks.append(mask_path)
                records.append(FindingRecord(f.label, f.present, f.probability, f.measurements, mask_path))
        except Exception as exc:
            self._fail(lane, job, exc)
            return
        self.metrics.stage_seconds.labels(spec.name, "postprocess").observe(time.monotonic() - t0)
        self.metrics.add_cpu(spec.name, "postprocess", c0)
        self._results.put((JobResult(job, records, prepared.sources), masks))
        lane.done()
        if job.level == "instance" and prepared.sop_class_uid is not None:
            self._prebuild(spec, job, prepared.sop_class_uid, records)

    def _prebuild(self, spec: ModelSpec, job: Job, sop_class_uid: str, records: list[FindingRecord]) -> None:
        """The SR's per-image items for this image's positive findings, now rather than after the quiet
        period (report authoring's CPU, counted as such). Only a memo: the report reads the journal."""
        c0 = time.thread_time()
        try:
            for r in records:
                if r.present:
                    area = r.measurements.get("area_mm2")
                    self.prebuilt.add(r.label, sop_class_uid, str(job.sop_instance_uid), r.probability,
                                      None if area is None else float(area))  # type: ignore[arg-type]
        except Exception:  # the report builds them itself
            log.debug("could not prebuild SR items", exc_info=True)
        self.metrics.add_cpu(spec.name, "object_write", c0)

    def _fail(self, lane: ModelLane, job: Job, exc: BaseException) -> None:
        if isinstance(exc, EngineUnavailableError):
            # Not the job's failure (a remote engine stopped waiting for its server at shutdown): the job
            # stays running in the journal and returns to pending at the next start or when its lease ends.
            logs.event(log, logging.INFO, "job.deferred", job=job.id, model=job.model, reason="backend unavailable")
            lane.done()
            return
        try:
            state = self.journal.fail_job(job, _reason(exc), self.cfg.max_attempts, self.cfg.retry_seconds)
            self.metrics.jobs.labels(job.model, state).inc()
            logs.event(log, logging.WARNING, "job.failed", job=job.id, model=job.model, job_level=job.level,
                       attempt=job.attempts, state=state, error=type(exc).__name__)
        except Exception:
            log.exception("could not record a job failure")
        finally:
            lane.done()
            self._wake.set()

    # -- writer: many jobs per transaction ---------------------------------------------------------

    def _writer_loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._results.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= 64:
                    break
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    item = False  # type: ignore[assignment]
                    break
            if item is None:
                stopping = True
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[JobResult, list[str]]]) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            finished = set(self.journal.finish_jobs([r for r, _ in batch]))
        except Exception:
            if len(batch) > 1:  # one bad record must not hold back the others: commit them one by one
                for item in batch:
                    self._commit([item])
                return
            result, masks = batch[0]
            log.exception("could not commit a job's findings")
            for m in masks:
                self.spool.remove(m)
            try:
                state = self.journal.fail_job(result.job, "findings could not be recorded", self.cfg.max_attempts,
                                              self.cfg.retry_seconds)
                self.metrics.jobs.labels(result.job.model, state).inc()
            except Exception:
                log.exception("could not record a job failure; the job will run again after its lease")
            return
        for result, masks in batch:
            if result.job.id in finished:
                self.metrics.jobs.labels(result.job.model, "done").inc()
            else:
                logs.event(log, logging.WARNING, "job.lease_lost", job=result.job.id, model=result.job.model)
                for m in masks:
                    self.spool.remove(m)
        self.metrics.stage_seconds.labels("all", "commit").observe(time.monotonic() - t0)
        self.metrics.add_cpu("all", "commit", c0)
        self._wake.set()
        if finished and self.on_jobs_done is not None:
            self.on_jobs_done(sorted(finished))
