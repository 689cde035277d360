"""Association requests seen before: decoded and negotiated once, answered from memory after that.

A modality proposes the same presentation contexts on every association it opens: DCMTK's storescu
sends a 9.6 KB A-ASSOCIATE-RQ with 128 contexts to store one image. For each association pynetdicom
decodes that PDU into items (~4.8 ms of CPU here), turns the items into an A-ASSOCIATE primitive
(~2.7 ms) and negotiates every proposed context against edged's supported ones (~3.4 ms): most of
the time it takes edged to set up an association.

Two memos, each keyed on everything its result depends on, so that a hit gives exactly what pynetdicom
would have built:

* :class:`RequestMemo` (one per listener, held by its :class:`~edged.dicom.guard.Guard`): the bytes of an
  A-ASSOCIATE-RQ PDU, AE titles included, to the decoded PDU and the primitive made from it. The guarded
  DUL decodes requests through it (:meth:`~edged.dicom.guard.GuardedDUL._decode_pdu`).
* :func:`negotiate_as_acceptor`, which :func:`install` puts where pynetdicom's ACSE calls it: for
  edged's own supported contexts (a :class:`~edged.dicom.contexts.SharedContexts`, which holds the
  memo) it maps the proposed contexts and SCP/SCU roles to the negotiated result. Any other caller gets
  pynetdicom's function unchanged.

Every association gets its own objects: the primitive, its presentation contexts and user information
items, and the negotiated contexts and role items are copied from the remembered ones (microseconds
each); nothing a handler or pynetdicom might change is shared. The decoded PDU itself is shared, as
pynetdicom only reads a received PDU. Both memos keep the :data:`MEMO_SIZE` most recently used entries,
so a peer that sends ever-different requests only cycles them; a request that pynetdicom cannot decode
or turn into a primitive is never remembered, and fails as it always did.

Written against pynetdicom 3.0 (pinned and checked at import); tests/unit/test_negotiation.py compares
both memos with pynetdicom's own results, and the storescu tests run through them.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import pynetdicom.acse
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_as_acceptor as _pynetdicom_negotiate

from edged.dicom.contexts import SharedContexts, require_pynetdicom

TESTED = ("3.0.",)
require_pynetdicom(__name__, TESTED, "check that A_ASSOCIATE, PresentationContext and negotiate_as_acceptor "
                                     "keep their fields and signature (tests/unit/test_negotiation.py)")

#: Entries each memo keeps (a modality usually sends one request; a few senders, a few each).
MEMO_SIZE = 32

K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    """A small thread-safe map that forgets its least recently used entry beyond ``size``."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# -- copies ---------------------------------------------------------------------------------------


def copy_context(cx: PresentationContext) -> PresentationContext:
    """A presentation context equal to ``cx`` that shares nothing mutable with it."""
    new = PresentationContext.__new__(PresentationContext)
    new.__dict__.update(cx.__dict__)
    new._transfer_syntax = list(cx._transfer_syntax)  # its UIDs are immutable
    return new


def copy_primitive(primitive: A_ASSOCIATE) -> A_ASSOCIATE:
    """An A-ASSOCIATE primitive equal to ``primitive`` that shares nothing mutable with it."""
    new = A_ASSOCIATE.__new__(A_ASSOCIATE)
    new.__dict__.update(primitive.__dict__)
    new._presentation_context_definition_list = [
        copy_context(cx) for cx in primitive._presentation_context_definition_list]
    new._presentation_context_definition_results_list = [
        copy_context(cx) for cx in primitive._presentation_context_definition_results_list]
    new._user_information = [copy.deepcopy(item) for item in primitive._user_information]
    return new


# -- requests -------------------------------------------------------------------------------------


class RememberedRequest(A_ASSOCIATE_RQ):
    """A decoded A-ASSOCIATE-RQ whose :meth:`to_primitive` copies a remembered primitive."""

    def __init__(self, decoded: A_ASSOCIATE_RQ, primitive: A_ASSOCIATE) -> None:
        self.__dict__.update(decoded.__dict__)  # the decoded fields, shared and only ever read
        self._primitive = primitive

    def to_primitive(self) -> A_ASSOCIATE:
        return copy_primitive(self._primitive)


class RequestMemo:
    """A-ASSOCIATE-RQ PDU bytes to the decoded request (see the module)."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._memo: _LRU[bytes, tuple[A_ASSOCIATE_RQ, A_ASSOCIATE]] = _LRU(size)

    def __len__(self) -> int:
        return len(self._memo)

    def decode(self, data: bytes) -> A_ASSOCIATE_RQ:
        """The request ``data`` holds, decoded; raises what ``A_ASSOCIATE_RQ.decode`` raises."""
        hit = self._memo.get(data)
        if hit is None:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(data)
            try:
                primitive = pdu.to_primitive()
            except Exception:  # noqa: BLE001 - pynetdicom raises it again where it always did (FSM AE-6)
                return pdu
            hit = (pdu, primitive)
            self._memo.put(data, hit)
        return RememberedRequest(*hit)


# -- negotiation ----------------------------------------------------------------------------------

_Negotiated = tuple[list[PresentationContext], list[Any]]


def _key(rq_contexts: list[PresentationContext], roles: dict[Any, Any] | None) -> tuple[Any, ...]:
    proposed = tuple((cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role)
                     for cx in rq_contexts)
    return proposed, tuple(sorted((roles or {}).items()))


def negotiate_as_acceptor(rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext],
                          roles: dict[Any, Any] | None = None) -> _Negotiated:
    """pynetdicom's ``negotiate_as_acceptor``, remembered per :class:`SharedContexts` (see the module)."""
    if not isinstance(ac_contexts, SharedContexts):
        return _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
    memo: _LRU[tuple[Any, ...], _Negotiated] | None = ac_contexts.__dict__.get("negotiated")
    if memo is None:
        memo = ac_contexts.__dict__.setdefault("negotiated", _LRU())
    key = _key(rq_contexts, roles)
    hit = memo.get(key)
    if hit is None:
        hit = _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
        memo.put(key, hit)
    contexts, reply_roles = hit
    return [copy_context(cx) for cx in contexts], [copy.deepcopy(item) for item in reply_roles]


def install() -> None:
    """Make pynetdicom's ACSE negotiate through :func:`negotiate_as_acceptor` (idempotent)."""
    pynetdicom.acse.negotiate_as_acceptor = negotiate_as_acceptor  # type: ignore[attr-defined]
