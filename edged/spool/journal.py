"""The journal: one SQLite database (WAL mode) that is the single source of truth for edged's state.

Every state change is one transaction. ``synchronous=FULL`` makes each commit durable before it
returns, so an instance the listener acknowledged survives a crash or power loss. The schema is
versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` lists the steps from each version to the
next and runs them in order at open.

One :class:`Journal` is shared by the listener's threads: writes are serialised by a lock (SQLite
allows one writer anyway). Readers in other processes (``edged status``) open their own connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edged.errors import JournalClosedError, JournalError

JOURNAL_NAME = "journal.sqlite3"

#: Instance states. ``received``: stored and acknowledged, not yet finished by the pipeline.
#: ``missing``: the journal had a row whose file was gone at start (found and logged by reconcile).
INSTANCE_STATES = ("received", "done", "failed", "missing")
#: States that count against ``[storage] max_pending``.
PENDING_STATES = ("received",)

MIGRATIONS: list[tuple[str, ...]] = [
    # 0 -> 1: instances
    (
        """
        CREATE TABLE instances (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            sop_class_uid TEXT NOT NULL,
            study_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL,
            modality TEXT NOT NULL,
            transfer_syntax_uid TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            calling_ae TEXT NOT NULL,
            received_at REAL NOT NULL,
            path TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'received'
        )
        """,
        "CREATE INDEX instances_state ON instances (state)",
        "CREATE INDEX instances_series ON instances (series_instance_uid)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as the listener records it. ``path`` is relative to the storage dir."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    size_bytes: int
    calling_ae: str
    path: str
    received_at: float = 0.0


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


class Journal:
    """Read-write access to the journal. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._pending = self._count_pending()

    @classmethod
    def open(cls, storage_dir: Path) -> "Journal":
        """Open (creating and migrating if needed) the journal in ``storage_dir``."""
        path = storage_dir / JOURNAL_NAME
        try:
            conn = _connect(path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise JournalError(path, f"cannot enable WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn, path)
        except sqlite3.Error as exc:
            raise JournalError(path, str(exc)) from None
        return cls(path, conn)

    # -- internal --------------------------------------------------------------------------------

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalClosedError(self.path)
        return self._conn

    def _count_pending(self) -> int:
        marks = ",".join("?" * len(PENDING_STATES))
        row = self._c().execute(f"SELECT COUNT(*) FROM instances WHERE state IN ({marks})", PENDING_STATES)
        return int(row.fetchone()[0])

    # -- instances -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Instances received and not finished (counted against ``max_pending``)."""
        return self._pending

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._lock:
            row = self._c().execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return row is not None

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Record a received instance in one durable transaction.

        Returns False (and changes nothing) when the SOP Instance UID is already recorded.
        """
        received_at = rec.received_at or time.time()
        with self._lock:
            conn = self._c()
            try:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
                    " series_instance_uid, modality, transfer_syntax_uid, size_bytes, calling_ae,"
                    " received_at, path, state) VALUES (?,?,?,?,?,?,?,?,?,?,'received')",
                    (
                        rec.sop_instance_uid,
                        rec.sop_class_uid,
                        rec.study_instance_uid,
                        rec.series_instance_uid,
                        rec.modality,
                        rec.transfer_syntax_uid,
                        rec.size_bytes,
                        rec.calling_ae,
                        received_at,
                        rec.path,
                    ),
                )
            except sqlite3.Error as exc:
                raise JournalError(self.path, str(exc)) from None
            inserted = cur.rowcount == 1
            if inserted:
                self._pending += 1
        return inserted

    def instance_paths(self) -> set[str]:
        """Relative spool paths of every recorded instance (used by start-up reconciliation)."""
        with self._lock:
            return {r[0] for r in self._c().execute("SELECT path FROM instances")}

    def mark_missing(self, paths: list[str]) -> int:
        """Mark the rows whose file is gone as ``missing``; returns how many changed."""
        if not paths:
            return 0
        with self._lock:
            conn = self._c()
            conn.execute("BEGIN IMMEDIATE")
            try:
                changed = 0
                for p in paths:
                    changed += conn.execute(
                        "UPDATE instances SET state = 'missing' WHERE path = ? AND state != 'missing'", (p,)
                    ).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._pending = self._count_pending()
        return changed

    def iter_instances(self) -> Iterator[sqlite3.Row]:
        with self._lock:
            cur = self._c().cursor()
            cur.row_factory = sqlite3.Row
            rows = cur.execute("SELECT * FROM instances ORDER BY id").fetchall()
        return iter(rows)

    def close(self) -> None:
        """Close the journal; later writes raise :class:`JournalClosedError`. Idempotent."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass
                self._conn.close()
                self._conn = None


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise JournalError(
            path, f"schema version {version} is newer than this edged supports ({SCHEMA_VERSION}); upgrade edged"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[target - 1]:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def read_counts(storage_dir: Path) -> dict[str, dict[str, int]]:
    """Counts per state, read-only, for ``edged status`` (another process may be writing)."""
    path = storage_dir / JOURNAL_NAME
    if not path.exists():
        raise JournalError(path, "no journal here (has the daemon run with this storage dir?)")
    try:
        conn = _connect(path, readonly=True)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version < 1:
                raise JournalError(path, "journal has no schema yet")
            instances = {s: 0 for s in INSTANCE_STATES}
            for state, n in conn.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"):
                instances[state] = int(n)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise JournalError(path, str(exc)) from None
    return {"instances": instances}
