"""The audit log: JSON lines of who sent what and where results went, with no patient data.

One object per line: ``ts`` (UTC, ISO 8601), ``event`` and fixed fields. Associations are recorded when
they end (calling and called AE, peer address, counts); stored instances and delivered results are
recorded with a *reference*: a keyed hash of the SOP Instance UID (HMAC-SHA-256 with a key kept beside
the journal), so an auditor holding a UID can confirm its line, while the log alone reveals none.

A full disk never turns into a DICOM failure: a line that cannot be written is dropped (a partial line
is cut off again, so the file stays valid JSON lines), ``audit.write_failed`` is logged once, and
``audit.write_resumed`` says how many were dropped when writing works again.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from edged import logs

KEY_NAME = "audit.key"
#: ``json.dumps(record, sort_keys=True, separators=(",", ":"))`` without building an encoder per line.
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
log = logging.getLogger("edged.audit")


class AuditLog:
    def __init__(self, path: Path, key_dir: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._key = self._load_key(key_dir / KEY_NAME)
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size
        self._dropped = 0
        self._stamp = (-1, "")

    @staticmethod
    def _load_key(path: Path) -> bytes:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
        return path.read_bytes()

    def ref(self, uid: str) -> str:
        """The reference recorded instead of a UID."""
        return hmac.digest(self._key, uid.encode(), "sha256").hex()[:24]  # hmac.new(...).hexdigest(), one call

    def _timestamp(self) -> str:
        """Now, UTC, to the millisecond (the seconds' text is formatted once per second)."""
        now = time.time()
        second = int(now)
        cached, text = self._stamp  # one tuple: threads never see one second's text under another's
        if second != cached:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._stamp = (second, text)
        return f"{text}.{int(now * 1000) % 1000:03d}Z"

    def write(self, event: str, **fields: Any) -> None:
        record = {"ts": self._timestamp(), "event": event, **fields}
        data = (_encode(record) + "\n").encode()
        with self._lock:
            if self._fd is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self._drop(exc)
                return
            self._size += len(data)
            if self._dropped:
                logs.event(log, logging.WARNING, "audit.write_resumed", dropped=self._dropped)
                self._dropped = 0

    def _drop(self, exc: OSError) -> None:
        try:
            os.ftruncate(self._fd, self._size)  # type: ignore[arg-type]  # cut a partial line off
        except OSError:
            pass
        self._dropped += 1
        if self._dropped == 1:
            logs.event(log, logging.WARNING, "audit.write_failed", errno=exc.errno,
                       note="audit records are dropped until the log can be written again")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
