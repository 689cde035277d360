"""Soak: push many CT slices at a steady rate through edged and watch its resources for growth.

One run on 127.0.0.1: Orthanc as the only destination (so that retention can delete: edged deletes only
what every destination has), a fresh ``python -m edged serve`` with the classifier only and a short
``[outbox] retention_seconds``, and a paced pynetdicom sender in this process (one association per series,
each C-STORE at its slot on a fixed schedule, ``--rate`` per second). Every ``--sample-seconds`` it records the
daemon's resident memory, open file descriptors, threads, CPU time, the journal's size (database + WAL), the
spool's size and the backlog (journal, read-only). After the last slice it waits until every job is done and
every result delivered, then one more retention sweep, and prints the samples, start/end/max per figure and a
verdict per figure: flat or growing, with the least-squares slope per 1,000 instances.

Run:  .venv/bin/python benchmarks/soak.py [--count 20000] [--rate 10] [--json FILE]
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sqlite3
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.uid import generate_uid

from edged.dicom import requestor
from edged.synthetic import chest_phantom, ct_slice

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from e2e import (  # noqa: E402
    CLASSIFIER, HOST, MAX_PDU, EDGED_AET, Edged, Pacs, open_journal, proc_cpu_seconds,
)
from harness import BenchError, run_in_workdir, stop_on_sigterm  # noqa: E402
from ingest import _positive  # noqa: E402

CALLING_AET = "SOAKSCU"

#: A figure is "flat" when its fitted growth over the whole run stays under max(absolute, relative x start).
FLAT_TOLERANCE: dict[str, tuple[float, float]] = {
    "rss_mib": (16.0, 0.05),
    "fds": (4.0, 0.0),
    "threads": (2.0, 0.0),
    "journal_mib": (1.0, 0.0),
    "wal_mib": (4.0, 0.0),
    "spool_mib": (64.0, 0.10),
    "backlog": (100.0, 0.0),
}
FIGURES = tuple(FLAT_TOLERANCE)


# -- the sender --------------------------------------------------------------------------------------


class PacedSender:
    """Sends ``count`` slices at ``rate`` per second, one association per series of ``series_size``.

    Slice i goes at start + i / rate (a fixed schedule: a late send does not shift the ones after it). Each
    slice is one of a few chest phantoms with its own study/series/SOP Instance UIDs and position.
    """

    def __init__(self, port: int, count: int, rate: float, series_size: int, phantoms: int, seed: int) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

        self.port, self.count, self.rate, self.series_size = port, count, rate, series_size
        rng = np.random.default_rng(seed)
        uid = generate_uid()
        self.templates = [ct_slice(0, study_uid=uid, series_uid=uid, hu=chest_phantom(rng, nodules=i % 3)[0],
                                   slice_thickness=2.5) for i in range(phantoms)]
        self.ae = AE(ae_title=CALLING_AET)
        self.ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 120
        self.sent = 0
        self.failed = 0
        self.max_lag = 0.0  # seconds the sender was behind its schedule, at worst
        #: C-STORE round trips (request sent -> response): long ones mean edged (or the machine) stalled, not
        #: the sender; one longer than the quiet period lets edged complete a series that is still arriving
        self.round_trips: list[float] = []
        self.error: str | None = None
        self.started = math.nan
        self.finished = math.nan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sender", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            i = 0
            while i < self.count and not self._stop.is_set():
                n = min(self.series_size, self.count - i)
                self._series(i, n)
                i += n
        except Exception as exc:  # reported by the main thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished = time.monotonic()

    def _series(self, first: int, n: int) -> None:
        study, series = generate_uid(), generate_uid()
        frame = generate_uid(entropy_srcs=[study, "for"])
        # edged.dicom.requestor: pynetdicom's reactor would sometimes take a response
        assoc = requestor.associate(self.ae, HOST, self.port, ae_title=EDGED_AET, max_pdu=MAX_PDU)
        if not assoc.is_established:
            raise BenchError("edged did not accept the association")
        try:
            for k in range(n):
                if self._stop.is_set():
                    return
                due = self.started + (first + k) / self.rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                else:
                    self.max_lag = max(self.max_lag, -wait)
                ds = self.templates[(first + k) % len(self.templates)]
                sop = generate_uid(entropy_srcs=[series, str(k)])
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
                ds.InstanceNumber = k + 1
                ds.ImagePositionPatient = [-250.0, -250.0, -2.5 * k]
                ds.SliceLocation = -2.5 * k
                t = time.monotonic()
                rsp = assoc.send_c_store(ds)
                self.round_trips.append(time.monotonic() - t)
                if rsp is None or "Status" not in rsp:
                    raise BenchError(f"no C-STORE response (association lost) at slice {first + k}")
                if int(rsp.Status) != 0:
                    self.failed += 1
                self.sent += 1
        finally:
            if assoc.is_established:
                assoc.release()


# -- sampling ----------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the sender started
    sent: int
    received: int  # instances acknowledged (edged_instances_received_total{status="success"})
    rss_mib: float
    fds: int
    threads: int
    cpu_s: float  # the daemon's utime + stime
    journal_mib: float  # journal.sqlite3
    wal_mib: float  # journal.sqlite3-wal
    spool_mib: float  # every file under the storage dir but the journal's
    spool_files: int
    backlog: int  # jobs pending/running/failed + deliveries pending + series open
    jobs_unfinished: int
    deliveries_pending: int
    purged: int  # instances retention deleted


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {name}")


def _size_mib(path: Path) -> float:
    try:
        return path.stat().st_size / 2**20
    except FileNotFoundError:
        return 0.0


def spool_usage(storage: Path, journal: Path) -> tuple[float, int]:
    """(MiB, files) under ``storage`` except the journal's files and the engine cache."""
    skip = {journal.name, journal.name + "-wal", journal.name + "-shm"}
    total, files = 0, 0
    for dirpath, dirnames, filenames in os.walk(storage):
        if Path(dirpath) == storage:
            dirnames[:] = [d for d in dirnames if d != "engines"]
        for name in filenames:
            if Path(dirpath) == storage and name in skip:
                continue
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except FileNotFoundError:  # retention removed it meanwhile
                pass
    return total / 2**20, files


_RECEIVED = re.compile(r'^edged_instances_received_total\{status="success"\} ([0-9.e+]+)$', re.M)


def _received(edged: Edged) -> int:
    """Instances edged acknowledged as stored, from its own counter: the journal cannot say once
    ``history_seconds`` has let it forget old series."""
    match = _RECEIVED.search(edged.metrics())
    return int(float(match.group(1))) if match else 0


def take_sample(edged: Edged, conn: sqlite3.Connection, sender: PacedSender, t0: float) -> Sample:
    pid = edged.pid
    one = lambda sql: int(conn.execute(sql).fetchone()[0] or 0)  # noqa: E731
    jobs = one("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running', 'failed')")
    deliveries = one("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'")
    open_series = one("SELECT COUNT(*) FROM series WHERE state = 'open'")
    spool_mib, spool_files = spool_usage(edged.storage, edged.journal)
    return Sample(
        t=time.monotonic() - t0, sent=sender.sent, received=_received(edged),
        rss_mib=_status_field(pid, "VmRSS") / 1024, fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=_status_field(pid, "Threads"), cpu_s=proc_cpu_seconds(pid),
        journal_mib=_size_mib(edged.journal), wal_mib=_size_mib(edged.journal.with_name(edged.journal.name + "-wal")),
        spool_mib=spool_mib, spool_files=spool_files, backlog=jobs + deliveries + open_series,
        jobs_unfinished=jobs, deliveries_pending=deliveries,
        purged=one("SELECT COUNT(*) FROM instances WHERE state = 'purged'"),
    )


# -- verdict -----------------------------------------------------------------------------------------


@dataclass
class Trend:
    figure: str
    start: float
    end: float
    max: float
    slope_per_1000: float  # least squares over the steady part, per 1,000 instances received
    growth: float  # slope x instances / 1000
    flat: bool


def trend(samples: list[Sample], figure: str, warmup: float) -> Trend:
    """Slope of ``figure`` against instances received, over the samples after the first ``warmup`` share of
    instances (start-up allocations, the first series filling the pipeline) and before the drain."""
    total = max(s.received for s in samples)
    steady = [s for s in samples if warmup * total <= s.received and s.sent < total] or samples
    x = np.array([s.received for s in steady], dtype=float)
    y = np.array([getattr(s, figure) for s in steady], dtype=float)
    slope = float(np.polyfit(x, y, 1)[0]) * 1000 if len(steady) >= 3 and np.ptp(x) > 0 else math.nan
    values = [float(getattr(s, figure)) for s in samples]
    growth = slope * total / 1000
    absolute, relative = FLAT_TOLERANCE[figure]
    flat = not math.isnan(slope) and growth < max(absolute, relative * abs(values[0]))
    return Trend(figure, values[0], values[-1], max(values), slope, growth, flat)


# -- the run -----------------------------------------------------------------------------------------


def run_soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    pacs = None if args.no_orthanc else Pacs(root / "orthanc")
    samples: list[Sample] = []
    try:
        if pacs is not None:
            pacs.start()
        extra = (f"\n[outbox]\nretention_seconds = {args.retention_seconds!r}\n"
                 f"history_seconds = {args.history_seconds!r}\n")
        edged = Edged(root / "edged", args.engines.resolve(), args.quiet_seconds,
                      None if pacs is None else pacs.port, models=[CLASSIFIER], extra_toml=extra)
        edged.write_config()
        sender = None
        try:
            edged.start()
            print(f"generating {args.phantoms} chest phantoms ...", file=sys.stderr, flush=True)
            sender = PacedSender(edged.port, args.count, args.rate, args.series_size, args.phantoms, args.seed)
            conn = open_journal(edged.journal)
            try:
                print(f"sending {args.count} slices at {args.rate:g}/s ({args.count / args.rate / 60:.1f} min), "
                      f"sampling every {args.sample_seconds:g} s ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                samples.append(take_sample(edged, conn, sender, t0))
                sender.start()
                drained_at = settle_until = None
                next_sample = t0 + args.sample_seconds
                deadline_after_send = None
                stopped_early = False
                while True:
                    time.sleep(max(0.0, next_sample - time.monotonic()))
                    next_sample += args.sample_seconds
                    s = take_sample(edged, conn, sender, t0)
                    samples.append(s)
                    if edged.proc is not None and edged.proc.poll() is not None:
                        raise BenchError(f"edged exited with {edged.proc.returncode}")
                    if sender.error:
                        raise BenchError(f"sender failed after {sender.sent} slices: {sender.error}")
                    if len(samples) % max(1, int(60 / args.sample_seconds)) == 0:
                        print(f"  {s.t:6.0f} s: sent {s.sent}, rss {s.rss_mib:.0f} MiB, fds {s.fds}, "
                              f"wal {s.wal_mib:.1f} MiB, spool {s.spool_mib:.0f} MiB, backlog {s.backlog}",
                              file=sys.stderr, flush=True)
                    if (args.max_send_seconds is not None and not stopped_early and sender.sent < args.count
                            and s.t > args.max_send_seconds):
                        stopped_early = True
                        print(f"  --max-send-seconds reached: stopping the sender at {sender.sent} slices",
                              file=sys.stderr, flush=True)
                        sender.stop()
                    if sender.join(0) and deadline_after_send is None:
                        deadline_after_send = time.monotonic() + args.timeout
                    if deadline_after_send is not None:
                        if drained_at is None and s.received >= sender.sent and s.backlog == 0:
                            drained_at = time.monotonic()
                            # one more retention sweep (every 30 s) after retention_seconds
                            settle_until = drained_at + args.settle_seconds
                        if settle_until is not None and time.monotonic() >= settle_until:
                            break
                        if drained_at is None and time.monotonic() > deadline_after_send:
                            # reported (the verdict covers the sending part), not raised: the samples are the point
                            print(f"  not drained {args.timeout:.0f} s after the last slice (backlog {s.backlog}); "
                                  "reporting what was measured", file=sys.stderr, flush=True)
                            break
            finally:
                conn.close()
            delivered = _delivered(edged.journal)
            reopened = _reopened(edged.journal)
        finally:
            if sender is not None:
                sender.stop()
            edged.stop()
    finally:
        if pacs is not None:
            pacs.stop()
    assert sender is not None
    send_seconds = sender.finished - sender.started
    return {
        "count": args.count, "stopped_early": stopped_early, "rate": args.rate, "series_size": args.series_size,
        "retention_seconds": args.retention_seconds, "history_seconds": args.history_seconds,
        "quiet_seconds": args.quiet_seconds,
        "destination": "none" if pacs is None else "Orthanc (127.0.0.1)",
        "cpu_count": os.cpu_count(), "sent": sender.sent, "failed": sender.failed,
        "send_seconds": send_seconds, "achieved_rate": sender.sent / send_seconds if send_seconds > 0 else math.nan,
        "max_lag_s": sender.max_lag, "delivered": delivered,
        "round_trip_s": {"p50": float(np.percentile(sender.round_trips, 50)) if sender.round_trips else math.nan,
                         "p99": float(np.percentile(sender.round_trips, 99)) if sender.round_trips else math.nan,
                         "max": max(sender.round_trips, default=math.nan),
                         "over_quiet_period": sum(1 for x in sender.round_trips if x > args.quiet_seconds)},
        "reopened_series": reopened,
        "drain_seconds": (drained_at - sender.finished) if drained_at is not None else math.nan,
        "drained": drained_at is not None,
        "samples": [asdict(s) for s in samples],
        "trends": [asdict(trend(samples, f, args.warmup)) for f in FIGURES],
    }


def _delivered(journal: Path) -> int:
    conn = open_journal(journal)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'").fetchone()[0])
    finally:
        conn.close()


def _reopened(journal: Path) -> dict[str, int]:
    """Series completed more than once (a gap longer than the quiet period while they arrived), and the report
    jobs all series got (one per series and generation)."""
    conn = open_journal(journal)
    try:
        series, reopened = conn.execute("SELECT COUNT(*), SUM(generation > 0) FROM series").fetchone()
        reports = conn.execute("SELECT COUNT(*) FROM jobs WHERE level = 'report'").fetchone()[0]
        return {"series": int(series), "reopened": int(reopened or 0), "report_jobs": int(reports)}
    finally:
        conn.close()


def report(r: dict[str, Any]) -> str:
    samples = [Sample(**s) for s in r["samples"]]
    lines = [
        f"edged soak: {r['count']} CT slices (512x512 16-bit) at {r['rate']:g}/s, series of {r['series_size']}, "
        f"one association per series (pynetdicom, paced); classifier {CLASSIFIER} only; retention "
        f"{r['retention_seconds']:g} s; destination {r['destination']}",
        f"machine: {r['cpu_count']} CPU cores; sender, edged, ONNX Runtime and Orthanc share them (other people's work "
        f"too: load average {os.getloadavg()[0]:.2f} at the end)",
        (f"STOPPED EARLY (--max-send-seconds): sent {r['sent']} of {r['count']}\n" if r["stopped_early"] else "") +
        f"sent {r['sent']} ({r['failed']} not Success) in {r['send_seconds']:.0f} s: {r['achieved_rate']:.1f}/s; the "
        f"sender was at most {r['max_lag_s']:.2f} s behind its schedule; drained {_f(r['drain_seconds'], '.0f')} s "
        f"after the last slice{'' if r['drained'] else ' (NOT drained: backlog left at the end)'}; {r['delivered']} results delivered",
        f"C-STORE round trip: p50 {r['round_trip_s']['p50']:.3f} s, p99 {r['round_trip_s']['p99']:.3f} s, max "
        f"{r['round_trip_s']['max']:.1f} s; {r['round_trip_s']['over_quiet_period']} longer than series_quiet_seconds "
        f"({r['quiet_seconds']:g} s); series completed more than once: {r['reopened_series']['reopened']} of "
        f"{r['reopened_series']['series']} ({r['reopened_series']['report_jobs']} report jobs)",
        "",
        f"  {'t s':>6} {'sent':>6} {'recv':>6} {'RSS MiB':>8} {'fds':>4} {'thr':>4} {'CPU s':>7} {'journal':>8} "
        f"{'WAL MiB':>7} {'spool MiB':>9} {'files':>6} {'backlog':>7} {'purged':>6}",
    ]
    step = max(1, len(samples) // 30)
    for i, s in enumerate(samples):
        if i % step and i != len(samples) - 1:
            continue
        lines.append(f"  {s.t:>6.0f} {s.sent:>6} {s.received:>6} {s.rss_mib:>8.1f} {s.fds:>4} {s.threads:>4} "
                     f"{s.cpu_s:>7.1f} {s.journal_mib:>8.2f} {s.wal_mib:>7.2f} {s.spool_mib:>9.0f} {s.spool_files:>6} "
                     f"{s.backlog:>7} {s.purged:>6}")
    lines += ["", f"  {'figure':<12} {'start':>9} {'end':>9} {'max':>9} {'slope/1000':>11}  verdict"]
    growing = []
    for t in r["trends"]:
        verdict = "flat" if t["flat"] else "GROWING"
        if not t["flat"]:
            growing.append(f"{t['figure']} {t['slope_per_1000']:+.3g}/1000")
        lines.append(f"  {t['figure']:<12} {t['start']:>9.2f} {t['end']:>9.2f} {t['max']:>9.2f} "
                     f"{_f(t['slope_per_1000'], '+.3f'):>11}  {verdict}")
    lines += [
        "  (slope: least squares against instances received, samples after the warm-up and before the drain; "
        "flat: fitted growth over the run under " + ", ".join(
            f"{k} {a:g}" + (f" or {100 * rel:g}% of start" if rel else "") for k, (a, rel) in FLAT_TOLERANCE.items())
        + ")",
        "",
        "verdict: " + ("flat (" + ", ".join(f"{t['figure']} {t['slope_per_1000']:+.3g}" for t in r["trends"])
                       + " per 1,000 instances)" if not growing else "growing: " + ", ".join(growing)
                       + " (per 1,000 instances)"),
    ]
    return "\n".join(lines)


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/soak.py",
        description="Push CT slices at a steady rate through edged (classifier, retention, Orthanc) and report "
                    "whether its memory, file descriptors, threads, journal, WAL, spool and backlog stay flat.",
        epilog="Needs Debian's orthanc and a C compiler (tests/orthanc.py) unless --no-orthanc. "
               "Example: .venv/bin/python benchmarks/soak.py --count 2000 --rate 10 --json soak.json",
    )
    p.add_argument("--count", type=_positive, default=20000, metavar="N", help="slices to send (default: 20000)")
    p.add_argument("--rate", type=float, default=10.0, metavar="R",
                   help="slices per second (default: 10: with one SR per 300-slice series taking ~27 s to author on "
                        "an idle 2-core machine, a faster steady rate piles up reports; see benchmarks/README.md)")
    p.add_argument("--series-size", type=_positive, default=300, metavar="K",
                   help="slices per series, one association each (default: 300)")
    p.add_argument("--sample-seconds", type=float, default=10.0, metavar="S", help="sampling period (default: 10)")
    p.add_argument("--retention-seconds", type=float, default=60.0, metavar="S",
                   help="[outbox] retention_seconds: how long delivered work stays in the spool (default: 60; a "
                        "site keeps a day, which would fill the disk in a soak this short)")
    p.add_argument("--history-seconds", type=float, default=60.0, metavar="S",
                   help="[outbox] history_seconds: how long the journal keeps the rows of a wholly purged series "
                        "(default: 60; a site keeps a week, longer than a soak, so the journal would only grow)")
    p.add_argument("--quiet-seconds", type=float, default=10.0, metavar="S",
                   help="[pipeline] series_quiet_seconds (default: 10, edged's default)")
    p.add_argument("--settle-seconds", type=float, default=None, metavar="S",
                   help="after the backlog is drained, keep sampling this long so that retention runs once more "
                        "(default: retention_seconds + 35)")
    p.add_argument("--warmup", type=float, default=0.1, metavar="F",
                   help="share of instances left out of the slopes at the start (default: 0.1)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="stop waiting (and report, saying so) when the backlog is not drained this long after the "
                        "last slice (default: 900)")
    p.add_argument("--max-send-seconds", type=float, default=None, metavar="S",
                   help="stop sending after S seconds even if --count is not reached (the report says so)")
    p.add_argument("--no-orthanc", action="store_true",
                   help="no destination: nothing is ever delivered, so retention deletes nothing")
    p.add_argument("--engines", type=Path, default=REPO / "engines", metavar="DIR",
                   help="model repository (default: the checkout's engines/)")
    p.add_argument("--phantoms", type=_positive, default=12, metavar="P", help="distinct phantoms (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR", help="where to create the work dir")
    p.add_argument("--keep", action="store_true", help="keep the work dir (journal, spool, logs)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write samples and figures to FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.sample_seconds <= 0:
        print("soak.py: --rate and --sample-seconds must be positive", file=sys.stderr)
        return 2
    if args.settle_seconds is None:
        args.settle_seconds = args.retention_seconds + 35.0
    stop_on_sigterm("soak.py")
    if not (args.engines / CLASSIFIER / "model.onnx").exists():
        print(f"soak.py: {args.engines / CLASSIFIER / 'model.onnx'} does not exist (use --engines DIR)", file=sys.stderr)
        return 2
    return run_in_workdir("soak.py", args, "edged-soak-", lambda root: run_soak(args, root), report, lambda r: r)


if __name__ == "__main__":
    sys.exit(main())
