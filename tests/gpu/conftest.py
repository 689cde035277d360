"""tests/gpu: real GPU tests. They run wherever pycuda and a CUDA device exist (and tensorrt, for the
engine tests), and skip with the reason everywhere else (CI has no GPU)."""

from __future__ import annotations

import pytest

from edged.errors import BackendUnavailableError


def _why_no_gpu() -> str | None:
    try:
        from edged.inference.cuda import load_pycuda

        load_pycuda()
    except BackendUnavailableError as exc:
        return exc.reason
    return None


def _why_no_tensorrt() -> str | None:
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        return f"tensorrt is not installed ({exc})"
    return None


@pytest.fixture(scope="session")
def cuda():
    reason = _why_no_gpu()
    if reason:
        pytest.skip(f"no GPU: {reason}")
    from edged.inference.cuda import load_pycuda

    return load_pycuda()


@pytest.fixture(scope="session")
def tensorrt_available(cuda) -> None:
    reason = _why_no_tensorrt()
    if reason:
        pytest.skip(reason)
