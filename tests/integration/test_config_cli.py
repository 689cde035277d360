"""Configuration errors stop edged before anything listens: one line naming the key, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import write_config


def edged(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"dicom": {"port": 70000}}, "dicom.port"),
        ({"dicom": {"port": "11112"}}, "dicom.port"),
        ({"dicom": {"ae_titel": "X"}}, "dicom.ae_titel"),
        ({"storage": {"max_pending": 0}}, "storage.max_pending"),
        ({"dicom.tls": {"cert": "missing.pem", "key": "missing.key"}}, "dicom.tls.cert"),
    ],
    ids=["port-out-of-range", "port-not-integer", "unknown-key", "max-pending-zero", "missing-tls-file"],
)
def test_bad_config_names_the_key_and_exits_2(tmp_path: Path, sections: dict, key: str) -> None:
    cfg = write_config(tmp_path / "bad.toml", sections)
    check = edged("config", "check", str(cfg))
    assert check.returncode == 2
    lines = check.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and str(cfg) in lines[0], check.stderr

    # serve refuses the same file before it binds anything.
    serve = edged("serve", "--config", str(cfg))
    assert serve.returncode == 2
    assert key in serve.stderr and "event=listening" not in serve.stderr


def test_config_show_prints_effective_defaults(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "edged.toml", {"dicom": {"port": 4242}, "storage": {"dir": "state"}})
    out = edged("config", "show", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "port = 4242" in out.stdout
    assert 'ae_title = "EDGED"' in out.stdout
    assert f'dir = "{tmp_path / "state"}"' in out.stdout  # relative to the config file
    # What show prints is itself a valid configuration.
    shown = tmp_path / "shown.toml"
    shown.write_text(out.stdout)
    assert edged("config", "check", str(shown)).returncode == 0


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "env.toml", {"dicom": {"ae_title": "FROMENV"}})
    monkeypatch.setenv("EDGED_CONFIG", str(cfg))
    out = edged("config", "show")
    assert 'ae_title = "FROMENV"' in out.stdout


def test_help_explains_commands() -> None:
    out = edged("--help")
    assert out.returncode == 0
    for cmd in ("serve", "config", "status", "echo", "send"):
        assert cmd in out.stdout
