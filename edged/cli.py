"""The ``edged`` command line. The only place that calls ``sys.exit``.

Exit codes: 0 success, 1 runtime failure (peer unreachable, some files not stored), 2 bad usage or
bad configuration (nothing was started).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from edged import config as config_mod
from edged import logs
from edged.errors import ConfigError, EdgedError, ModelConfigError
from edged.inference.repository import PRECISIONS

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DESCRIPTION = """\
edged receives images from scanners over DICOM (C-STORE), keeps every image it acknowledged on disk
and in its journal, runs CNN engines on them and sends the findings to the PACS.

Configuration: one TOML file given with --config or $EDGED_CONFIG; every key has a default, so
'edged serve' alone runs (listening on port 11112, AE title EDGED). 'edged config show' prints
the effective configuration.
"""


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="FILE",
                   help=f"configuration file (default: ${config_mod.ENV_CONFIG}, else built-in defaults)")


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("serve", help="run the daemon (DICOM listener)",
                       description="Run the daemon in the foreground until SIGTERM or SIGINT. "
                                   "A second signal skips the graceful wait.")
    _add_config_arg(p)

    p = sub.add_parser("config", help="check or show the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    pc = csub.add_parser("check", help="validate a configuration file (exit 2 on error)")
    pc.add_argument("file", type=Path, metavar="FILE")
    ps = csub.add_parser("show", help="print the effective configuration as TOML")
    _add_config_arg(ps)

    p = sub.add_parser("status", help="counts from the journal (works while the daemon runs)")
    _add_config_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", default="EDGED", help="calling AE title (default: EDGED)")
    p.add_argument("--aec", default="ANY-SCP", help="called AE title (default: ANY-SCP)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")

    p = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--to", required=True, type=_hostport, metavar="HOST:PORT")
    p.add_argument("--aet", default="EDGED", help="calling AE title (default: EDGED)")
    p.add_argument("--aec", default="ANY-SCP", help="called AE title (default: ANY-SCP)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default: 60)")
    _add_engines_parser(sub)

    p = sub.add_parser("outbox", help="list and retry deliveries of results to the destinations")
    osub = p.add_subparsers(dest="outbox_command", metavar="ACTION")
    osub.required = True
    po = osub.add_parser("list", help="deliveries not yet delivered (pending and dead)")
    _add_config_arg(po)
    po.add_argument("--dead", action="store_true", help="only the dead ones")
    po.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    pr = osub.add_parser("retry", help="send dead deliveries again (after fixing their destination)")
    _add_config_arg(pr)
    pr.add_argument("ids", nargs="*", type=int, metavar="ID")
    pr.add_argument("--all-dead", action="store_true", help="every dead delivery")
    return parser


def _add_engines_parser(sub: Any) -> None:
    p = sub.add_parser("engines", help="list, build, verify and bench the models' engines",
                       description="Models live in [engines] dir (engines/<name>/model.toml + model.onnx). "
                                   "Built plans and converted ONNX go to a cache under the storage dir.")
    esub = p.add_subparsers(dest="engines_command", metavar="ACTION")
    esub.required = True
    pl = esub.add_parser("list", help="models, versions, backend and plan state (built / stale / missing)")
    _add_config_arg(pl)
    pb = esub.add_parser("build", help="apply the precision to the ONNX and build TensorRT plans where possible")
    _add_config_arg(pb)
    pb.add_argument("models", nargs="*", metavar="MODEL", help="models to build (default: all)")
    pb.add_argument("--precision", choices=PRECISIONS, help="override model.toml's [tensorrt] precision")
    pb.add_argument("--calibration", type=Path, metavar="DIR", help="DICOM images for int8 calibration")
    pb.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    pv = esub.add_parser("verify", help="compare the chosen backend with ONNX Runtime fp32 on the CPU")
    _add_config_arg(pv)
    pv.add_argument("model", metavar="MODEL")
    pv.add_argument("--precision", choices=PRECISIONS, help="override model.toml's precision")
    pv.add_argument("--batch", type=int, default=4, help="reference inputs (default 4)")
    pn = esub.add_parser("bench", help="images/s and latency p50/p99 per batch size")
    _add_config_arg(pn)
    pn.add_argument("model", metavar="MODEL")
    pn.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], metavar="N", help="batch sizes (default 1 4 16)")
    pn.add_argument("--seconds", type=float, default=5.0, help="seconds per batch size (default 5)")
    pn.add_argument("--precision", choices=PRECISIONS, help="override model.toml's precision")
    pn.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    px = esub.add_parser("export-triton", help="write a Triton model repository of the models",
                         description="DIR/<model>/config.pbtxt and DIR/<model>/<version>/model.onnx (model.plan "
                                     "where a TensorRT plan was built), named as [triton] maps them.")
    _add_config_arg(px)
    px.add_argument("dir", type=Path, metavar="DIR")
    px.add_argument("models", nargs="*", metavar="MODEL", help="models to export (default: all)")


def _load(path: Path | None) -> config_mod.Config:
    return config_mod.load(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from edged.daemon import Daemon

    cfg = _load(args.config)
    logs.setup(cfg.daemon.log_level)
    Daemon(cfg).run()
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "check":
        _load(args.file)
        print(f"{args.file}: ok")
        return EXIT_OK
    print(config_mod.to_toml(_load(args.config)), end="")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from edged.spool.journal import read_counts

    cfg = _load(args.config)
    counts = read_counts(cfg.storage.dir)
    engines = _engine_states(cfg.storage.dir)
    if args.json:
        print(json.dumps({**counts, "engines": engines}, sort_keys=True))
        return EXIT_OK
    print(f"storage: {cfg.storage.dir}")
    for group in ("instances", "jobs", "deliveries"):
        states = counts[group]
        detail = ", ".join(f"{s} {n}" for s, n in states.items())
        print(f"{group}: {sum(states.values())} ({detail})")
    for model, states in sorted(counts["models"].items()):
        detail = ", ".join(f"{s} {n}" for s, n in states.items() if n)
        print(f"  {model}: {detail}")
    oldest = counts["oldest_pending_job_seconds"]
    print("oldest pending job: " + ("none" if oldest is None else f"{oldest:.0f} s"))
    for model, st in sorted(engines.items()):
        if st.get("available"):
            print(f"engine {model}: {st.get('backend')} available")
        else:
            since = max(0.0, time.time() - float(st.get("since") or time.time()))
            print(f"engine {model}: {st.get('backend')} UNAVAILABLE for {since:.0f} s ({st.get('reason')});"
                  " its jobs wait")
    return EXIT_OK


def _engine_states(storage: Path) -> dict[str, Any]:
    """The running daemon's engines.json (see Daemon), or {} when no daemon runs."""
    import os

    try:
        data = json.loads((storage / "engines.json").read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    engines = data.get("engines")
    return engines if isinstance(engines, dict) else {}


def cmd_echo(args: argparse.Namespace) -> int:
    from edged.dicom.scu import echo

    code = echo(args.host, args.port, aet=args.aet, aec=args.aec, timeout=args.timeout)
    print(f"C-ECHO {args.host}:{args.port}: status 0x{code:04X}")
    return EXIT_OK if code == 0 else EXIT_FAILURE


def cmd_send(args: argparse.Namespace) -> int:
    from edged.dicom.scu import send

    host, port = args.to
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            width = 30
            filled = width * done // max(total, 1)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    outcomes = send(args.paths, host, port, aet=args.aet, aec=args.aec, timeout=args.timeout, progress=progress)
    total = sum(outcomes.values())
    print(f"sent {total} file(s) to {host}:{port}")
    for key, n in sorted(outcomes.items()):
        label = {"0x0000": "success"}.get(key, key)
        print(f"  {key:>12}  {n}  {label if label != key else ''}".rstrip())
    return EXIT_OK if total and outcomes.get("0x0000", 0) == total else EXIT_FAILURE


def cmd_engines(args: argparse.Namespace) -> int:
    from edged.inference import commands

    cfg = _load(args.config)
    logs.setup(cfg.daemon.log_level)
    return commands.run(args, cfg)


def cmd_outbox(args: argparse.Namespace) -> int:
    import time

    from edged.spool.journal import list_deliveries, retry_deliveries

    cfg = _load(args.config)
    if args.outbox_command == "retry":
        if bool(args.ids) == bool(args.all_dead):
            print("edged: outbox retry: give delivery IDs or --all-dead (not both)", file=sys.stderr)
            return EXIT_USAGE
        n = retry_deliveries(cfg.storage.dir, None if args.all_dead else args.ids)
        print(f"{n} deliver{'y' if n == 1 else 'ies'} queued again")
        return EXIT_OK if n or args.all_dead else EXIT_FAILURE
    rows = list_deliveries(cfg.storage.dir, dead_only=args.dead)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
        return EXIT_OK
    print(f"{'id':>6} {'destination':<14} {'state':<8} {'tries':>5} {'kind':<4} {'model':<16} {'next in':>8}  last error")
    now = time.time()
    for r in rows:
        nxt = f"{max(0.0, r['next_attempt_at'] - now):.0f}s" if r["state"] == "pending" else "-"
        print(f"{r['id']:>6} {r['destination']:<14} {r['state']:<8} {r['attempts']:>5} {r['kind']:<4} "
              f"{r['model']:<16} {nxt:>8}  {r['last_error'] or ''}")
    return EXIT_OK


COMMANDS = {"serve": cmd_serve, "config": cmd_config, "status": cmd_status, "echo": cmd_echo, "send": cmd_send, "engines": cmd_engines, "outbox": cmd_outbox}


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except (ConfigError, ModelConfigError) as exc:
        print(f"edged: config error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except EdgedError as exc:
        logging.getLogger("edged").debug("command failed", exc_info=True)
        print(f"edged: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
