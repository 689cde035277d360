"""A C-STORE-RSP (Success) encoded directly instead of through pydicom.

pynetdicom turns every response primitive into a pydicom command-set dataset (an element at a time,
each value validated) and encodes it with pydicom's writer: for a C-STORE that is about a fifth of the
CPU the listener spends per image. A Success response to a C-STORE is always the same six elements
(Implicit VR Little Endian, as every command set), so :class:`StoreResponseDIMSE` writes those bytes
with ``struct`` and hands the P-DATA to the DUL as pynetdicom would. Every other message (requests,
other services, any non-Success status, anything with an optional status element) and any association
with an ``EVT_DIMSE_SENT`` handler bound takes pynetdicom's own path unchanged.

It is a subclass of pynetdicom's ``DIMSEServiceProvider`` overriding only ``send_msg``; :func:`install`
switches an established association's provider to it (no state is added). Written against pynetdicom
3.0 (checked at import, with the contexts module's pin); tests/unit/test_fastdimse.py compares its bytes
with pynetdicom's for the same primitive and the storescu tests exercise it against DCMTK.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from edged.dicom import contexts  # noqa: F401 - imports the pynetdicom version check

_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _us(elem: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, elem, 2, value)


def _uid_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def store_success_command(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The encoded command set of a C-STORE-RSP with Status 0x0000 (Implicit VR Little Endian)."""
    body = (_uid_element(0x0002, _ui(sop_class_uid))
            + _us(0x0100, _C_STORE_RSP)
            + _us(0x0120, message_id)
            + _us(0x0800, _NO_DATASET)
            + _us(0x0900, 0x0000)
            + _uid_element(0x1000, _ui(sop_instance_uid)))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _plain_success(primitive: Any) -> bool:
    return (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status == 0x0000 and primitive.ErrorComment is None
            and primitive.OffendingElement is None and primitive.AffectedSOPClassUID is not None
            and primitive.AffectedSOPInstanceUID is not None)


class StoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with C-STORE Success responses encoded directly."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if not _plain_success(primitive) or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        try:
            command = store_success_command(int(primitive.MessageIDBeingRespondedTo),
                                            str(primitive.AffectedSOPClassUID),
                                            str(primitive.AffectedSOPInstanceUID))
        except (UnicodeEncodeError, struct.error):  # odd values: pydicom's encoder decides
            super().send_msg(primitive, context_id)
            return
        peer_max = int(getattr(self.assoc.requestor, "maximum_length", 0) or 0)
        if peer_max and len(command) + 6 > peer_max:  # one PDV must fit the peer's maximum PDU; else fragment
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        # Control header 0x03: command set, last fragment. A few hundred bytes: one PDV, one PDU.
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)


def install(assoc: Any) -> None:
    """Make ``assoc``'s DIMSE provider a :class:`StoreResponseDIMSE` (call from EVT_ESTABLISHED)."""
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = StoreResponseDIMSE
