from __future__ import annotations

from pathlib import Path

import pytest

from edged import config
from edged.errors import ConfigError


def test_defaults_run_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGED_CONFIG", raising=False)
    cfg = config.load()
    assert cfg.dicom.ae_title == "EDGED"
    assert cfg.dicom.port == 11112
    assert cfg.dicom.allowed_calling_aes == []
    assert not cfg.dicom.tls.enabled


def test_storage_dir_follows_systemd_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edged")
    assert config.from_mapping({}).storage.dir == Path("/var/lib/edged")


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    f = tmp_path / "edged.toml"
    f.write_text('[storage]\ndir = "data"\n')
    assert config.load(f).storage.dir == tmp_path / "data"


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"dicom": {"port": -1}}, "dicom.port", ">= 0"),
        ({"dicom": {"port": True}}, "dicom.port", "integer"),
        ({"dicom": {"ae_title": ""}}, "dicom.ae_title", "non-empty"),
        ({"dicom": {"ae_title": "    "}}, "dicom.ae_title", "non-empty"),
        ({"dicom": {"ae_title": "X" * 17}}, "dicom.ae_title", "16"),
        ({"dicom": {"allowed_calling_aes": "CT01"}}, "dicom.allowed_calling_aes", "list"),
        ({"dicom": {"acse_timeout": 0}}, "dicom.acse_timeout", ">="),
        ({"dicom": []}, "dicom", "table"),
        ({"storage": {"min_free_bytes": -5}}, "storage.min_free_bytes", ">= 0"),
        ({"daemon": {"log_level": "loud"}}, "daemon.log_level", "one of"),
        ({"http": {"bogus": 1}}, "http.bogus", "unknown key"),
        ({"dicom": {"tls": {"ca": "/etc/hostname"}}}, "dicom.tls.ca", "requires"),
    ],
)
def test_bad_values_name_the_key(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping(data)
    assert exc.value.key == key
    assert fragment in exc.value.reason


def test_tls_cert_without_key(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"dicom": {"tls": {"cert": str(cert)}}})
    assert exc.value.key == "dicom.tls.key"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("[dicom\nport = 1\n")
    with pytest.raises(ConfigError) as exc:
        config.load(f)
    assert exc.value.source == str(f) and "TOML" in exc.value.reason


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path / "nope.toml")
    assert "cannot read" in exc.value.reason


def test_show_round_trips(tmp_path: Path) -> None:
    cfg = config.from_mapping({"dicom": {"port": 104, "allowed_calling_aes": ["CT01", "MR 2"]},
                               "storage": {"dir": str(tmp_path)}})
    f = tmp_path / "shown.toml"
    f.write_text(config.to_toml(cfg))
    assert config.load(f) == cfg
