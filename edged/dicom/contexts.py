"""Supported presentation contexts shared by every association, instead of deep-copied for each.

pynetdicom's request handler deep-copies the server's whole list of supported presentation contexts
for every new association (``transport.RequestHandler._create_association``). With every storage SOP
class times every transfer syntax edged accepts that is thousands of objects and most of the cost of
an association. Negotiation only reads these contexts (it builds new ones for its result), so one list
can serve every association: :class:`SharedContexts` is a list whose deep copy is itself.

Written against pynetdicom 3.0; the version is checked at import, so an upgrade is a deliberate step
(run tests/unit/test_contexts.py and the storescu tests, then widen ``TESTED``).
"""

from __future__ import annotations

from typing import Any

import pynetdicom

TESTED = ("3.0.",)


def require_pynetdicom(module: str, tested: tuple[str, ...], check: str) -> None:
    """Refuse to import ``module`` (an override of pynetdicom internals) on a pynetdicom it was not written
    for: the ImportError says which versions it was written for and what to ``check`` before widening them."""
    if not str(pynetdicom.__version__).startswith(tested):  # pragma: no cover - guards an upgrade
        raise ImportError(
            f"{module} was written for pynetdicom {', '.join(tested)}x, found {pynetdicom.__version__}: "
            f"{check}, then update TESTED")


require_pynetdicom(__name__, TESTED, "check that association negotiation still only reads the supported contexts")


class SharedContexts(list):  # type: ignore[type-arg]
    """A list of presentation contexts that ``copy.deepcopy`` returns as it is (read-only by convention)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "SharedContexts":
        return self
