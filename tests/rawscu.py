"""A minimal Storage SCU over a plain socket, for sending datasets exactly as encoded (PS3.8 upper layer).

pynetdicom's SCU is not used for the fuzz test: it parses files before sending them (a leading delimiter
item is skipped) and, with the CPU busy, its reactor thread can take a C-STORE response off the queue
before the waiting call sees it (the call then times out although the peer answered). This one writes
the PDUs itself and reads the answers itself: one request in flight at a time.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.8.498.1"
MAX_PDU = 65536


def _even(uid: bytes) -> bytes:
    return uid + b"\x00" if len(uid) % 2 else uid


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str, calling: str, contexts: list[tuple[str, str]]) -> bytes:
    """A-ASSOCIATE-RQ proposing each (abstract syntax, transfer syntax) as its own context (ids 1, 3, ...)."""
    items = _item(0x10, APPLICATION_CONTEXT)
    for i, (abstract, ts) in enumerate(contexts):
        body = struct.pack(">BBBB", 2 * i + 1, 0, 0, 0) + _item(0x30, abstract.encode()) + _item(0x40, ts.encode())
        items += _item(0x20, body)
    items += _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID))
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32) + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, elem, len(value)) + value


def store_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """C-STORE-RQ command set (Implicit VR Little Endian, group 0000 with its group length)."""
    body = (_element(0, 0x0002, _even(sop_class.encode())) + _element(0, 0x0100, struct.pack("<H", 0x0001))
            + _element(0, 0x0110, struct.pack("<H", message_id)) + _element(0, 0x0700, struct.pack("<H", 0))
            + _element(0, 0x0800, struct.pack("<H", 0x0000)) + _element(0, 0x1000, _even(sop_instance.encode())))
    return _element(0, 0x0000, struct.pack("<I", len(body))) + body


def _pdata(context_id: int, header: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _command_values(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[group << 16 | elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


class Aborted(Exception):
    """The peer aborted (A-ABORT) or closed the connection instead of answering."""


@dataclass
class Association:
    sock: socket.socket
    contexts: dict[str, int]  # accepted transfer syntax -> presentation context id
    max_pdu: int
    open: bool = field(default=True)

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                self.open = False
                raise Aborted("connection closed by the peer")
            buf += chunk
        return bytes(buf)

    def read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self._read_exact(6))
        body = self._read_exact(length)
        if kind == 0x07:
            self.open = False
            raise Aborted(f"A-ABORT source={body[2] if len(body) > 2 else '?'} reason={body[3] if len(body) > 3 else '?'}")
        return kind, body

    def store(self, sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes, message_id: int) -> int:
        """C-STORE ``dataset`` (bytes as encoded); returns the response's status. Raises Aborted, socket.timeout."""
        cid = self.contexts[transfer_syntax]
        out = [_pdata(cid, 0x03, store_command(sop_class, sop_instance, message_id))]
        room = self.max_pdu - 6 if self.max_pdu else len(dataset) or 1  # PDV length item + header inside the PDU
        chunks = [dataset[i : i + room] for i in range(0, len(dataset), room)] or [b""]
        for i, chunk in enumerate(chunks):
            out.append(_pdata(cid, 0x02 if i == len(chunks) - 1 else 0x00, chunk))
        self.sock.sendall(b"".join(out))
        command = b""
        while True:
            kind, body = self.read_pdu()
            if kind != 0x04:
                raise AssertionError(f"unexpected PDU type 0x{kind:02X} in answer to a C-STORE")
            pos, last = 0, False
            while pos < len(body):
                length, _, header = struct.unpack_from(">IBB", body, pos)
                if header & 0x01:
                    command += body[pos + 6 : pos + 4 + length]
                    last = bool(header & 0x02)
                pos += 4 + length
            if last:
                break
        values = _command_values(command)
        assert struct.unpack("<H", values[0x00000100])[0] == 0x8001, "not a C-STORE-RSP"
        assert struct.unpack("<H", values[0x00000120])[0] == message_id, "answer to another message"
        return int(struct.unpack("<H", values[0x00000900])[0])

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
        kind, _ = self.read_pdu()
        assert kind == 0x06, f"A-RELEASE-RQ answered with PDU type 0x{kind:02X}"
        self.close()

    def close(self) -> None:
        self.open = False
        self.sock.close()


def associate(port: int, called: str, calling: str, contexts: list[tuple[str, str]], timeout: float) -> Association:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(associate_rq(called, calling, contexts))
    assoc = Association(sock, {}, MAX_PDU)
    kind, body = assoc.read_pdu()
    if kind != 0x02:
        assoc.close()
        raise Aborted(f"association not accepted (PDU type 0x{kind:02X})")
    pos = 68  # protocol version, reserved, AE titles, reserved
    while pos + 4 <= len(body):
        item, _, length = struct.unpack_from(">BBH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        if item == 0x21 and value[2] == 0:  # accepted presentation context: its transfer syntax sub-item
            ts = value[8 : 8 + struct.unpack_from(">H", value, 6)[0]].rstrip(b"\x00").decode()
            assoc.contexts[ts] = value[0]
        elif item == 0x50 and len(value) >= 8 and value[0] == 0x51:
            assoc.max_pdu = struct.unpack_from(">I", value, 4)[0]
        pos += 4 + length
    return assoc
