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

* :class:`AcceptMemo` (one per listener, on the same ``Guard``): the content of an A-ASSOCIATE (accept)
  primitive to the bytes of its A-ASSOCIATE-AC PDU. Building that PDU from the primitive validates every
  UID of every result context and encoding it walks them again (~3 ms for storescu's 128); the same
  request negotiated the same way gives the same answer. :func:`install` puts :func:`send_accept` in
  pynetdicom's state machine as action AE-7 for DULs with a guard; any other DUL gets pynetdicom's AE-7.

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
import logging
import threading
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import pynetdicom.acse
import pynetdicom.fsm
from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_as_acceptor as _pynetdicom_negotiate

from edged.dicom.contexts import SharedContexts, require_pynetdicom

TESTED = ("3.0.",)
require_pynetdicom(__name__, TESTED, "check that A_ASSOCIATE, PresentationContext, negotiate_as_acceptor and "
                                     "the state machine's AE-7 keep their fields and signature "
                                     "(tests/unit/test_negotiation.py)")

#: Entries each memo keeps (a modality usually sends one request; a few senders, a few each).
MEMO_SIZE = 32

log = logging.getLogger("edged.scp")

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


# -- the answer ------------------------------------------------------------------------------------


def _frozen(value: Any) -> Any:
    """``value`` as a hashable key part (lists and dicts as tuples); raises TypeError where it can't be."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    hash(value)
    return value


def _accept_key(primitive: A_ASSOCIATE) -> tuple[Any, ...]:
    """Everything ``A_ASSOCIATE_AC.from_primitive`` reads: the AE titles it echoes, the application context,
    each result context's ID, result and (first) transfer syntax, and every user information item whole."""
    results = tuple((cx.context_id, cx.result, tuple(cx.transfer_syntax[:1]))
                    for cx in primitive.presentation_context_definition_results_list)
    items = tuple((type(item), _frozen(vars(item))) for item in primitive.user_information)
    return (primitive.called_ae_title, primitive.calling_ae_title, primitive.application_context_name,
            results, items)


class AcceptMemo:
    """A-ASSOCIATE (accept) primitives to the A-ASSOCIATE-AC PDU's bytes (see the module)."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._memo: _LRU[tuple[Any, ...], bytes] = _LRU(size)

    def __len__(self) -> int:
        return len(self._memo)

    def encode(self, primitive: A_ASSOCIATE) -> bytes:
        """The A-ASSOCIATE-AC PDU for ``primitive``, encoded; raises what pynetdicom's building raises."""
        try:
            key: tuple[Any, ...] | None = _accept_key(primitive)
        except TypeError:  # an item holding something unhashable: built afresh, never remembered
            key = None
        data = self._memo.get(key) if key is not None else None
        if data is None:
            data = bytes(A_ASSOCIATE_AC(primitive).encode())
            if key is not None:
                self._memo.put(key, data)
        return data


_pynetdicom_ae_7 = pynetdicom.fsm.AE_7


def send_accept(dul: Any) -> str:
    """State machine action AE-7 (Sta3 + Evt7: the local user accepted; send the A-ASSOCIATE-AC, go to
    Sta6), answered through the listener's :class:`AcceptMemo`. pynetdicom's own AE-7 for a DUL that has
    no guard, or whose guard has no memo."""
    memo: AcceptMemo | None = getattr(getattr(dul, "_guard", None), "accepts", None)
    if memo is None:
        return _pynetdicom_ae_7(dul)
    primitive = dul.to_provider_queue.get(False)
    data = memo.encode(primitive)
    if dul.socket is None:  # as pynetdicom's _send: nothing to send it on; the state machine moves on
        log.warning("A-ASSOCIATE-AC not sent: the connection has gone")
        return "Sta6"
    dul.socket.send(data)
    if dul.assoc.get_handlers(evt.EVT_PDU_SENT):  # a handler wants the PDU itself: build it for it
        evt.trigger(dul.assoc, evt.EVT_PDU_SENT, {"pdu": A_ASSOCIATE_AC(primitive)})
    return "Sta6"


def install() -> None:
    """Make pynetdicom's ACSE negotiate through :func:`negotiate_as_acceptor`, and its state machine send
    A-ASSOCIATE-ACs through :func:`send_accept` (idempotent)."""
    pynetdicom.acse.negotiate_as_acceptor = negotiate_as_acceptor  # type: ignore[attr-defined]
    description, _, state = pynetdicom.fsm.ACTIONS["AE-7"]
    pynetdicom.fsm.ACTIONS["AE-7"] = (description, send_accept, state)
