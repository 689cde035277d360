"""The Triton backend against a real Triton Inference Server on 127.0.0.1 (see tests/tritonserver.py).

One server for the module (its start costs ~15-35 s: three models load), serving both demo models and a
copy of ct-nodule-cls whose input is renamed ("ct-nodule-cls-pixels"). The stop/start test runs last and
leaves the server running again. Whole module: about 4-5 min on the loaded 2-core machine (the stop/start
test ~110 s of it, the end-to-end comparison ~65 s).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from support import PIPELINE, EdgedProcess, findings, jobs, metrics_text, run, sample, storescu, wait_jobs, write_series
from tritonserver import TritonServer

from edged.config import TritonConfig
from edged.inference.onnxruntime import OnnxRuntimeEngine
from edged.inference.repository import Repository
from edged.inference.triton import TritonEngine

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[2]
MISMATCHED = "ct-nodule-cls-pixels"
@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = TritonServer(tmp_path_factory.mktemp("triton"), ["ct-nodule-cls", "lesion-seg"],
                          mismatch={MISMATCHED: "ct-nodule-cls"})
    try:
        yield server.start()
    finally:
        server.stop()


def _triton_edged(edged_factory, triton: TritonServer, name: str = "edged", protocol: str = "grpc",
                  extra: str = "") -> EdgedProcess:
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    proc = edged_factory(name, pipeline=PIPELINE, engines={"backend": "triton"},
                         triton={"url": url, "protocol": protocol, "request_timeout": 20.0, "max_in_flight": 2,
                                 "retry_max_seconds": 1.0})
    if extra:
        proc.config.write_text(proc.config.read_text() + "\n" + extra)
    return proc


def _status(edged: EdgedProcess, *args: str) -> str:
    res = run([sys.executable, "-m", "edged", "status", *args, "--config", str(edged.config)], env=None)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _by_job_key(edged: EdgedProcess) -> dict[tuple, list[tuple]]:
    """Findings keyed by what identifies a job across daemons (model, level, instance, series sources)."""
    out: dict[tuple, list[tuple]] = {}
    for f in findings(edged):
        key = (f["model"], f["level"], f["sop_instance_uid"], f["sources"] if f["level"] == "series" else None)
        out.setdefault(key, []).append((f["label"], bool(f["present"]), f["probability"],
                                        json.loads(f["measurements"] or "{}")))
    return out


def test_findings_through_triton_equal_local_onnxruntime(edged_factory, triton: TritonServer, tmp_path: Path) -> None:
    protocol = "grpc"
    files = write_series(tmp_path / "ct", 10, seed=21)
    remote = _triton_edged(edged_factory, triton, f"triton-{protocol}", protocol).start()
    local = edged_factory(f"local-{protocol}", pipeline=PIPELINE, engines={"backend": "onnxruntime"}).start()
    assert "backend=triton" in remote.log_text() and "backend=onnxruntime" in local.log_text()
    storescu(remote, files)
    storescu(local, files)
    for e in (remote, local):
        wait_jobs(e, total=10 + 1 + 2)
        assert all(r["state"] == "done" for r in jobs(e))
    got, want = _by_job_key(remote), _by_job_key(local)
    assert sorted(got) == sorted(want) and len(got) == 11
    for key, expected in want.items():
        (g,), (w,) = got[key], expected
        assert g[0] == w[0] and g[1] == w[1], key
        assert g[2] == pytest.approx(w[2], abs=1e-5), key
        assert g[3].keys() == w[3].keys()
        for name, value in w[3].items():
            if isinstance(value, float):
                assert g[3][name] == pytest.approx(value, rel=1e-4, abs=1e-3), (key, name)
            else:
                assert g[3][name] == value, (key, name)
    assert any(p[1] for v in want.values() for p in v), "no positive finding: the comparison would be weak"
    assert sample(metrics_text(remote), "edged_engine_available", model="ct-nodule-cls", backend="triton") == 1.0
    ready = urllib.request.urlopen(f"http://127.0.0.1:{remote.http_port}/readyz", timeout=10)
    assert ready.status == 200
    assert "engine ct-nodule-cls: triton available" in _status(remote)


def test_http_protocol_gives_the_local_outputs(triton: TritonServer) -> None:
    models = Repository(REPO / "engines").load()
    rng = np.random.default_rng(9)
    for name, spec in models.items():
        x = rng.random((5, *spec.input.shape[1:]), dtype=np.float32)
        remote = TritonEngine(spec, TritonConfig(url=triton.http_url, protocol="http"))
        remote.activate()
        try:
            assert remote.health() is None and remote.available
            got = remote.infer(x)
        finally:
            remote.deactivate()
        with OnnxRuntimeEngine(spec) as local:
            want = local.infer(x)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-5)


def test_concurrent_requests_are_batched_by_triton(triton: TritonServer) -> None:
    spec = Repository(REPO / "engines").load(["ct-nodule-cls"])["ct-nodule-cls"]
    engine = TritonEngine(spec, TritonConfig(url=triton.grpc_url, max_in_flight=8))
    engine.activate()
    before = triton.statistics("ct-nodule-cls")
    senders, rounds = 8, 3
    barrier = threading.Barrier(senders)
    rng = np.random.default_rng(5)
    planes = rng.random((senders, rounds, 1, 1, 256, 256), dtype=np.float32)
    results: dict[tuple[int, int], np.ndarray] = {}

    def send(i: int) -> None:
        for r in range(rounds):
            barrier.wait(timeout=60)
            results[(i, r)] = engine.infer(planes[i, r])["logit"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.deactivate()
    after = triton.statistics("ct-nodule-cls")
    assert len(results) == senders * rounds
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == senders * rounds
    assert executions < requests, f"Triton ran {executions} executions for {requests} requests: no batching"
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    assert max(sizes) > 1
    # each sender got its own plane's answer, not a neighbour's from the same Triton batch
    import onnxruntime as ort

    session = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    for (i, r), got in results.items():
        np.testing.assert_allclose(got, session.run(["logit"], {"image": planes[i, r]})[0], atol=1e-5)


def test_mismatched_triton_model_refuses_to_start(edged_factory, triton: TritonServer) -> None:
    edged = _triton_edged(edged_factory, triton, "mismatch", extra=(
        f'[[triton.models]]\nmodel = "ct-nodule-cls"\nname = "{MISMATCHED}"\n'))
    with pytest.raises(AssertionError, match="edged exited with 1"):
        edged.start(timeout=60)
    lines = [line for line in edged.log_text().splitlines() if line.startswith("edged:")]
    assert lines == [f"edged: engine ct-nodule-cls tensor 'image': Triton model '{MISMATCHED}' has inputs "
                     "['pixels'], model.toml says ['image']"]
    assert "Traceback" not in edged.log_text()


def test_triton_stopped_mid_series_every_job_finishes_once(edged_factory, triton: TritonServer,
                                                           tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 24, seed=22)
    edged = _triton_edged(edged_factory, triton, "outage").start()
    storescu(edged, files[:12])
    deadline = time.monotonic() + 60
    while sum(r["state"] == "done" and r["level"] == "instance" for r in jobs(edged)) < 12:
        assert time.monotonic() < deadline, jobs(edged)
        time.sleep(0.1)
    triton.stop()
    try:
        storescu(edged, files[12:])  # receiving goes on while the backend is away
        deadline = time.monotonic() + 30
        while "UNAVAILABLE" not in _status(edged):
            assert time.monotonic() < deadline, "edged status never showed the backend unavailable"
            time.sleep(0.2)
        time.sleep(3)  # several back-off rounds: jobs must wait, not fail
        assert sample(metrics_text(edged), "edged_engine_available", model="ct-nodule-cls", backend="triton") == 0.0
        states = [r["state"] for r in jobs(edged)]
        assert "failed" not in states and "dead" not in states and states.count("done") >= 12
        assert any(s in ("pending", "running") for s in states)
        status = json.loads(_status(edged, "--json"))
        assert status["engines"]["ct-nodule-cls"]["available"] is False
        with pytest.raises(urllib.error.HTTPError):  # not ready while the backend is away
            urllib.request.urlopen(f"http://127.0.0.1:{edged.http_port}/readyz", timeout=10)
    finally:
        triton.start()
    wait_jobs(edged, total=24 + 1 + 2, timeout=180)
    rows = jobs(edged)
    assert all(r["state"] == "done" for r in rows), [(r["level"], r["state"]) for r in rows]
    assert all(r["attempts"] == 1 for r in rows if r["level"] == "instance"), "an outage counted as an attempt"
    per_job: dict[int, int] = {}
    for f in findings(edged):
        per_job[f["job_id"]] = per_job.get(f["job_id"], 0) + 1
    assert sorted(per_job) == sorted(r["id"] for r in rows if r["level"] != "report")
    assert set(per_job.values()) == {1}  # exactly one finding per job: nothing lost, nothing twice
    assert "engine ct-nodule-cls: triton available" in _status(edged)
    assert "event=triton.unavailable" in edged.log_text() and "event=triton.available" in edged.log_text()
