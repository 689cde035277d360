"""The listening server: pynetdicom's threaded association server, with the TLS handshake moved out of
the accept loop.

pynetdicom wraps each accepted socket in TLS inside ``get_request``, that is inside its single accept
loop: one client that connects and never starts its handshake stalls every new association until the
handshake times out. Here ``get_request`` only accepts; the handshake runs in the connection's own thread,
bounded by ``handshake_timeout``, so honest senders are accepted meanwhile.

pynetdicom also makes an association (which counts against ``max_associations``) for every connection as
soon as it is accepted: a few clients that connect and say nothing would have every honest sender
rejected as busy. Here the association is made only once the client has sent something, within
``handshake_timeout``; each connection is then read through :mod:`edged.dicom.guard`'s bounds.

Written against pynetdicom 3.0 (checked with the contexts module's pin at import).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from edged import logs
from edged.dicom import contexts  # noqa: F401 - imports the pynetdicom version check
from edged.dicom import negotiation
from edged.dicom.guard import Guard, GuardedRequestHandler

log = logging.getLogger("edged.scp")


class ListeningServer(ThreadedAssociationServer):
    handshake_timeout: float = 30.0
    request_queue_size = 128  # listen backlog (socketserver's default, 5, drops SYNs when many senders start at once)
    # Connection threads may wait up to handshake_timeout for a silent client: closing the listener must
    # not join them (shutdown would wait that long), nor may they keep the process alive at exit.
    daemon_threads = True
    block_on_close = False
    guard: Guard | None = None  # installed on every association by GuardedRequestHandler

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()  # no TLS here: see process_request_thread

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(self.handshake_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                logs.event(log, logging.WARNING, "tls.handshake_failed", peer=f"{client_address[0]}:{client_address[1]}",
                           error=type(exc).__name__)
                try:
                    request.close()
                except OSError:
                    pass
                return
        spoke = _wait_readable(request, self.handshake_timeout)
        if not spoke or _closed_by_peer(request):
            # Never spoke, so never became an association (and never took a slot of max_associations).
            if not spoke:
                logs.event(log, logging.WARNING, "connection.silent",
                           peer=f"{client_address[0]}:{client_address[1]}", seconds=self.handshake_timeout)
            try:
                request.close()
            except OSError:
                pass
            return
        super().process_request_thread(request, client_address)


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    """True once ``sock`` has something to read (or was closed by the peer), False after ``timeout``."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], timeout)
    except (OSError, ValueError):
        return True  # let pynetdicom see the error
    return bool(readable)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True if a readable plain socket has nothing but the peer's close to read (TLS: not checked)."""
    if isinstance(sock, ssl.SSLSocket):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def start_server(ae: AE, address: tuple[str, int], *, ssl_context: ssl.SSLContext | None, evt_handlers: list,
                 contexts: list, handshake_timeout: float, guard: Guard | None = None) -> ListeningServer:
    """Like ``AE.start_server(block=False)``, with :class:`ListeningServer` and ``guard``'s bounds."""
    negotiation.install()  # negotiation over `contexts` (a SharedContexts) is remembered
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers, contexts=contexts,
                            server_class=ListeningServer, request_handler=GuardedRequestHandler)
    server.handshake_timeout = handshake_timeout
    server.guard = guard
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # AE.shutdown and the server's own shutdown keep this list
    return server
