"""The listener's CPU per received image: what ``edged serve`` spends (user + system, every thread) per
C-STORE while DCMTK ``storescu`` sends synthetic 512x512 CT slices over one or more associations.

CPU time, unlike images/s, hardly depends on what else runs on the machine, so it compares two versions of
the receive path on a busy machine. A fresh daemon (benchmarks/ingest.py's :class:`Edged`: empty model
repository, fsync before every Success) receives ``--warmup`` images first (imports, first association,
caches), then ``--count`` more, measured from ``/proc/<pid>/stat``; ``--repeat`` fresh daemons (each one's
storage removed after it), the median is printed. ``--compare DIR`` alternates each run with one of the edged package in ``DIR`` (another
checkout, put first on the daemon's PYTHONPATH; in ABBA order), so that before and after see the same
machine load.
``--py-spy FILE`` also records the measured part with py-spy (``--gil``: the Python work; speedscope
format) when py-spy is installed.

Run:  .venv/bin/python benchmarks/listener_cpu.py [--count 500] [--warmup 50] [--associations 1]
          [--repeat 3] [--compare OTHER_CHECKOUT] [--py-spy profile.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import proc_cpu_seconds  # noqa: E402
from ingest import Edged, Tools, find_tools, running, send  # noqa: E402

from edged.synthetic import write_ct_series  # noqa: E402


def measure(root: Path, files: Sequence[Path], warmup: int, associations: int,
            profile: Path | None) -> tuple[float, float]:
    """CPU milliseconds per image of one fresh daemon receiving ``files[warmup:]``, and images/s."""
    tools = find_tools()
    logdir = root / "logs"
    logdir.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="edged-", dir=root))
    edged = Edged(workdir)
    try:
        return _measure(edged, tools, logdir, files, warmup, associations, profile)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(edged: Edged, tools: Tools, logdir: Path, files: Sequence[Path], warmup: int, associations: int,
             profile: Path | None) -> tuple[float, float]:
    with running(edged):
        assert edged.proc is not None
        pid = edged.proc.pid
        if warmup:
            send(tools, edged, files[:warmup], 1, logdir)
        spy: subprocess.Popen[bytes] | None = None
        if profile is not None:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "--threads",
                                    "--rate", "250", "--format", "speedscope", "-o", str(profile), "-p", str(pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c0 = proc_cpu_seconds(pid)
        seconds = send(tools, edged, files[warmup:], associations, logdir)
        c1 = proc_cpu_seconds(pid)
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
            spy.wait(timeout=60)
    count = len(files) - warmup
    return (c1 - c0) * 1000 / count, count / seconds


def _set_pythonpath(first: str | None, saved: str | None) -> None:
    """The daemons started next import edged from ``first`` (None: from this checkout)."""
    parts = [p for p in (first, saved) if p]
    if parts:
        os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    else:
        os.environ.pop("PYTHONPATH", None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=500, help="images measured (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="images sent first, not measured (default 50)")
    p.add_argument("--associations", type=int, default=1, help="concurrent storescu processes (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="fresh daemons; the median is printed (default 3)")
    p.add_argument("--compare", type=Path, default=None,
                   help="another checkout: alternate every run with its edged package (its median printed too)")
    p.add_argument("--py-spy", type=Path, default=None, dest="py_spy", help="record the last run with py-spy")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="edged-listener-cpu-"))
    try:
        files = write_ct_series(root / "series", args.warmup + args.count)
        trees: dict[str, str | None] = {"this checkout": None}
        if args.compare is not None:
            trees[str(args.compare)] = str(args.compare.resolve())
        per_image: dict[str, list[float]] = {name: [] for name in trees}
        rates: dict[str, list[float]] = {name: [] for name in trees}
        saved = os.environ.get("PYTHONPATH")
        try:
            for i in range(args.repeat):
                # ABBA: neither tree always runs first (the filesystem's state drifts from run to run).
                for name, src in (list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]):
                    _set_pythonpath(src, saved)
                    ms, rate = measure(root, files, args.warmup, args.associations,
                                 args.py_spy if i == args.repeat - 1 and src is None else None)
                    per_image[name].append(ms)
                    rates[name].append(rate)
                    print(f"  run {i + 1} ({name}): {ms:.2f} ms CPU per image, {rate:.1f} images/s", flush=True)
        finally:
            _set_pythonpath(None, saved)
        for name, values in per_image.items():
            print(f"edged listener ({name}), {args.associations} association(s), {args.count} images of "
                  f"{files[-1].stat().st_size / 1e3:.0f} KB: median {statistics.median(values):.2f} ms CPU per image, "
                  f"{statistics.median(rates[name]):.1f} images/s ({os.cpu_count()} CPU cores; every thread of the daemon, user + system)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
