"""Scale-out benchmark: two edged daemons sharing one Triton server against one edged with local ONNX Runtime.

1. Synthetic chest CT series (512x512 16-bit slices from ``edged.synthetic``), written once.
2. Local: one edged (``backend = "onnxruntime"``); the series are pushed with DCMTK ``storescu``
   (``TCP_NODELAY=1``), one association per series. Figure: findings/s, the classifier's and the
   segmenter's findings committed to the journal divided by the time from the first push to the last
   finding.
3. Triton: a real Triton Inference Server (PyTriton's tritonserver from scripts/install-triton-server,
   the models run by ONNX Runtime in its Python backend, Triton's dynamic batcher on) and two edged daemons
   (``backend = "triton"``), each pushed the same series at the same time. Figure: findings/s of each daemon
   and of both together, and the ratio of both together to local.

Every process runs on this machine's cores (Triton, both daemons, storescu): on a 2-core box the figure
says what sharing costs and how batching across daemons behaves, not what a GPU server would give.
Reports (SR/SEG) are built after findings and are not counted. The clock includes the 5 s of quiet after
which a series is complete (its series job then runs). On a machine shared with other work, two daemons
get a larger share of the contended cores than one: note the load average the script prints.

Run:  .venv/bin/python benchmarks/triton.py [--slices 120] [--series-size 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.uid import generate_uid

from edged.synthetic import chest_phantom, ct_slice

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from tritonserver import TritonServer  # noqa: E402 - the same server the tests start

LISTENING = re.compile(r"event=listening host=\S+ port=(\d+)")
MODELS = ("ct-nodule-cls", "lesion-seg")


def write_series(root: Path, slices: int, series_size: int) -> list[list[Path]]:
    rng = np.random.default_rng(7)
    pool = [chest_phantom(rng, nodules=1 if i % 3 == 0 else 0)[0] for i in range(8)]
    study = generate_uid()
    out: list[list[Path]] = []
    for s in range(0, slices, series_size):
        folder = root / f"series{s // series_size:03d}"
        folder.mkdir(parents=True)
        uid = generate_uid()
        files = []
        for i in range(min(series_size, slices - s)):
            ds = ct_slice(i, study_uid=study, series_uid=uid, hu=pool[(s + i) % len(pool)], slice_thickness=2.5)
            p = folder / f"s{i:04d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(p)
        out.append(files)
    return out


class Proc:
    def __init__(self, cmd: list[str], log: Path, group: bool = True) -> None:
        self.log = log
        with log.open("ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=f, start_new_session=group)

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if len(re.findall(pattern, text)) >= count:
                return text
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[0]} exited {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {pattern!r} in {self.log}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


class Edged(Proc):
    def __init__(self, workdir: Path, engines: str, triton_url: str | None = None) -> None:
        workdir.mkdir(parents=True)
        self.storage = workdir / "data"
        text = (f'[dicom]\nhost = "127.0.0.1"\nport = 0\nmax_pdu = 131072\n[http]\nhost = "127.0.0.1"\nport = 0\n'
                f'[storage]\ndir = "{self.storage}"\nmin_free_bytes = 0\n'
                f'[pipeline]\nseries_quiet_seconds = 5.0\npoll_seconds = 0.05\n'
                f'[engines]\nbackend = "{engines}"\n')
        if triton_url:
            text += f'[triton]\nurl = "{triton_url}"\nmax_in_flight = 2\n'
        (workdir / "edged.toml").write_text(text)
        super().__init__([sys.executable, "-m", "edged", "serve", "-c", str(workdir / "edged.toml")],
                         workdir / "edged.log")
        self.port = int(LISTENING.findall(self.wait_for(r"event=listening ", 120))[-1])

    def progress(self) -> tuple[int, int, float | None]:
        """(findings-producing jobs done, such jobs in all, last finish time)."""
        conn = sqlite3.connect(f"file:{self.storage / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT SUM(state = 'done'), COUNT(*), MAX(finished_at) FROM jobs"
                               " WHERE level != 'report'").fetchone()
            found = conn.execute("SELECT COUNT(*) FROM findings").fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'dead'").fetchone()[0]
        finally:
            conn.close()
        if dead:
            raise RuntimeError(f"{dead} dead job(s) in {self.storage}")
        self.findings = int(found)
        return int(row[0] or 0), int(row[1] or 0), row[2]


def push(edged: Edged, series: list[list[Path]], log: Path) -> subprocess.Popen[bytes]:
    """Every series, one storescu association each, one after the other (a shell loop)."""
    storescu = shutil.which("storescu")
    if storescu is None:
        raise RuntimeError("storescu not found: run scripts/install-test-deps")
    script = " && ".join(f"{storescu} -aec EDGED -xs 127.0.0.1 {edged.port} " + " ".join(map(str, files))
                         for files in series)
    with log.open("ab") as f:
        return subprocess.Popen(["sh", "-c", script], stdout=f, stderr=f, env={**os.environ, "TCP_NODELAY": "1"})


@dataclass
class Run:
    name: str
    findings: int
    seconds: float
    findings_per_s: float


def run_scenario(name: str, daemons: list[Edged], series: list[list[Path]], workdir: Path, timeout: float) -> list[Run]:
    expected_jobs = sum(len(s) for s in series) + len(series)  # an instance job per slice, a series job each
    t0 = time.time()
    senders = [push(e, series, workdir / f"{name}-push{i}.log") for i, e in enumerate(daemons)]
    deadline = time.monotonic() + timeout
    done: dict[int, float] = {}
    while len(done) < len(daemons):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: not finished within {timeout} s")
        for i, e in enumerate(daemons):
            if i in done:
                continue
            finished, total, last = e.progress()
            if total >= expected_jobs and finished == total:
                done[i] = float(last)
        time.sleep(0.1)
    for s in senders:
        if s.wait(60) != 0:
            raise RuntimeError(f"{name}: storescu failed (see {workdir})")
    runs = [Run(f"{name}[{i}]", e.findings, done[i] - t0, e.findings / (done[i] - t0)) for i, e in enumerate(daemons)]
    if len(daemons) > 1:
        total = sum(e.findings for e in daemons)
        span = max(done.values()) - t0
        runs.append(Run(f"{name}[all]", total, span, total / span))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=120, help="slices per push (default 120)")
    ap.add_argument("--series-size", type=int, default=40, help="slices per series (default 40)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per scenario (default 900)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edged-triton-bench-"))
    load0 = os.getloadavg()[0]
    procs: list[Proc] = []
    stoppers: list[TritonServer] = []
    try:
        series = write_series(work / "ct", args.slices, args.series_size)
        local = Edged(work / "local", "onnxruntime")
        procs.append(local)
        runs = run_scenario("local-onnxruntime", [local], series, work, args.timeout)
        local.stop()
        server = TritonServer(work / "triton", list(MODELS))
        stoppers.append(server)
        server.start(300)
        url = server.grpc_url
        pair = [Edged(work / f"triton{i}", "triton", url) for i in range(2)]
        procs.extend(pair)
        runs += run_scenario("triton-2-daemons", pair, series, work, args.timeout)
    finally:
        for p in reversed(procs):
            p.stop()
        for t in stoppers:
            t.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    local_rate = runs[0].findings_per_s
    both = runs[-1].findings_per_s
    print(f"{args.slices} slices in {len(series)} series, pushed to each daemon; {os.cpu_count()} CPU cores; "
          f"load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} (other work on the machine skews both)")
    print(f"{'run':<24} {'findings':>9} {'seconds':>9} {'findings/s':>11}")
    for r in runs:
        print(f"{r.name:<24} {r.findings:>9} {r.seconds:>9.1f} {r.findings_per_s:>11.2f}")
    print(f"ratio (two daemons on Triton, together / one local ONNX Runtime): {both / local_rate:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"slices": args.slices, "series": len(series), "cpus": os.cpu_count(),
                                         "load_average_start": load0, "load_average_end": os.getloadavg()[0],
                                         "runs": [asdict(r) for r in runs], "ratio": both / local_rate}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
