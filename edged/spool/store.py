"""The spool: received instances as files, written so that a crash never leaves a partial file.

Layout under the storage dir::

    spool/tmp/        files being written (anything here at start is a leftover and is removed)
    spool/instances/  complete files, named from a hash of the SOP Instance UID

A write goes to a temp file, is fsynced, renamed to its final name and the directory is fsynced: after
:meth:`Spool.commit` returns, the file and its name survive a power loss. File names are the SHA-256 of
the SOP Instance UID, so they are safe whatever the sender put in the UID and carry no identifier.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edged.errors import SpoolError
from edged.spool.writeback import drop_cached

SPOOL_DIR = "spool"
INSTANCES_DIR = "instances"
MASKS_DIR = "masks"
RESULTS_DIR = "results"
TMP_DIR = "tmp"
TMP_SUFFIX = ".part"


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: tuple[bytes | memoryview, ...]) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _make_dir(path: Path) -> None:
    """Create ``path`` (and parents) durably: each new directory's parent is fsynced."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o750, exist_ok=True)
        fsync_dir(d.parent)


@dataclass(frozen=True)
class ReconcileReport:
    """What start-up reconciliation found and did."""

    removed_temp: int
    removed_unrecorded: int
    missing: list[str]


class Spool:
    """Durable file store for received instances, rooted at ``storage_dir``."""

    def __init__(self, storage_dir: Path) -> None:
        self.storage_dir = storage_dir
        self.root = storage_dir / SPOOL_DIR
        self.instances = self.root / INSTANCES_DIR
        self.tmp = self.root / TMP_DIR
        self.masks = self.root / MASKS_DIR
        self.results = self.root / RESULTS_DIR
        try:
            for d in (self.instances, self.tmp, self.masks, self.results):
                _make_dir(d)
        except OSError as exc:
            raise SpoolError(self.root, f"cannot create directory: {exc.strerror or exc}") from None
        self._counter = 0
        self._counter_lock = threading.Lock()

    @staticmethod
    def relpath_for(sop_instance_uid: str) -> str:
        """The spool path (relative to the storage dir) for an instance: a hash, never the UID itself."""
        digest = hashlib.sha256(sop_instance_uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]
        return f"{SPOOL_DIR}/{INSTANCES_DIR}/{digest}.dcm"

    def path(self, relpath: str) -> Path:
        return self.storage_dir / relpath

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def write_temp(self, *parts: bytes | memoryview) -> Path:
        """Write ``parts`` one after the other to a new temp file and fsync it.

        The caller then commits (:meth:`commit`) or discards (:meth:`discard`) the file.
        """
        with self._counter_lock:
            self._counter += 1
            n = self._counter
        tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{n}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, parts)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.discard(tmp)
            raise
        os.close(fd)
        return tmp

    def write_placed(self, relpath: str, *parts: bytes | memoryview, keep_cached: bool = True) -> Path:
        """Write ``parts`` to a temp file, rename it to ``relpath`` and fsync it; the directory is *not*
        fsynced: the caller does that (once for a group, see :mod:`edged.spool.commit`) before it records
        or acknowledges the file.

        The rename comes before the fsync so that, on journalling filesystems (ext4, XFS), the file's
        fsync also makes the rename durable and the directory fsync that follows has little left to do.
        A crash before the journal row is committed may leave a file (even an incomplete one) under its
        final name: it has no journal row, was never acknowledged, and :meth:`reconcile` removes it at
        the next start. On error nothing is left behind and :class:`OSError` is raised.
        ``keep_cached=False``: see :meth:`place`.
        """
        fd, tmp = self.open_temp()
        try:
            _write_all(fd, parts)
        except BaseException:
            self.abandon(fd, tmp)
            raise
        return self.place(fd, tmp, relpath, keep_cached=keep_cached)

    def open_temp(self) -> tuple[int, Path]:
        """A new, empty temp file opened for reading and writing (for a dataset written as it arrives):
        the caller writes to the descriptor, then places (:meth:`place`) or abandons (:meth:`abandon`) it."""
        with self._counter_lock:
            self._counter += 1
            n = self._counter
        tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{n}{TMP_SUFFIX}"
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640), tmp

    def place(self, fd: int, tmp: Path, relpath: str, *, keep_cached: bool = True) -> Path:
        """Rename a temp file from :meth:`open_temp` to ``relpath``, fsync it and close it: what
        :meth:`write_placed` does after writing (the directory is *not* fsynced). On error nothing is
        left behind, ``fd`` is closed and :class:`OSError` is raised.

        ``keep_cached=False`` (a file nothing will read soon: no engine routes the instance) lets the
        file's pages leave the page cache once it is fsynced (:func:`edged.spool.writeback.drop_cached`).
        """
        final = self.storage_dir / relpath
        placed = False
        try:
            os.replace(tmp, final)
            placed = True
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            if placed:
                self.remove(relpath)
            else:
                self.discard(tmp)
            raise
        if not keep_cached:
            drop_cached(fd)
        os.close(fd)
        return final

    def abandon(self, fd: int, tmp: Path) -> None:
        """Close and remove a temp file from :meth:`open_temp`."""
        try:
            os.close(fd)
        finally:
            self.discard(tmp)

    def commit(self, tmp: Path, relpath: str) -> Path:
        """Rename a written temp file to its final name and fsync the directory."""
        final = self.storage_dir / relpath
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return final

    def discard(self, tmp: Path) -> None:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass

    def remove(self, relpath: str) -> None:
        """Remove a committed file (its journal row could not be written, or retention let it go)."""
        path = self.storage_dir / relpath
        try:
            path.unlink()
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass

    def write_mask(self, name: str, mask: np.ndarray) -> str:
        """Store a segmentation mask (bool array) durably as ``spool/masks/<name>.npz``; returns its relpath."""
        buf = io.BytesIO()
        np.savez_compressed(buf, mask=np.asarray(mask, dtype=bool))
        relpath = f"{SPOOL_DIR}/{MASKS_DIR}/{name}.npz"
        self.commit(self.write_temp(buf.getbuffer()), relpath)
        return relpath

    def read_mask(self, relpath: str) -> np.ndarray:
        with np.load(self.storage_dir / relpath) as data:
            return data["mask"]

    def remove_unrecorded(self, subdir: str, recorded: set[str]) -> int:
        """Remove files of ``spool/<subdir>`` the journal does not refer to (written by work that never
        committed, or left by a crash during retention)."""
        folder = self.root / subdir
        if not folder.is_dir():
            return 0
        removed = 0
        prefix = f"{SPOOL_DIR}/{subdir}/"
        for p in folder.iterdir():
            if prefix + p.name not in recorded:
                p.unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(folder)
        return removed

    def reconcile(self, recorded: set[str]) -> ReconcileReport:
        """Make spool and journal agree after a crash.

        Temp files are removed. Complete files with no journal row were never acknowledged (the row is
        committed before Success is sent), so they are removed too: the sender will resend them.
        Recorded paths whose file is gone are returned so the journal can flag them.
        """
        removed_temp = 0
        for p in self.tmp.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed_temp += 1
        on_disk: set[str] = set()
        removed_unrecorded = 0
        prefix = f"{SPOOL_DIR}/{INSTANCES_DIR}/"
        for p in self.instances.iterdir():
            rel = prefix + p.name
            if rel in recorded:
                on_disk.add(rel)
            else:
                p.unlink(missing_ok=True)
                removed_unrecorded += 1
        if removed_temp:
            fsync_dir(self.tmp)
        if removed_unrecorded:
            fsync_dir(self.instances)
        missing = sorted(r for r in recorded if r.startswith(prefix) and r not in on_disk)
        return ReconcileReport(removed_temp, removed_unrecorded, missing)
