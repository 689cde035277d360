"""Ingest benchmark: edged against Orthanc, DCMTK's storescp and the disk's own fsync limit, in one run.

Generates synthetic 512x512 16-bit CT slices, then measures for 1 and for several concurrent
associations (default 1 and 4):

* edged (``python -m edged serve``, fresh storage dir and daemon for every measurement),
* Orthanc (Debian's package, via tests/orthanc.py on 127.0.0.1, fresh database each time; see
  :class:`Orthanc` for its configuration),
* DCMTK ``storescp`` (``--fork`` when more than one association, fresh output dir each time),
* the disk limit: the same files written with temp file + fsync + rename + directory fsync in a loop
  (one writer thread per "association"), which bounds any receiver that fsyncs before it acknowledges,
* disk+journal: that loop again (a separate pass) with one SQLite commit per file after it (WAL,
  synchronous=FULL), timed per step; with storescp's time per image it gives the ordered bound at 1
  association (:func:`ordered_bound`), the most any receiver that keeps edged's order can reach,
* the 'ordered' loop (in rounds where storescp ran): edged's order (write, rename, fsync, group commit)
  in one thread per association, each paced at that round's storescp time per image, with no receiver
  CPU work (:func:`measure_ordered`); and, from edged's metrics, where its time per image went by step,

and the cost of setting up an association (``echoscu``, then ``storescu`` with one file, one association
each, with every receiver running and taking turns call by call). Every DCMTK peer runs with ``TCP_NODELAY=1`` (Debian's build leaves Nagle on).
See benchmarks/README.md for what the figures mean.

Run:  .venv/bin/python benchmarks/ingest.py [--count 500] [--associations 1 4] [--repeat 1]
          [--receivers edged orthanc storescp disk] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from edged.metrics import STORE_STEPS as STEPS  # edged_store_step_seconds' steps, in order
from edged.spool.commit import GroupCommit
from edged.spool.store import fsync_dir
from edged.synthetic import write_ct_series

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402  (re-exported for e2e.py and soak.py)
    BenchError, adopt, kill_group_leftovers, run_in_workdir, spawn, stop_on_sigterm, stop_proc)

HOST = "127.0.0.1"
MAX_PDU = 131072
EDGED_AET = "EDGED"
STORESCP_AET = "STORESCP"
CALLING_AET = "BENCH"
LISTENING = re.compile(r"event=listening host=\S+ port=(\d+)")
HTTP_LISTENING = re.compile(r"event=http\.listening host=\S+ port=(\d+)")
NOTE = ("DCMTK peers run with TCP_NODELAY=1; edged fsyncs each file, its directory and its journal before Success; "
        "storescp does not fsync; Orthanc (its DICOM side is DCMTK: TCP_NODELAY=1 too) does not fsync its storage files "
        "(its SQLite index: WAL, synchronous=NORMAL)")
REPO = Path(__file__).resolve().parent.parent
ORTHANC_AET = "ORTHANC"
RECEIVERS = ("edged", "orthanc", "storescp", "disk")
#: The rows of the throughput table, in order ("disk" measures "disk limit", "disk+journal" and, after
#: storescp in the same round, "ordered").
ROWS = ("edged", "orthanc", "storescp", "disk limit", "disk+journal", "ordered")
#: The (receiver, other) ratios given round by round, in the report and in the JSON.
ROUND_PAIRS = (("edged", "orthanc"), ("edged", "disk limit"), ("ordered", "disk limit"), ("edged", "ordered"))
#: The speed issue's target at 1 association: edged >= this x the disk limit.
TARGET_OVER_DISK_LIMIT = 0.6

START_TIMEOUT_S = 60.0


# -- tools -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    storescu: str
    storescp: str
    echoscu: str
    version: str


def _find_dcmtk(name: str) -> str:
    """The DCMTK tool ``name`` on PATH, skipping pynetdicom's scripts of the same name.

    pynetdicom installs its own ``storescu``/``storescp``/``echoscu`` into the virtualenv's bin
    directory, which comes first on PATH in an activated venv; they are not DCMTK.
    """
    venv_bin = str(Path(sys.prefix) / "bin")
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d and os.path.realpath(d) != os.path.realpath(venv_bin)]
    path = shutil.which(name, path=os.pathsep.join(dirs))
    if path is None:
        raise BenchError(f"DCMTK's {name} not found on PATH (Debian/Ubuntu: apt-get install dcmtk)")
    if "dcmtk" not in _version_text(path).lower():
        raise BenchError(f"{path} does not look like DCMTK's {name} (its --version does not mention dcmtk)")
    return path


def _version_text(path: str) -> str:
    res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, env=dcmtk_env())
    return res.stdout + res.stderr


def find_tools() -> Tools:
    storescu = _find_dcmtk("storescu")
    first = _version_text(storescu).strip().splitlines()
    version = first[0].strip("$ ").removeprefix("dcmtk:").strip() if first else "unknown"
    return Tools(storescu=storescu, storescp=_find_dcmtk("storescp"), echoscu=_find_dcmtk("echoscu"), version=version)


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK peers: Nagle off (Debian's DCMTK stalls ~40 ms per message without it)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no output)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"


# -- receivers ---------------------------------------------------------------------------------------


class Receiver:
    """A running C-STORE receiver on 127.0.0.1: its name, AE title, port and stored-image count."""

    name: str
    aet: str
    port: int

    def start(self) -> "Receiver":
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Edged(Receiver):
    """``python -m edged serve`` with a config in ``workdir`` and storage in ``workdir/edged-data``."""

    name = "edged"
    aet = EDGED_AET

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = workdir / "edged-data"
        self.config = workdir / "edged.toml"
        self.log = workdir / "edged.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = 0

    def write_config(self) -> None:
        self.config.write_text(
            "[dicom]\n"
            f"host = {_toml_str(HOST)}\n"
            "port = 0\n"
            f"max_pdu = {MAX_PDU}\n"
            "\n[storage]\n"
            f"dir = {_toml_str(str(self.storage))}\n"
            "min_free_bytes = 0\n"
            "max_pending = 100000\n"
            "\n[http]\n"
            "# any free port, so that the benchmark never collides with a running edged\n"
            f"host = {_toml_str(HOST)}\n"
            "port = 0\n"
            "\n[engines]\n"
            "# the receive path alone: an empty model repository (benchmarks/e2e.py measures it with the models)\n"
            f"dir = {_toml_str(str(self.workdir / 'no-models'))}\n"
        )

    def start(self) -> "Edged":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log.open("wb") as log:
            self.proc = spawn([sys.executable, "-m", "edged", "serve", "--config", str(self.config)],
                              group=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            dicom, http = LISTENING.search(text), HTTP_LISTENING.search(text)
            if dicom and http:
                self.port, self.http_port = int(dicom.group(1)), int(http.group(1))
                return self
            if self.proc.poll() is not None:
                raise BenchError(f"edged exited with {self.proc.returncode} before listening:\n{_tail(self.log)}")
            time.sleep(0.05)
        raise BenchError(f"edged did not log event=listening within {START_TIMEOUT_S:.0f}s:\n{_tail(self.log)}")

    def counts(self) -> dict[str, int]:
        """``edged status --json``'s instance counts per state."""
        res = subprocess.run([sys.executable, "-m", "edged", "status", "--config", str(self.config), "--json"],
                             capture_output=True, text=True, timeout=60, cwd=self.workdir)
        if res.returncode != 0:
            raise BenchError(f"edged status failed ({res.returncode}): {res.stderr.strip()}")
        return {k: int(v) for k, v in json.loads(res.stdout)["instances"].items()}

    def stored(self) -> int:
        """Instances in the journal, whatever state processing has moved them to (``missing`` excepted)."""
        return sum(n for state, n in self.counts().items() if state != "missing")

    def step_totals(self) -> dict[str, tuple[float, int]]:
        """``edged_store_step_seconds``' sum and count per step, scraped from /metrics now."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/metrics", timeout=30) as r:
            return step_totals(r.read().decode())

    def stop(self) -> None:
        if self.proc is None:
            return
        rc = stop_proc(self.proc, signal.SIGTERM)
        kill_group_leftovers(self.proc)
        self.proc = None
        if rc != 0:  # reported, not raised: this runs in finally blocks
            print(f"\nwarning: edged exited with {rc} after SIGTERM (log: {self.log}):\n{_tail(self.log, 5)}",
                  file=sys.stderr)


class Storescp(Receiver):
    """DCMTK ``storescp`` writing to ``workdir/out``; ``--fork`` (one child per association) if ``fork``."""

    name = "storescp"
    aet = STORESCP_AET

    def __init__(self, workdir: Path, tools: Tools, *, fork: bool) -> None:
        self.workdir = workdir
        self.out = workdir / "out"
        self.log = workdir / "storescp.log"
        self.tools = tools
        self.fork = fork
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, attempts: int = 3) -> "Storescp":
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):  # the free port may be taken between free_port() and storescp's bind
            self.port = free_port()
            cmd = [self.tools.storescp, *(["--fork"] if self.fork else []), "-od", str(self.out),
                   "--max-pdu", str(MAX_PDU), "-aet", self.aet, str(self.port)]
            with self.log.open("wb") as log:
                self.proc = spawn(cmd, group=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  cwd=self.workdir, env=dcmtk_env())
            if self._wait_ready():
                return self
            stop_proc(self.proc, timeout=5)
        raise BenchError(f"storescp did not answer C-ECHO on 127.0.0.1:{self.port}:\n{_tail(self.log)}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            res = subprocess.run([self.tools.echoscu, "-aet", CALLING_AET, "-aec", self.aet, HOST, str(self.port)],
                                 capture_output=True, timeout=30, env=dcmtk_env())
            if res.returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def stored(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.proc, signal.SIGTERM)
            kill_group_leftovers(self.proc)
            self.proc = None


class Orthanc(Receiver):
    """Debian's Orthanc (tests/orthanc.py: 127.0.0.1 only through an LD_PRELOAD shim), fresh database.

    Configuration: the tests' (no plugins, no compression, SQLite index in ``workdir/db``) plus
    ``DicomThreadsCount`` = 4 (enough threads for 4 associations) and ``TcpNoDelay`` (its HTTP side); its
    DICOM side is Debian's DCMTK, started with ``TCP_NODELAY=1`` like the other DCMTK peers (without it
    Orthanc receives ~19 images/s here instead of ~90, a 40 ms Nagle stall per image). Orthanc 1.10 has no
    option to fsync its storage area, and its SQLite index runs WAL with synchronous=NORMAL: it is the
    nearest durable receiver with an index, but it acknowledges before its files reach the disk.
    """

    name = "orthanc"
    aet = ORTHANC_AET

    def __init__(self, workdir: Path) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from orthanc import Orthanc as _Server  # tests/orthanc.py (tests/support.py imports pytest)
        except ImportError as exc:
            raise BenchError(f"cannot import tests/orthanc.py ({exc}); install the test extra or leave orthanc out")
        workdir.mkdir(parents=True, exist_ok=True)
        self.server = _Server(workdir, aet=self.aet)
        config = json.loads(self.server.config.read_text())
        config.update({"DicomThreadsCount": 4, "TcpNoDelay": True, "StorageCompression": False,
                       "MaximumStorageCacheSize": 0, "SaveJobs": False})
        self.server.config.write_text(json.dumps(config))
        self.port = int(self.server.dicom_port)

    def start(self) -> "Orthanc":
        try:
            self.server.start()
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"Orthanc did not start: {exc}") from None
        assert self.server.proc is not None
        adopt(self.server.proc)  # reap_all ends it whatever happens
        return self

    def stored(self) -> int:
        return int(self.server.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def running(receiver: Receiver) -> Iterator[Receiver]:
    """Start ``receiver`` (already constructed) and always stop it."""
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.stop()


# -- measurements ------------------------------------------------------------------------------------


T = TypeVar("T")


@dataclass(frozen=True)
class DiskCounters:
    """A block device's cache-flush counters (or the difference of two readings)."""

    flushes: int
    flush_ms: int

    def __sub__(self, other: "DiskCounters") -> "DiskCounters":
        return DiskCounters(self.flushes - other.flushes, self.flush_ms - other.flush_ms)


def disk_counters(path: Path, sys_root: Path = Path("/sys")) -> DiskCounters | None:
    """Cache flushes completed by the block device that holds ``path``, and the milliseconds spent on them:
    fields 16 and 17 of ``/sys/dev/block/MAJ:MIN/stat`` (Linux 5.5 and later; a partition's flushes are
    counted on its disk). Every fsync that must reach stable storage costs one unless the kernel merges it
    with another in flight. None where there is no such device or counter (tmpfs, overlay, an older kernel)."""
    st = os.stat(path)
    base = sys_root / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        if (base / "partition").exists():
            base = base.resolve().parent
        fields = (base / "stat").read_text().split()
    except OSError:
        return None
    if len(fields) < 17:
        return None
    return DiskCounters(int(fields[15]), int(fields[16]))


def _counted(path: Path, run: Callable[[], T]) -> tuple[T, DiskCounters | None]:
    """``run()``'s result, and the flushes of ``path``'s device while it ran."""
    before = disk_counters(path)
    result = run()
    after = disk_counters(path)
    return result, (after - before if before is not None and after is not None else None)


@dataclass
class FileTimes:
    """Seconds a durable write loop spent in each step, summed over its files (over every writer thread)."""

    files: int = 0
    write_s: float = 0.0  # (a) open the temp file and write its bytes (to the page cache)
    flush_s: float = 0.0  # (b) fsync it, close, rename into place, fsync the directory
    commit_s: float = 0.0  # (c) commit its row to the journal (0 in the loop without one)

    def __add__(self, other: "FileTimes") -> "FileTimes":
        return FileTimes(self.files + other.files, self.write_s + other.write_s, self.flush_s + other.flush_s,
                         self.commit_s + other.commit_s)

    def record(self, write_s: float, flush_s: float, commit_s: float) -> None:
        self.files += 1
        self.write_s += write_s
        self.flush_s += flush_s
        self.commit_s += commit_s

    def ms_per_file(self) -> dict[str, float]:
        n = self.files
        return {"write": 1000.0 * self.write_s / n, "fsync_rename_dirfsync": 1000.0 * self.flush_s / n,
                "journal_commit": 1000.0 * self.commit_s / n}


@dataclass
class Throughput:
    receiver: str
    associations: int
    images: int
    seconds: float
    megabytes: float
    per_file: FileTimes | None = None  # the disk loops only
    #: edged only: mean ms per stored image spent in each step of ``edged_store_step_seconds`` (STEPS)
    steps: dict[str, float] | None = None
    #: the work dir's block device during the measurement: cache flushes completed, and the ms it spent on
    #: them (:func:`disk_counters`); None where the kernel does not count them
    device: DiskCounters | None = None

    @property
    def flushes_per_image(self) -> float | None:
        return self.device.flushes / self.images if self.device is not None else None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cycle_ms(self) -> float:
        """Wall ms from one image to the next on each association (all run at once): associations x seconds
        / images."""
        return self.associations * self.seconds * 1000 / self.images

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("per_file", "device", "steps")}
        out.update(images_per_s=round(self.images_per_s, 2), mb_per_s=round(self.mb_per_s, 2))
        if self.device is not None:
            out["device_flushes"] = self.device.flushes
            out["device_flush_ms"] = self.device.flush_ms
        if self.steps is not None:
            out["step_ms"] = {k: round(v, 4) for k, v in self.steps.items()}
            out["cycle_ms"] = round(self.cycle_ms, 4)
        if self.per_file is not None:
            out["ms_per_file"] = {k: round(v, 4) for k, v in self.per_file.ms_per_file().items()}
        return out


@dataclass
class Setup:
    receiver: str
    repeats: int
    echo_ms: float  # median ms per association of the round's calls
    store_one_ms: float
    round: int = 0  # which round (setup rounds run every receiver at once, call by call in turn)


@dataclass
class Results:
    count: int
    file_bytes: int
    cpu_count: int | None
    dcmtk: str
    workdir_fs: str
    repeat: int = 1
    throughput: list[Throughput] = field(default_factory=list)
    setup: list[Setup] = field(default_factory=list)
    tool_start_ms: float = 0.0

    runs: list[Throughput] = field(default_factory=list)
    setup_runs: list[Setup] = field(default_factory=list)

    def get(self, receiver: str, associations: int) -> Throughput | None:
        return next((t for t in self.throughput if t.receiver == receiver and t.associations == associations), None)

    def rates(self, receiver: str, associations: int) -> list[float]:
        """images/s of every run of ``receiver`` at ``associations``, round by round."""
        return [t.images_per_s for t in self.runs if t.receiver == receiver and t.associations == associations]

    def add(self, t: Throughput) -> None:
        """Record one measurement; the best (highest images/s) per receiver and association count is kept."""
        self.runs.append(t)
        best = self.get(t.receiver, t.associations)
        if best is None:
            self.throughput.append(t)
        elif t.images_per_s > best.images_per_s:
            self.throughput[self.throughput.index(best)] = t

    def add_setup(self, s: Setup) -> None:
        """Record one setup measurement; the fastest (lowest store-one ms) per receiver is kept."""
        self.setup_runs.append(s)
        best = next((x for x in self.setup if x.receiver == s.receiver), None)
        if best is None:
            self.setup.append(s)
        else:
            self.setup[self.setup.index(best)] = Setup(s.receiver, s.repeats, min(s.echo_ms, best.echo_ms),
                                                       min(s.store_one_ms, best.store_one_ms), s.round)


def split(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """``items`` in ``parts`` contiguous chunks of (almost) equal size."""
    n = len(items)
    return [list(items[i * n // parts:(i + 1) * n // parts]) for i in range(parts)]


def storescu_cmd(tools: Tools, aet: str, port: int, files: Sequence[Path]) -> list[str]:
    # File names relative to the series folder (the cwd) keep the command line short.
    return [tools.storescu, "--max-pdu", str(MAX_PDU), "-aet", CALLING_AET, "-aec", aet, HOST, str(port),
            *(f.name for f in files)]


def send(tools: Tools, receiver: Receiver, files: Sequence[Path], associations: int, logdir: Path) -> float:
    """Send ``files`` with ``associations`` concurrent storescu processes; seconds from first start to last end."""
    chunks = [c for c in split(files, associations) if c]
    cwd = files[0].parent
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    t0 = time.perf_counter()
    try:
        for i, chunk in enumerate(chunks):
            log = logdir / f"storescu-{receiver.name}-{associations}-{i}.log"
            with log.open("wb") as out:
                procs.append((spawn(storescu_cmd(tools, receiver.aet, receiver.port, chunk), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, cwd=cwd, env=dcmtk_env()), log))
        for proc, _ in procs:
            proc.wait(timeout=max(600.0, 2.0 * len(files)))
        elapsed = time.perf_counter() - t0
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                stop_proc(proc, signal.SIGKILL, timeout=5)
    for proc, log in procs:
        if proc.returncode != 0:
            raise BenchError(f"storescu to {receiver.name} exited with {proc.returncode}:\n{_tail(log)}")
    return elapsed


def step_totals(metrics_text: str) -> dict[str, tuple[float, int]]:
    """``edged_store_step_seconds``' (sum, count) per step in a scrape of edged's /metrics."""
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "edged_store_step_seconds":
            continue
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")):
                out.setdefault(s.labels["step"], [0.0, 0.0])[s.name.endswith("_count")] = s.value
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def steps_ms(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> dict[str, float] | None:
    """Mean ms per image in each step between two :func:`step_totals`; None if a step saw no image."""
    out: dict[str, float] = {}
    for step in STEPS:
        s0, n0 = before.get(step, (0.0, 0))
        s1, n1 = after.get(step, (0.0, 0))
        if n1 <= n0:
            return None
        out[step] = (s1 - s0) * 1000 / (n1 - n0)
    return out


def measure_receiver(receiver: Receiver, tools: Tools, files: Sequence[Path], associations: int,
                     megabytes: float, logdir: Path) -> Throughput:
    steps = None
    with running(receiver):
        before = receiver.step_totals() if isinstance(receiver, Edged) else None
        # logdir is in the run's work dir, on the same device as every receiver's storage
        seconds, device = _counted(logdir, lambda: send(tools, receiver, files, associations, logdir))
        stored = receiver.stored()
        if isinstance(receiver, Edged) and before is not None:
            steps = steps_ms(before, receiver.step_totals())
    if stored != len(files):
        raise BenchError(f"{receiver.name} stored {stored} of {len(files)} images ({associations} association(s))")
    return Throughput(receiver.name, associations, len(files), seconds, megabytes, device=device, steps=steps)


JOURNAL_FILE = "journal.sqlite3"


def _create_journal(path: Path) -> None:
    """The disk+journal loop's SQLite database: WAL (persistent), one table of integer key and path."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise BenchError(f"{path}: cannot enable WAL mode (got {mode})")
        conn.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT NOT NULL)")
    finally:
        conn.close()


def _open_journal(path: Path) -> sqlite3.Connection:
    """One writer thread's connection (opened and used in that thread): synchronous=FULL, as edged's journal."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=60.0)  # writers share the database: wait for the lock
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _durable_write_loop(files: Sequence[Path], tmp_dir: Path, dest_dir: Path, tag: str,
                        journal: Path | None = None) -> FileTimes:
    """For each file: its bytes to a new temp file, fsync, rename into ``dest_dir``, fsync ``dest_dir``; then,
    with ``journal``, its row committed there in a transaction of its own. Returns the time spent per step."""
    times = FileTimes()
    conn = _open_journal(journal) if journal is not None else None
    clock = time.perf_counter
    try:
        for i, src in enumerate(files):
            data = memoryview(src.read_bytes())
            tmp, dest = tmp_dir / f"{tag}-{i}.part", dest_dir / f"{tag}-{i}.dcm"
            t_open = clock()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                while data:
                    data = data[os.write(fd, data):]
                t_written = clock()
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
            fsync_dir(dest_dir)
            t_durable = clock()
            if conn is not None:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO files (path) VALUES (?)", (str(dest),))
                conn.execute("COMMIT")
            t_committed = clock() if conn is not None else t_durable
            times.record(t_written - t_open, t_durable - t_written, t_committed - t_durable)
    finally:
        if conn is not None:
            conn.close()
    return times


def _loop_dirs(workdir: Path) -> tuple[Path, Path]:
    """A disk loop's temp and destination directories, made in ``workdir``."""
    tmp_dir, dest_dir = workdir / "tmp", workdir / "instances"
    tmp_dir.mkdir(parents=True)
    dest_dir.mkdir(parents=True)
    return tmp_dir, dest_dir


def _per_thread(files: Sequence[Path], threads: int, run: Callable[[Sequence[Path], str], T]) -> list[T]:
    """``run(chunk, tag)`` for ``threads`` chunks of ``files`` at once, one thread each (tags w0, w1, ...)."""
    chunks = [c for c in split(files, threads) if c]
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        futures = [pool.submit(run, chunk, f"w{i}") for i, chunk in enumerate(chunks)]
        return [f.result() for f in futures]


def measure_disk_limit(files: Sequence[Path], threads: int, workdir: Path, megabytes: float, *,
                       journal: bool = False) -> Throughput:
    """The fsync-before-ack ceiling of this disk for these files, with ``threads`` writers in parallel.

    ``journal=True`` is the "disk+journal" pass: the same loop, each file then committed as a row of a SQLite
    database in ``workdir`` (WAL, synchronous=FULL, one transaction per file, one connection per thread).

    It is a separate pass, not the disk limit's own loop with the commits timed and subtracted, because that
    would not be the same figure: the journal's WAL fsyncs go to the same disk (and, on ext4, the same
    filesystem journal) as the files' fsyncs and change what those cost, and with several threads one
    thread's commit overlaps the others' writes, so there is no commit time to subtract from the wall clock.
    So the "disk limit" loop is exactly what it was (wall clock of write + fsync + rename + directory fsync,
    no database), and the flushes edged must do, interleaved as edged does them, are timed in a loop of
    their own. Both passes record the per-step times (:class:`FileTimes`); the clock calls cost < 1 us per
    file.
    """
    tmp_dir, dest_dir = _loop_dirs(workdir)
    db = workdir / JOURNAL_FILE if journal else None
    if db is not None:
        _create_journal(db)
    fsync_dir(workdir)
    t0 = time.perf_counter()
    times, device = _counted(workdir, lambda: _per_thread(
        files, threads, lambda chunk, tag: _durable_write_loop(chunk, tmp_dir, dest_dir, tag, db)))
    seconds = time.perf_counter() - t0
    label = "disk+journal" if journal else "disk limit"
    written = sum(1 for _ in dest_dir.iterdir())
    if written != len(files):
        raise BenchError(f"{label} loop wrote {written} of {len(files)} files")
    if db is not None:
        rows = journal_rows(db)
        if rows != len(files):
            raise BenchError(f"{label} loop committed {rows} of {len(files)} rows")
    return Throughput(label, threads, len(files), seconds, megabytes, per_file=sum(times, FileTimes()), device=device)


class _RowJournal:
    """What :class:`edged.spool.commit.GroupCommit` needs of a journal, for the "ordered" loop: each group a
    row per file in one SQLite transaction (WAL, synchronous=FULL) of the loop's database, instead of
    edged's journal rows; the leader, the directory fsync and the order are edged's own."""

    def __init__(self, db: Path) -> None:
        self.path = db
        # used by whichever thread leads a group, one at a time
        self._conn = sqlite3.connect(db, isolation_level=None, timeout=60.0, check_same_thread=False)
        self._conn.execute("PRAGMA synchronous = FULL")

    def add_instances(self, items: Sequence[tuple[str, Sequence[Any]]]) -> list[bool]:
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.executemany("INSERT INTO files (path) VALUES (?)", [(path,) for path, _ in items])
        self._conn.execute("COMMIT")
        return [True] * len(items)

    def add_instance(self, path: str, routes: Sequence[Any] = ()) -> bool:
        return self.add_instances([(path, routes)])[0]

    def close(self) -> None:
        self._conn.close()


def ordered_group(db: Path, directory: Path) -> tuple[GroupCommit, _RowJournal]:
    """edged's group commit over ``directory`` and a :class:`_RowJournal` on ``db`` (close the journal after)."""
    journal = _RowJournal(db)
    return GroupCommit(journal, directory), journal  # type: ignore[arg-type]


def _paced_ordered_loop(files: Sequence[Path], tmp_dir: Path, dest_dir: Path, tag: str, pace_s: float,
                        group: GroupCommit, sleep: Callable[[float], None] = time.sleep) -> None:
    """For each file: its bytes to a new temp file, then a wait until ``pace_s`` has passed since the file
    began (a sender's time per image: the data set is written as it arrives), rename into ``dest_dir``,
    fsync, then ``group.commit``: edged's order, at a sender's pace, with nothing of edged's own work."""
    clock = time.perf_counter
    for i, src in enumerate(files):
        data = memoryview(src.read_bytes())
        t0 = clock()
        tmp, dest = tmp_dir / f"{tag}-{i}.part", dest_dir / f"{tag}-{i}.dcm"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            while data:
                data = data[os.write(fd, data):]
            left = pace_s - (clock() - t0)
            if left > 0:
                sleep(left)
            os.replace(tmp, dest)
            os.fsync(fd)
        finally:
            os.close(fd)
        group.commit(str(dest))  # type: ignore[arg-type]  # _RowJournal's rows are paths


def measure_ordered(files: Sequence[Path], threads: int, pace_s: float, workdir: Path,
                    megabytes: float) -> Throughput:
    """An estimate of the most a receiver keeping edged's order can reach with ``threads`` associations:
    ``threads`` writers, each taking one image per ``pace_s`` at best (storescp's time per image and
    association in the same round: the sender's pace, the network and the write to the page cache), then
    rename, fsync, edged's group commit (:func:`ordered_group`) before the next. It leaves out every CPU cost of
    a real receiver (parsing, checks, the network's and the sender's CPU competing with it), so a receiver
    doing that work falls short of it; edged/ordered says by how much."""
    tmp_dir, dest_dir = _loop_dirs(workdir)
    db = workdir / JOURNAL_FILE
    _create_journal(db)
    fsync_dir(workdir)
    group, journal = ordered_group(db, dest_dir)
    t0 = time.perf_counter()
    try:
        _, device = _counted(workdir, lambda: _per_thread(
            files, threads, lambda chunk, tag: _paced_ordered_loop(chunk, tmp_dir, dest_dir, tag, pace_s, group)))
    finally:
        journal.close()
    seconds = time.perf_counter() - t0
    written = sum(1 for _ in dest_dir.iterdir())
    rows = journal_rows(db)
    if written != len(files) or rows != len(files):
        raise BenchError(f"ordered loop placed {written} and committed {rows} of {len(files)} files")
    return Throughput("ordered", threads, len(files), seconds, megabytes, device=device)


def journal_rows(db: Path) -> int:
    """Rows committed to a disk+journal loop's database."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    finally:
        conn.close()


def _run_tool(cmd: Sequence[str], cwd: Path | None = None) -> None:
    """Run one DCMTK command; it must exit 0."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd, env=dcmtk_env())
    if res.returncode != 0:
        raise BenchError(f"{Path(cmd[0]).name} exited with {res.returncode}: {(res.stderr or res.stdout).strip()}")


def _per_call_ms(cmds: Sequence[Sequence[str]], cwd: Path | None = None) -> float:
    """Run ``cmds`` one after the other; mean wall-clock ms per command."""
    t0 = time.perf_counter()
    for cmd in cmds:
        _run_tool(cmd, cwd)
    return (time.perf_counter() - t0) * 1000.0 / len(cmds)


def interleaved_ms(cmds: dict[str, list[list[str]]], *, run: Callable[[list[str]], None],
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """The wall-clock ms of each command, per receiver, the receivers taking turns: the i-th command of
    each, then the (i+1)-th of each, the turn's first receiver rotating, so that every receiver's calls
    see the same machine (its load, its page cache, its CPU frequency) and none always goes first."""
    names = list(cmds)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(max((len(c) for c in cmds.values()), default=0)):
        turn = names[i % len(names):] + names[:i % len(names)]
        for name in turn:
            if i < len(cmds[name]):
                t0 = clock()
                run(cmds[name][i])
                out[name].append((clock() - t0) * 1000.0)
    return out


def measure_setup(receivers: Sequence[Receiver], tools: Tools, files: Sequence[Path], repeats: int,
                  round_no: int = 0) -> list[Setup]:
    """ms per association for every receiver at once (all running), the median of ``repeats`` calls each:
    ``echoscu``, then ``storescu`` with one file, the receivers taking turns call by call."""
    echo = {r.name: [[tools.echoscu, "-aet", CALLING_AET, "-aec", r.aet, HOST, str(r.port)]] * repeats
            for r in receivers}
    # Distinct files where there are enough, so that edged never takes its (cheaper) duplicate path.
    stores = {r.name: [storescu_cmd(tools, r.aet, r.port, [files[i % len(files)]]) for i in range(repeats)]
              for r in receivers}
    echo_ms = interleaved_ms(echo, run=_run_tool)
    store_ms = interleaved_ms(stores, run=lambda cmd: _run_tool(cmd, files[0].parent))
    return [Setup(r.name, repeats, statistics.median(echo_ms[r.name]), statistics.median(store_ms[r.name]), round_no)
            for r in receivers]


def tool_start_ms(tools: Tools, repeats: int) -> float:
    """ms to start and exit ``echoscu --version``: the process overhead inside every setup figure."""
    return _per_call_ms([[tools.echoscu, "--version"]] * repeats)


# -- the run -----------------------------------------------------------------------------------------


def filesystem_of(path: Path, *, mounts_file: Path = Path("/proc/mounts"), sys_root: Path = Path("/sys")) -> str:
    """The mount's filesystem type for ``path`` (from /proc/mounts; 'unknown' elsewhere), and for ext4
    whether it runs without a journal (``/sys/fs/ext4/<device>/journal_task`` reads ``<none>``).

    Without a journal, ext4's fsync writes the file's inode block itself (one 4 KB block holds 16
    inodes, so concurrent fsyncs of files created together queue on it) and creating a file skips,
    one by one, every inode freed in the last minutes (``recently_deleted``): a run started right after
    another, which deleted thousands of files, creates its files more slowly.
    """
    try:
        mounts = [line.split() for line in mounts_file.read_text().splitlines()]
    except OSError:
        return "unknown"
    best, fstype, source = "", "unknown", ""
    real = os.path.realpath(path)
    for m in mounts:
        if len(m) >= 3 and (real == m[1] or real.startswith(m[1].rstrip("/") + "/")) and len(m[1]) >= len(best):
            best, fstype, source = m[1], m[2], m[0]
    if not best:
        return fstype
    if fstype == "ext4" and source.startswith("/dev/"):
        device = os.path.basename(os.path.realpath(source))  # /dev/mapper/x -> dm-0, as sysfs names it
        try:
            task = (sys_root / "fs" / "ext4" / device / "journal_task").read_text().strip()
        except OSError:
            task = ""
        if task == "<none>":
            return f"{fstype} ({best}, no journal)"
    return f"{fstype} ({best})"


def run_benchmark(args: argparse.Namespace, root: Path, tools: Tools) -> Results:
    print(f"generating {args.count} synthetic CT slices in {root / 'series'} ...", flush=True)
    files = write_ct_series(root / "series", args.count)
    file_bytes = sum(f.stat().st_size for f in files)
    megabytes = file_bytes / 1e6
    results = Results(count=len(files), file_bytes=file_bytes, cpu_count=os.cpu_count(), dcmtk=tools.version,
                      workdir_fs=filesystem_of(root), repeat=args.repeat)
    logdir = root / "logs"
    logdir.mkdir()
    run_no = 0

    def fresh(name: str) -> Path:
        nonlocal run_no
        run_no += 1
        d = root / f"{run_no:02d}-{name}"
        d.mkdir()
        return d

    makers = {
        "edged": lambda d, n: Edged(d),
        "orthanc": lambda d, n: Orthanc(d),
        "storescp": lambda d, n: Storescp(d, tools, fork=n > 1),
    }
    def measure(row: str, n: int) -> Throughput:
        if row == "disk limit":
            return measure_disk_limit(files, n, fresh(f"disk-{n}"), megabytes)
        if row == "disk+journal":
            return measure_disk_limit(files, n, fresh(f"disk-journal-{n}"), megabytes, journal=True)
        if row == "ordered":  # paced at this round's storescp (measured just before, in RECEIVERS order)
            pace_s = n / results.rates("storescp", n)[-1]
            return measure_ordered(files, n, pace_s, fresh(f"ordered-{n}"), megabytes)
        return measure_receiver(makers[row](fresh(f"{row}-{n}"), n), tools, files, n, megabytes, logdir)

    for n in args.associations:
        for _ in range(args.repeat):  # rounds: every receiver once per round, best of the rounds kept
            for label in [r for r in RECEIVERS if r in args.receivers]:
                rows: tuple[str, ...] = (label,)
                if label == "disk":
                    rows = ("disk limit", "disk+journal") + (("ordered",) if results.rates("storescp", n) else ())
                for row in rows:
                    print(f"  {row:<12} {n} association(s) ...", end=" ", flush=True)
                    t = measure(row, n)
                    results.add(t)
                    print(f"{t.images_per_s:8.1f} images/s", flush=True)

    labels = [r for r in ("edged", "orthanc", "storescp") if r in args.receivers] if args.setup_repeats else []
    for round_no in range(args.repeat if labels else 0):
        print(f"  association setup x{args.setup_repeats}, {', '.join(labels)} taking turns ...", flush=True)
        with contextlib.ExitStack() as stack:
            receivers = [stack.enter_context(running(makers[label](fresh(f"{label}-setup"), 1))) for label in labels]
            setups = measure_setup(receivers, tools, files[: args.setup_repeats], args.setup_repeats, round_no)
        for s in setups:
            results.add_setup(s)
            print(f"    {s.receiver:<10} echo {s.echo_ms:6.1f} ms, store-one {s.store_one_ms:6.1f} ms", flush=True)
    if args.setup_repeats:
        results.tool_start_ms = tool_start_ms(tools, args.setup_repeats)
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def round_ratios(results: Results, receiver: str, other: str, associations: int) -> list[float]:
    """``receiver``'s images/s over ``other``'s, round by round (the k-th run of each at ``associations``).

    In a round the receivers run one right after the other, so both see the same machine; the ratio of
    the best rounds (:func:`ratios`) may pair a quick round of one with a slow round of the other.
    """
    return [a / b for a, b in zip(results.rates(receiver, associations), results.rates(other, associations)) if b]


def ratios(results: Results) -> list[dict[str, Any]]:
    out = []
    for n in sorted({t.associations for t in results.throughput}):
        e, o, s, d = (results.get(r, n) for r in ("edged", "orthanc", "storescp", "disk limit"))
        row: dict[str, Any] = {
            "associations": n,
            "edged_over_orthanc": round(e.images_per_s / o.images_per_s, 3) if e and o else None,
            "edged_over_storescp": round(e.images_per_s / s.images_per_s, 3) if e and s else None,
            "edged_over_disk_limit": round(e.images_per_s / d.images_per_s, 3) if e and d else None,
        }
        p = results.get("ordered", n)
        if p is not None:
            row["edged_over_ordered"] = round(e.images_per_s / p.images_per_s, 3) if e else None
            row["ordered_over_disk_limit"] = round(p.images_per_s / d.images_per_s, 3) if d else None
        for receiver, other in ROUND_PAIRS:
            if p is None and "ordered" in (receiver, other):
                continue
            key = f"{receiver}_over_{other.replace(' ', '_')}"
            each = round_ratios(results, receiver, other, n)
            row[f"{key}_rounds"] = [round(x, 3) for x in each]
            row[f"{key}_median_round"] = round(statistics.median(each), 3) if each else None
        out.append(row)
    return out


def _each_and_median(each: Sequence[float]) -> str:
    """Ratios as the report lists them round by round: "1.10x, 1.20x (median 1.15x)"."""
    return ", ".join(f"{x:.2f}x" for x in each) + f" (median {statistics.median(each):.2f}x)"


def _round_lines(results: Results) -> list[str]:
    """The ratios to Orthanc and to the disk limit round by round, with their median (where >1 round); and
    the 'ordered' loop's, to the disk limit and from edged."""
    lines: list[str] = []
    for n in sorted({t.associations for t in results.throughput}):
        for receiver, other in ROUND_PAIRS:
            each = round_ratios(results, receiver, other, n)
            if len(each) > 1:
                lines.append(f"  {n} assoc., {receiver}/{other.replace(' ', '-')} round by round: {_each_and_median(each)}")
    if lines:
        lines.insert(0, "(the same ratios within each round, the receivers measured one right after the other:)")
    return lines


@dataclass(frozen=True)
class OrderedBound:
    """The most any receiver keeping edged's order can reach at 1 association, and its ratios (ms per image)."""

    storescp_ms: float  # storescp's time per image: the sender's pace, the network, the page-cache write
    flush_ms: float  # (b) fsync + rename + directory fsync, per file, from the disk+journal loop at 1 thread
    commit_ms: float  # (c) the journal commit, per file, same loop
    disk_limit: float | None  # images/s at 1 association
    edged: float | None  # images/s at 1 association

    @property
    def ms_per_image(self) -> float:
        return self.storescp_ms + self.flush_ms + self.commit_ms

    @property
    def images_per_s(self) -> float:
        return 1000.0 / self.ms_per_image

    @property
    def over_disk_limit(self) -> float | None:
        return self.images_per_s / self.disk_limit if self.disk_limit else None

    @property
    def edged_over_bound(self) -> float | None:
        return self.edged / self.images_per_s if self.edged is not None else None

    @property
    def target_over_bound(self) -> float | None:
        """The target (TARGET_OVER_DISK_LIMIT x the disk limit) as a fraction of the bound: > 1 is out of reach."""
        return TARGET_OVER_DISK_LIMIT * self.disk_limit / self.images_per_s if self.disk_limit else None

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return round(x, 3) if x is not None else None
        return {
            "images_per_s": round(self.images_per_s, 2),
            "over_disk_limit": r(self.over_disk_limit),
            "edged_over_bound": r(self.edged_over_bound),
            "target_over_disk_limit": TARGET_OVER_DISK_LIMIT,
            "target_over_bound": r(self.target_over_bound),
            "storescp_ms_per_image": round(self.storescp_ms, 4),
            "flush_ms": {"fsync_rename_dirfsync": round(self.flush_ms, 4), "journal_commit": round(self.commit_ms, 4),
                         "total": round(self.flush_ms + self.commit_ms, 4)},
        }


def ordered_bound(results: Results) -> OrderedBound | None:
    """ordered_bound_1 = 1 / (1 / storescp's images/s + (b) + (c) per file), at 1 association; None without
    storescp or the disk+journal loop at 1 association.

    With one association storescu waits for each response before it sends the next image, so a receiver that
    writes, fsyncs, renames, fsyncs the directory and commits its journal before answering cannot receive
    image n+1 while image n is being flushed: its time per image is at least storescp's (the sender's pace,
    the network and the write to the page cache, all of which storescp does too) plus the flushes (b) + (c),
    timed in the disk+journal loop at 1 thread ((a), the page-cache write, is already in storescp's time
    and is not counted twice). With K > 1 associations one association's flushes overlap the others'
    transfers (and group commit shares them), so this sum bounds nothing there and is not computed: the
    'ordered' loop (:func:`measure_ordered`) estimates what the order allows at every K instead.

    Best of rounds, like every other figure: storescp's best round (highest images/s) and the per-step
    times of the disk+journal round with the highest images/s (the rows the throughput table shows).
    Both are the fastest seen, so the bound is the most optimistic one the run supports. storescp's time per
    image includes starting storescu and setting up the association, spread over ``--count`` images (as
    edged's does, so edged/bound is like for like; bound/disk-limit is low with a small ``--count``).
    """
    s, j = results.get("storescp", 1), results.get("disk+journal", 1)
    if s is None or j is None or j.per_file is None or not j.per_file.files:
        return None
    d, e = results.get("disk limit", 1), results.get("edged", 1)
    ms = j.per_file.ms_per_file()
    return OrderedBound(storescp_ms=1000.0 / s.images_per_s, flush_ms=ms["fsync_rename_dirfsync"],
                        commit_ms=ms["journal_commit"], disk_limit=d.images_per_s if d else None,
                        edged=e.images_per_s if e else None)


def _bound_lines(results: Results) -> list[str]:
    """The ordered bound block of the report (and the 1-thread disk+journal loop's ms per step)."""
    lines = ["", "ordered bound, 1 association: the most any receiver keeping edged's order (write, fsync, rename, "
                 "directory fsync, journal commit, then Success) can reach, storescu waiting for each Success"]
    b = ordered_bound(results)
    if b is None:
        lines.append("  n/a (needs storescp and disk measured at 1 association)")
    else:
        lines += [
            f"  storescp's {b.storescp_ms:.2f} ms per image + flushes {b.flush_ms + b.commit_ms:.2f} ms "
            f"(fsync+rename+dir fsync {b.flush_ms:.2f}, journal commit {b.commit_ms:.2f}) = {b.ms_per_image:.2f} ms "
            f"-> {b.images_per_s:.1f} images/s",
            f"  bound/disk-limit {_ratio(b.images_per_s, b.disk_limit)}   edged/bound {_ratio(b.edged, b.images_per_s)}"
            f"   target {TARGET_OVER_DISK_LIMIT}x disk-limit = "
            + (f"{b.target_over_bound:.2f}x the bound" if b.target_over_bound is not None else "n/a"),
        ]
    j = results.get("disk+journal", 1)
    if j is not None and j.per_file is not None and j.per_file.files:
        ms = j.per_file.ms_per_file()
        lines.append(f"  disk+journal loop, 1 thread, mean ms per file: (a) open+write {ms['write']:.3f}, "
                     f"(b) fsync+rename+dir fsync {ms['fsync_rename_dirfsync']:.3f}, "
                     f"(c) journal commit {ms['journal_commit']:.3f}")
    paced = [(t, results.get("edged", t.associations), results.get("disk limit", t.associations))
             for t in sorted(results.throughput, key=lambda t: t.associations) if t.receiver == "ordered"]
    if paced:
        lines += ["", "the 'ordered' loop (every association count): edged's order at storescp's pace, no receiver CPU; "
                      "best rounds"]
        for o, e, d in paced:
            target = f"{TARGET_OVER_DISK_LIMIT * d.images_per_s / o.images_per_s:.2f}x 'ordered'" if d else "n/a"
            lines.append(f"  {o.associations} assoc.: ordered/disk-limit {_ratio(o.images_per_s, d and d.images_per_s)}"
                         f"   edged/ordered {_ratio(e and e.images_per_s, o.images_per_s)}"
                         f"   target {TARGET_OVER_DISK_LIMIT}x disk-limit = {target}")
    return lines


def _step_lines(results: Results) -> list[str]:
    """Where each association's time went in edged's best rounds (``edged_store_step_seconds``)."""
    rows = [t for t in sorted(results.throughput, key=lambda t: t.associations)
            if t.receiver == "edged" and t.steps is not None]
    if not rows:
        return []
    lines = ["", "edged, where each association's time went (best round; mean ms per image, edged_store_step_seconds):",
             f"{'assoc.':>6} " + " ".join(f"{s:>8}" for s in STEPS) + f" {'between':>8} {'cycle':>8}",
             f"{'-' * 6} " + " ".join("-" * 8 for _ in STEPS) + f" {'-' * 8} {'-' * 8}"]
    for t in rows:
        assert t.steps is not None
        between = t.cycle_ms - sum(t.steps.values())
        lines.append(f"{t.associations:>6} " + " ".join(f"{t.steps[s]:>8.2f}" for s in STEPS)
                     + f" {between:>8.2f} {t.cycle_ms:>8.2f}")
    lines += ["(receive: command set to the data set's last fragment, written as it came; checks: header, duplicate,",
              " free space; fsync: rename + the file's fsync; commit: group commit, directory fsync + journal;",
              " respond: until the response is sent; between: the rest of the cycle, the sender's turn from a",
              " response to its next command, and its start and association setup spread over its images;",
              " cycle: associations x seconds / images)"]
    return lines


def report(results: Results) -> str:
    mb_each = results.file_bytes / results.count / 1e6
    lines = [
        "",
        f"edged ingest benchmark: {results.count} synthetic CT slices, 512x512 16-bit, {mb_each:.3f} MB each "
        f"({results.file_bytes / 1e6:.1f} MB in all), 127.0.0.1, --max-pdu {MAX_PDU}",
        f"machine: {results.cpu_count} CPU cores (os.cpu_count()), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; work dir filesystem: {results.workdir_fs}",
        f"DCMTK: {results.dcmtk}",
        f"note: {NOTE}",
        "",
        f"{'receiver':<12} {'assoc.':>6} {'images/s':>9} {'MB/s':>7} {'seconds':>8} {'flushes/img':>11}",
        f"{'-' * 12} {'-' * 6} {'-' * 9} {'-' * 7} {'-' * 8} {'-' * 11}",
    ]
    for t in sorted(results.throughput, key=lambda t: (t.associations, ROWS.index(t.receiver))):
        each = results.rates(t.receiver, t.associations)
        runs = " (runs: " + ", ".join(f"{x:.1f}" for x in each) + ")" if len(each) > 1 else ""
        flushes = f"{t.flushes_per_image:.2f}" if t.flushes_per_image is not None else "n/a"
        lines.append(f"{t.receiver:<12} {t.associations:>6} {t.images_per_s:>9.1f} {t.mb_per_s:>7.1f} {t.seconds:>8.2f} "
                     f"{flushes:>11}{runs}")
    lines += [
        "(disk limit: same files, temp file + fsync + rename + directory fsync in a loop; 'assoc.' = parallel writer threads;",
        " disk+journal: that loop again, each file then committed as a row of a SQLite journal, WAL, synchronous=FULL;",
        " flushes/img: cache flushes the work dir's disk completed during that best round, per image, whoever asked;",
        " ordered: edged's order (write, rename, fsync, group commit of directory fsync + journal) in 'assoc.' threads,",
        " each paced at that round's storescp time per image and association, with no CPU work of a receiver's own)",
        f"(best of {results.repeat} round(s); in each round every receiver ran once, one after the other)",
        "",
        f"{'assoc.':>6} {'edged/orthanc':>14} {'edged/storescp':>15} {'edged/disk-limit':>17}   ({results.cpu_count} CPU cores)",
        f"{'-' * 6} {'-' * 14} {'-' * 15} {'-' * 17}",
    ]
    for n in sorted({t.associations for t in results.throughput}):
        e, o, s, d = (results.get(r, n) for r in ("edged", "orthanc", "storescp", "disk limit"))
        lines.append(f"{n:>6} {_ratio(e and e.images_per_s, o and o.images_per_s):>14} "
                     f"{_ratio(e and e.images_per_s, s and s.images_per_s):>15} "
                     f"{_ratio(e and e.images_per_s, d and d.images_per_s):>17}")
    lines += _round_lines(results)
    lines += _step_lines(results)
    lines += _bound_lines(results)
    if results.setup:
        lines += [
            "",
            f"association setup, ms per association (median of {results.setup[0].repeats}, each a new DCMTK process, "
            f"the receivers taking turns call by call; best of {results.repeat} rounds; {results.cpu_count} CPU cores):",
            f"{'receiver':<12} {'echoscu':>9} {'storescu 1 file':>16}",
            f"{'-' * 12} {'-' * 9} {'-' * 16}",
        ]
        for s in results.setup:
            lines.append(f"{s.receiver:<12} {s.echo_ms:>9.1f} {s.store_one_ms:>16.1f}")
        by = {s.receiver: s for s in results.setup}
        if "edged" in by and "storescp" in by:
            e, s = by["edged"], by["storescp"]
            lines.append(f"{'edged/storescp':<12} {_ratio(e.echo_ms, s.echo_ms):>9} {_ratio(e.store_one_ms, s.store_one_ms):>16}")
        if "edged" in by and "orthanc" in by:
            e, o = by["edged"], by["orthanc"]
            lines.append(f"{'edged/orthanc':<12} {_ratio(e.echo_ms, o.echo_ms):>9} {_ratio(e.store_one_ms, o.store_one_ms):>16}")
        lines += _setup_round_lines(results)
        lines.append(f"(included in every figure above: starting and exiting echoscu --version takes {results.tool_start_ms:.1f} ms)")
    return "\n".join(lines)


def setup_round_ratios(results: Results, receiver: str, other: str) -> tuple[list[float], list[float]]:
    """``receiver``'s ms per association over ``other``'s within each setup round: (echoscu, storescu)."""
    rounds: dict[int, dict[str, Setup]] = {}
    for s in results.setup_runs:
        rounds.setdefault(s.round, {})[s.receiver] = s
    pairs = [(r[receiver], r[other]) for _, r in sorted(rounds.items()) if receiver in r and other in r]
    return ([a.echo_ms / b.echo_ms for a, b in pairs if b.echo_ms],
            [a.store_one_ms / b.store_one_ms for a, b in pairs if b.store_one_ms])


def _setup_round_lines(results: Results) -> list[str]:
    lines: list[str] = []
    for other in ("storescp", "orthanc"):
        echo, store = setup_round_ratios(results, "edged", other)
        if len(echo) > 1:
            lines.append(f"  edged/{other} round by round: echoscu {_each_and_median(echo)}; "
                         f"storescu 1 file {_each_and_median(store)}")
    return lines


def to_json(results: Results) -> dict[str, Any]:
    bound = ordered_bound(results)
    return {
        "count": results.count,
        "file_bytes": results.file_bytes,
        "cpu_count": results.cpu_count,
        "platform": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "dcmtk": results.dcmtk,
        "workdir_filesystem": results.workdir_fs,
        "max_pdu": MAX_PDU,
        "note": NOTE,
        "repeat": results.repeat,
        "throughput": [t.as_dict() for t in results.throughput],
        "throughput_runs": [t.as_dict() for t in results.runs],
        "ratios": ratios(results),
        **({"ordered_bound_1": bound.as_dict()} if bound is not None else {}),
        "association_setup_ms": [asdict(s) for s in results.setup],
        "association_setup_runs_ms": [asdict(s) for s in results.setup_runs],
        "tool_start_ms": round(results.tool_start_ms, 2),
    }


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/ingest.py",
        description="Measure edged's ingest rate (images/s) against Orthanc, DCMTK storescp and the disk's "
                    "fsync limit, for one and for several concurrent associations, plus the cost of an "
                    "association, all in one run on 127.0.0.1. " + NOTE + ".",
        epilog="Needs DCMTK (storescu, storescp, echoscu) on PATH. Example: "
               ".venv/bin/python benchmarks/ingest.py --count 500 --associations 1 4 --json ingest.json",
    )
    p.add_argument("--count", type=_positive, default=500, metavar="N",
                   help="synthetic 512x512 16-bit CT slices to send per measurement (default: 500)")
    p.add_argument("--associations", type=_positive, nargs="+", default=[1, 4], metavar="K",
                   help="concurrent associations to measure, each a separate storescu process sending 1/K of "
                        "the files (default: 1 4)")
    p.add_argument("--setup-repeats", type=int, default=30, metavar="R",
                   help="associations per receiver for the association-setup figures, the receivers taking turns "
                        "(default: 30; 0: skip)")
    p.add_argument("--repeat", type=_positive, default=1, metavar="N",
                   help="rounds of every measurement; the best of the rounds is reported, every run listed "
                        "(default: 1). Use 3 or more on a shared machine")
    p.add_argument("--receivers", nargs="+", choices=RECEIVERS, default=list(RECEIVERS), metavar="NAME",
                   help=f"what to measure, of {', '.join(RECEIVERS)} (default: all)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="where to create the temporary directory (default: the system's temp dir); it "
                        "should be on the disk you want to measure, not a tmpfs")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (files, stores, logs)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON to FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop_on_sigterm("ingest.py")
    try:
        tools = find_tools()
    except BenchError as exc:
        print(f"ingest.py: {exc}", file=sys.stderr)
        return 2
    return run_in_workdir("ingest.py", args, "edged-ingest-", lambda root: run_benchmark(args, root, tools),
                          report, to_json)


if __name__ == "__main__":
    sys.exit(main())
