"""edged's configuration: one TOML file, every key with a default.

Sections and keys are declared once, as dataclasses whose fields carry their constraints. Loading checks
every key: an unknown key, a wrong type or a value out of range raises :class:`~edged.errors.ConfigError`
naming the dotted key and the reason, before anything listens. Relative paths in a file are resolved
against that file's directory.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from edged.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENV_CONFIG = "EDGED_CONFIG"

Check = Callable[[Any], "str | None"]


def _range(lo: float | None = None, hi: float | None = None) -> Check:
    def check(value: Any) -> str | None:
        if lo is not None and value < lo:
            return f"must be >= {lo}, got {value!r}"
        if hi is not None and value > hi:
            return f"must be <= {hi}, got {value!r}"
        return None

    return check


def _ae_title(value: Any) -> str | None:
    """DICOM AE title (PS3.5 VR AE): 1-16 characters, default character repertoire, not all spaces."""
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty AE title"
    if len(value) > 16:
        return f"must be at most 16 characters, got {len(value)}"
    if any(c in value for c in "\\") or not all(32 <= ord(c) < 127 for c in value):
        return "must use printable ASCII characters without backslash"
    return None


def _ae_list(value: Any) -> str | None:
    for i, item in enumerate(value):
        problem = _ae_title(item)
        if problem:
            return f"item {i} {problem}"
    return None


def _non_empty(value: Any) -> str | None:
    return None if str(value).strip() else "must not be empty"


def _opt(check: Check | None = None, *, path: bool = False, must_exist: bool = False) -> dict[str, Any]:
    return {"check": check, "path": path, "must_exist": must_exist}


def _default_storage_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the XDG state directory of the user."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "edged"


@dataclass(frozen=True)
class TlsConfig:
    """``[dicom.tls]``: when ``cert`` and ``key`` are set the listener speaks TLS only.

    ``ca``, when set, makes client certificates mandatory and verifies them against it.
    """

    cert: Path | None = field(default=None, metadata=_opt(path=True, must_exist=True))
    key: Path | None = field(default=None, metadata=_opt(path=True, must_exist=True))
    ca: Path | None = field(default=None, metadata=_opt(path=True, must_exist=True))

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class DicomConfig:
    """``[dicom]``: the DICOM listener (Storage SCP and Verification SCP)."""

    ae_title: str = field(default="EDGED", metadata=_opt(_ae_title))
    host: str = field(default="0.0.0.0", metadata=_opt(_non_empty))
    port: int = field(default=11112, metadata=_opt(_range(0, 65535)))  # 0: any free port
    allowed_calling_aes: list[str] = field(default_factory=list, metadata=_opt(_ae_list))
    max_associations: int = field(default=16, metadata=_opt(_range(1, 1000)))
    max_pdu: int = field(default=262144, metadata=_opt(_range(0, 2**32 - 1)))
    acse_timeout: float = field(default=30.0, metadata=_opt(_range(0.1, 3600)))
    dimse_timeout: float = field(default=60.0, metadata=_opt(_range(0.1, 3600)))
    network_timeout: float = field(default=60.0, metadata=_opt(_range(0.1, 3600)))
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: where received instances (spool) and the journal live, and their bounds."""

    dir: Path = field(default_factory=_default_storage_dir, metadata=_opt(path=True))
    min_free_bytes: int = field(default=1 << 30, metadata=_opt(_range(0)))
    max_pending: int = field(default=10000, metadata=_opt(_range(1)))


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: metrics and health endpoints."""

    host: str = field(default="127.0.0.1", metadata=_opt(_non_empty))
    port: int = field(default=8780, metadata=_opt(_range(0, 65535)))


@dataclass(frozen=True)
class DaemonConfig:
    """``[daemon]``: process-wide behaviour."""

    shutdown_timeout: float = field(default=30.0, metadata=_opt(_range(0, 3600)))
    log_level: str = field(
        default="info",
        metadata=_opt(lambda v: None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}"),
    )


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    """The whole effective configuration. ``source`` is the file it was read from, if any."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source: Path | None = field(default=None, compare=False, metadata={"internal": True})


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(tp, str(tp))


def _convert(key: str, value: Any, ftype: Any, meta: Mapping[str, Any], base: Path, source: Path | None) -> Any:
    if meta.get("path"):
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "must be a non-empty path string", source)
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = (base / p).resolve()
        if meta.get("must_exist") and not p.is_file():
            raise ConfigError(key, f"file not found or not a regular file: {p}", source)
        return p
    if ftype in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}", source)
        return value
    if ftype in ("float", float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}", source)
        return float(value)
    if ftype in ("str", str):
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}", source)
        return value
    if ftype in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}", source)
        return value
    if ftype in ("list[str]",):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, got {value!r}", source)
        return list(value)
    raise ConfigError(key, f"unsupported type {ftype!r}", source)  # pragma: no cover - programming error


def _build(cls: type, table: Mapping[str, Any], prefix: str, base: Path, source: Path | None) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(prefix, f"must be a table, got {table!r}", source)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for name in table:
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{prefix}.{name}" if prefix else name, f"unknown key (known: {known})", source)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = _build(f.default_factory, table.get(name, {}), key, base, source)
            continue
        if name not in table:
            continue
        ftype = f.type.replace(" | None", "") if isinstance(f.type, str) else f.type
        value = _convert(key, table[name], ftype, f.metadata, base, source)
        check = f.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(key, problem, source)
        kwargs[name] = value
    return cls(**kwargs)


def _validate_cross(cfg: Config) -> None:
    tls = cfg.dicom.tls
    src = cfg.source
    if (tls.cert is None) != (tls.key is None):
        missing = "dicom.tls.key" if tls.key is None else "dicom.tls.cert"
        raise ConfigError(missing, "dicom.tls.cert and dicom.tls.key must be set together", src)
    if tls.ca is not None and tls.cert is None:
        raise ConfigError("dicom.tls.ca", "requires dicom.tls.cert and dicom.tls.key", src)


def from_mapping(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from parsed TOML."""
    base = source.parent if source is not None else Path.cwd()
    cfg = _build(Config, data, "", base, source)
    cfg = dataclasses.replace(cfg, source=source)
    _validate_cross(cfg)
    return cfg


def load(path: Path | str | None = None) -> Config:
    """Load the configuration from ``path``, else ``$EDGED_CONFIG``, else the embedded defaults."""
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        path = Path(env) if env else None
    if path is None:
        return from_mapping({})
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError("config", f"cannot read file: {exc.strerror or exc}", p) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"not valid TOML: {exc}", p) from None
    return from_mapping(data, p.resolve())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)  # pragma: no cover


def to_toml(cfg: Config) -> str:
    """Render the effective configuration as TOML (unset optional keys are shown commented out)."""
    lines: list[str] = []

    def section(obj: Any, name: str) -> None:
        lines.append(f"[{name}]")
        nested: list[tuple[Any, str]] = []
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((value, f"{name}.{f.name}"))
            elif value is None:
                lines.append(f"# {f.name} = (unset)")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
        for sub, subname in nested:
            section(sub, subname)

    for f in dataclasses.fields(cfg):
        if not f.metadata.get("internal"):
            section(getattr(cfg, f.name), f.name)
    return "\n".join(lines)
