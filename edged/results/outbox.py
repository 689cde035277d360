"""The outbox: every result to every destination, with C-STORE, durably.

Deliveries live in the journal (one per result x destination). One sender thread per destination
takes the deliveries that are due, sends them over one association it keeps open while there is work
(and releases after ``association_idle_seconds``), and records each outcome: Success (and Warning,
logged and counted) is delivered; a failure is retried after an exponential back-off with jitter
(``retry_base_seconds`` doubling up to ``retry_max_seconds``).

Failures are transient or permanent. Transient: the PACS is down or busy (connection refused or timed
out, association aborted or lost, association rejected-transient, C-STORE 0xA7xx Out of Resources);
these retry with the capped back-off until ``max_age_seconds``, however many attempts that takes, so an
outage of minutes or hours never dead-letters a result. Permanent: the PACS refuses this object or this
sender (association rejected-permanent, e.g. an unknown AE title; no presentation context for the SOP
class; any other C-STORE failure status); after ``max_attempts`` attempts such a delivery is dead,
kept with its reason until an operator retries it (``edged outbox retry``).
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from typing import Any

from pynetdicom import AE, evt
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from edged import logs
from edged.audit import AuditLog
from edged.config import Destination, OutboxConfig
from edged.dicom import requestor
from edged.metrics import Metrics
from edged.spool.journal import Delivery, Journal
from edged.spool.store import Spool

log = logging.getLogger("edged.outbox")

#: Statuses a Storage SCP answers that mean "stored" (PS3.4 B.2.3): Success and the Warnings.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
BATCH = 32


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1``: full jitter over an exponential ceiling.

    The exponent is bounded: transient failures retry without an attempt limit, and ``2 ** 1100`` does
    not fit a float."""
    ceiling = min(cap, base * (2.0 ** min(max(0, attempt - 1), 60)))
    return rng.uniform(ceiling / 2, ceiling)


def _no_delay(event: Any) -> None:
    """EVT_CONN_OPEN: Nagle off on the association's socket (pynetdicom leaves it on). A C-STORE is a
    small command PDU, then the dataset, then a wait for the answer: with Nagle on, a write that follows
    an unacknowledged small one can wait for the peer's delayed ACK (~40 ms on Linux)."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # no socket any more (closed meanwhile): nothing to tune
        pass


class AssociationFailed(ConnectionError):
    """No association with the destination; ``transient`` unless it rejected us permanently."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.transient = transient


def status_is_transient(code: int) -> bool:
    """C-STORE failure statuses worth retrying without limit: Refused, Out of Resources (0xA7xx)."""
    return code & 0xFF00 == 0xA700


def error_is_transient(exc: BaseException) -> bool:
    """An exception while associating or sending: permanent only when the destination refused us for
    good, has no presentation context for the object (pynetdicom's ValueError), or the file is gone."""
    if isinstance(exc, AssociationFailed):
        return exc.transient
    return not isinstance(exc, (ValueError, FileNotFoundError))


class Sender:
    """Sends one destination's deliveries on its own thread."""

    def __init__(self, dest: Destination, journal: Journal, spool: Spool, cfg: OutboxConfig, metrics: Metrics,
                 calling_ae: str, audit: AuditLog | None = None) -> None:
        self.audit = audit
        self.dest = dest
        self.journal = journal
        self.spool = spool
        self.cfg = cfg
        self.metrics = metrics
        self.calling_ae = dest.calling_ae or calling_ae
        self.rng = random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._assoc: Any = None
        self._last_used = 0.0
        self._thread = threading.Thread(target=self._run, name=f"outbox-{dest.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- association ------------------------------------------------------------------------------

    def _associate(self, contexts: set[tuple[str, str]]) -> Any:
        if self._assoc is not None and self._assoc.is_established:
            have = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in self._assoc.accepted_contexts}
            if contexts <= have:
                return self._assoc
            self._release()
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class in sorted({c for c, _ in contexts}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls = None
        if self.dest.tls.ca is not None or self.dest.tls.cert is not None:
            import ssl

            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(self.dest.tls.ca) if self.dest.tls.ca else None)
            ctx.check_hostname = False
            if self.dest.tls.cert is not None:
                ctx.load_cert_chain(str(self.dest.tls.cert), str(self.dest.tls.key))
            tls = (ctx, None)
        # requestor: a quick rejection is reported as one, responses stay for the call that waits for them
        assoc = requestor.associate(ae, self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls,
                                    evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
        if not assoc.is_established:
            if assoc.is_rejected:
                result = getattr(assoc.acceptor.primitive, "result", None)
                transient = result == 0x02  # rejected-transient (busy); 0x01 is rejected-permanent
                raise AssociationFailed(f"association rejected ({'transient' if transient else 'permanent'})",
                                        transient)
            raise AssociationFailed("association failed", True)
        self._assoc = assoc
        return assoc

    def _release(self) -> None:
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            except Exception:
                pass
            self._assoc = None

    # -- loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                due = self.journal.due_deliveries(self.dest.name, BATCH)
            except Exception:
                log.exception("outbox: cannot read deliveries")
                due = []
            if due:
                self._send(due)
                continue
            if self._assoc is not None and time.monotonic() - self._last_used > self.cfg.association_idle_seconds:
                self._release()
            nxt = self.journal.next_delivery_at(self.dest.name) if self.journal.is_open else None
            wait = 1.0 if nxt is None else min(1.0, max(0.01, nxt - time.time()))
            self._wake.wait(wait)
            self._wake.clear()
        self._release()

    def _send(self, due: list[Delivery]) -> None:
        contexts: set[tuple[str, str]] = set()
        for d in due:
            contexts.add((d.sop_class_uid, ExplicitVRLittleEndian))
        try:
            assoc = self._associate(contexts)
        except Exception as exc:
            for d in due:
                self._failed(d, f"{type(exc).__name__}: {exc}", None, error_is_transient(exc))
            return
        for d in due:
            if self._stop.is_set():
                break
            t0, c0 = time.monotonic(), time.thread_time()
            try:
                rsp = assoc.send_c_store(self.spool.path(d.path))
                code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            except Exception as exc:
                self._failed(d, f"{type(exc).__name__}: {exc}", None, error_is_transient(exc))
                self._release()
                return
            self._last_used = time.monotonic()
            if code is None:
                self._failed(d, "no response (association lost)", None, True)
                self._release()
                return
            status = f"0x{code:04X}"
            if code in STORED:
                model, seconds = self.journal.delivered(d.id, status)
                self.metrics.end_to_end.labels(model).observe(seconds)
                if self.audit is not None:
                    self.audit.write("result.delivered", ref=self.audit.ref(d.sop_instance_uid), model=model,
                                     destination=self.dest.name, status=status, delivery=d.id)
                self.metrics.deliveries.labels(self.dest.name, "delivered").inc()
                self.metrics.stage_seconds.labels("all", "delivery").observe(time.monotonic() - t0)
                self.metrics.add_cpu("all", "delivery", c0)
                if code != 0:
                    self.metrics.deliveries.labels(self.dest.name, "warning").inc()
                    logs.event(log, logging.WARNING, "delivery.warning", destination=self.dest.name, status=status,
                               delivery=d.id)
            else:
                self._failed(d, f"C-STORE status {status}", status, status_is_transient(code))

    def _failed(self, d: Delivery, error: str, status: str | None, transient: bool) -> None:
        """Record a failed attempt. Transient failures retry until ``max_age_seconds``; permanent ones are
        dead after ``max_attempts`` attempts (all attempts count, transient ones included)."""
        attempts = d.attempts + 1
        too_old = time.time() - d.created_at > self.cfg.max_age_seconds
        if too_old or (not transient and attempts >= self.cfg.max_attempts):
            nxt = None
            self.metrics.deliveries.labels(self.dest.name, "dead").inc()
        else:
            nxt = time.time() + backoff(attempts, self.cfg.retry_base_seconds, self.cfg.retry_max_seconds, self.rng)
            self.metrics.deliveries.labels(self.dest.name, "failed").inc()
        self.journal.delivery_failed(d.id, error, status, nxt)
        if nxt is None and self.audit is not None:
            self.audit.write("result.dead", ref=self.audit.ref(d.sop_instance_uid), destination=self.dest.name,
                             attempts=attempts, delivery=d.id)
        logs.event(log, logging.WARNING, "delivery.failed", destination=self.dest.name, delivery=d.id,
                   attempt=attempts, state="dead" if nxt is None else "retry", error=error.split(":")[0],
                   failure="transient" if transient else "permanent")


class Outbox:
    def __init__(self, destinations: list[Destination], journal: Journal, spool: Spool, cfg: OutboxConfig,
                 metrics: Metrics, calling_ae: str, audit: AuditLog | None = None) -> None:
        self.senders = [Sender(d, journal, spool, cfg, metrics, calling_ae, audit) for d in destinations]

    @property
    def names(self) -> list[str]:
        return [s.dest.name for s in self.senders]

    def start(self) -> None:
        for s in self.senders:
            s.start()

    def notify(self) -> None:
        for s in self.senders:
            s.notify()

    def stop(self, timeout: float = 10.0) -> None:
        for s in self.senders:
            s.stop(timeout)
