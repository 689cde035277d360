"""edged.dicom.negotiation: a remembered request or negotiation gives exactly what pynetdicom builds, and
every association gets objects of its own."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         MRImageStorage, RLELossless)
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, AsynchronousOperationsWindowNegotiation,
                                       ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification,
                                       SCP_SCU_RoleSelectionNegotiation, SOPClassCommonExtendedNegotiation,
                                       SOPClassExtendedNegotiation, UserIdentityNegotiation)
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_as_acceptor as pynetdicom_negotiate
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from support import require_tool

from edged.config import DicomConfig
from edged.dicom import negotiation
from edged.dicom.contexts import SharedContexts
from edged.dicom.guard import Guard, Limits
from edged.dicom.scp import build_ae
from edged.dicom.server import start_server
from edged.synthetic import write_ct_series

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


def _context(context_id: int, abstract: str, syntaxes: list[str]) -> PresentationContext:
    cx = PresentationContext()
    cx.context_id = context_id
    cx.abstract_syntax = abstract
    cx.transfer_syntax = syntaxes
    return cx


def _request(calling: str = "SCANNER", called: str = "EDGED", *, contexts: list[PresentationContext] | None = None,
             extras: list[Any] | None = None) -> bytes:
    """An A-ASSOCIATE-RQ PDU as pynetdicom's requestor encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    for cx in contexts or [_context(1, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]:
        primitive.presentation_context_definition_list.append(cx)
    length = MaximumLengthNotification()
    length.maximum_length = 16384
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.0"
    primitive.user_information = [length, impl, *(extras or [])]
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


def _extras() -> list[Any]:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = MRImageStorage
    role.scu_role, role.scp_role = True, True
    ident = UserIdentityNegotiation()
    ident.user_identity_type = 2
    ident.primary_field = b"operator"
    ident.secondary_field = b"secret"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 3
    window.maximum_number_operations_performed = 2
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = PATIENT_ROOT_FIND
    ext.service_class_application_information = b"\x01\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = MRImageStorage
    common.service_class_uid = "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = [CTImageStorage]
    return [role, ident, window, ext, common]


def _storescu_request(tmp_path: Path) -> bytes:
    """The A-ASSOCIATE-RQ DCMTK's storescu sends to store one CT image (128 presentation contexts)."""
    storescu = require_tool("storescu")
    image = write_ct_series(tmp_path / "ct", 1, rows=16, columns=16)[0]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        port = server.getsockname()[1]
        client = threading.Thread(target=subprocess.run, daemon=True, kwargs={
            "args": [storescu, "-aet", "SCANNER", "-aec", "EDGED", "127.0.0.1", str(port), str(image)],
            "env": {**os.environ, "TCP_NODELAY": "1"}, "capture_output": True, "timeout": 60})
        client.start()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            data = b""
            while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
                chunk = conn.recv(65536)
                assert chunk, "storescu closed before its request was complete"
                data += chunk
        client.join(60)
    return data


REQUESTS = {
    "one context": lambda: _request(),
    "other AE titles": lambda: _request("CT2", "EDGED2"),
    "roles, identity, window, extended": lambda: _request(contexts=[
        _context(1, CTImageStorage, [JPEG2000Lossless, RLELossless]), _context(3, MRImageStorage, [ImplicitVRLittleEndian]),
        _context(5, PATIENT_ROOT_FIND, [ExplicitVRLittleEndian])], extras=_extras()),
    "many contexts": lambda: _request(contexts=[
        _context(2 * i + 1, CTImageStorage if i % 2 else MRImageStorage, [ExplicitVRLittleEndian, RLELossless][: 1 + i % 2])
        for i in range(120)]),
}


def describe(value: Any) -> Any:
    """Everything a primitive, context or item holds, as plain data (to compare by value)."""
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return (type(value).__name__, {k: describe(v) for k, v in vars(value).items()})
    return value


def _shares_something_mutable(a: Any, b: Any) -> bool:
    if isinstance(a, (list, dict)) or (hasattr(a, "__dict__") and not isinstance(a, (str, bytes, int))):
        if a is b:
            return True
    if isinstance(a, (list, tuple)):
        return any(_shares_something_mutable(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return any(_shares_something_mutable(v, getattr(b, k)) for k, v in vars(a).items())
    return False


def _pynetdicom_primitive(data: bytes) -> A_ASSOCIATE:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    return pdu.to_primitive()


@pytest.mark.parametrize("name", REQUESTS)
def test_a_remembered_request_gives_what_pynetdicom_decodes(name: str) -> None:
    data = REQUESTS[name]()
    memo = negotiation.RequestMemo()
    first, second = memo.decode(data), memo.decode(data)
    assert len(memo) == 1
    expected = describe(_pynetdicom_primitive(data))
    for pdu in (first, second):
        assert isinstance(pdu, A_ASSOCIATE_RQ) and pdu.protocol_version == 1
        assert describe(pdu.to_primitive()) == expected
        assert bytes(A_ASSOCIATE_RQ(pdu.to_primitive()).encode()) == data


def test_storescus_request_is_remembered_as_pynetdicom_decodes_it(tmp_path: Path) -> None:
    data = _storescu_request(tmp_path)
    memo = negotiation.RequestMemo()
    memo.decode(data)
    primitive = memo.decode(data).to_primitive()
    assert len(primitive.presentation_context_definition_list) > 100
    assert describe(primitive) == describe(_pynetdicom_primitive(data))


def test_each_association_gets_a_primitive_of_its_own() -> None:
    data = REQUESTS["roles, identity, window, extended"]()
    memo = negotiation.RequestMemo()
    a, b = memo.decode(data).to_primitive(), memo.decode(data).to_primitive()
    assert not _shares_something_mutable(a, b)
    a.presentation_context_definition_list[0].transfer_syntax.append(ImplicitVRLittleEndian)
    a.presentation_context_definition_list.pop()
    a.user_information[0].maximum_length = 1
    a.calling_ae_title = "CHANGED"
    assert describe(memo.decode(data).to_primitive()) == describe(_pynetdicom_primitive(data))


def test_the_ae_titles_are_part_of_what_is_remembered() -> None:
    memo = negotiation.RequestMemo()
    for calling in ("CT1", "CT2", "CT1"):
        assert memo.decode(_request(calling)).to_primitive().calling_ae_title == calling
    assert len(memo) == 2


def test_the_memo_keeps_only_the_most_recent_requests() -> None:
    memo = negotiation.RequestMemo(size=4)
    for i in range(10):
        memo.decode(_request(f"CT{i}"))
    assert len(memo) == 4
    assert memo.decode(_request("CT9")).to_primitive().calling_ae_title == "CT9"


def test_an_undecodable_request_fails_as_in_pynetdicom_and_is_not_remembered() -> None:
    data = bytearray(_request())
    data[10:26] = b" " * 16  # an all-space called AE title
    with pytest.raises(Exception) as stock:
        A_ASSOCIATE_RQ().decode(bytes(data))
    memo = negotiation.RequestMemo()
    with pytest.raises(type(stock.value)):
        memo.decode(bytes(data))
    assert len(memo) == 0


def _edged_contexts() -> SharedContexts:
    return SharedContexts(build_ae(DicomConfig()).supported_contexts)


ROLES: list[dict[Any, Any]] = [{}, {MRImageStorage: (True, True)}, {CTImageStorage: (False, True)}]


@pytest.mark.parametrize("name", REQUESTS)
@pytest.mark.parametrize("roles", ROLES, ids=["no roles", "both roles", "scp only"])
def test_a_remembered_negotiation_gives_what_pynetdicom_negotiates(name: str, roles: dict[Any, Any]) -> None:
    proposed = _pynetdicom_primitive(REQUESTS[name]()).presentation_context_definition_list
    shared = _edged_contexts()
    expected = describe(pynetdicom_negotiate(proposed, shared, roles))
    first = negotiation.negotiate_as_acceptor(proposed, shared, roles)
    second = negotiation.negotiate_as_acceptor(proposed, shared, roles)
    assert describe(first) == describe(second) == expected
    assert not _shares_something_mutable(first, second)
    assert len(shared.__dict__["negotiated"]) == 1


def test_a_change_to_one_negotiated_result_is_not_seen_by_the_next() -> None:
    proposed = _pynetdicom_primitive(REQUESTS["many contexts"]()).presentation_context_definition_list
    shared = _edged_contexts()
    result, _ = negotiation.negotiate_as_acceptor(proposed, shared, {})
    expected = describe(pynetdicom_negotiate(proposed, shared, {}))
    result[0].transfer_syntax = [RLELossless]
    result[0].result = 0x04
    assert describe(negotiation.negotiate_as_acceptor(proposed, shared, {})) == expected


def test_a_different_proposal_is_negotiated_afresh() -> None:
    shared = _edged_contexts()
    a = [_context(1, CTImageStorage, [JPEG2000Lossless])]
    b = [_context(1, CTImageStorage, [RLELossless])]
    for proposed in (a, b, a):
        result, _ = negotiation.negotiate_as_acceptor(proposed, shared, {})
        assert [str(cx.transfer_syntax[0]) for cx in result] == [proposed[0].transfer_syntax[0]]


def test_other_acceptor_contexts_go_to_pynetdicom_unremembered() -> None:
    plain = list(_edged_contexts())
    proposed = [_context(1, CTImageStorage, [ImplicitVRLittleEndian])]
    result, _ = negotiation.negotiate_as_acceptor(proposed, plain, {})
    assert describe(result) == describe(pynetdicom_negotiate(proposed, plain, {})[0])
    assert not hasattr(plain, "negotiated")


def test_the_listener_decodes_and_negotiates_storescus_request_once(tmp_path: Path) -> None:
    """edged's server (start_server with a Guard) against DCMTK's storescu: three associations from one
    sender, then one from another AE title; every image is stored, and the listener decoded and negotiated
    each distinct request once."""
    storescu = require_tool("storescu")
    image = write_ct_series(tmp_path / "ct", 1, rows=16, columns=16)[0]
    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(event.assoc.requestor.ae_title)
        return 0x0000

    ae = build_ae(DicomConfig())
    contexts = SharedContexts(ae.supported_contexts)
    guard = Guard(Limits(0, 1 << 26, 30.0))
    server = start_server(ae, ("127.0.0.1", 0), ssl_context=None, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                          contexts=contexts, handshake_timeout=30.0, guard=guard)
    try:
        port = str(server.server_address[1])
        for calling in ("CT1", "CT1", "CT1", "CT2"):
            done = subprocess.run([storescu, "-aet", calling, "-aec", "EDGED", "127.0.0.1", port, str(image)],
                                  env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, timeout=60)
            assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    assert stored == ["CT1", "CT1", "CT1", "CT2"]
    assert len(guard.requests) == 2  # the AE titles differ, so the requests' bytes do
    assert len(contexts.__dict__["negotiated"]) == 1  # the proposed contexts do not
    assert len(guard.accepts) == 2  # the answers echo the AE titles


# -- the A-ASSOCIATE-AC ---------------------------------------------------------------------------


def _accept(name: str, roles: dict[Any, Any], *, identity_response: bytes | None = None) -> A_ASSOCIATE:
    """An accept primitive for request ``name``, as pynetdicom's ACSE makes one: the negotiated result
    contexts (rejected ones included) and role replies, and the acceptor's user information."""
    rq = _pynetdicom_primitive(REQUESTS[name]())
    results, role_items = pynetdicom_negotiate(rq.presentation_context_definition_list, _edged_contexts(), roles)
    ac = A_ASSOCIATE()
    ac.application_context_name = rq.application_context_name
    ac.calling_ae_title, ac.called_ae_title = rq.calling_ae_title, rq.called_ae_title
    ac.result = 0x00
    ac.presentation_context_definition_results_list = results
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.0"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_300"
    items: list[Any] = [length, impl, version, *role_items]
    if identity_response is not None:
        ident = UserIdentityNegotiation()
        ident.server_response = identity_response
        items.append(ident)
    ac.user_information = items
    return ac


@pytest.mark.parametrize("name", REQUESTS)
@pytest.mark.parametrize("roles", ROLES, ids=["no roles", "both roles", "scp only"])
def test_a_remembered_accept_is_the_pdu_pynetdicom_encodes(name: str, roles: dict[Any, Any]) -> None:
    memo = negotiation.AcceptMemo()
    expected = bytes(A_ASSOCIATE_AC(_accept(name, roles)).encode())
    assert memo.encode(_accept(name, roles)) == expected  # built
    assert memo.encode(_accept(name, roles)) == expected  # remembered: an equal primitive of its own
    assert len(memo) == 1


def test_every_part_of_the_accept_is_part_of_what_is_remembered() -> None:
    """Each change pynetdicom's PDU would show gives its own answer, never a remembered one."""
    name = "roles, identity, window, extended"
    changes = {
        "as it is": lambda ac: None,
        "calling AE": lambda ac: setattr(ac, "calling_ae_title", "CT9"),
        "called AE": lambda ac: setattr(ac, "called_ae_title", "EDGED9"),
        "a result": lambda ac: setattr(ac.presentation_context_definition_results_list[0], "result", 0x03),
        "a transfer syntax": lambda ac: setattr(ac.presentation_context_definition_results_list[0],
                                                "transfer_syntax", [ExplicitVRLittleEndian]),
        "a context ID": lambda ac: setattr(ac.presentation_context_definition_results_list[0], "context_id", 99),
        "the maximum PDU": lambda ac: setattr(ac.user_information[0], "maximum_length_received", 0),
        "the version name": lambda ac: setattr(ac.user_information[2], "implementation_version_name", "OTHER"),
    }
    memo = negotiation.AcceptMemo()
    seen: set[bytes] = set()
    for change in changes.values():
        ac = _accept(name, {MRImageStorage: (True, True)}, identity_response=b"token")
        change(ac)
        expected = bytes(A_ASSOCIATE_AC(ac).encode())
        assert memo.encode(ac) == expected
        seen.add(expected)
    other_identity = _accept(name, {MRImageStorage: (True, True)}, identity_response=b"other")
    assert memo.encode(other_identity) == bytes(A_ASSOCIATE_AC(other_identity).encode())
    assert len(seen) == len(changes) and len(memo) == len(changes) + 1


def test_the_listener_sends_its_remembered_accept_and_handlers_still_see_the_pdu() -> None:
    """edged's server against a pynetdicom requestor, twice: the requestor decodes what it was sent as
    the A-ASSOCIATE-AC pynetdicom would have built, and an EVT_PDU_SENT handler still gets that PDU."""
    sent: list[Any] = []
    received: list[Any] = []
    ae = build_ae(DicomConfig())
    guard = Guard(Limits(0, 1 << 26, 30.0))
    server = start_server(ae, ("127.0.0.1", 0), ssl_context=None,
                          evt_handlers=[(evt.EVT_PDU_SENT, lambda event: sent.append(event.pdu))],
                          contexts=SharedContexts(ae.supported_contexts), handshake_timeout=30.0, guard=guard)
    try:
        for _ in range(2):
            scu = AE(ae_title="SCANNER")
            scu.add_requested_context(Verification)
            scu.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, RLELossless])
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="EDGED",
                                  evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))])
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
    finally:
        server.shutdown()
    acs_sent = [p for p in sent if isinstance(p, A_ASSOCIATE_AC)]
    acs_received = [p for p in received if isinstance(p, A_ASSOCIATE_AC)]
    assert len(acs_sent) == len(acs_received) == 2
    assert len(guard.accepts) == 1
    for ours, theirs in zip(acs_sent, acs_received):
        assert bytes(ours.encode()) == bytes(theirs.encode())
        assert [(cx.context_id, cx.result) for cx in theirs.presentation_context] == [(1, 0), (3, 0)]


def test_a_plain_pynetdicom_listener_still_answers_with_pynetdicoms_own_accept() -> None:
    """install() changes nothing for an association whose DUL has no guard."""
    negotiation.install()
    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        scu = AE(ae_title="SCANNER")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="PLAIN")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
