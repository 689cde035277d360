"""End-to-end benchmark: scanner -> edged -> findings -> SR at the PACS, in one run on 127.0.0.1.

1. The bare engine: ``edged engines bench MODEL --batch 1 4 8 16 --json`` for every model (same config and
   backend as the daemon); each model's best images/s is what the pipeline is compared with.
2. Orthanc as the PACS (``[[destinations]]``), a fresh edged, and synthetic chest CT slices (512x512
   16-bit, drawn from a pool of ``edged.synthetic.chest_phantom`` images, each slice with its own SOP
   Instance UID and position) pushed with DCMTK ``storescu`` (``TCP_NODELAY=1``), one ``storescu`` per
   series, series after series. Then it waits, polling the journal read-only, until every job is done
   and every result delivered.
3. Figures, all from this one run: the machine's cores; sustained findings/s of the classifier and images/s
   of every model against its bare engine at its best batch size; latency from receipt to finding (per
   slice) and from receipt to delivery (per result, journal timestamps); time to result per series; edged's
   CPU time per stage (``edged_stage_cpu_seconds_total``, summing to the daemon's CPU time); wall time per
   stage; the batch sizes the batcher formed; CPU per slice outside inference.

Run:  .venv/bin/python benchmarks/e2e.py [--quick] [--backend onnxruntime|tensorrt] [--slices 1000] [--json FILE]
See benchmarks/README.md for what every figure means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from edged.synthetic import chest_phantom, ct_slice

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from harness import BenchError, run_in_workdir, spawn, stop_on_sigterm, stop_proc  # noqa: E402
from ingest import HTTP_LISTENING, Tools, _positive, dcmtk_env, find_tools  # noqa: E402

HOST = "127.0.0.1"
MAX_PDU = 131072
EDGED_AET = "EDGED"
CALLING_AET = "E2EBENCH"
CLASSIFIER = "ct-nodule-cls"
BENCH_BATCHES = (1, 4, 8, 16)
LISTENING = re.compile(r"event=listening host=\S+ port=(\d+)")
BACKEND = re.compile(r"event=engines\.backend backend=(\S+)")
NOTE = "storescu runs with TCP_NODELAY=1; sender, edged, ONNX Runtime and Orthanc share this machine's cores"

START_TIMEOUT_S = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Pipeline stages in the order a slice meets them; "receive" is edged_store_seconds (C-STORE handling).
STAGES = ("receive", "preprocess", "queue_wait", "inference", "postprocess", "commit", "object_write", "delivery")
WAIT_STAGES = ("queue_wait",)  # time spent waiting, not working: left out of the shares
#: Cores other processes may keep busy (on average) before the report warns that they skewed the figures.
OTHERS_LIMIT = 0.2


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no output)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (/proc/stat: user, nice, system, irq, softirq)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / CLK_TCK


def _rusage_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds consumed so far by the machine and by each part of the run, at one moment."""

    wall: float
    machine: float
    edged: float
    orthanc: float
    senders: float  # this script's finished children: storescu (and the engine benches, before the window)
    script: float

    @classmethod
    def take(cls, edged_pid: int, orthanc_pid: int | None) -> "CpuSnapshot":
        return cls(time.monotonic(), machine_busy_seconds(), proc_cpu_seconds(edged_pid),
                   proc_cpu_seconds(orthanc_pid) if orthanc_pid is not None else 0.0,
                   _rusage_seconds(resource.RUSAGE_CHILDREN), _rusage_seconds(resource.RUSAGE_SELF))


@dataclass(frozen=True)
class CpuUse:
    """Cores busy on average (CPU seconds / wall seconds) between two snapshots, per part of the run."""

    seconds: float
    edged: float
    edged_cpu_seconds: float
    orthanc: float
    senders: float
    script: float
    others: float  # everything else on the machine: other people's work skews every figure

    @classmethod
    def between(cls, a: CpuSnapshot, b: CpuSnapshot) -> "CpuUse":
        wall = max(b.wall - a.wall, 1e-9)
        parts = [b.edged - a.edged, b.orthanc - a.orthanc, b.senders - a.senders, b.script - a.script]
        others = (b.machine - a.machine) - sum(parts)
        return cls(wall, parts[0] / wall, parts[0], parts[1] / wall, parts[2] / wall, parts[3] / wall,
                   max(0.0, others) / wall)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else math.nan


# -- synthetic series --------------------------------------------------------------------------------


@dataclass
class Series:
    index: int
    folder: Path
    files: list[Path]


def phantom_pool(count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct chest phantoms (HU), 0, 1 or 2 nodules in turn, so the classifier sees both classes."""
    rng = np.random.default_rng(seed)
    return [chest_phantom(rng, nodules=i % 3)[0] for i in range(count)]


def write_slices(root: Path, slices: int, series_size: int, pool: list[np.ndarray]) -> list[Series]:
    """``slices`` CT slices in series of ``series_size`` (one folder each), cycling through ``pool``.

    Every series gets its own study and series UIDs; every slice its own SOP Instance UID (derived from
    the series UID and its index) and position, so edged sees them as distinct images.
    """
    series: list[Series] = []
    written = 0
    while written < slices:
        n = min(series_size, slices - written)
        s = Series(len(series), root / f"series{len(series):03d}", [])
        s.folder.mkdir(parents=True)
        study_uid, series_uid = generate_uid(), generate_uid()
        for i in range(n):
            hu = pool[(written + i) % len(pool)]
            ds = ct_slice(i, study_uid=study_uid, series_uid=series_uid, hu=hu, slice_thickness=2.5)
            path = s.folder / f"ct{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            s.files.append(path)
        series.append(s)
        written += n
    return series


# -- bare engine -------------------------------------------------------------------------------------


@dataclass
class EnginePoint:
    model: str
    batch: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    backend: str
    cpu_cores: float | None  # CPU seconds per wall second of the bench process while it ran this batch size
    others_cores: float | None  # the same for every other process on the machine (should be ~0)


def engine_bench(config: Path, model: str, batches: Sequence[int], seconds: float, log: Path) -> list[EnginePoint]:
    """``edged engines bench MODEL --json``; also samples the bench process's CPU time after each line.

    The first batch size's CPU share is unknown (the interval includes Python's start and the model load).
    """
    cmd = [sys.executable, "-m", "edged", "engines", "bench", model, "--batch", *map(str, batches),
           "--seconds", f"{seconds:g}", "--json", "--config", str(config)]
    with log.open("ab") as err:
        proc = spawn(cmd, group=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    points: list[EnginePoint] = []
    last: tuple[float, float, float] | None = None
    assert proc.stdout is not None
    for raw in proc.stdout:
        now = (time.monotonic(), _cpu_or_nan(proc.pid), machine_busy_seconds())
        line = raw.decode(errors="replace").strip()
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        cores = others = None
        if last is not None and not math.isnan(now[1]):
            wall = max(now[0] - last[0], 1e-9)
            cores = (now[1] - last[1]) / wall
            others = max(0.0, (now[2] - last[2]) - (now[1] - last[1])) / wall
        last = now
        points.append(EnginePoint(model, int(rec["batch"]), float(rec["images_per_s"]), float(rec["p50_ms"]),
                                  float(rec["p99_ms"]), str(rec.get("backend", "?")), cores, others))
    rc = proc.wait()
    if rc != 0 or not points:
        raise BenchError(f"edged engines bench {model} failed ({rc}):\n{_tail(log)}")
    return points


def _cpu_or_nan(pid: int) -> float:
    try:
        return proc_cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return math.nan


# -- peers -------------------------------------------------------------------------------------------


class Pacs:
    """Orthanc from tests/orthanc.py (Debian's package, kept on 127.0.0.1 by an LD_PRELOAD shim)."""

    def __init__(self, workdir: Path) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from orthanc import Orthanc  # tests/orthanc.py (needs tests/support.py, which imports pytest)
        except ImportError as exc:
            raise BenchError(f"cannot import tests/orthanc.py ({exc}); install the test extra or use --no-orthanc")
        workdir.mkdir(parents=True, exist_ok=True)
        self.server = Orthanc(workdir)

    def start(self) -> "Pacs":
        try:
            self.server.start()
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"Orthanc did not start: {exc}") from None
        return self

    @property
    def port(self) -> int:
        return int(self.server.dicom_port)

    def count(self) -> int:
        return len(self.server.instances())

    def stop(self) -> None:
        self.server.stop()


class Edged:
    """``python -m edged serve`` with a fresh storage dir, results going to ``destination`` if given."""

    def __init__(self, workdir: Path, engines: Path, quiet_seconds: float, destination: int | None,
                 backend: str = "onnxruntime", models: Sequence[str] = (), extra_toml: str = "") -> None:
        self.workdir = workdir
        self.models = list(models)  # [engines] models: empty means every model in ``engines``
        self.extra_toml = extra_toml  # more sections, appended to the configuration
        self.backend_requested = backend
        self.storage = workdir / "edged-data"
        self.config = workdir / "edged.toml"
        self.log = workdir / "edged.log"
        self.engines = engines
        self.quiet_seconds = quiet_seconds
        self.destination = destination
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = 0

    @property
    def journal(self) -> Path:
        return self.storage / "journal.sqlite3"

    def write_config(self) -> None:
        text = (
            f"[dicom]\nhost = {_toml_str(HOST)}\nport = 0\nmax_pdu = {MAX_PDU}\n\n"
            f"[http]\nhost = {_toml_str(HOST)}\nport = 0\n\n"
            f"[storage]\ndir = {_toml_str(str(self.storage))}\nmin_free_bytes = 0\nmax_pending = 100000\n\n"
            f"[engines]\ndir = {_toml_str(str(self.engines))}\nbackend = {_toml_str(self.backend_requested)}\n"
            f"cache_dir = {_toml_str(str(self.workdir / 'engine-cache'))}\n"
            f"models = [{', '.join(map(_toml_str, self.models))}]\n\n"
            f"[pipeline]\nseries_quiet_seconds = {self.quiet_seconds!r}\npoll_seconds = 0.1\n"
        )
        if self.destination is not None:
            text += (f"\n[[destinations]]\nname = \"orthanc\"\nae_title = \"ORTHANC\"\nhost = {_toml_str(HOST)}\n"
                     f"port = {self.destination}\n")
        text += self.extra_toml
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(text)

    def start(self) -> "Edged":
        with self.log.open("ab") as log:
            self.proc = spawn([sys.executable, "-m", "edged", "serve", "--config", str(self.config)], group=True,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir)
        # TensorRT builds the plans at the first start: minutes, not seconds
        limit = START_TIMEOUT_S if self.backend_requested == "onnxruntime" else 1800.0
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            dicom, http = LISTENING.search(text), HTTP_LISTENING.search(text)
            if dicom and http:
                self.port, self.http_port = int(dicom.group(1)), int(http.group(1))
                return self
            if self.proc.poll() is not None:
                raise BenchError(f"edged exited with {self.proc.returncode} before listening:\n{_tail(self.log)}")
            time.sleep(0.05)
        raise BenchError(f"edged did not log event=listening within {limit:.0f}s:\n{_tail(self.log)}")

    def backend(self) -> str:
        found = BACKEND.search(self.log.read_text(errors="replace"))
        return found.group(1) if found else "?"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/metrics", timeout=30) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc is None:
            return
        rc = stop_proc(self.proc, signal.SIGTERM, timeout=60)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it left behind in its group
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None
        if rc != 0:  # reported, not raised: this runs in finally blocks
            print(f"warning: edged exited with {rc} after SIGTERM (log: {self.log})", file=sys.stderr)


# -- sending -----------------------------------------------------------------------------------------


@dataclass
class Send:
    series: int
    files: int
    started: float  # time.time()
    seconds: float


def send_series(tools: Tools, port: int, series: Series, log: Path) -> Send:
    """One ``storescu`` association with every file of ``series``, in slice order."""
    cmd = [tools.storescu, "-aet", CALLING_AET, "-aec", EDGED_AET, "--max-pdu", str(MAX_PDU), HOST, str(port),
           *map(str, series.files)]
    started, t0 = time.time(), time.monotonic()
    with log.open("ab") as out:
        proc = spawn(cmd, group=True, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=dcmtk_env())
        rc = proc.wait()
    seconds = time.monotonic() - t0
    if rc != 0:
        raise BenchError(f"storescu (series {series.index}) exited with {rc}:\n{_tail(log)}")
    return Send(series.index, len(series.files), started, seconds)


# -- the journal (read-only) -------------------------------------------------------------------------


def open_journal(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA query_only = 1")
    return conn


@dataclass
class Progress:
    instances: int
    cls_done: int
    open_series: int
    unfinished_jobs: int
    report_jobs_done: int
    results: int
    deliveries: int
    delivered: int
    dead_jobs: int
    dead_deliveries: int

    def line(self, slices: int) -> str:
        return (f"received {self.instances}/{slices}, {CLASSIFIER} findings {self.cls_done}, open series "
                f"{self.open_series}, unfinished jobs {self.unfinished_jobs}, reports {self.report_jobs_done}, "
                f"delivered {self.delivered}/{self.deliveries}")


def progress(conn: sqlite3.Connection) -> Progress:
    one = lambda sql: int(conn.execute(sql).fetchone()[0] or 0)  # noqa: E731
    return Progress(
        instances=one("SELECT COUNT(*) FROM instances"),
        cls_done=one(f"SELECT COUNT(*) FROM jobs WHERE model = '{CLASSIFIER}' AND level = 'instance' AND state = 'done'"),
        open_series=one("SELECT COUNT(*) FROM series WHERE state = 'open'"),
        unfinished_jobs=one("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running', 'failed')"),
        report_jobs_done=one("SELECT COUNT(*) FROM jobs WHERE level = 'report' AND state = 'done'"),
        results=one("SELECT COUNT(*) FROM results"),
        deliveries=one("SELECT COUNT(*) FROM deliveries"),
        delivered=one("SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'"),
        dead_jobs=one("SELECT COUNT(*) FROM jobs WHERE state = 'dead'"),
        dead_deliveries=one("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'"),
    )


def _first_errors(conn: sqlite3.Connection, table: str) -> str:
    rows = conn.execute(f"SELECT id, last_error FROM {table} WHERE state = 'dead' ORDER BY id LIMIT 3").fetchall()
    return "; ".join(f"#{i}: {e}" for i, e in rows)


def is_finished(p: Progress, slices: int, series: int, destinations: int) -> bool:
    """Everything sent was stored, every series completed, every job done, every result delivered."""
    return (p.instances >= slices and p.open_series == 0 and p.unfinished_jobs == 0
            and p.report_jobs_done >= series and p.delivered == p.results * destinations)


def wait_until_finished(edged: Edged, slices: int, series: int, destinations: int, timeout: float) -> float:
    """Poll the journal until :func:`is_finished`; returns time.time() then. Dead jobs or deliveries fail."""
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 10
    conn = open_journal(edged.journal)
    try:
        while True:
            p = progress(conn)
            if p.dead_jobs:
                raise BenchError(f"{p.dead_jobs} dead jobs: {_first_errors(conn, 'jobs')}")
            if p.dead_deliveries:
                raise BenchError(f"{p.dead_deliveries} dead deliveries: {_first_errors(conn, 'deliveries')}")
            if is_finished(p, slices, series, destinations):
                return time.time()
            if edged.proc is not None and edged.proc.poll() is not None:
                raise BenchError(f"edged exited with {edged.proc.returncode}:\n{_tail(edged.log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"not finished after {timeout:.0f}s: {p.line(slices)}")
            if time.monotonic() > next_note:
                print(f"  waiting: {p.line(slices)}", file=sys.stderr, flush=True)
                next_note = time.monotonic() + 10
            time.sleep(0.25)
    finally:
        conn.close()


# -- figures from the journal ------------------------------------------------------------------------


@dataclass
class SeriesTiming:
    """Seconds after the series' last slice was received (``None``: that step did not happen)."""

    series: int
    slices: int
    generations: int
    completed: float | None  # series marked complete (quiet period + control-loop lag)
    cls_last_finding: float | None
    seg_series_done: float | None
    sr: dict[str, float | None] = field(default_factory=dict)  # model -> SR delivered (or written)
    all_results: float | None = None  # every result (SR, SEG) of the series delivered (or written)


@dataclass
class JournalFigures:
    cls_jobs_done: int
    first_received: float
    last_received: float
    last_cls_finished: float
    latency_ms: list[float]  # received -> classifier job finished, per instance
    series: list[SeriesTiming]
    models: list[str]
    results_by_kind: dict[str, int]
    #: per model: images it ran on (an instance job: 1; a series job: its sources) and its last job's finished_at
    model_images: dict[str, int] = field(default_factory=dict)
    model_last_finished: dict[str, float] = field(default_factory=dict)
    #: per result (SR, SEG) and destination: (model, kind, seconds from the last instance of its series received
    #: before the result was written, to the result delivered; with no destination: to the result written)
    result_latency: list[tuple[str, str, float]] = field(default_factory=list)


def journal_figures(path: Path, sends: list[Send], delivered: bool) -> JournalFigures:
    conn = open_journal(path)
    try:
        return _journal_figures(conn, sends, delivered)
    finally:
        conn.close()


def _journal_figures(conn: sqlite3.Connection, sends: list[Send], delivered: bool) -> JournalFigures:
    rows = conn.execute(
        "SELECT i.received_at, j.finished_at FROM jobs j JOIN instances i ON i.sop_instance_uid = j.sop_instance_uid"
        " WHERE j.model = ? AND j.level = 'instance' AND j.state = 'done'", (CLASSIFIER,)).fetchall()
    first_received = float(conn.execute("SELECT MIN(received_at) FROM instances").fetchone()[0])
    last_received = float(conn.execute("SELECT MAX(received_at) FROM instances").fetchone()[0])
    models = [m for (m,) in conn.execute("SELECT DISTINCT model FROM jobs ORDER BY model")]
    kinds = dict(conn.execute("SELECT kind, COUNT(*) FROM results GROUP BY kind").fetchall())
    # the series in the order they were sent: by first receipt
    uids = [u for (u,) in conn.execute(
        "SELECT series_instance_uid FROM instances GROUP BY series_instance_uid ORDER BY MIN(received_at)")]
    timings = [_series_timing(conn, i, uid, models, delivered) for i, uid in enumerate(uids)]
    per_model = conn.execute(
        "SELECT model, SUM(CASE WHEN level = 'instance' THEN 1 ELSE COALESCE(json_array_length(sources), 0) END),"
        " MAX(finished_at) FROM jobs WHERE state = 'done' AND level IN ('instance', 'series') GROUP BY model").fetchall()
    # the same definition as edged_end_to_end_seconds, from the journal's own timestamps (exact, not bucketed)
    received = ("(SELECT MAX(i.received_at) FROM instances i WHERE i.series_instance_uid = r.series_instance_uid"
                " AND i.received_at <= r.created_at)")
    latency_sql = (f"SELECT r.model, r.kind, d.delivered_at - {received} FROM results r JOIN deliveries d"
                   " ON d.result_id = r.id WHERE d.state = 'delivered'" if delivered else
                   f"SELECT r.model, r.kind, r.created_at - {received} FROM results r")
    latency = [(str(m), str(k), float(v)) for m, k, v in conn.execute(latency_sql) if v is not None]
    return JournalFigures(
        cls_jobs_done=len(rows),
        first_received=first_received,
        last_received=last_received,
        last_cls_finished=max((f for _, f in rows), default=math.nan),
        latency_ms=[(f - r) * 1000 for r, f in rows],
        series=timings,
        models=models,
        results_by_kind={str(k): int(v) for k, v in kinds.items()},
        model_images={str(m): int(n) for m, n, _ in per_model},
        model_last_finished={str(m): float(f) for m, _, f in per_model},
        result_latency=latency,
    )


def _series_timing(conn: sqlite3.Connection, index: int, uid: str, models: list[str], delivered: bool) -> SeriesTiming:
    def value(sql: str, *args: Any) -> float | None:
        v = conn.execute(sql, (uid, *args)).fetchone()[0]
        return None if v is None else float(v)

    slices, last = conn.execute("SELECT COUNT(*), MAX(received_at) FROM instances WHERE series_instance_uid = ?",
                                (uid,)).fetchone()
    generation, completed = conn.execute(
        "SELECT generation, completed_at FROM series WHERE series_instance_uid = ?", (uid,)).fetchone()

    def after(t: float | None) -> float | None:
        return None if t is None else t - last

    # the final generation's results: a series reopened by a late slice has an older SR too
    done_at = ("SELECT MAX(d.delivered_at) FROM deliveries d JOIN results r ON r.id = d.result_id"
               " WHERE r.series_instance_uid = ? AND r.generation = ?" if delivered else
               "SELECT MAX(r.created_at) FROM results r WHERE r.series_instance_uid = ? AND r.generation = ?")
    t = SeriesTiming(
        series=index, slices=int(slices), generations=int(generation) + 1,
        completed=after(None if completed is None else float(completed)),
        cls_last_finding=after(value("SELECT MAX(finished_at) FROM jobs WHERE series_instance_uid = ?"
                                     " AND level = 'instance' AND model = ?", CLASSIFIER)),
        seg_series_done=after(value("SELECT MAX(finished_at) FROM jobs WHERE series_instance_uid = ?"
                                    " AND level = 'series'")),
        all_results=after(value(done_at, generation)),
    )
    for model in models:
        t.sr[model] = after(value(done_at + " AND r.model = ? AND r.kind = 'sr'", generation, model))
    return t


# -- figures from /metrics ---------------------------------------------------------------------------


@dataclass
class StageSum:
    stage: str
    model: str
    seconds: float
    count: int


@dataclass
class MetricFigures:
    stages: list[StageSum]
    batches: dict[str, dict[str, int]]  # model -> bucket label ("1", "2", "3-4", ...) -> batches
    batch_mean: dict[str, float]
    #: edged_stage_cpu_seconds_total: (stage, model) -> CPU seconds of the thread that ran it
    cpu: dict[tuple[str, str], float] = field(default_factory=dict)
    native_cpu: float | None = None  # edged_native_threads_cpu_seconds (ONNX Runtime's pool threads, BLAS)


def metric_figures(text: str) -> MetricFigures:
    sums: dict[tuple[str, str], list[float]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    batch_sum: dict[str, list[float]] = {}
    cpu: dict[tuple[str, str], float] = {}
    native: float | None = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "edged_stage_cpu_seconds_total":
                cpu[(s.labels["stage"], s.labels["model"])] = s.value
            elif s.name == "edged_native_threads_cpu_seconds":
                native = s.value
            if family.name == "edged_stage_seconds" and s.name.endswith(("_sum", "_count")):
                key = (s.labels["stage"], s.labels["model"])
                sums.setdefault(key, [0.0, 0.0])[s.name.endswith("_count")] += s.value
            elif family.name == "edged_store_seconds" and s.name.endswith(("_sum", "_count")):
                sums.setdefault(("receive", "-"), [0.0, 0.0])[s.name.endswith("_count")] += s.value
            elif family.name == "edged_batch_size" and s.name.endswith("_bucket"):
                buckets.setdefault(s.labels["model"], []).append((float(s.labels["le"]), s.value))
            elif family.name == "edged_batch_size" and s.name.endswith(("_sum", "_count")):
                batch_sum.setdefault(s.labels["model"], [0.0, 0.0])[s.name.endswith("_count")] += s.value
    order = {name: i for i, name in enumerate(STAGES)}
    stages = sorted((StageSum(st, m, v[0], int(v[1])) for (st, m), v in sums.items()),
                    key=lambda x: (order.get(x.stage, len(order)), x.model))
    return MetricFigures(
        stages=stages,
        batches={m: _bucket_counts(b) for m, b in buckets.items()},
        batch_mean={m: (v[0] / v[1] if v[1] else math.nan) for m, v in batch_sum.items()},
        cpu=cpu, native_cpu=native,
    )


def _bucket_counts(cumulative: list[tuple[float, float]]) -> dict[str, int]:
    """Prometheus' cumulative ``le`` buckets of whole numbers as counts per range ("3-4": 2 < size <= 4)."""
    out: dict[str, int] = {}
    below, prev_le = 0.0, 0.0
    for le, count in sorted(cumulative):
        n = int(count - below)
        lo = int(prev_le) + 1
        label = (f">{int(prev_le)}" if math.isinf(le) else str(int(le)) if lo >= le else f"{lo}-{int(le)}")
        if n:
            out[label] = n
        below, prev_le = count, le
    return out


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Results:
    slices: int
    series_size: int
    quiet_seconds: float
    cpu_count: int | None
    cpu_affinity: int
    engines_dir: str
    backend: str
    orthanc: bool
    dcmtk: str
    engine: list[EnginePoint]
    sends: list[Send]
    journal: JournalFigures
    metrics: MetricFigures
    metrics_ready: MetricFigures  # /metrics when edged was ready, before the first slice: CPU counters' start
    cpu: CpuUse  # from edged ready (models loaded) to the end of the run
    run_seconds: float  # first storescu start -> everything finished
    orthanc_instances: int | None
    load_before: float  # 1-minute load average before the run: other work on the machine skews every figure
    load_after: float
    timings: dict[str, float] = field(default_factory=dict)


def run_benchmark(args: argparse.Namespace, root: Path, tools: Tools) -> Results:
    timings: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    print(f"generating {args.slices} slices from {min(args.phantoms, args.slices)} chest phantoms ...",
          file=sys.stderr, flush=True)
    pool = phantom_pool(min(args.phantoms, args.slices), args.seed)
    series = write_slices(root / "slices", args.slices, args.series_size, pool)
    timings["generate"] = time.monotonic() - t0

    pacs = None if args.no_orthanc else Pacs(root / "orthanc")
    try:
        if pacs is not None:
            pacs.start()
        edged = Edged(root / "edged", args.engines.resolve(), args.quiet_seconds,
                      None if pacs is None else pacs.port, args.backend)
        edged.write_config()
        try:
            engine = bare_engine(edged, args.bench_seconds, timings)
            t0 = time.monotonic()
            edged.start()
            timings["edged_start"] = time.monotonic() - t0
            orthanc_pid = pacs.server.proc.pid if pacs is not None else None
            metrics_ready = edged.metrics()
            cpu0 = CpuSnapshot.take(edged.pid, orthanc_pid)
            sends = []
            for s in series:
                print(f"sending series {s.index + 1}/{len(series)} ({len(s.files)} slices) ...", file=sys.stderr,
                      flush=True)
                sends.append(send_series(tools, edged.port, s, root / "storescu.log"))
            finished = wait_until_finished(edged, args.slices, len(series), 0 if pacs is None else 1, args.timeout)
            metrics_text = edged.metrics()
            cpu = CpuUse.between(cpu0, CpuSnapshot.take(edged.pid, orthanc_pid))
            (root / "metrics.txt").write_text(metrics_text)
            backend = edged.backend()
        finally:
            edged.stop()
        orthanc_instances = pacs.count() if pacs is not None else None
    finally:
        if pacs is not None:
            pacs.stop()
    return Results(
        slices=args.slices, series_size=args.series_size, quiet_seconds=args.quiet_seconds,
        cpu_count=os.cpu_count(), cpu_affinity=len(os.sched_getaffinity(0)), engines_dir=str(args.engines),
        backend=backend, orthanc=pacs is not None, dcmtk=tools.version, engine=engine, sends=sends,
        journal=journal_figures(edged.journal, sends, delivered=pacs is not None),
        metrics=metric_figures(metrics_text), metrics_ready=metric_figures(metrics_ready), cpu=cpu, run_seconds=finished - sends[0].started,
        orthanc_instances=orthanc_instances, load_before=load_before, load_after=os.getloadavg()[0],
        timings=timings,
    )


def bare_engine(edged: Edged, seconds: float, timings: dict[str, float]) -> list[EnginePoint]:
    """Every model of ``--engines`` at every batch size of BENCH_BATCHES up to its ``max_batch`` (plus the
    ``max_batch`` itself), with the daemon's configuration and backend, before the daemon starts."""
    t0 = time.monotonic()
    log = edged.workdir / "bench.log"
    points: list[EnginePoint] = []
    for model, max_batch in models_in(edged.engines):
        batches = sorted({b for b in BENCH_BATCHES if b <= max_batch} | {max_batch})
        print(f"bare engine: edged engines bench {model} --batch {' '.join(map(str, batches))} ...",
              file=sys.stderr, flush=True)
        points += engine_bench(edged.config, model, batches, seconds, log)
    timings["engine_bench"] = time.monotonic() - t0
    return points


def models_in(engines: Path) -> Iterator[tuple[str, int]]:
    """(name, max_batch) of the models in ``engines`` that have a model.onnx, the classifier first."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    found = []
    for toml in sorted(engines.glob("*/model.toml")):
        spec = tomllib.loads(toml.read_text())
        if (toml.parent / "model.onnx").exists():
            found.append((str(spec["name"]), int(spec.get("batching", {}).get("max_batch", 1))))
    yield from sorted(found, key=lambda m: (m[0] != CLASSIFIER, m[0]))


# -- the report --------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def best_engine(r: Results, model: str = CLASSIFIER) -> EnginePoint | None:
    """The bench's best batch size (images/s) for ``model``; None if it was not benched."""
    return max((p for p in r.engine if p.model == model), key=lambda p: p.images_per_s, default=None)


#: Rows of the CPU table: (row, edged_stage_cpu_seconds_total stages it sums). Native threads go to inference.
CPU_ROWS = (
    ("receive", ("receive",)),  # the C-STORE handler: header, temp file, fsync, rename, the instance's journal row
    ("journal", ("control", "commit")),  # pipeline: series completion, lease recovery, claims; findings commit
    ("decode/preprocess", ("preprocess",)),
    ("inference", ("inference",)),  # the batcher thread (batching, the engine call)
    ("postprocess", ("postprocess",)),
    ("report authoring", ("object_write",)),  # SR / SEG with highdicom (and per-image SR items built ahead), written, journal rows
    ("delivery", ("delivery",)),  # C-STORE to the destination, the delivery's journal row
)


@dataclass
class CpuRow:
    row: str
    model: str
    seconds: float


def cpu_rows(r: Results) -> list[CpuRow]:
    """edged's CPU time from ready to finished, per stage: the deltas of edged_stage_cpu_seconds_total (and of
    edged_native_threads_cpu_seconds, as inference) between the two scrapes; what no stage counted is the last
    row, so the rows sum to the daemon's utime + stime (/proc/<pid>/stat) over the same window."""
    def delta(key: tuple[str, str]) -> float:
        return r.metrics.cpu.get(key, 0.0) - r.metrics_ready.cpu.get(key, 0.0)

    rows: list[CpuRow] = []
    for name, stages in CPU_ROWS:
        keys = sorted({k for k in r.metrics.cpu if k[0] in stages}, key=lambda k: (k[1] != CLASSIFIER, k[1]))
        per_model: dict[str, float] = {}
        for key in keys:
            per_model[key[1]] = per_model.get(key[1], 0.0) + delta(key)
        rows += [CpuRow(name, model, seconds) for model, seconds in per_model.items()]
        if name == "inference" and r.metrics.native_cpu is not None:
            rows.append(CpuRow(name, "pool threads", r.metrics.native_cpu - (r.metrics_ready.native_cpu or 0.0)))
    counted = sum(x.seconds for x in rows)
    rows.append(CpuRow("not attributed", "-", r.cpu.edged_cpu_seconds - counted))
    return rows


def model_rates(r: Results) -> dict[str, dict[str, float]]:
    """Per model: images it ran on ÷ (its last job finished - the first slice received), and that ÷ the bench's
    best images/s for the model (its best batch size, measured in this run)."""
    j = r.journal
    out: dict[str, dict[str, float]] = {}
    for model, images in j.model_images.items():
        span = j.model_last_finished[model] - j.first_received
        rate = images / span if span > 0 else math.nan
        best = best_engine(r, model)
        out[model] = {"images": images, "seconds": span, "images_per_s": rate,
                      "bare_best_images_per_s": best.images_per_s if best else math.nan,
                      "bare_best_batch": best.batch if best else math.nan,
                      "ratio": rate / best.images_per_s if best else math.nan}
    return out


def result_latency(r: Results) -> dict[str, dict[str, float]]:
    """p50/p99/max seconds from received to delivered (or written), per model and kind and over all results."""
    groups: dict[str, list[float]] = {"all results": [v for _, _, v in r.journal.result_latency]}
    for model, kind, v in r.journal.result_latency:
        groups.setdefault(f"{model} {kind.upper()}", []).append(v)
    return {k: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v, default=math.nan)}
            for k, v in groups.items()}


#: The issue's aim for end-to-end findings/s, as a share of the bare engine at its best batch.
TARGET_RATIO = 0.7


def cpu_ceiling(r: Results) -> dict[str, float]:
    """What this machine's cores allow, from figures measured in this run (an upper bound, not a forecast).

    ``findings_per_s``: every core given to edged alone (no sender, no PACS, no other process) at the CPU it
    spent per slice in this run, in all. ``budget_ms_per_slice``: the CPU per slice, in all, that
    :data:`TARGET_RATIO` times the bare engine leaves on these cores; ``bench_inference_ms_per_image``: the
    bench's own CPU per image at its best batch (NaN where the bench could not measure it: the first batch
    size), and ``outside_inference_budget_ms``: what is left of the budget after it (negative: no CPU outside
    inference at all would do).
    """
    best = best_engine(r)
    cores = float(r.cpu_affinity or r.cpu_count or 1)
    cpu_ms = r.cpu.edged_cpu_seconds / r.slices * 1000 if r.slices else math.nan
    bare = best.images_per_s if best else math.nan
    ceiling = cores * 1000 / cpu_ms if cpu_ms > 0 else math.nan
    budget = cores * 1000 / (TARGET_RATIO * bare) if bare > 0 else math.nan
    bench_cpu = (best.cpu_cores * 1000 / best.images_per_s
                 if best is not None and best.cpu_cores is not None and best.images_per_s > 0 else math.nan)
    return {"cores": cores, "edged_cpu_ms_per_slice": cpu_ms, "findings_per_s": ceiling,
            "ratio_to_bare_engine": ceiling / bare if bare > 0 else math.nan,
            "target_findings_per_s": TARGET_RATIO * bare, "budget_ms_per_slice": budget,
            "bench_inference_ms_per_image": bench_cpu, "outside_inference_budget_ms": budget - bench_cpu}


def summary(r: Results) -> dict[str, Any]:
    """The headline figures (also the JSON's)."""
    j, best = r.journal, best_engine(r)
    span = j.last_cls_finished - j.first_received
    findings_per_s = j.cls_jobs_done / span if span > 0 else math.nan
    send_seconds = sum(s.seconds for s in r.sends)
    rows = cpu_rows(r)
    inference_cpu = sum(x.seconds for x in rows if x.row == "inference")
    sr_key = "delivered" if r.orthanc else "written"
    out: dict[str, Any] = {
        "cpu_count": r.cpu_count,
        "findings_per_s": findings_per_s,
        "bare_engine_images_per_s": best.images_per_s if best else math.nan,
        "bare_engine_batch": best.batch if best else math.nan,
        "ratio_to_bare_engine": findings_per_s / best.images_per_s if best else math.nan,
        "models": model_rates(r),
        "ingest_images_per_s": r.slices / send_seconds,
        "latency_to_finding_ms": {"p50": percentile(j.latency_ms, 50), "p99": percentile(j.latency_ms, 99),
                                  "max": max(j.latency_ms, default=math.nan)},
        f"latency_received_to_{sr_key}_s": result_latency(r),
        "cpu_seconds_by_stage": [asdict(x) for x in rows],
        "edged_cpu_ms_per_slice": r.cpu.edged_cpu_seconds / r.slices * 1000,
        "inference_cpu_ms_per_slice": inference_cpu / r.slices * 1000,
        "cpu_outside_inference_ms_per_slice": (r.cpu.edged_cpu_seconds - inference_cpu) / r.slices * 1000,
        "edged_cores_busy": r.cpu.edged,
        "cpu_ceiling": cpu_ceiling(r),
    }
    for model in j.models:
        values = [t.sr.get(model) for t in j.series]
        present = [v for v in values if v is not None]
        out[f"sr_{sr_key}_s.{model}"] = {"p50": percentile(present, 50), "p99": percentile(present, 99),
                                         "overhead_p50": percentile(present, 50) - r.quiet_seconds,
                                         "overhead_p99": percentile(present, 99) - r.quiet_seconds}
    return out


def report(r: Results) -> str:
    s, j = summary(r), r.journal
    sr_word = "delivered to Orthanc" if r.orthanc else "written (no destination: --no-orthanc)"
    lines = [
        f"edged end-to-end: {r.slices} slices of 512x512 16-bit CT in {len(r.sends)} series of up to "
        f"{r.series_size}, one storescu association per series, in sequence",
        f"machine: {r.cpu_count} CPU cores ({r.cpu_affinity} usable), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {r.dcmtk}",
        f"edged: backend {r.backend}, engines {r.engines_dir}, series_quiet_seconds {r.quiet_seconds:g}, "
        f"destination {'Orthanc (127.0.0.1)' if r.orthanc else 'none'}",
        f"note: {NOTE}",
        f"1-minute load average: {r.load_before:.2f} before the run, {r.load_after:.2f} at its end",
    ]
    busy_bench = [p for p in r.engine if (p.others_cores or 0.0) > OTHERS_LIMIT]
    if busy_bench:
        lines.append(f"WARNING: other processes kept up to {max(p.others_cores or 0.0 for p in busy_bench):.2f} cores "
                     f"busy during the engine bench; its figures include that competition")
    lines += [
        "",
        "bare engine (edged engines bench MODEL --batch ..., same config and backend, before the daemon starts):",
        f"  {'model':<14} {'batch':>5} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU cores':>9} {'others':>6}",
    ]
    for p in r.engine:
        best = best_engine(r, p.model)
        mark = " best" if best is not None and best.batch == p.batch else ""
        lines.append(f"  {p.model:<14} {p.batch:>5} {p.images_per_s:>9.1f} {p.p50_ms:>8.2f} {p.p99_ms:>8.2f} "
                     f"{_fmt(p.cpu_cores):>9} {_fmt(p.others_cores):>6}{mark}")
    lines.append("  (CPU cores: the bench process's CPU time per second while it ran that batch size; the first "
                 "size's interval includes its start-up, so none is shown; others: every other process's)")
    lines += [
        "",
        "sustained throughput in the pipeline vs the bare engine at its best batch (both measured in this run):",
        f"  {'model':<14} {'images':>6} {'seconds':>8} {'images/s':>9} {'bare best':>9} {'batch':>5} {'ratio':>6}",
    ]
    for model, m in s["models"].items():
        lines.append(f"  {model:<14} {m['images']:>6} {m['seconds']:>8.1f} {m['images_per_s']:>9.1f} "
                     f"{_fmt(m['bare_best_images_per_s'], '.1f'):>9} {_fmt(m['bare_best_batch'], '.0f'):>5} "
                     f"{_fmt(m['ratio']):>5}x")
    lines += [
        "  (images: an instance job's slice, or every slice of a series job; seconds: the first slice received ->"
        " the model's last job finished; the models share the cores in the pipeline, not in the bench)",
        "",
        "headline:",
        f"  {CLASSIFIER} findings/s (sustained)   {s['findings_per_s']:8.1f}   "
        f"({j.cls_jobs_done} findings / first slice received -> last finding)",
        f"  ratio end-to-end / bare engine      {s['ratio_to_bare_engine']:8.2f}x   (at the bench's best batch, "
        f"{_fmt(s['bare_engine_batch'], '.0f')}: {_fmt(s['bare_engine_images_per_s'], '.1f')} images/s)",
        f"  ingest images/s (storescu, summed)  {s['ingest_images_per_s']:8.1f}   "
        f"(with the pipeline running beside it)",
        f"  findings/s / ingest images/s        {s['findings_per_s'] / s['ingest_images_per_s']:8.2f}x   "
        f"(~1: the pipeline kept up and the sender set the pace)",
        f"  latency received -> finding, ms     p50 {s['latency_to_finding_ms']['p50']:.0f}  "
        f"p99 {s['latency_to_finding_ms']['p99']:.0f}  max {s['latency_to_finding_ms']['max']:.0f}   "
        f"(per slice: the classifier job's finished_at - the instance's received_at)",
        "",
        f"latency received -> {'delivered' if r.orthanc else 'written'}, per result (journal timestamps):",
        f"  {'result':<24} {'n':>4} {'p50 s':>7} {'p99 s':>7} {'max s':>7}",
    ]
    lat = s["latency_received_to_delivered_s" if r.orthanc else "latency_received_to_written_s"]
    for name, v in lat.items():
        lines.append(f"  {name:<24} {v['n']:>4} {_fmt(v['p50']):>7} {_fmt(v['p99']):>7} {_fmt(v['max']):>7}")
    lines += [
        f"  (per result (SR, SEG) and destination: deliveries.delivered_at{'' if r.orthanc else ' (here results.created_at)'}"
        " - the latest received_at of its series' instances received before the result was written; the same"
        f" definition as edged_end_to_end_seconds. It includes series_quiet_seconds ({r.quiet_seconds:g} s))",
        "",
        f"time to result per series: seconds after its last slice was received (SR {sr_word});",
        f"overhead = SR time - series_quiet_seconds ({r.quiet_seconds:g} s):",
    ]
    lines += _series_table(r)
    lines += ["", "edged CPU time per stage, from ready to finished (edged_stage_cpu_seconds_total deltas):"]
    lines += _cpu_table(r)
    lines += ["", "wall time per stage (edged_stage_seconds sums; stages overlap across threads):"]
    lines += _stage_table(r)
    lines += ["", "batch sizes the batcher formed (batches per size range):"]
    for model, counts in sorted(r.metrics.batches.items()):
        ranges = ", ".join(f"{k}: {v}" for k, v in counts.items())
        lines.append(f"  {model:<14} mean {_fmt(r.metrics.batch_mean.get(model), '.1f')}   {ranges}")
    lines += [
        "",
        "edged CPU time (utime+stime of the daemon from ready to finished, start-up excluded):",
        f"  total                          {s['edged_cpu_ms_per_slice']:7.1f} ms/slice   "
        f"({r.cpu.edged_cpu_seconds:.1f} s CPU in {r.cpu.seconds:.1f} s: {s['edged_cores_busy']:.2f} cores busy)",
        f"  inference (CPU)                {s['inference_cpu_ms_per_slice']:7.1f} ms/slice   "
        f"(batcher threads + engine pool threads)",
        f"  outside inference              {s['cpu_outside_inference_ms_per_slice']:7.1f} ms/slice   "
        f"(total - inference; target <= 10 ms, /work/shared/BENCHMARKING.md)",
    ]
    cap = s["cpu_ceiling"]
    lines += [
        "",
        f"what {cap['cores']:g} cores allow (an upper bound: edged alone on every core, no sender, no PACS):",
        f"  {cap['cores']:g} cores / {_fmt(cap['edged_cpu_ms_per_slice'], '.1f')} ms of edged CPU per slice (in all) = "
        f"{_fmt(cap['findings_per_s'], '.0f')} findings/s = {_fmt(cap['ratio_to_bare_engine'])}x the bare engine",
        f"  {TARGET_RATIO:g}x the bare engine ({_fmt(cap['target_findings_per_s'], '.0f')} findings/s) leaves "
        f"{_fmt(cap['budget_ms_per_slice'])} ms of CPU per slice in all; the bench's inference took "
        f"{_fmt(cap['bench_inference_ms_per_image'])} ms per image at its best batch, which leaves "
        f"{_fmt(cap['outside_inference_budget_ms'])} ms outside inference",
    ]
    c = r.cpu
    lines += [
        "",
        f"cores busy on average from edged ready to finished ({c.seconds:.1f} s): edged {c.edged:.2f}, storescu "
        f"{c.senders:.2f}, Orthanc {c.orthanc:.2f}, this script {c.script:.2f}, other processes {c.others:.2f}",
    ]
    if c.others > OTHERS_LIMIT:
        lines.append(f"WARNING: other processes kept {c.others:.2f} cores busy during the run; the figures include "
                     f"that competition")
    kinds = ", ".join(f"{v} {k.upper()}" for k, v in sorted(j.results_by_kind.items()))
    lines += ["", f"results: {kinds or 'none'}" + (
        f"; Orthanc holds {r.orthanc_instances} instances" if r.orthanc_instances is not None else "")]
    reopened = [t.series for t in j.series if t.generations > 1]
    if reopened:
        lines.append(f"warning: series {reopened} were completed more than once (a pause longer than the quiet "
                     f"period while they were being sent); their SR figures are for the last generation")
    return "\n".join(lines)


def _cpu_table(r: Results) -> list[str]:
    rows = cpu_rows(r)
    total = r.cpu.edged_cpu_seconds
    lines = [f"  {'stage':<18} {'model':<14} {'CPU s':>7} {'ms/slice':>8} {'share':>6}"]
    for x in rows:
        share = f"{100 * x.seconds / total:5.1f}%" if total > 0 else "-"
        lines.append(f"  {x.row:<18} {x.model:<14} {x.seconds:>7.2f} {1000 * x.seconds / r.slices:>8.2f} {share:>6}")
    lines.append(f"  {'total (edged)':<18} {'':<14} {total:>7.2f} {1000 * total / r.slices:>8.2f} "
                 f"{'100.0%' if total > 0 else '-':>6}")
    lines += [
        "  (each stage: time.thread_time() of the thread that ran it; receive includes the instance's journal row;",
        "   journal: the pipeline's control step and findings commits; inference: the batcher thread plus the",
        "   engine's pool threads (edged_native_threads_cpu_seconds); not attributed: pynetdicom's PDU reading and",
        "   association threads outside the handler, the outbox's associations, HTTP, logging, garbage collection)",
    ]
    return lines


def _series_table(r: Results) -> list[str]:
    models = r.journal.models
    head = f"  {'series':>6} {'slices':>6} {'send s':>7} {'complete':>8} {'cls last':>8} {'seg done':>8}"
    head += "".join(f" {('SR ' + m)[:18]:>18}" for m in models) + f" {'all':>6} {'overhead':>8}"
    lines = [head]
    for t, send in zip(r.journal.series, r.sends):
        row = (f"  {t.series:>6} {t.slices:>6} {send.seconds:>7.1f} {_fmt(t.completed):>8} "
               f"{_fmt(t.cls_last_finding):>8} {_fmt(t.seg_series_done):>8}")
        row += "".join(f" {_fmt(t.sr.get(m)):>18}" for m in models)
        row += f" {_fmt(t.all_results):>6} {_fmt(None if t.all_results is None else t.all_results - r.quiet_seconds):>8}"
        lines.append(row)
    for q in (50, 99):
        row = f"  {'p' + str(q):>6} {'':>6} {'':>7} {'':>8} {'':>8} {'':>8}"
        row += "".join(f" {_fmt(percentile([v for t in r.journal.series if (v := t.sr.get(m)) is not None], q)):>18}"
                       for m in models)
        alls = [t.all_results for t in r.journal.series if t.all_results is not None]
        row += f" {_fmt(percentile(alls, q)):>6} {_fmt(percentile(alls, q) - r.quiet_seconds):>8}"
        lines.append(row)
    lines.append("  (complete: series marked complete; cls last: its last classifier finding; seg done: the series "
                 "job of the segmentation model; all: every result of the series)")
    return lines


def _stage_table(r: Results) -> list[str]:
    busy = sum(st.seconds for st in r.metrics.stages if st.stage not in WAIT_STAGES)
    lines = [f"  {'stage':<13} {'model':<14} {'seconds':>8} {'count':>7} {'mean ms':>8} {'share':>6} {'ms/slice':>8}"]
    for st in r.metrics.stages:
        share = "(wait)" if st.stage in WAIT_STAGES else f"{100 * st.seconds / busy:5.1f}%" if busy else "-"
        mean = 1000 * st.seconds / st.count if st.count else math.nan
        lines.append(f"  {st.stage:<13} {st.model:<14} {st.seconds:>8.2f} {st.count:>7} {_fmt(mean, '.2f'):>8} "
                     f"{share:>6} {1000 * st.seconds / r.slices:>8.2f}")
    lines.append("  (receive = edged_store_seconds; shares are of the working stages' total, queue_wait left out)")
    return lines


def to_json(r: Results) -> dict[str, Any]:
    return {
        "summary": summary(r),
        "slices": r.slices, "series_size": r.series_size, "quiet_seconds": r.quiet_seconds,
        "cpu_count": r.cpu_count, "cpu_affinity": r.cpu_affinity, "engines_dir": r.engines_dir,
        "backend": r.backend, "orthanc": r.orthanc, "dcmtk": r.dcmtk, "note": NOTE,
        "platform": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "engine_bench": [asdict(p) for p in r.engine],
        "sends": [asdict(s) for s in r.sends],
        "series": [asdict(t) for t in r.journal.series],
        "stages": [asdict(s) for s in r.metrics.stages],
        "batch_sizes": r.metrics.batches, "batch_mean": r.metrics.batch_mean,
        "cpu_cores_busy": asdict(r.cpu), "run_seconds": r.run_seconds,
        "load_before": r.load_before, "load_after": r.load_after,
        "results_by_kind": r.journal.results_by_kind, "orthanc_instances": r.orthanc_instances,
        "timings": r.timings,
    }


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/e2e.py",
        description="Push synthetic chest CT series through edged with DCMTK storescu, with Orthanc as the PACS, "
                    "and report findings/s against the bare engine, ingest rate, time to result, where the time "
                    "goes and edged's CPU per slice outside inference. " + NOTE + ".",
        epilog="Needs DCMTK (storescu) and, unless --no-orthanc, Debian's orthanc and a C compiler (tests/orthanc.py). "
               "Example: .venv/bin/python benchmarks/e2e.py --slices 300 --series-size 300 --json e2e.json",
    )
    p.add_argument("--slices", type=_positive, default=1000, metavar="N", help="CT slices to send (default: 1000)")
    p.add_argument("--series-size", type=_positive, default=300, metavar="K",
                   help="slices per series; one storescu association per series, in sequence (default: 300)")
    p.add_argument("--no-orthanc", action="store_true",
                   help="no destination: time to result is measured to the SR written, not delivered")
    p.add_argument("--engines", type=Path, default=REPO / "engines", metavar="DIR",
                   help="model repository for [engines] dir (default: the checkout's engines/)")
    p.add_argument("--quiet-seconds", type=float, default=2.0, metavar="S",
                   help="[pipeline] series_quiet_seconds (default: 2.0)")
    p.add_argument("--phantoms", type=_positive, default=50, metavar="P",
                   help="distinct chest phantoms the slices cycle through (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="phantom generator seed (default: 0)")
    p.add_argument("--bench-seconds", type=float, default=3.0, metavar="S",
                   help="seconds per batch size for the bare engine bench (default: 3)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="give up when the pipeline has not finished this long after the last storescu (default: 1800)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="where to create the temporary work dir (default: the system's temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (slices, journal, logs, metrics)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON to FILE")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                   help="[engines] backend for the bench and the daemon (default: onnxruntime, the CPU). tensorrt "
                        "needs a GPU, tensorrt and pycuda; without them the script prints 'skipped: no GPU/TensorRT' "
                        "and exits 0")
    p.add_argument("--quick", action="store_true",
                   help=f"a run of about a minute: the defaults become {QUICK} (options given explicitly win)")
    return p


#: --quick: smaller defaults (the figures are noisier; the report is the same)
QUICK = {"slices": 120, "series_size": 60, "phantoms": 10, "bench_seconds": 1.0}


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.quick:
        return
    for name, value in QUICK.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def tensorrt_unavailable() -> str | None:
    """Why the TensorRT backend cannot run here (None: it can), asked of edged itself in a child process
    (so that this script holds no CUDA context)."""
    code = ("from edged.errors import BackendUnavailableError\n"
            "from edged.inference.select import resolve_backend\n"
            "try:\n    _, reason, plans = resolve_backend('tensorrt')\n"
            "except BackendUnavailableError as exc:\n    print(exc.reason)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return f"cannot check ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})"
    return proc.stdout.strip() or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_quick(args, parser)
    stop_on_sigterm("e2e.py")
    if args.backend == "tensorrt":
        why = tensorrt_unavailable()
        if why is not None:
            print(f"e2e.py --backend tensorrt: skipped: no GPU/TensorRT ({why})")
            return 0
    if not (args.engines / CLASSIFIER / "model.onnx").exists():
        print(f"e2e.py: {args.engines / CLASSIFIER / 'model.onnx'} does not exist (use --engines DIR)", file=sys.stderr)
        return 2
    try:
        tools = find_tools()
    except BenchError as exc:
        print(f"e2e.py: {exc}", file=sys.stderr)
        return 2
    return run_in_workdir("e2e.py", args, "edged-e2e-", lambda root: run_benchmark(args, root, tools), report,
                          to_json)


if __name__ == "__main__":
    sys.exit(main())
