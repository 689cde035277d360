"""The one exception hierarchy of edged.

Every error edged raises on purpose derives from :class:`EdgedError`. Subclasses carry the data an
operator needs (file, key, reason) as attributes, so callers never parse messages. Messages never
contain patient data (names, IDs, UIDs, dates of birth): they may be logged or sent to a peer.
"""

from __future__ import annotations

from pathlib import Path


class EdgedError(Exception):
    """Root of every error edged raises on purpose."""


class ConfigError(EdgedError):
    """A configuration file or value is invalid.

    ``key`` is the dotted key (``dicom.port``), ``source`` the file it came from (None for defaults or
    the environment), ``reason`` a short human explanation.
    """

    def __init__(self, key: str, reason: str, source: Path | str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = str(source) if source is not None else None
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}{key}: {reason}")


class JournalError(EdgedError):
    """The journal cannot be opened, migrated or written."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"journal {self.path}: {reason}")


class JournalClosedError(JournalError):
    """The journal was closed (the daemon is shutting down)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, "closed")


class SpoolError(EdgedError):
    """The spool directory cannot be prepared or written."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"spool {self.path}: {reason}")


class PixelDataError(EdgedError, ValueError):
    """An image's pixel data could not be decoded. ``reason`` is short and has no patient data."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class OutOfResourcesError(EdgedError):
    """Storing one more instance would break a resource bound (disk watermark, pending limit).

    ``resource`` is a short fixed name (``disk`` or ``pending``), safe for metric labels.
    """

    def __init__(self, resource: str, reason: str) -> None:
        self.resource = resource
        self.reason = reason
        super().__init__(f"out of resources ({resource}): {reason}")


class DicomNetworkError(EdgedError):
    """A DICOM peer could not be reached or refused the association (CLI helpers)."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"{peer}: {reason}")


class ModelConfigError(EdgedError):
    """A model's model.toml (or its files) is invalid. Names the file and the dotted key."""

    def __init__(self, path: Path | str, key: str, reason: str) -> None:
        self.path = str(path)
        self.key = key
        self.reason = reason
        super().__init__(f"{self.path}: {key}: {reason}")


class EngineError(EdgedError):
    """An engine could not be activated or run. ``model`` names it; ``tensor`` the tensor at fault."""

    def __init__(self, model: str, reason: str, tensor: str | None = None) -> None:
        self.model = model
        self.reason = reason
        self.tensor = tensor
        where = f" tensor {tensor!r}" if tensor else ""
        super().__init__(f"engine {model}{where}: {reason}")


class EngineBuildError(EngineError):
    """Building an engine (precision conversion, TensorRT parse or build) failed.

    ``details`` holds every message the builder reported (e.g. each ONNX parser error).
    """

    def __init__(self, model: str, reason: str, details: list[str] | None = None) -> None:
        self.details = list(details or [])
        super().__init__(model, reason + ("".join(f"\n  - {d}" for d in self.details)))


class BackendUnavailableError(EngineError):
    """The requested backend cannot run here (no tensorrt / pycuda, no GPU)."""


class EngineUnavailableError(EngineError):
    """A remote engine (Triton) cannot be reached or its model is not ready: transient.

    Jobs that meet it wait and run again; it never counts as a job's failed attempt.
    """
