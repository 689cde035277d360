"""edged.dicom.fastdimse: a C-STORE Success response encoded directly is byte for byte what pynetdicom
encodes, and anything else goes through pynetdicom unchanged (~1 s). The storescu tests
(tests/integration/test_receive_*.py) exercise it against DCMTK."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from edged.dicom import fastdimse

CT = "1.2.840.10008.5.1.4.1.1.2"


def pynetdicom_bytes(primitive: Any, context_id: int) -> list[bytes]:
    msg = C_STORE_RSP()
    msg.primitive_to_message(primitive)
    return [pdv for p in msg.encode_msg(context_id, 16384) for _, pdv in p.presentation_data_value_list]


def rsp(status: int = 0x0000, message_id: int = 7, uid: str = "1.2.3.4.5") -> C_STORE:
    r = C_STORE()
    r.MessageIDBeingRespondedTo = message_id
    r.AffectedSOPClassUID = CT
    r.AffectedSOPInstanceUID = uid
    r.Status = status
    return r


class _Dul:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append(primitive)


class _Assoc:
    def __init__(self, handlers: list[Any] | None = None, peer_max_pdu: int = 16384) -> None:
        self.dul = _Dul()
        self._handlers = handlers or []
        self.requestor = type("Requestor", (), {"maximum_length": peer_max_pdu})()

    def get_handlers(self, event: Any) -> list[Any]:
        return self._handlers


def provider(handlers: list[Any] | None = None, peer_max_pdu: int = 16384) -> DIMSEServiceProvider:
    assoc = _Assoc(handlers, peer_max_pdu)
    p = DIMSEServiceProvider(assoc)  # type: ignore[arg-type]
    fastdimse.install(type("A", (), {"dimse": p})())
    assert type(p) is fastdimse.StoreResponseDIMSE
    return p


@pytest.mark.parametrize("uid", ["1.2.3.4.5", "1.2.3.4", "2.25.339616765227826917913542389473929581238"])
@pytest.mark.parametrize("message_id", [1, 7, 65535])
def test_success_bytes_match_pynetdicom(uid: str, message_id: int) -> None:
    expected = pynetdicom_bytes(rsp(0, message_id, uid), 5)
    assert [b"\x03" + fastdimse.store_success_command(message_id, CT, uid)] == expected


def test_success_is_sent_directly_as_one_pdv() -> None:
    p = provider()
    p.send_msg(rsp(), 5)
    sent = p.assoc.dul.sent  # type: ignore[attr-defined]
    assert len(sent) == 1
    assert sent[0].presentation_data_value_list == [(5, b"\x03" + fastdimse.store_success_command(7, CT, "1.2.3.4.5"))]


@pytest.mark.parametrize("make", [
    lambda: rsp(status=0xA700),  # failures keep pynetdicom's encoding (and their optional elements)
    lambda: _with(rsp(status=0xC210), ErrorComment="cannot decode"),
    lambda: _with(C_ECHO(), MessageIDBeingRespondedTo=1, AffectedSOPClassUID="1.2.840.10008.1.1", Status=0),
])
def test_everything_else_takes_pynetdicoms_path(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", lambda self, prim, cx: calls.append(prim))
    p = provider()
    prim = make()
    p.send_msg(prim, 3)
    assert calls == [prim]
    assert p.assoc.dul.sent == []  # type: ignore[attr-defined]


def test_bound_dimse_sent_handler_keeps_pynetdicoms_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", lambda self, prim, cx: calls.append(prim))
    p = provider(handlers=[print])
    p.send_msg(rsp(), 3)
    assert len(calls) == 1


def _with(prim: Any, **values: Any) -> Any:
    for k, v in values.items():
        setattr(prim, k, v)
    return prim


def test_a_peer_maximum_pdu_too_small_for_one_pdv_keeps_pynetdicoms_fragmenting_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", lambda self, prim, cx: calls.append(prim))
    p = provider(peer_max_pdu=64)  # the response's command set is ~150 bytes
    p.send_msg(rsp(), 3)
    assert len(calls) == 1 and p.assoc.dul.sent == []  # type: ignore[attr-defined]
    q = provider(peer_max_pdu=0)  # 0: no limit
    q.send_msg(rsp(), 3)
    assert len(calls) == 1 and len(q.assoc.dul.sent) == 1  # type: ignore[attr-defined]
