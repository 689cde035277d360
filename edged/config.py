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
from typing import Any, Mapping

from edged.errors import ConfigError
from edged.schema import Builder, in_range, meta, non_empty, one_of, to_toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENV_CONFIG = "EDGED_CONFIG"

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


def _dest_name(value: Any) -> str | None:
    ok = value and all(c.isalnum() or c in "-_." for c in value) and len(value) <= 64
    return None if ok else "must be 1-64 of letters, digits, - _ . (it is a metric label)"


def _default_storage_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, else the XDG state directory of the user."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "edged"


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class TlsConfig:
    """``[dicom.tls]``: when ``cert`` and ``key`` are set the listener speaks TLS only.

    ``ca``, when set, makes client certificates mandatory and verifies them against it.
    """

    cert: Path | None = field(default=None, metadata=meta(path=True, must_exist=True))
    key: Path | None = field(default=None, metadata=meta(path=True, must_exist=True))
    ca: Path | None = field(default=None, metadata=meta(path=True, must_exist=True))

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class DicomConfig:
    """``[dicom]``: the DICOM listener (Storage SCP and Verification SCP)."""

    ae_title: str = field(default="EDGED", metadata=meta(_ae_title))
    host: str = field(default="0.0.0.0", metadata=meta(non_empty))
    port: int = field(default=11112, metadata=meta(in_range(0, 65535)))  # 0: any free port
    allowed_calling_aes: list[str] = field(default_factory=list, metadata=meta(_ae_list))
    max_associations: int = field(default=16, metadata=meta(in_range(1, 1000)))
    max_pdu: int = field(default=262144, metadata=meta(in_range(0, 2**32 - 1)))
    #: Largest data set one C-STORE may carry (bytes); beyond it the association is aborted (edged.dicom.guard).
    max_message_bytes: int = field(default=1 << 30, metadata=meta(in_range(1 << 20, 1 << 40)))
    acse_timeout: float = field(default=30.0, metadata=meta(in_range(0.1, 3600)))
    dimse_timeout: float = field(default=60.0, metadata=meta(in_range(0.1, 3600)))
    network_timeout: float = field(default=60.0, metadata=meta(in_range(0.1, 3600)))
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: where received instances (spool) and the journal live, and their bounds."""

    dir: Path = field(default_factory=_default_storage_dir, metadata=meta(path=True))
    min_free_bytes: int = field(default=1 << 30, metadata=meta(in_range(0)))
    max_pending: int = field(default=10000, metadata=meta(in_range(1)))


def _default_engines_dir() -> Path:
    """The ``engines/`` beside the package (a checkout), else ``engines/`` in the working directory."""
    beside = Path(__file__).resolve().parent.parent / "engines"
    return beside if beside.is_dir() else Path.cwd() / "engines"


@dataclass(frozen=True)
class EnginesConfig:
    """``[engines]``: the model repository and how models run."""

    dir: Path = field(default_factory=_default_engines_dir, metadata=meta(path=True))
    backend: str = field(default="auto", metadata=meta(one_of("auto", "tensorrt", "onnxruntime", "triton")))
    models: list[str] = field(default_factory=list)
    cache_dir: Path | None = field(default=None, metadata=meta(path=True))
    intra_op_threads: int = field(default=0, metadata=meta(in_range(0, 256)))
    inter_op_threads: int = field(default=1, metadata=meta(in_range(0, 256)))
    #: ONNX Runtime's pool threads spin while they wait for work (its default). Off: they sleep, and the
    #: cores they would burn go to receiving and preprocessing (an edge box shares them).
    spin_wait: bool = False

    def cache(self, storage_dir: Path) -> Path:
        """Built plans and converted ONNX: ``cache_dir``, else ``<storage dir>/engines``."""
        return self.cache_dir if self.cache_dir is not None else storage_dir / "engines"


def _triton_url(value: Any) -> str | None:
    host, sep, port = str(value).rpartition(":")
    if "://" in str(value):
        return "must be HOST:PORT without a scheme (set protocol and [triton.tls] instead)"
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be HOST:PORT, got {value!r}"
    return None


def _triton_version(value: Any) -> str | None:
    return None if value == "" or (value.isdigit() and int(value) > 0) else "must be a positive integer, as a string"


@dataclass(frozen=True)
class TritonTlsConfig:
    """``[triton.tls]``: TLS to the Triton server. ``ca`` verifies the server; ``cert``/``key`` identify edged."""

    enabled: bool = False
    ca: Path | None = field(default=None, metadata=meta(path=True, must_exist=True))
    cert: Path | None = field(default=None, metadata=meta(path=True, must_exist=True))
    key: Path | None = field(default=None, metadata=meta(path=True, must_exist=True))


@dataclass(frozen=True)
class TritonModel:
    """``[[triton.models]]``: the name (and version) an edged model has on the Triton server."""

    model: str = field(metadata=meta(non_empty))
    name: str | None = field(default=None, metadata=meta(non_empty))
    version: str | None = field(default=None, metadata=meta(_triton_version))


@dataclass(frozen=True)
class TritonConfig:
    """``[triton]``: the Triton Inference Server used when ``[engines] backend = "triton"``.

    A model not listed in ``models`` is served under its model.toml name, at the version given by the
    leading number of its model.toml version ("1.0.0" -> 1).
    """

    url: str = field(default="127.0.0.1:8001", metadata=meta(_triton_url))
    protocol: str = field(default="grpc", metadata=meta(one_of("grpc", "http")))
    request_timeout: float = field(default=60.0, metadata=meta(in_range(0.1, 3600)))
    max_in_flight: int = field(default=2, metadata=meta(in_range(1, 64)))
    retry_max_seconds: float = field(default=30.0, metadata=meta(in_range(0.1, 3600)))
    tls: TritonTlsConfig = field(default_factory=TritonTlsConfig)
    models: list[TritonModel] = field(default_factory=list)

    def mapping(self, model: str, model_version: str) -> tuple[str, str]:
        """(Triton model name, Triton version) for an edged model."""
        for m in self.models:
            if m.model == model:
                return m.name or model, m.version if m.version is not None else default_triton_version(model_version)
        return model, default_triton_version(model_version)


def default_triton_version(model_version: str) -> str:
    """Triton versions are integers: model.toml's version if it is one, else its leading number, else ""."""
    head = model_version.split(".")[0]
    return head if head.isdigit() and int(head) > 0 else ""


@dataclass(frozen=True)
class PipelineConfig:
    """``[pipeline]``: jobs, series assembly and scheduling."""

    series_quiet_seconds: float = field(default=10.0, metadata=meta(in_range(0, 86400)))
    workers: int = field(default=2, metadata=meta(in_range(1, 64)))
    max_attempts: int = field(default=3, metadata=meta(in_range(1, 100)))
    retry_seconds: float = field(default=10.0, metadata=meta(in_range(0, 86400)))
    lease_seconds: float = field(default=600.0, metadata=meta(in_range(1, 86400)))
    queue_size: int = field(default=64, metadata=meta(in_range(1, 100000)))
    poll_seconds: float = field(default=0.5, metadata=meta(in_range(0.01, 60)))


@dataclass(frozen=True)
class Destination:
    """``[[destinations]]``: a PACS (Storage SCP) every result is sent to."""

    name: str = field(metadata=meta(_dest_name))
    ae_title: str = field(metadata=meta(_ae_title))
    host: str = field(metadata=meta(non_empty))
    port: int = field(metadata=meta(in_range(1, 65535)))
    calling_ae: str | None = field(default=None, metadata=meta(_ae_title))
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: delivery retries and spool retention.

    Transient failures (destination down or busy) retry until ``max_age_seconds``; permanent ones (the
    destination refuses the object or the sender) are dead after ``max_attempts`` attempts."""

    retry_base_seconds: float = field(default=5.0, metadata=meta(in_range(0.01, 86400)))
    retry_max_seconds: float = field(default=600.0, metadata=meta(in_range(0.01, 86400)))
    max_attempts: int = field(default=50, metadata=meta(in_range(1, 100000)))
    max_age_seconds: float = field(default=7 * 86400.0, metadata=meta(in_range(1, 365 * 86400)))
    retention_seconds: float = field(default=86400.0, metadata=meta(in_range(0, 365 * 86400)))
    #: how long the journal keeps the record (jobs, findings, deliveries) of a wholly purged series
    history_seconds: float = field(default=7 * 86400.0, metadata=meta(in_range(0, 3650 * 86400)))
    association_idle_seconds: float = field(default=10.0, metadata=meta(in_range(0, 3600)))


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: metrics and health endpoints."""

    host: str = field(default="127.0.0.1", metadata=meta(non_empty))
    port: int = field(default=8780, metadata=meta(in_range(0, 65535)))


@dataclass(frozen=True)
class DaemonConfig:
    """``[daemon]``: process-wide behaviour."""

    shutdown_timeout: float = field(default=30.0, metadata=meta(in_range(0, 3600)))
    log_level: str = field(default="info", metadata=meta(one_of(*LOG_LEVELS)))
    audit_log: Path | None = field(default=None, metadata=meta(path=True))

    def audit_path(self, storage_dir: Path) -> Path:
        """JSON-lines audit log: ``audit_log``, else ``<storage dir>/audit.jsonl``."""
        return self.audit_log if self.audit_log is not None else storage_dir / "audit.jsonl"


@dataclass(frozen=True)
class Config:
    """The whole effective configuration. ``source`` is the file it was read from, if any."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    destinations: list[Destination] = field(default_factory=list)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source: Path | None = field(default=None, compare=False, metadata={"internal": True})


def _validate_cross(cfg: Config) -> None:
    tls = cfg.dicom.tls
    src = cfg.source
    if (tls.cert is None) != (tls.key is None):
        missing = "dicom.tls.key" if tls.key is None else "dicom.tls.cert"
        raise ConfigError(missing, "dicom.tls.cert and dicom.tls.key must be set together", src)
    if tls.ca is not None and tls.cert is None:
        raise ConfigError("dicom.tls.ca", "requires dicom.tls.cert and dicom.tls.key", src)
    names = [d.name for d in cfg.destinations]
    for i, d in enumerate(cfg.destinations):
        if names.index(d.name) != i:
            raise ConfigError(f"destinations[{i}].name", f"duplicate destination name {d.name!r}", src)
        if (d.tls.cert is None) != (d.tls.key is None):
            raise ConfigError(f"destinations[{i}].tls", "cert and key must be set together", src)
    tt = cfg.triton.tls
    if (tt.cert is None) != (tt.key is None):
        raise ConfigError("triton.tls.key" if tt.key is None else "triton.tls.cert",
                          "triton.tls.cert and triton.tls.key must be set together", src)
    if not tt.enabled and (tt.ca or tt.cert):
        raise ConfigError("triton.tls.enabled", "must be true when triton.tls.ca, cert or key is set", src)
    seen: list[str] = []
    for i, m in enumerate(cfg.triton.models):
        if m.model in seen:
            raise ConfigError(f"triton.models[{i}].model", f"{m.model!r} is mapped twice", src)
        seen.append(m.model)


def from_mapping(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from parsed TOML."""
    base = source.parent if source is not None else Path.cwd()
    builder = Builder(lambda key, reason: ConfigError(key, reason, source), base)
    cfg = dataclasses.replace(builder.build(Config, data), source=source)
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


def to_toml(cfg: Config) -> str:
    """Render the effective configuration as TOML (unset optional keys are shown commented out)."""
    lines: list[str] = []

    def section(obj: Any, name: str, header: str) -> None:
        lines.append(header)
        nested: list[tuple[Any, str, str]] = []
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((value, f"{name}.{f.name}", f"[{name}.{f.name}]"))
            elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                nested.extend((item, f"{name}.{f.name}", f"[[{name}.{f.name}]]") for item in value)
            elif value is None:
                lines.append(f"# {f.name} = (unset)")
            else:
                lines.append(f"{f.name} = {to_toml_value(value)}")
        lines.append("")
        for sub, subname, subheader in nested:
            section(sub, subname, subheader)

    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, list):  # arrays of tables: [[destinations]]
            if not value:
                lines.extend([f"# [[{f.name}]] (none)", ""])
            for item in value:
                section(item, f.name, f"[[{f.name}]]")
        else:
            section(value, f.name, f"[{f.name}]")
    return "\n".join(lines)
