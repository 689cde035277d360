"""Group commit: one directory fsync and one journal transaction for the instances of every association
that is waiting at that moment.

Each association thread writes and fsyncs its own file (under its final name) and then calls
:meth:`GroupCommit.commit`, which returns only once the spool directory has been fsynced and the
instance's journal row committed (``synchronous=FULL``), or raises. There is no committer thread: the
first caller to find no commit in progress leads one for everything queued at that moment (itself
included), and callers that arrive meanwhile wait and are committed together by the next leader. With
one association each instance is its own group, committed by its own thread (no hand-off, no timer);
with several, the fsyncs of the directory and of the WAL are shared. Nothing is acknowledged before
its own group is durable.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edged.errors import JournalError
from edged.spool.journal import InstanceRecord, Journal, Route
from edged.spool.store import fsync_dir

log = logging.getLogger("edged.spool")

#: Most instances committed in one transaction (bounds the time a group holds the journal's lock).
MAX_GROUP = 64


@dataclass
class _Pending:
    record: InstanceRecord
    routes: Sequence[Route]
    done: bool = False
    error: BaseException | None = None
    added: bool = False


class GroupCommit:
    """Commits instances (directory fsync, then one journal transaction) for many threads at once."""

    def __init__(self, journal: Journal, directory: Path, *,
                 sync_dir: Callable[[Path], None] = fsync_dir) -> None:
        self.journal = journal
        self.directory = directory
        self._sync_dir = sync_dir
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        #: Groups committed and instances in them (for tests and the curious).
        self.groups = 0
        self.instances = 0

    def commit(self, record: InstanceRecord, routes: Sequence[Route] = ()) -> bool:
        """Make ``record`` durable with its file's directory entry; True if it was added (False: the UID
        was already recorded). Raises :class:`OSError` (directory fsync) or :class:`JournalError`."""
        item = _Pending(record, routes)
        with self._cond:
            if self._closed:
                raise JournalError(self.journal.path, "group commit closed")
            self._queue.append(item)
        while True:
            with self._cond:
                while not item.done and self._busy:
                    self._cond.wait()
                if item.done:
                    break
                self._busy = True  # this thread leads the next group
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                self._commit_group(group)
            finally:
                with self._cond:
                    for member in group:
                        member.done = True
                    self._busy = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.added

    def close(self) -> None:
        """Refuse later commits (:class:`JournalError`); commits already queued still complete."""
        with self._cond:
            self._closed = True

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
        except BaseException as exc:  # noqa: BLE001 - handed to every member of the group, never lost
            for item in group:
                if item.error is None:
                    item.error = exc if isinstance(exc, (JournalError, OSError)) else JournalError(
                        self.journal.path, f"group commit failed: {type(exc).__name__}")
            if not isinstance(exc, (JournalError, OSError)):
                log.exception("group commit failed")
            if not isinstance(exc, Exception):
                raise
