"""DICOM Upper Layer PDUs built by hand (PS3.8 section 9.3), for tests that must send what no
well-behaved library would: wrong lengths, unknown types, PDUs in the wrong state.

Only what the tests need: A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ, A-ABORT, C-ECHO-RQ and C-STORE-RQ
command sets, and a reader for what the peer answers.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}

#: Message control header bits of a PDV (PS3.8 E.2).
COMMAND, LAST = 0x01, 0x02


def header(pdu_type: int, length: int) -> bytes:
    """The 6-byte PDU header: type, reserved, 32-bit big-endian length of what follows."""
    return struct.pack(">BBL", pdu_type, 0, length)


def pdu(pdu_type: int, body: bytes) -> bytes:
    return header(pdu_type, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def ae_field(title: bytes) -> bytes:
    """A 16-byte AE title field (space padded); ``title`` is sent as given, even if it is all spaces."""
    return title.ljust(16, b" ")[:16]


def associate_rq(called: bytes = b"EDGED", calling: bytes = b"RAWPDU", *,
                 contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = ((1, VERIFICATION, (IMPLICIT_VR_LE,)),),
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` as (context ID, abstract syntax, transfer syntaxes)."""
    items = _item(0x10, _uid(APPLICATION_CONTEXT))
    for cx_id, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        items += _item(0x20, struct.pack(">BBBB", cx_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _uid("1.2.826.0.1.3680043.9.7433.1.1"))
    items += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + ae_field(called) + ae_field(calling) + b"\x00" * 32
    return pdu(ASSOCIATE_RQ, fixed + items)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item: length, context ID, message control header, fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(pdvs))


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, b"\x00" * 4)


def abort() -> bytes:
    return pdu(ABORT, b"\x00\x00\x00\x00")


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", group, elem, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (group 0000, implicit VR little endian) with its group length first."""
    body = b"".join(_element(0x0000, e, v) for e, v in sorted(elements))
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def echo_rq(message_id: int = 1) -> bytes:
    return command_set([(0x0002, _uid(VERIFICATION)), (0x0100, struct.pack("<H", 0x0030)),
                        (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101))])


def store_rq(sop_instance_uid: str, message_id: int = 1, sop_class_uid: str = CT_IMAGE_STORAGE) -> bytes:
    return command_set([(0x0002, _uid(sop_class_uid)), (0x0100, struct.pack("<H", 0x0001)),
                        (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 0)),
                        (0x0800, struct.pack("<H", 0x0000)), (0x1000, _uid(sop_instance_uid))])


@dataclass
class Answer:
    """A PDU received from the peer, or ``closed`` if the connection ended first."""

    pdu_type: int | None
    body: bytes = b""

    @property
    def closed(self) -> bool:
        return self.pdu_type is None

    @property
    def name(self) -> str:
        return "closed" if self.pdu_type is None else PDU_NAMES.get(self.pdu_type, f"0x{self.pdu_type:02X}")

    def reject(self) -> tuple[int, int, int]:
        """An A-ASSOCIATE-RJ's (result, source, reason/diagnostic)."""
        assert self.pdu_type == ASSOCIATE_RJ, self.name
        return self.body[1], self.body[2], self.body[3]

    def accepted_contexts(self) -> dict[int, int]:
        """An A-ASSOCIATE-AC's presentation context results: {context ID: result} (0 is acceptance)."""
        assert self.pdu_type == ASSOCIATE_AC, self.name
        out, pos = {}, 68
        while pos + 4 <= len(self.body):
            item_type, _, length = struct.unpack_from(">BBH", self.body, pos)
            if item_type == 0x21:
                out[self.body[pos + 4]] = self.body[pos + 6]
            pos += 4 + length
        return out

    def dimse_status(self) -> int:
        """The Status (0000,0900) of a one-PDV P-DATA-TF carrying a whole response command set."""
        assert self.pdu_type == P_DATA_TF, self.name
        data = self.body[6:]
        pos = 0
        while pos + 8 <= len(data):
            group, elem, length = struct.unpack_from("<HHL", data, pos)
            if (group, elem) == (0x0000, 0x0900):
                return int(struct.unpack_from("<H", data, pos + 8)[0])
            pos += 8 + length
        raise AssertionError("no Status in the response")


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> Answer:
    """The next PDU from ``sock``; ``Answer(None)`` if the peer closed or reset the connection."""
    sock.settimeout(timeout)
    try:
        head = _recv_exact(sock, 6)
        if head is None:
            return Answer(None)
        pdu_type, _, length = struct.unpack(">BBL", head)
        body = _recv_exact(sock, length)
        return Answer(None) if body is None else Answer(pdu_type, body)
    except (ConnectionResetError, BrokenPipeError):
        return Answer(None)


def read_until_end(sock: socket.socket, timeout: float = 10.0) -> list[Answer]:
    """Every PDU the peer sends until it closes the connection (the last entry is the close)."""
    answers = []
    while True:
        a = read_pdu(sock, timeout)
        answers.append(a)
        if a.closed:
            return answers


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(port: int, **kw: object) -> tuple[socket.socket, Answer]:
    """Connect and send an A-ASSOCIATE-RQ; the socket and the peer's answer."""
    sock = connect(port)
    sock.sendall(associate_rq(**kw))  # type: ignore[arg-type]
    return sock, read_pdu(sock)


def stream(sock: socket.socket, total: int, chunk: int = 1 << 20, fill: bytes = b"\x00") -> int:
    """Send up to ``total`` bytes of ``fill``; how many went out before the peer stopped reading or closed."""
    block = (fill * (chunk // len(fill) + 1))[:chunk]
    sent = 0
    try:
        while sent < total:
            sock.sendall(block[: min(chunk, total - sent)])
            sent += min(chunk, total - sent)
    except (BrokenPipeError, ConnectionResetError, socket.timeout, TimeoutError):
        pass
    return sent
