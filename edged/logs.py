"""Structured logs: one ``key=value`` line per event (logfmt), never patient data.

Call sites pass an event name and fields; the fields must come from fixed sets or be counts,
durations, AE titles and peer addresses, never names, IDs, UIDs or dates of a patient.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.3f}"
    s = str(value)
    if s == "" or any(c in s for c in ' ="\\') or any(ord(c) < 32 for c in s):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_fmt_value(record.getMessage())}",
        ]
        fields = getattr(record, "fields", None) or {}
        parts.extend(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"error={_fmt_value(record.exc_info[0].__name__)}")
        return " ".join(parts)


def event(logger: logging.Logger, severity: int, name: str, **fields: Any) -> None:
    """Log one structured event line (``severity``: a logging level; ``fields``: the key=value pairs)."""
    if logger.isEnabledFor(severity):
        logger.log(severity, name, extra={"fields": fields})


def setup(level: str = "info") -> None:
    """Send edged's logs to stderr as logfmt; quiet pynetdicom's per-message chatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Libraries log identifiers: pynetdicom every PDU (with UIDs) at INFO/DEBUG, highdicom the UIDs of the
    # datasets it copies at INFO, pydicom element values in warnings. Keep only their errors.
    for name in ("pynetdicom", "highdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Python warnings (pydicom's quote element values) become log records, and are dropped the same way.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
