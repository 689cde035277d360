"""Group commit: one directory fsync and one journal transaction for the instances of every association
that is waiting at that moment.

Each association thread writes and fsyncs its own file (under its final name) and then hands the
instance to :meth:`GroupCommit.commit`, which blocks until the spool directory has been fsynced and the
instance's journal row committed (``synchronous=FULL``), or raises. One committer thread takes whatever
is queued when it comes round, so with one association each instance is its own group (no wait for a
timer: the committer never sleeps while work is queued), and with several the fsyncs of the directory
and of the WAL are shared by all of them. Nothing is acknowledged before its own group is durable.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from edged.errors import JournalError
from edged.spool.journal import InstanceRecord, Journal, Route

log = logging.getLogger("edged.spool")

#: Most instances committed in one transaction (bounds the time a group holds the journal's lock).
MAX_GROUP = 64


@dataclass
class _Pending:
    record: InstanceRecord
    routes: Sequence[Route]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    added: bool = False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommit:
    """Commits instances (directory fsync, then one journal transaction) for many threads at once."""

    def __init__(self, journal: Journal, directory: Path, *,
                 sync_dir: Callable[[Path], None] = fsync_dir) -> None:
        self.journal = journal
        self.directory = directory
        self._sync_dir = sync_dir
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        #: Groups committed and instances in them (for tests and the benchmark's curiosity).
        self.groups = 0
        self.instances = 0

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="GroupCommit", daemon=True)
            self._thread.start()

    def commit(self, record: InstanceRecord, routes: Sequence[Route] = ()) -> bool:
        """Make ``record`` durable with its file's directory entry; True if it was added (False: the UID
        was already recorded). Raises :class:`OSError` (directory fsync) or :class:`JournalError`."""
        item = _Pending(record, routes)
        with self._cond:
            if self._closed:
                raise JournalError(self.journal.path, "group commit closed")
            self._ensure_thread()
            self._queue.append(item)
            self._cond.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.added

    def close(self) -> None:
        """Stop the committer once the queue is empty; later commits raise :class:`JournalError`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            self._commit_group(group)

    def _commit_group(self, group: list[_Pending]) -> None:
        try:
            try:
                self._sync_dir(self.directory)
            except OSError as exc:
                for item in group:
                    item.error = exc
                return
            try:
                added = self.journal.add_instances([(i.record, i.routes) for i in group])
                for item, ok in zip(group, added):
                    item.added = ok
            except JournalError:
                if len(group) == 1:
                    raise
                # One bad row must not fail the others: commit them one by one.
                for item in group:
                    try:
                        item.added = self.journal.add_instance(item.record, item.routes)
                    except JournalError as exc:
                        item.error = exc
            self.groups += 1
            self.instances += len(group)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting thread, never lost
            for item in group:
                if item.error is None:
                    item.error = exc if isinstance(exc, (JournalError, OSError)) else JournalError(
                        self.journal.path, f"group commit failed: {type(exc).__name__}")
            if not isinstance(exc, (JournalError, OSError)):
                log.exception("group commit failed")
        finally:
            for item in group:
                item.done.set()
