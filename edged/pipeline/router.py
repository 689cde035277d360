"""Routing: which models want an instance, from its header and each model's ``[accepts]`` rules.

Pure: the listener calls :meth:`Router.route` and records the routes with the instance in one
journal transaction, so no acknowledged instance is ever without its jobs.
"""

from __future__ import annotations

import re

from edged.dicom.header import Header
from edged.inference.repository import ModelSpec
from edged.spool.journal import Route


def _upper(values: list[str]) -> frozenset[str]:
    return frozenset(v.strip().upper() for v in values)


class Router:
    def __init__(self, models: dict[str, ModelSpec]) -> None:
        self._rules = []
        for name, spec in sorted(models.items()):
            a = spec.accepts
            pattern = re.compile(a.series_description) if a.series_description else None
            self._rules.append((Route(name, spec.version, spec.level), _upper(a.modalities), frozenset(a.sop_class_uids),
                                _upper(a.body_parts), pattern, a.min_rows, a.min_columns))

    def route(self, h: Header) -> list[Route]:
        routes = []
        for route, modalities, classes, parts, pattern, min_rows, min_cols in self._rules:
            if modalities and h.modality.upper() not in modalities:
                continue
            if classes and h.sop_class_uid not in classes:
                continue
            if parts and h.body_part.upper() not in parts:
                continue
            if pattern is not None and not pattern.search(h.series_description):
                continue
            if h.rows < min_rows or h.columns < min_cols:
                continue
            routes.append(route)
        return routes
