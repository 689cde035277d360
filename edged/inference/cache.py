"""Cache of built artifacts (converted ONNX, TensorRT plans), keyed by everything they depend on.

Layout: ``<cache>/<model>/<kind>-<digest>.<ext>`` plus ``<cache>/<model>/<kind>.json``, the manifest of
the latest build of that kind: the key's parts and the file name. A key is a flat mapping of strings
(ONNX sha256, TensorRT version, GPU name and compute capability, driver version, build options...);
its digest names the file. Comparing the manifest's parts with the current ones tells ``built``,
``stale`` (something changed: rebuild) or ``missing``. Files are written atomically (temp, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from edged.spool.store import fsync_dir

Key = Mapping[str, str]


def digest(parts: Key) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Entry:
    path: Path
    parts: dict[str, str]


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _manifest(self, model: str, kind: str) -> Path:
        return self.root / model / f"{kind}.json"

    def latest(self, model: str, kind: str) -> Entry | None:
        """The latest build of ``kind`` for ``model`` (whatever its key), if its file is there."""
        try:
            data = json.loads(self._manifest(model, kind).read_text())
            path = self.root / model / data["file"]
            parts = {str(k): str(v) for k, v in data["key"].items()}
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return Entry(path, parts) if path.is_file() else None

    def lookup(self, model: str, kind: str, parts: Key, ignore: Iterable[str] = ()) -> Entry | None:
        """The cached artifact whose key equals ``parts`` (keys in ``ignore`` not compared)."""
        entry = self.latest(model, kind)
        if entry is None:
            return None
        skip = set(ignore)
        mine = {k: v for k, v in entry.parts.items() if k not in skip}
        want = {k: str(v) for k, v in parts.items() if k not in skip}
        return entry if mine == want else None

    def state(self, model: str, kind: str, parts: Key, ignore: Iterable[str] = ()) -> str:
        """``built``, ``stale`` (a build exists for another key) or ``missing``."""
        if self.lookup(model, kind, parts, ignore) is not None:
            return "built"
        return "stale" if self.latest(model, kind) is not None else "missing"

    def changed_parts(self, model: str, kind: str, parts: Key) -> list[str]:
        """Which key parts differ from the latest build's (for the rebuild log line)."""
        entry = self.latest(model, kind)
        if entry is None:
            return []
        names = set(entry.parts) | set(parts)
        return sorted(n for n in names if entry.parts.get(n) != (str(parts[n]) if n in parts else None))

    def store(self, model: str, kind: str, parts: Key, data: bytes, ext: str) -> Entry:
        """Write ``data`` for this key and make it the latest build of ``kind``."""
        str_parts = {k: str(v) for k, v in parts.items()}
        name = f"{kind}-{digest(str_parts)[:24]}.{ext}"
        path = self.root / model / name
        _atomic_write(path, data)
        manifest = json.dumps({"key": str_parts, "file": name}, indent=2, sort_keys=True).encode()
        _atomic_write(self._manifest(model, kind), manifest)
        return Entry(path, str_parts)

    def discard(self, model: str, kind: str) -> None:
        """Forget the latest build of ``kind`` (e.g. a plan that no longer deserializes)."""
        entry = self.latest(model, kind)
        self._manifest(model, kind).unlink(missing_ok=True)
        if entry is not None:
            entry.path.unlink(missing_ok=True)
