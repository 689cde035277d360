from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import EdgedProcess  # noqa: E402

from edged.synthetic import write_ct_series  # noqa: E402


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """200 synthetic CT slices (512x512, 16-bit), written once per test session."""
    return write_ct_series(tmp_path_factory.mktemp("ct"), 200)


@pytest.fixture
def edged_factory(tmp_path: Path) -> Iterator:
    """Make ``EdgedProcess`` objects; every process started is stopped (or killed) at teardown."""
    made: list[EdgedProcess] = []

    def make(name: str = "edged", **overrides: dict) -> EdgedProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        proc = EdgedProcess(workdir, **overrides)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        if proc.alive():
            try:
                proc.stop(timeout=15)
            except AssertionError:
                pass


@pytest.fixture
def edged(edged_factory) -> EdgedProcess:
    """A running daemon with default settings, on 127.0.0.1 and a free port."""
    return edged_factory().start()
