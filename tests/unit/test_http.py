from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from edged.http import HttpServer
from edged.metrics import Metrics


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_readyz_names_what_is_not_ready() -> None:
    state = {"listener": "listener not bound"}
    checks = {"journal": lambda: None, "listener": lambda: state.get("listener"),
              "engines": lambda: 1 / 0}  # a broken check means not ready, not a crash
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), checks)
    server.start()
    try:
        base = "http://127.0.0.1:%d" % server.address[1]
        code, body = get(base + "/readyz")
        out = json.loads(body)
        assert code == 503 and out["ready"] is False
        assert out["failing"] == {"listener": "listener not bound", "engines": "check failed: ZeroDivisionError"}
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_metrics_registry_is_per_instance() -> None:
    a, b = Metrics(), Metrics()
    a.instances_received.labels("success").inc()
    assert a.registry.get_sample_value("edged_instances_received_total", {"status": "success"}) == 1
    assert b.registry.get_sample_value("edged_instances_received_total", {"status": "success"}) is None
    assert not a.gpu.available or a.registry.get_sample_value("edged_gpu_memory_total_bytes", {"gpu": "0"})
