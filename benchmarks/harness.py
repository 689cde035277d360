"""What every benchmark script shares: the processes it started (ended whatever happens), its work dir, and
the run → report → JSON sequence with its exit codes.

``run_in_workdir`` is each script's ``main`` after its own argument checks: it makes the work dir, runs the
measurement, prints the report, writes the figures as JSON if asked, and always ends every process the
script started; the work dir is kept for inspection when a measurement failed (exit 1) or with --keep.
SIGTERM is turned into SystemExit so that the same clean-up runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence, TypeVar

STOP_TIMEOUT_S = 30.0

R = TypeVar("R")


class BenchError(RuntimeError):
    """A measurement could not be made (a peer failed, images went missing, a tool is absent)."""


# -- processes ---------------------------------------------------------------------------------------

_started: list[subprocess.Popen[bytes]] = []
_started_lock = threading.Lock()


def adopt(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Remember a process started elsewhere (a test helper's server), so that :func:`reap_all` ends it too."""
    with _started_lock:
        _started.append(proc)
    return proc


def spawn(cmd: Sequence[str], *, group: bool = False, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a process and remember it, so that :func:`reap_all` can end it whatever happens.

    ``group=True`` puts it in a new session (its own process group), so that the children it forks
    (``storescp --fork``) are ended together with it.
    """
    proc = subprocess.Popen(list(cmd), start_new_session=group, **kwargs)
    with _started_lock:
        _started.append(proc)
    return proc


def _signal_proc(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to ``proc``, and to its process group if it leads one."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def stop_proc(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """Ask ``proc`` (and its group) to stop with ``sig``; SIGKILL it if it has not exited in ``timeout``."""
    if proc.poll() is None:
        _signal_proc(proc, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_proc(proc, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def kill_group_leftovers(proc: subprocess.Popen[bytes]) -> None:
    """After a group leader exited, SIGKILL whatever it forked that is still running."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def reap_all() -> None:
    """End every process this script started that is still running (and their process groups)."""
    with _started_lock:
        procs = list(_started)
        _started.clear()
    for proc in procs:
        if proc.poll() is None:
            stop_proc(proc, signal.SIGTERM, timeout=10)


# -- main --------------------------------------------------------------------------------------------


def no_nan(o: Any) -> Any:
    """NaN (a figure that could not be computed) as null: JSON has no NaN."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: no_nan(v) for k, v in o.items()}
    if isinstance(o, list):
        return [no_nan(v) for v in o]
    return o


def stop_on_sigterm(prog: str) -> None:
    """Make SIGTERM a SystemExit, so that ``finally`` blocks (and :func:`reap_all`) still run."""
    def handler(signum: int, frame: FrameType | None) -> None:
        print(f"\n{prog}: terminated; stopping the processes it started", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_in_workdir(prog: str, args: Any, prefix: str, run: Callable[[Path], R], report: Callable[[R], str],
                   figures: Callable[[R], Any]) -> int:
    """Run ``run(work_dir)``, print ``report`` of its result and write ``figures`` of it to ``args.json``.

    ``args`` needs ``workdir`` (parent of the work dir, or None), ``keep`` and ``json``. Returns the exit
    status: 0, 1 when a measurement failed (:class:`BenchError`; the work dir is kept), 130 on Ctrl-C.
    """
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir))
    try:
        results = run(root)
        print(report(results))
        if args.json is not None:
            args.json.write_text(json.dumps(no_nan(figures(results)), indent=2) + "\n")
            print(f"\nfigures written to {args.json}")
        return 0
    except BenchError as exc:
        print(f"\n{prog}: {exc}", file=sys.stderr)
        args.keep = True  # for inspection: logs, configs, journal, stored files
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; stopping the processes it started", file=sys.stderr)
        return 130
    except BaseException:
        args.keep = True
        raise
    finally:
        reap_all()
        if args.keep:
            print(f"work dir kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
