"""The audit log: JSON lines of who sent what and where results went, with no patient data.

One object per line: ``ts`` (UTC, ISO 8601), ``event`` and fixed fields. Associations are recorded when
they end (calling and called AE, peer address, counts); stored instances and delivered results are
recorded with a *reference*: a keyed hash of the SOP Instance UID (HMAC-SHA-256 with a key kept beside
the journal), so an auditor holding a UID can confirm its line, while the log alone reveals none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

KEY_NAME = "audit.key"


class AuditLog:
    def __init__(self, path: Path, key_dir: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._key = self._load_key(key_dir / KEY_NAME)
        self._lock = threading.Lock()
        self._fh = path.open("a", encoding="utf-8")

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
        return hmac.new(self._key, uid.encode(), hashlib.sha256).hexdigest()[:24]

    def write(self, event: str, **fields: Any) -> None:
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                  "event": event, **fields}
        line = json.dumps(record, sort_keys=True, separators=(",", ":"))
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()
