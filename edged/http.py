"""The HTTP endpoint: ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process runs. ``/readyz`` answers 200 only when every readiness check
passes (journal open, engines active, listener bound) and 503 with the failing checks otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edged.errors import EdgedError

log = logging.getLogger("edged.http")

#: name -> check returning None when fine, else a short reason (no patient data).
ReadinessChecks = dict[str, Callable[[], "str | None"]]


class HttpServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, checks: ReadinessChecks) -> None:
        self.registry = registry
        self.checks = checks
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    failing = outer.not_ready()
                    body = json.dumps({"ready": not failing, "failing": failing}).encode() + b"\n"
                    self._send(503 if failing else 200, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:  # quiet: scrapes every few seconds
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise EdgedError(f"http: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def not_ready(self) -> dict[str, str]:
        failing = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that breaks means not ready, not a crash
                problem = f"check failed: {type(exc).__name__}"
            if problem:
                failing[name] = problem
        return failing

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
