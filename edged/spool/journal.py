"""The journal: one SQLite database (WAL mode) that is the single source of truth for edged's state.

Every state change is one transaction. ``synchronous=FULL`` makes each commit durable before it
returns, so an instance the listener acknowledged survives a crash or power loss. The schema is
versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` lists the steps from each version to the
next and runs them in order at open.

One :class:`Journal` is shared by the listener's threads: writes are serialised by a lock (SQLite
allows one writer anyway). Readers in other processes (``edged status``) open their own connection.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from edged.errors import JournalClosedError, JournalError

JOURNAL_NAME = "journal.sqlite3"

#: Instance states. ``received``: stored and acknowledged, its jobs not all finished yet.
#: ``done``: every job that needs it has finished (done or dead). ``missing``: the journal had a row whose
#: file was gone at start (found and logged by reconcile). ``purged``: its file was removed by retention
#: after every result of its series was delivered.
INSTANCE_STATES = ("received", "done", "missing", "purged")
#: Delivery states (outbox): pending (with its next attempt time) -> delivered | dead.
DELIVERY_STATES = ("pending", "delivered", "dead")
#: Job levels: one instance, one series, or the report (SR/SEG) of a series for one model.
JOB_LEVELS = ("instance", "series", "report")
#: Job states: pending -> running -> done | failed (retried after a delay) -> dead after max attempts.
JOB_STATES = ("pending", "running", "done", "failed", "dead")
UNFINISHED_JOB_STATES = ("pending", "running", "failed")
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
    # 1 -> 2: series, jobs, findings (pipeline)
    (
        """
        CREATE TABLE series (
            series_instance_uid TEXT PRIMARY KEY,
            study_instance_uid TEXT NOT NULL,
            modality TEXT NOT NULL,
            first_received REAL NOT NULL,
            last_received REAL NOT NULL,
            instance_count INTEGER NOT NULL DEFAULT 0,
            expected_count INTEGER,
            state TEXT NOT NULL DEFAULT 'open',
            generation INTEGER NOT NULL DEFAULT 0,
            completed_at REAL
        )
        """,
        "CREATE INDEX series_state ON series (state, last_received)",
        """
        CREATE TABLE series_models (
            series_instance_uid TEXT NOT NULL,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            PRIMARY KEY (series_instance_uid, model)
        )
        """,
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            level TEXT NOT NULL,
            sop_instance_uid TEXT,
            series_instance_uid TEXT NOT NULL,
            generation INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            lease_token TEXT,
            lease_until REAL,
            retry_at REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL,
            sources TEXT
        )
        """,
        "CREATE UNIQUE INDEX jobs_unique ON jobs (model, level, series_instance_uid, COALESCE(sop_instance_uid, ''), generation)",
        "CREATE INDEX jobs_state ON jobs (state, model, id)",
        "CREATE INDEX jobs_instance ON jobs (sop_instance_uid)",
        "CREATE INDEX jobs_series ON jobs (series_instance_uid, level)",
        """
        CREATE TABLE findings (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs (id),
            model TEXT NOT NULL,
            label TEXT NOT NULL,
            present INTEGER NOT NULL,
            probability REAL NOT NULL,
            measurements TEXT NOT NULL,
            mask_path TEXT,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX findings_job ON findings (job_id)",
    ),
    # 2 -> 3: results (SR, SEG) and their deliveries (outbox)
    (
        """
        CREATE TABLE results (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs (id),
            model TEXT NOT NULL,
            kind TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL,
            generation INTEGER NOT NULL,
            sop_class_uid TEXT NOT NULL,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'stored',
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX results_series ON results (series_instance_uid, model)",
        """
        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            result_id INTEGER NOT NULL REFERENCES results (id),
            destination TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_status TEXT,
            last_error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            delivered_at REAL,
            UNIQUE (result_id, destination)
        )
        """,
        "CREATE INDEX deliveries_due ON deliveries (destination, state, next_attempt_at)",
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
    expected_count: int | None = None


@dataclass(frozen=True)
class Route:
    """A model that accepts an instance (from the router): an instance job now, or a series job later."""

    model: str
    version: str
    level: str


@dataclass(frozen=True)
class Job:
    """A claimed job, as a worker sees it."""

    id: int
    model: str
    model_version: str
    level: str
    sop_instance_uid: str | None
    series_instance_uid: str
    generation: int
    attempts: int
    lease_token: str


@dataclass(frozen=True)
class FindingRecord:
    """One finding of a job. ``measurements`` is JSON-ready (area/volume, bbox, centroid...)."""

    label: str
    present: bool
    probability: float
    measurements: dict[str, object]
    mask_path: str | None = None


@dataclass(frozen=True)
class ResultRecord:
    """A DICOM object edged wrote (SR or SEG), stored in the spool at ``path``."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class Delivery:
    """A result to send to one destination."""

    id: int
    result_id: int
    destination: str
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    attempts: int
    created_at: float


@dataclass(frozen=True)
class JobResult:
    """A finished job: its findings and the source instances it used (in order)."""

    job: Job
    findings: list[FindingRecord]
    sources: list[str]


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
        #: A second connection for :meth:`has_instance` only (opened on first use).
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
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
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def pending(self) -> int:
        """Instances received and not finished (counted against ``max_pending``)."""
        return self._pending

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether the instance is recorded (committed).

        Read on a connection of its own: in WAL mode a reader never waits for the writer, so the listener's
        duplicate check does not queue behind another association's commit and its fsync. A row committed
        before this call is seen (each query is a new read transaction)."""
        with self._read_lock:
            if self._conn is None:
                raise JournalClosedError(self.path)
            try:
                if self._reader is None:
                    self._reader = _connect(self.path)
                row = self._reader.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise JournalError(self.path, str(exc)) from None
        return row is not None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), serialised with every other writer."""
        with self._lock:
            conn = self._c()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JournalError(self.path, str(exc)) from None

    def add_instance(self, rec: InstanceRecord, routes: Sequence[Route] = ()) -> bool:
        """Record a received instance, its series and its jobs in one durable transaction.

        Instance-level routes become pending jobs now; series-level routes are remembered on the series
        and become jobs when it completes. A series that had completed is reopened (its generation goes
        up) so a new series job follows. An instance no model wants is ``done`` at once. Returns False
        (and changes nothing) when the SOP Instance UID is already recorded.
        """
        return self.add_instances([(rec, routes)])[0]

    def add_instances(self, items: Sequence[tuple[InstanceRecord, Sequence[Route]]]) -> list[bool]:
        """:meth:`add_instance` for several instances in one durable transaction (a group commit): all
        of them are recorded or, on error, none. One bool per item, as :meth:`add_instance` returns."""
        now = time.time()
        added: list[bool] = []
        with self._tx() as conn:
            for rec, routes in items:
                added.append(self._insert_instance(conn, rec, routes, now))
        self._pending += sum(1 for ok, (_, routes) in zip(added, items) if ok and routes)
        return added

    @staticmethod
    def _insert_instance(conn: sqlite3.Connection, rec: InstanceRecord, routes: Sequence[Route], now: float) -> bool:
        received_at = rec.received_at or now
        wanted = bool(routes)
        cur = conn.execute(
            "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
            " series_instance_uid, modality, transfer_syntax_uid, size_bytes, calling_ae,"
            " received_at, path, state) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (rec.sop_instance_uid, rec.sop_class_uid, rec.study_instance_uid, rec.series_instance_uid,
             rec.modality, rec.transfer_syntax_uid, rec.size_bytes, rec.calling_ae, received_at, rec.path,
             "received" if wanted else "done"),
        )
        if cur.rowcount != 1:
            return False
        conn.execute(
            "INSERT INTO series (series_instance_uid, study_instance_uid, modality, first_received,"
            " last_received, instance_count, expected_count) VALUES (?,?,?,?,?,1,?)"
            " ON CONFLICT (series_instance_uid) DO UPDATE SET last_received = excluded.last_received,"
            " instance_count = instance_count + 1,"
            " expected_count = COALESCE(excluded.expected_count, expected_count),"
            " generation = generation + (state = 'complete'), state = 'open'",
            (rec.series_instance_uid, rec.study_instance_uid, rec.modality, received_at, received_at,
             rec.expected_count),
        )
        for r in routes:
            if r.level == "instance":
                conn.execute(
                    "INSERT OR IGNORE INTO jobs (model, model_version, level, sop_instance_uid,"
                    " series_instance_uid, created_at, updated_at) VALUES (?,?,'instance',?,?,?,?)",
                    (r.model, r.version, rec.sop_instance_uid, rec.series_instance_uid, now, now))
            else:
                conn.execute("INSERT OR IGNORE INTO series_models VALUES (?,?,?)",
                             (rec.series_instance_uid, r.model, r.version))
        return True

    # -- series and jobs --------------------------------------------------------------------------

    def complete_series(self, quiet_seconds: float, now: float | None = None) -> list[tuple[str, int]]:
        """Mark open series complete (quiet long enough, or expected count reached) and create their
        series jobs. Returns ``(series uid, jobs created)`` for each completed series."""
        now = time.time() if now is None else now
        done: list[tuple[str, int]] = []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT series_instance_uid, generation FROM series WHERE state = 'open' AND"
                " (last_received <= ? OR (expected_count IS NOT NULL AND instance_count >= expected_count))",
                (now - quiet_seconds,)).fetchall()
            for uid, generation in rows:
                conn.execute("UPDATE series SET state = 'complete', completed_at = ? WHERE series_instance_uid = ?",
                             (now, uid))
                created = 0
                for model, version in conn.execute(
                        "SELECT model, model_version FROM series_models WHERE series_instance_uid = ?", (uid,)
                ).fetchall():
                    created += conn.execute(
                        "INSERT OR IGNORE INTO jobs (model, model_version, level, series_instance_uid, generation,"
                        " created_at, updated_at) VALUES (?,?,'series',?,?,?,?)",
                        (model, version, uid, generation, now, now)).rowcount
                # One report (SR, and SEG for segmentation) per model that ran on the series, this generation.
                for model, version in conn.execute(
                        "SELECT DISTINCT model, model_version FROM jobs WHERE series_instance_uid = ?"
                        " AND level != 'report'", (uid,)).fetchall():
                    created += conn.execute(
                        "INSERT OR IGNORE INTO jobs (model, model_version, level, series_instance_uid, generation,"
                        " created_at, updated_at) VALUES (?,?,'report',?,?,?,?)",
                        (model, version, uid, generation, now, now)).rowcount
                done.append((uid, created))
            if rows:
                self._settle_instances(conn, [uid for uid, _ in rows])
        return done

    def next_series_due(self, quiet_seconds: float) -> float | None:
        """When the earliest open series will have been quiet for ``quiet_seconds`` (a time), or None."""
        with self._lock:
            row = self._c().execute("SELECT MIN(last_received) FROM series WHERE state = 'open'").fetchone()
        return None if row[0] is None else float(row[0]) + quiet_seconds

    def claim_jobs(self, model: str | None, limit: int, lease_seconds: float, token: str,
                   now: float | None = None, reports: bool = False) -> list[Job]:
        """Lease up to ``limit`` runnable jobs (pending, or failed and due for retry).

        Inference jobs (instance, series) of ``model``; or, with ``reports``, report jobs of any model
        whose inference jobs on that series have all finished.
        """
        now = time.time() if now is None else now
        unfinished = ",".join(f"'{s}'" for s in UNFINISHED_JOB_STATES)
        if reports:
            where = ("r.level = 'report' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.model = r.model"
                     " AND j.series_instance_uid = r.series_instance_uid AND j.level != 'report'"
                     f" AND j.state IN ({unfinished}))")
            args: tuple = ()
        else:
            where, args = "r.model = ? AND r.level != 'report'", (model,)
        # "state IN (...)" first: SQLite then searches jobs_state (state, model, id) for the few runnable jobs;
        # with only the OR it searched every job the model ever had (jobs_unique by model), and the journal
        # keeps days of finished jobs.
        query = ("SELECT r.id, r.model, r.model_version, r.level, r.sop_instance_uid, r.series_instance_uid,"
                 f" r.generation, r.attempts FROM jobs r WHERE r.state IN ('pending', 'failed') AND {where}"
                 " AND (r.state = 'pending' OR r.retry_at <= ?)"
                 " ORDER BY r.id LIMIT ?")
        # The pipeline asks on every wake and mostly finds nothing: look first without taking the write lock
        # (a read of the committed state); only when there is something, claim it in a write transaction,
        # which looks again.
        with self._lock:
            if not self._c().execute(query, (*args, now, 1)).fetchone():
                return []
        with self._tx() as conn:
            rows = conn.execute(query, (*args, now, limit)).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_token = ?, lease_until = ?,"
                    " updated_at = ? WHERE id = ?", (token, now + lease_seconds, now, row[0]))
        return [Job(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7] + 1, token) for r in rows]

    def finish_jobs(self, results: list[JobResult]) -> list[int]:
        """Store findings and mark jobs done, all in one transaction; returns the ids that were done.

        A job whose lease was lost (expired and taken by another attempt) is not completed twice:
        its results are dropped here and the ids returned exclude it.
        """
        now = time.time()
        finished: list[int] = []
        series: set[str] = set()
        with self._tx() as conn:
            for res in results:
                job = res.job
                cur = conn.execute(
                    "UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?, lease_until = NULL,"
                    " last_error = NULL, sources = ? WHERE id = ? AND state = 'running' AND lease_token = ?",
                    (now, now, json.dumps(res.sources), job.id, job.lease_token))
                if cur.rowcount != 1:
                    continue
                conn.executemany(
                    "INSERT INTO findings (job_id, model, label, present, probability, measurements, mask_path,"
                    " created_at) VALUES (?,?,?,?,?,?,?,?)",
                    [(job.id, job.model, f.label, int(f.present), float(f.probability),
                      json.dumps(f.measurements, sort_keys=True), f.mask_path, now) for f in res.findings])
                finished.append(job.id)
                series.add(job.series_instance_uid)
            self._settle_instances(conn, sorted(series))
        return finished

    def fail_job(self, job: Job, error: str, max_attempts: int, retry_delay: float) -> str:
        """Record a failed attempt: ``failed`` (retried after ``retry_delay``) or ``dead``. Returns the state."""
        now = time.time()
        state = "dead" if job.attempts >= max_attempts else "failed"
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = ?, last_error = ?, retry_at = ?, lease_until = NULL, updated_at = ?,"
                " finished_at = CASE WHEN ? = 'dead' THEN ? END WHERE id = ? AND state = 'running' AND lease_token = ?",
                (state, error[:500], now + retry_delay, now, state, now, job.id, job.lease_token))
            if cur.rowcount == 1 and state == "dead":
                self._settle_instances(conn, [job.series_instance_uid])
        return state

    def recover_jobs(self, now: float | None = None, *, all_running: bool = False) -> int:
        """Return running jobs whose lease expired (or, at start-up, every running job) to pending."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            if all_running:
                cur = conn.execute("UPDATE jobs SET state = 'pending', lease_token = NULL, lease_until = NULL"
                                   " WHERE state = 'running'")
            else:
                cur = conn.execute("UPDATE jobs SET state = 'pending', lease_token = NULL, lease_until = NULL"
                                   " WHERE state = 'running' AND lease_until < ?", (now,))
            return cur.rowcount

    def _settle_instances(self, conn: sqlite3.Connection, series_uids: list[str]) -> None:
        """Mark instances of these series ``done`` once no unfinished job needs them."""
        if not series_uids:
            return
        unfinished = ",".join(f"'{s}'" for s in UNFINISHED_JOB_STATES)
        marks = ",".join("?" * len(series_uids))
        cur = conn.execute(
            f"UPDATE instances SET state = 'done' WHERE state = 'received' AND series_instance_uid IN ({marks})"
            f" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.sop_instance_uid = instances.sop_instance_uid"
            f"   AND j.state IN ({unfinished}))"
            f" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.level = 'series'"
            f"   AND j.series_instance_uid = instances.series_instance_uid AND j.state IN ({unfinished}))"
            f" AND NOT EXISTS (SELECT 1 FROM series s JOIN series_models m USING (series_instance_uid)"
            f"   WHERE s.series_instance_uid = instances.series_instance_uid AND s.state = 'open')",
            series_uids)
        self._pending -= cur.rowcount

    def series_sources(self, series_uid: str) -> list[tuple[str, str]]:
        """(SOP Instance UID, spool path) of every instance of a series on file, in arrival order."""
        with self._lock:
            return [(r[0], r[1]) for r in self._c().execute(
                "SELECT sop_instance_uid, path FROM instances WHERE series_instance_uid = ? AND state != 'missing'"
                " ORDER BY id", (series_uid,))]

    def series_instances(self, series_uid: str) -> list[tuple[str, str, str, str]]:
        """(SOP Instance UID, SOP Class UID, Study Instance UID, spool path) of every instance of a series on
        file, in arrival order: what a report's evidence needs, without reading the files."""
        with self._lock:
            return [(r[0], r[1], r[2], r[3]) for r in self._c().execute(
                "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, path FROM instances"
                " WHERE series_instance_uid = ? AND state != 'missing' ORDER BY id", (series_uid,))]

    def instance_path(self, sop_instance_uid: str) -> str | None:
        with self._lock:
            row = self._c().execute("SELECT path FROM instances WHERE sop_instance_uid = ?",
                                    (sop_instance_uid,)).fetchone()
        return row[0] if row else None

    def findings(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Findings (of one job, or all) joined with their job, oldest first."""
        where, args = ("WHERE f.job_id = ?", (job_id,)) if job_id is not None else ("", ())
        with self._lock:
            cur = self._c().cursor()
            cur.row_factory = sqlite3.Row
            rows = cur.execute(
                "SELECT f.*, j.level, j.sop_instance_uid, j.series_instance_uid, j.generation, j.sources,"
                f" j.model_version FROM findings f JOIN jobs j ON j.id = f.job_id {where} ORDER BY f.id", args
            ).fetchall()
        return [dict(r) for r in rows]

    # -- reports, results and the outbox -----------------------------------------------------------

    def report_findings(self, model: str, series_uid: str) -> list[dict[str, Any]]:
        """Findings of a model on a series for its report: every instance job's (any generation), and the
        latest series job's."""
        with self._lock:
            cur = self._c().cursor()
            cur.row_factory = sqlite3.Row
            rows = cur.execute(
                "SELECT f.*, j.level, j.sop_instance_uid, j.generation, j.sources, j.model_version FROM findings f"
                " JOIN jobs j ON j.id = f.job_id WHERE j.model = ? AND j.series_instance_uid = ? AND j.state = 'done'"
                " AND (j.level = 'instance' OR j.generation = (SELECT MAX(generation) FROM jobs"
                "   WHERE model = ? AND series_instance_uid = ? AND level = 'series' AND state = 'done'))"
                " ORDER BY f.id", (model, series_uid, model, series_uid)).fetchall()
        return [dict(r) for r in rows]

    def previous_result(self, model: str, series_uid: str, kind: str, generation: int) -> dict[str, Any] | None:
        """The latest result of this kind for an earlier generation (the document a new one supersedes)."""
        with self._lock:
            cur = self._c().cursor()
            cur.row_factory = sqlite3.Row
            row = cur.execute(
                "SELECT * FROM results WHERE model = ? AND series_instance_uid = ? AND kind = ? AND generation < ?"
                " ORDER BY generation DESC LIMIT 1", (model, series_uid, kind, generation)).fetchone()
        return dict(row) if row else None

    def finish_report(self, job: Job, results: list[ResultRecord], destinations: list[str]) -> bool:
        """Record a report job's results and queue one delivery per result x destination, atomically.
        False if the job's lease was lost (nothing recorded)."""
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?, lease_until = NULL, last_error = NULL"
                " WHERE id = ? AND state = 'running' AND lease_token = ?", (now, now, job.id, job.lease_token))
            if cur.rowcount != 1:
                return False
            for r in results:
                rid = conn.execute(
                    "INSERT INTO results (job_id, model, kind, series_instance_uid, generation, sop_class_uid,"
                    " sop_instance_uid, path, created_at) VALUES (?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (sop_instance_uid) DO UPDATE SET path = excluded.path RETURNING id",
                    (job.id, job.model, r.kind, job.series_instance_uid, job.generation, r.sop_class_uid,
                     r.sop_instance_uid, r.path, now)).fetchone()[0]
                conn.executemany(
                    "INSERT OR IGNORE INTO deliveries (result_id, destination, next_attempt_at, created_at, updated_at)"
                    " VALUES (?,?,?,?,?)", [(rid, d, now, now, now) for d in destinations])
        return True

    def due_deliveries(self, destination: str, limit: int, now: float | None = None) -> list[Delivery]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._c().execute(
                "SELECT d.id, d.result_id, d.destination, r.path, r.sop_instance_uid, r.sop_class_uid, d.attempts,"
                " d.created_at"
                " FROM deliveries d JOIN results r ON r.id = d.result_id WHERE d.destination = ?"
                " AND d.state = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.id LIMIT ?",
                (destination, now, limit)).fetchall()
        return [Delivery(*r) for r in rows]

    def next_delivery_at(self, destination: str) -> float | None:
        with self._lock:
            row = self._c().execute("SELECT MIN(next_attempt_at) FROM deliveries WHERE destination = ?"
                                    " AND state = 'pending'", (destination,)).fetchone()
        return row[0]

    def delivered(self, delivery_id: int, status: str) -> tuple[str, float]:
        """Mark a delivery done; returns (model, seconds from the series' last instance received to now)."""
        now = time.time()
        with self._tx() as conn:
            conn.execute("UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, last_status = ?,"
                         " last_error = NULL, delivered_at = ?, updated_at = ? WHERE id = ?",
                         (status, now, now, delivery_id))
            model, last = conn.execute(
                "SELECT r.model, (SELECT MAX(i.received_at) FROM instances i"
                " WHERE i.series_instance_uid = r.series_instance_uid) FROM deliveries d"
                " JOIN results r ON r.id = d.result_id WHERE d.id = ?", (delivery_id,)).fetchone()
        return str(model), max(0.0, now - (last or now))

    def delivery_failed(self, delivery_id: int, error: str, status: str | None, next_attempt_at: float | None) -> None:
        """A failed attempt: retry at ``next_attempt_at``, or dead when it is None."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, last_status = ?, updated_at = ?,"
                " state = CASE WHEN ? IS NULL THEN 'dead' ELSE 'pending' END,"
                " next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
                (error[:300], status, now, next_attempt_at, next_attempt_at, delivery_id))

    def purge(self, older_than: float) -> tuple[list[str], list[str], list[str]]:
        """Mark what retention may delete as ``purged``; returns (instance paths, result paths, mask paths)
        to remove. A series' masks go with its last instance (its reports are written and delivered).

        A result goes once every delivery of it succeeded. An instance goes once its jobs are all finished,
        every report on its series is written and every result of its series delivered. Both only after
        ``older_than`` (a time) and only if there is at least one delivery: without a destination nothing
        leaves the box, so nothing is deleted. The caller deletes the files after this commits (a crash in
        between leaves files the next start-up reconciliation removes).
        """
        with self._tx() as conn:
            results = conn.execute(
                "SELECT r.id, r.path FROM results r WHERE r.state = 'stored' AND r.created_at < ?"
                " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.result_id = r.id)"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.result_id = r.id AND d.state != 'delivered')",
                (older_than,)).fetchall()
            unfinished = ",".join(f"'{s}'" for s in UNFINISHED_JOB_STATES)
            instances = conn.execute(
                "SELECT i.id, i.path FROM instances i WHERE i.state = 'done' AND i.received_at < ?"
                " AND EXISTS (SELECT 1 FROM results r JOIN deliveries d ON d.result_id = r.id"
                "   WHERE r.series_instance_uid = i.series_instance_uid)"
                " AND NOT EXISTS (SELECT 1 FROM series s WHERE s.series_instance_uid = i.series_instance_uid"
                "   AND s.state = 'open')"
                f" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = i.series_instance_uid"
                f"   AND j.state IN ({unfinished}))"
                " AND NOT EXISTS (SELECT 1 FROM results r JOIN deliveries d ON d.result_id = r.id"
                "   WHERE r.series_instance_uid = i.series_instance_uid AND d.state != 'delivered')",
                (older_than,)).fetchall()
            conn.executemany("UPDATE results SET state = 'purged' WHERE id = ?", [(r[0],) for r in results])
            conn.executemany("UPDATE instances SET state = 'purged' WHERE id = ?", [(r[0],) for r in instances])
            masks: list[tuple[int, str]] = []
            if instances:
                masks = conn.execute(
                    "SELECT f.id, f.mask_path FROM findings f JOIN jobs j ON j.id = f.job_id"
                    " WHERE f.mask_path IS NOT NULL AND j.series_instance_uid IN"
                    "  (SELECT DISTINCT series_instance_uid FROM instances WHERE state = 'purged')"
                    " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.series_instance_uid = j.series_instance_uid"
                    "   AND i.state != 'purged')").fetchall()
                conn.executemany("UPDATE findings SET mask_path = NULL WHERE id = ?", [(m[0],) for m in masks])
        return [r[1] for r in instances], [r[1] for r in results], [m[1] for m in masks]

    def forget(self, older_than: float, limit: int = 500) -> int:
        """Delete the journal's rows of series that retention has wholly purged and that last received an
        instance before ``older_than`` (a time): instances, jobs, findings, results, deliveries. Returns
        how many series were forgotten. Without this the journal grows ~1.4 KB per instance for ever.
        An instance of a forgotten series that arrives again is a new instance to edged (it is
        processed and reported again, under the same derived UIDs)."""
        unfinished = ",".join(f"'{s}'" for s in UNFINISHED_JOB_STATES)
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT s.series_instance_uid FROM series s WHERE s.state != 'open' AND s.last_received < ?"
                " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.series_instance_uid = s.series_instance_uid"
                "   AND i.state != 'purged')"
                " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.series_instance_uid = s.series_instance_uid"
                "   AND r.state != 'purged')"
                f" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = s.series_instance_uid"
                f"   AND j.state IN ({unfinished}))"
                " AND NOT EXISTS (SELECT 1 FROM findings f JOIN jobs j ON j.id = f.job_id"
                "   WHERE j.series_instance_uid = s.series_instance_uid AND f.mask_path IS NOT NULL)"
                " LIMIT ?", (older_than, limit)).fetchall()
            for (uid,) in rows:
                # children before parents (deliveries -> results -> jobs <- findings)
                conn.execute("DELETE FROM deliveries WHERE result_id IN"
                             " (SELECT id FROM results WHERE series_instance_uid = ?)", (uid,))
                conn.execute("DELETE FROM results WHERE series_instance_uid = ?", (uid,))
                conn.execute("DELETE FROM findings WHERE job_id IN (SELECT id FROM jobs WHERE series_instance_uid = ?)",
                             (uid,))
                for table in ("jobs", "instances", "series_models", "series"):
                    conn.execute(f"DELETE FROM {table} WHERE series_instance_uid = ?", (uid,))
        return len(rows)

    def result_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._c().execute("SELECT path FROM results WHERE state = 'stored'")}

    def counts(self) -> dict[str, Any]:
        """The same counts as :func:`read_counts`, on the daemon's own connection (for metrics)."""
        with self._lock:
            return _counts(self._c())

    def mask_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._c().execute("SELECT mask_path FROM findings WHERE mask_path IS NOT NULL")}

    def instance_paths(self) -> set[str]:
        """Relative spool paths of every recorded instance (used by start-up reconciliation)."""
        with self._lock:
            return {r[0] for r in self._c().execute("SELECT path FROM instances WHERE state != 'purged'")}

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
        with self._lock, self._read_lock:  # (has_instance takes only the second)
            if self._reader is not None:
                self._reader.close()
                self._reader = None
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


def _counts(conn: sqlite3.Connection) -> dict[str, Any]:
    instances = {s: 0 for s in INSTANCE_STATES}
    for state, n in conn.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"):
        instances[state] = int(n)
    jobs = {s: 0 for s in JOB_STATES}
    models: dict[str, dict[str, int]] = {}
    for model, state, n in conn.execute("SELECT model, state, COUNT(*) FROM jobs GROUP BY model, state"):
        jobs[state] += int(n)
        models.setdefault(model, {s: 0 for s in JOB_STATES})[state] = int(n)
    oldest = conn.execute("SELECT MIN(created_at) FROM jobs WHERE state IN ('pending', 'failed')").fetchone()[0]
    deliveries = {s: 0 for s in DELIVERY_STATES}
    for state, n in conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state"):
        deliveries[state] = int(n)
    return {"instances": instances, "jobs": jobs, "models": models, "deliveries": deliveries,
            "oldest_pending_job_seconds": None if oldest is None else max(0.0, time.time() - oldest)}


def read_counts(storage_dir: Path) -> dict[str, Any]:
    """Counts per state, read-only, for ``edged status`` (another process may be writing).

    ``instances``, ``jobs`` and ``deliveries`` map each state to a count; ``models`` maps each model to its
    job counts per state; ``oldest_pending_job_seconds`` is the age of the oldest job waiting to run.
    """
    path = storage_dir / JOURNAL_NAME
    if not path.exists():
        raise JournalError(path, "no journal here (has the daemon run with this storage dir?)")
    try:
        conn = _connect(path, readonly=True)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version < SCHEMA_VERSION:
                raise JournalError(path, f"journal schema {version} is older than {SCHEMA_VERSION}: start the daemon once")
            return _counts(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise JournalError(path, str(exc)) from None


def _external(storage_dir: Path) -> sqlite3.Connection:
    """A connection for a CLI process working beside the daemon (WAL lets both go on)."""
    path = storage_dir / JOURNAL_NAME
    if not path.exists():
        raise JournalError(path, "no journal here (has the daemon run with this storage dir?)")
    conn = _connect(path)
    conn.row_factory = sqlite3.Row
    return conn


def list_deliveries(storage_dir: Path, dead_only: bool = False) -> list[dict[str, Any]]:
    """Deliveries not yet delivered (pending and dead), or only the dead ones, oldest first."""
    states = ("dead",) if dead_only else ("pending", "dead")
    conn = _external(storage_dir)
    try:
        rows = conn.execute(
            "SELECT d.id, d.destination, d.state, d.attempts, d.last_status, d.last_error, d.next_attempt_at,"
            " d.created_at, r.kind, r.model FROM deliveries d JOIN results r ON r.id = d.result_id"
            f" WHERE d.state IN ({','.join('?' * len(states))}) ORDER BY d.id", states).fetchall()
    except sqlite3.Error as exc:
        raise JournalError(storage_dir / JOURNAL_NAME, str(exc)) from None
    finally:
        conn.close()
    return [dict(r) for r in rows]


def retry_deliveries(storage_dir: Path, ids: list[int] | None = None) -> int:
    """Put dead deliveries (these ids, or all when None) back to pending, due now. Returns how many."""
    now = time.time()
    conn = _external(storage_dir)
    try:
        conn.execute("BEGIN IMMEDIATE")
        if ids is None:
            cur = conn.execute("UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                               " updated_at = ? WHERE state = 'dead'", (now, now))
        else:
            cur = conn.execute(
                f"UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?"
                f" WHERE state = 'dead' AND id IN ({','.join('?' * len(ids))})", (now, now, *ids))
        conn.execute("COMMIT")
        return cur.rowcount
    except sqlite3.Error as exc:
        raise JournalError(storage_dir / JOURNAL_NAME, str(exc)) from None
    finally:
        conn.close()
