"""Fake ``pycuda.driver``: the subset edged uses, with host memory standing in for the device."""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable

import numpy as np

DEVICE_COUNT = 1
_ids = itertools.count(0x1000, 0x100)
_local = threading.local()
allocations: dict[int, "DeviceAllocation"] = {}
streams: dict[int, "Stream"] = {}
_initialized = False


class Error(Exception):
    pass


def init() -> None:
    global _initialized
    _initialized = True


def get_driver_version() -> int:
    return 13000


def _stack() -> list["Context"]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _require_context(op: str) -> None:
    if not _initialized:
        raise Error(f"{op}: cuInit has not been called")
    if not _stack():
        raise Error(f"{op}: no current context (push one first)")


class Context:
    def __init__(self) -> None:
        self.detached = False

    def push(self) -> None:
        if self.detached:
            raise Error("push of a detached context")
        _stack().append(self)

    @staticmethod
    def pop() -> None:
        if not _stack():
            raise Error("context stack is empty")
        _stack().pop()

    def detach(self) -> None:
        self.detached = True


class Device:
    def __init__(self, index: int) -> None:
        if not _initialized:
            raise Error("cuInit has not been called")
        if not 0 <= index < DEVICE_COUNT:
            raise Error(f"invalid device ordinal {index}")
        self.index = index

    @staticmethod
    def count() -> int:
        return DEVICE_COUNT

    def name(self) -> str:
        return "Fake GPU 9000"

    def compute_capability(self) -> tuple[int, int]:
        return (8, 9)

    def retain_primary_context(self) -> Context:
        return Context()


class _Pagelocked(np.ndarray):
    pass


def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
    _require_context("pagelocked_empty")
    return np.empty(shape, dtype).view(_Pagelocked)


def _is_pagelocked(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, _Pagelocked):
            return True
        a = a.base if isinstance(a.base, np.ndarray) else None
    return False


class DeviceAllocation:
    def __init__(self, nbytes: int) -> None:
        self.buf = bytearray(nbytes)
        self.ptr = next(_ids)
        allocations[self.ptr] = self

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        allocations.pop(self.ptr, None)
        self.buf = bytearray()


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _require_context("mem_alloc")
    return DeviceAllocation(nbytes)


class Stream:
    def __init__(self) -> None:
        _require_context("Stream")
        self.handle = next(_ids)
        self.queue: list[Callable[[], None]] = []
        streams[self.handle] = self

    def enqueue(self, op: Callable[[], None]) -> None:
        self.queue.append(op)

    def synchronize(self) -> None:
        _require_context("Stream.synchronize")
        while self.queue:
            self.queue.pop(0)()


def memcpy_htod_async(dest: DeviceAllocation, src: np.ndarray, stream: Stream) -> None:
    _require_context("memcpy_htod_async")
    if not _is_pagelocked(src):
        raise Error("memcpy_htod_async: source must be page-locked host memory")
    if src.nbytes > len(dest.buf):
        raise Error("memcpy_htod_async: copy larger than the allocation")

    def op() -> None:  # reads the host array when the stream gets there, as the GPU would
        dest.buf[: src.nbytes] = src.tobytes()

    stream.enqueue(op)


def memcpy_dtoh_async(dest: np.ndarray, src: DeviceAllocation, stream: Stream) -> None:
    _require_context("memcpy_dtoh_async")
    if not _is_pagelocked(dest):
        raise Error("memcpy_dtoh_async: destination must be page-locked host memory")
    if dest.nbytes > len(src.buf):
        raise Error("memcpy_dtoh_async: copy larger than the allocation")

    def op() -> None:
        dest[...] = np.frombuffer(bytes(src.buf[: dest.nbytes]), dtype=dest.dtype).reshape(dest.shape)

    stream.enqueue(op)
