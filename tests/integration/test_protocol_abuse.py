"""Raw-protocol abuse against the real daemon, while an honest sender (DCMTK storescu and echoscu) keeps
working: each attack ends in an A-ABORT or a closed connection, the daemon's memory stays bounded, the
honest sender's every operation succeeds, and every image acknowledged to it is in the spool.

The daemon runs with ``max_associations = 5`` so that an attack that kept association slots would have
the honest sender rejected as busy, and ``max_message_bytes = 16 MiB`` so that the endless-fragments
attack meets its bound quickly. Memory bound: the guard lets one connection buffer at most one PDU
(64 KiB before association, max_pdu + 64 KiB after) and one message (16 MiB here); each attack streams
256 MiB, which stock pynetdicom buffers whole. The peak RSS (VmHWM) may grow by at most 64 MiB: four
times the message bound, a quarter of what one attack sends.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pydicom
import pytest
import rawpdu as R
from support import EdgedProcess, eventually, metric, require_tool, run

from edged.synthetic import write_ct_series

ATTACK_BYTES = 256 << 20
RSS_BOUND_MB = 64
MESSAGE_LIMIT = 16 << 20
ATTACK_SECONDS = 1.0


def memory_mb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("small"), 20, rows=64, columns=64)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgedProcess]:
    """One daemon for the whole module (each test measures its own deltas): attacks also meet what the
    previous ones left behind."""
    work = tmp_path_factory.mktemp("abuse")
    (work / "no-engines").mkdir()
    # acse_timeout well above network_timeout: a connection that sent half of its first PDU is then always
    # cut off by the PDU deadline (counted as slow_pdu), never first by the wait for its A-ASSOCIATE-RQ.
    # max_associations 5: the half-sent PDU test holds 3 slots and leaves the honest sender 2 (an
    # association's slot is free only once its thread has ended, a moment after the peer's release).
    edged = EdgedProcess(work, dicom={"max_associations": 5, "max_message_bytes": MESSAGE_LIMIT,
                                      "network_timeout": 5.0, "acse_timeout": 20.0},
                         engines={"dir": str(work / "no-engines")})
    try:
        yield edged.start()
    finally:
        if edged.alive():
            try:
                edged.stop(timeout=15)
            except AssertionError:
                pass


@dataclass
class Round:
    files: list[Path]
    start: float
    end: float
    ok: bool
    detail: str


class HonestSender:
    """storescu (5 images) and echoscu, one association each, in a loop until stopped."""

    def __init__(self, edged: EdgedProcess, files: list[Path]) -> None:
        self.edged = edged
        self.files = files
        self.rounds: list[Round] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        i = 0
        timeouts = ["-to", "15", "-ta", "15", "-td", "15"]
        while not self._stop.is_set():
            batch = [self.files[(i + k) % len(self.files)] for k in range(5)]
            i += 5
            t0 = time.monotonic()
            store = run([require_tool("storescu"), *timeouts, "-aec", "EDGED", "127.0.0.1", str(self.edged.port),
                         *map(str, batch)], timeout=60)
            echo = run([require_tool("echoscu"), *timeouts, "-aec", "EDGED", "127.0.0.1", str(self.edged.port)],
                       timeout=60)
            self.rounds.append(Round(batch, t0, time.monotonic(), store.returncode == 0 and echo.returncode == 0,
                                     store.stderr[-500:] + echo.stderr[-500:]))

    def __enter__(self) -> "HonestSender":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.rounds and time.monotonic() < deadline:  # warm: one round done before the attack
            time.sleep(0.02)
        assert self.rounds and self.rounds[0].ok, self.rounds[0].detail if self.rounds else "no round"
        return self

    def __exit__(self, *exc: object) -> None:
        n = len(self.rounds)
        deadline = time.monotonic() + 60
        while len(self.rounds) < n + 1 and time.monotonic() < deadline:  # one more round after the attack
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(90)

    def check(self, window: tuple[float, float]) -> None:
        """Every round succeeded, some ran during ``window``, and every acknowledged image is stored intact."""
        failed = [r.detail for r in self.rounds if not r.ok]
        assert not failed, failed[0]
        assert any(r.start < window[1] and r.end > window[0] for r in self.rounds)
        rows = {r["sop_instance_uid"]: r for r in self.edged.rows()}
        for path in {p for r in self.rounds for p in r.files}:
            original = pydicom.dcmread(path)
            row = rows[str(original.SOPInstanceUID)]
            stored = pydicom.dcmread(self.edged.storage / row["path"])
            assert stored == original and stored.PixelData == original.PixelData


def closed_or_aborted(sock: socket.socket) -> list[str]:
    """What the daemon sends until it closes the connection: only A-ABORTs, then the close."""
    names = [a.name for a in R.read_until_end(sock, timeout=20)]
    assert set(names) <= {"A-ABORT", "closed"}, names
    return names


# -- the attacks: each returns how many bytes it sent ------------------------------------------------------

def huge_associate_rq(port: int) -> int:
    with R.connect(port) as s:
        s.sendall(R.header(R.ASSOCIATE_RQ, 0xFFFFFFF0))
        sent = R.stream(s, ATTACK_BYTES)
        closed_or_aborted(s)
    return sent


def _established(port: int, **kw: object) -> socket.socket:
    s, answer = R.associate(port, **kw)
    assert answer.name == "A-ASSOCIATE-AC", answer.name
    return s


def huge_p_data(port: int) -> int:
    with _established(port) as s:
        s.sendall(R.header(R.P_DATA_TF, 0xFFFFFFF0))
        sent = R.stream(s, ATTACK_BYTES)
        closed_or_aborted(s)
    return sent


def endless_fragments(port: int) -> int:
    """A C-STORE whose data set never ends: P-DATA-TF after P-DATA-TF without the last-fragment bit."""
    with _established(port, contexts=((1, R.CT_IMAGE_STORAGE, (R.IMPLICIT_VR_LE,)),)) as s:
        s.sendall(R.p_data(R.pdv(1, R.COMMAND | R.LAST, R.store_rq("1.2.826.0.1.3680043.9.7433.9.1"))))
        fragment = R.p_data(R.pdv(1, 0, b"\x00" * 16000))
        sent = 0
        try:
            while sent < ATTACK_BYTES:
                s.sendall(fragment)
                sent += len(fragment)
        except (BrokenPipeError, ConnectionResetError):
            pass
        closed_or_aborted(s)
    return sent


def unknown_pdu_type(port: int) -> int:
    with R.connect(port) as s:
        s.sendall(R.pdu(0x99, b"\x00" * 16))
        sent = R.stream(s, ATTACK_BYTES)
        closed_or_aborted(s)
    return sent


def second_associate_rq(port: int) -> int:
    with _established(port) as s:
        s.sendall(R.associate_rq())
        assert closed_or_aborted(s)[0] == "A-ABORT"
    return 0


def all_space_calling_ae(port: int) -> int:
    s, answer = R.associate(port, calling=b" " * 16)
    with s:
        assert answer.name in ("A-ABORT", "A-ASSOCIATE-RJ", "closed"), answer.name
        closed_or_aborted(s)
    return 0


def all_space_called_ae(port: int) -> int:
    s, answer = R.associate(port, called=b" " * 16)
    with s:
        assert answer.name in ("A-ABORT", "A-ASSOCIATE-RJ", "closed"), answer.name
        closed_or_aborted(s)
    return 0


ATTACKS: dict[str, tuple[Callable[[int], int], str]] = {
    "huge_associate_rq": (huge_associate_rq, "pdu_too_long"),
    "huge_p_data": (huge_p_data, "pdu_too_long"),
    "endless_fragments": (endless_fragments, "message_too_long"),
    "unknown_pdu_type": (unknown_pdu_type, "unknown_pdu"),
    "second_associate_rq": (second_associate_rq, "unexpected_pdu"),
    "all_space_calling_ae": (all_space_calling_ae, "invalid_pdu"),
    "all_space_called_ae": (all_space_called_ae, "invalid_pdu"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_aborted_and_honest_sender_is_served(name: str, target: EdgedProcess,
                                                       small_images: list[Path]) -> None:
    attack, reason = ATTACKS[name]
    assert target.proc is not None
    with HonestSender(target, small_images) as honest:
        before = memory_mb(target.proc.pid)
        violations = metric(target, "edged_protocol_violations_total", reason=reason)
        t0 = time.monotonic()
        tries, sent = 0, 0
        while time.monotonic() - t0 < ATTACK_SECONDS:  # one attacker after another: more than the slots
            sent += attack(target.port)
            tries += 1
            time.sleep(0.1)
        window = (t0, time.monotonic())
        after = memory_mb(target.proc.pid)
    honest.check(window)
    grown = after["VmHWM"] - before["VmHWM"]
    print(f"{name}: {tries} tried, {tries} survived, 0 lost; attacker sent {sent >> 20} MiB; "
          f"peak RSS {before['VmHWM']} -> {after['VmHWM']} MiB; honest rounds {len(honest.rounds)}")
    assert grown < RSS_BOUND_MB, (before, after)
    if sent:  # a streaming attack: the daemon stopped reading long before the end
        assert sent < tries * ATTACK_BYTES // 4
    eventually(lambda: metric(target, "edged_protocol_violations_total", reason=reason) - violations == tries,
               what=f"{tries} {reason} violations counted")
    assert target.alive()


def test_silent_plain_clients_take_no_association_slot(target: EdgedProcess, small_images: list[Path]) -> None:
    """More silent TCP clients than max_associations: honest senders are still accepted, not told 'busy'."""
    busy = metric(target, "edged_associations_total", result="rejected:busy")
    silent = [R.connect(target.port) for _ in range(8)]
    try:
        with HonestSender(target, small_images) as honest:
            t0 = time.monotonic()
            time.sleep(ATTACK_SECONDS)
            window = (t0, time.monotonic())
        honest.check(window)
        assert metric(target, "edged_associations_total", result="rejected:busy") == busy
    finally:
        for s in silent:
            s.close()


def test_half_sent_pdu_is_dropped_after_the_network_timeout(target: EdgedProcess,
                                                            small_images: list[Path]) -> None:
    """A peer that sends part of a PDU and stops (stock pynetdicom waits on it forever) is cut off after
    dicom.network_timeout (5 s here) and counted as a slow PDU, and meanwhile honest senders are served.

    The peers stay quiet for a while before they start their PDU: the idle timer (network_timeout since
    the last complete PDU) must not cut off, uncounted, a PDU whose own deadline has not yet passed. A
    peer that says nothing at all is still cut off by that idle timer, and is not a protocol violation."""
    violations = metric(target, "edged_protocol_violations_total", reason="slow_pdu")
    with HonestSender(target, small_images) as honest:
        t0 = time.monotonic()
        slow = [_established(target.port), R.connect(target.port)]  # with the silent peer: 3 of 5 slots
        silent = _established(target.port)
        time.sleep(1.5)
        for s in slow:
            s.sendall(R.header(R.P_DATA_TF, 1000)[:3] if s is slow[-1] else R.header(R.P_DATA_TF, 1000) + b"\x00")
        for s in slow + [silent]:
            closed_or_aborted(s)
            s.close()
        window = (t0, time.monotonic())
    honest.check(window)
    eventually(lambda: metric(target, "edged_protocol_violations_total", reason="slow_pdu") - violations == len(slow),
               what=f"{len(slow)} slow_pdu violations counted")


def test_silent_client_does_not_hold_up_shutdown(edged_factory, tmp_path: Path) -> None:
    """SIGTERM with a silent client and one that sent half a PDU header connected: the daemon stops within
    its shutdown timeout, not after acse_timeout (300 s here) or never (stock pynetdicom's reader has no
    timeout, and the abort waits on it)."""
    (tmp_path / "no-engines").mkdir()
    edged = edged_factory(dicom={"acse_timeout": 300.0}, daemon={"shutdown_timeout": 5.0},
                          engines={"dir": str(tmp_path / "no-engines")}).start()
    with R.connect(edged.port), R.connect(edged.port) as half:
        half.sendall(R.header(R.ASSOCIATE_RQ, 100)[:3])
        time.sleep(0.2)
        assert edged.stop(timeout=20) == 0
