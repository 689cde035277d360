"""Page-cache hints for spool files: start writing a file's new bytes to disk while more are arriving,
and let a durable file's pages go when nothing will read them soon.

A streamed data set (:mod:`edged.dicom.stream`) reaches the spool over a few milliseconds; its ``fsync``
comes after the last fragment and, with nothing written out yet, waits for the whole file to go to
disk, while the sender waits for its response. :func:`start_writeback` is Linux's
``sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)``: it starts writeback of those pages and
returns without waiting, so that by the time of the ``fsync`` most of the file is on its way or there.

It guarantees nothing and changes no guarantee: the ``fsync`` before the acknowledgement still runs and
still reports any write error (a ``SYNC_FILE_RANGE_WRITE`` does not consume the file's writeback error
state, which ``fsync`` reads), so the call's own result is ignored. Where the call does not exist
(another OS, a libc without it) it does nothing.

:func:`drop_cached` is ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``, called once a file is fsynced
(its pages are clean, so the kernel frees them at once; dirty pages would only be queued for writeback).
A received instance no engine reads would otherwise stay in the page cache until memory runs short, and
the next slice would be written into memory the kernel has to take from its free pool: on a virtual
machine whose host reclaims free guest memory (balloon free-page reporting, as on the machines edged is
measured on) touching such memory is slow. Measured there with 513 KB slices: ``write`` 1.2 ms into
fresh pages, 0.18 ms when the previous files' pages were dropped (``benchmarks/README.md``; no
difference once memory freed by earlier work is being reused). The call itself takes ~70 us for such a
file, so the streamed path makes it after its response has gone (:func:`drop_cached_path`), while the
sender prepares its next message. It is advice: it cannot lose data and changes no guarantee; where it
does not exist it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Callable

#: ``SYNC_FILE_RANGE_WRITE`` from <linux/fs.h>: start writeback of dirty pages in the range, do not wait.
SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load()

#: Whether :func:`start_writeback` does anything here.
AVAILABLE = _sync_file_range is not None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing bytes ``offset:offset + length`` of ``fd`` to disk, without waiting (a hint: see the
    module's docstring)."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


#: Whether :func:`drop_cached` does anything here.
CAN_DROP = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


def drop_cached(fd: int) -> None:
    """Ask the kernel to free ``fd``'s cached pages (call after its fsync: a hint, see the module's
    docstring). Errors are ignored: nothing depends on it."""
    if CAN_DROP:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def drop_cached_path(path: str | os.PathLike[str]) -> None:
    """:func:`drop_cached` for a file by name (one already fsynced and closed); a file gone meanwhile is
    not an error."""
    if not CAN_DROP:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        drop_cached(fd)
    finally:
        os.close(fd)
