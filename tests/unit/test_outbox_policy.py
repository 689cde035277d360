"""The outbox's retry policy: which failures are transient (retry until max age) and which are permanent
(dead after max_attempts), and a back-off that stays bounded however many attempts a long outage takes."""

from __future__ import annotations

import random
import socket
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from edged.config import Destination, OutboxConfig
from edged.results.outbox import AssociationFailed, Sender, backoff, error_is_transient, status_is_transient


def test_backoff_is_capped_and_never_overflows() -> None:
    rng = random.Random(1)
    assert 0.5 <= backoff(1, 1.0, 600.0, rng) <= 1.0
    assert 4.0 <= backoff(4, 1.0, 600.0, rng) <= 8.0
    for attempt in (60, 1025, 100_000):  # an outage of days: attempts keep counting
        assert 300.0 <= backoff(attempt, 5.0, 600.0, rng) <= 600.0


@pytest.mark.parametrize(("code", "transient"), [(0xA700, True), (0xA7FF, True), (0xA900, False),
                                                  (0xC000, False), (0x0122, False), (0x0124, False)])
def test_store_statuses(code: int, transient: bool) -> None:
    assert status_is_transient(code) is transient


def test_errors() -> None:
    assert error_is_transient(ConnectionRefusedError())
    assert error_is_transient(TimeoutError())
    assert error_is_transient(RuntimeError("association lost"))
    assert error_is_transient(AssociationFailed("busy", True))
    assert not error_is_transient(AssociationFailed("rejected", False))
    assert not error_is_transient(ValueError("no presentation context"))
    assert not error_is_transient(FileNotFoundError())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sender(port: int, ae_title: str) -> Sender:
    dest = Destination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)
    return Sender(dest, None, None, OutboxConfig(), None, "EDGED")  # type: ignore[arg-type]


def _associate_error(sender: Sender) -> AssociationFailed:
    with pytest.raises(AssociationFailed) as info:
        sender._associate({(CTImageStorage, "1.2.840.10008.1.2.1")})
    return info.value


def test_association_outcomes_against_a_real_scp() -> None:
    """A pynetdicom Storage SCP: unknown AE title is rejected-permanent; busy is rejected-transient;
    nobody listening is a transient connection failure."""
    port = _free_port()
    assert _associate_error(_sender(port, "PACS")).transient  # nothing listening yet
    scp = AE(ae_title="PACS")
    scp.require_called_aet = True
    scp.maximum_associations = 1
    scp.add_supported_context(CTImageStorage)
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        wrong = _associate_error(_sender(port, "OTHER"))
        assert not wrong.transient and "permanent" in str(wrong)
        deadline = time.monotonic() + 10
        while server.active_associations and time.monotonic() < deadline:  # the rejected one has gone
            time.sleep(0.01)
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        held = holder.associate("127.0.0.1", port, ae_title="PACS")
        assert held.is_established
        try:
            busy = _associate_error(_sender(port, "PACS"))
            assert busy.transient and "transient" in str(busy)
        finally:
            held.release()
    finally:
        server.shutdown()


def test_the_outbox_association_has_nagle_off() -> None:
    # pynetdicom leaves Nagle's algorithm on; a C-STORE's small command PDU followed by the dataset can
    # then wait for a delayed ACK. The outbox turns it off on every association it opens.
    port = _free_port()
    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        sender = _sender(port, "PACS")
        assoc = sender._associate({(CTImageStorage, "1.2.840.10008.1.2.1")})
        try:
            assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            sender._release()
    finally:
        server.shutdown()
