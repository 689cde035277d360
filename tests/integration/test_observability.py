"""Metrics, health and the Grafana dashboard against a real Prometheus scraping a working edged."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest
from orthanc import Orthanc, free_port
from support import PIPELINE, require_tool, storescu, write_series

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "ops" / "grafana" / "edged-dashboard.json"
#: Panels that must show data once edged has received, processed and delivered a series.
KEY_PANELS = {
    "Images/min received", "Images/min processed, per model",
    "End-to-end latency per model (last slice received -> result delivered)", "Stage latency p95",
    "Queue depths", "Oldest pending job", "Dead letters", "Spool free space", "Active engines",
}


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def prometheus(tmp_path: Path):
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> int:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                       f"  - job_name: edged\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(subprocess.Popen(
            [require_tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200:
                    return port
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not start: " + (tmp_path / "prometheus.log").read_text()[-2000:])

    yield start
    for p in procs:
        p.terminate()
        p.wait(20)


def query(port: int, expr: str) -> dict:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    out = json.loads(body)
    assert status == 200 and out["status"] == "success", f"{expr}: {out}"
    return out["data"]


def test_dashboard_queries_evaluate_and_key_panels_have_data(edged_factory, prometheus, tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        edged = edged_factory(pipeline=PIPELINE)
        with edged.config.open("a") as f:
            f.write(f'\n[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
                    f"port = {orthanc.dicom_port}\n")
        edged.start()
        prom = prometheus(edged.http_port)
        files = write_series(tmp_path / "ct", 6, seed=41)
        storescu(edged, files)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if query(prom, 'edged_deliveries{state="delivered"}')["result"] and \
                    float(query(prom, 'sum(edged_deliveries{state="delivered"})')["result"][0]["value"][1]) >= 2:
                break
            time.sleep(0.5)
        panels = json.loads(DASHBOARD.read_text())["panels"]
        assert KEY_PANELS <= {p["title"] for p in panels}
        # Rates and quantiles need two scrapes on each side of the delivery; on a loaded machine a scrape
        # can be dropped (its timeout is the 1 s interval), so poll rather than wait a fixed time. Every
        # panel's queries must evaluate; the key panels must show data.
        deadline = time.monotonic() + 60
        while True:
            empty = []
            for panel in panels:
                results = [query(prom, t["expr"])["result"] for t in panel["targets"]]
                if panel["title"] in KEY_PANELS and not any(results):
                    empty.append(panel["title"])
            if not empty:
                break
            assert time.monotonic() < deadline, f"no data for {empty}"
            time.sleep(0.5)

        # The endpoint itself: names and labels follow the rules, and carry no identifier.
        status, body = http_get(f"http://127.0.0.1:{edged.http_port}/metrics")
        text = body.decode()
        assert status == 200
        names = set(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
        for name, kind in names:
            if name.startswith("edged_") is False:
                continue
            if kind == "counter":
                assert name.endswith("_total"), name
        assert {"edged_instances_received_total", "edged_stage_seconds", "edged_end_to_end_seconds",
                "edged_engine_info", "edged_jobs"} <= {n for n, _ in names}
        # CPU time per stage (benchmarks/e2e.py's table): every stage this push went through counted some
        cpu = {stage: float(v) for stage, v in re.findall(
            r'^edged_stage_cpu_seconds_total\{model="[^"]*",stage="([a-z_]+)"\} (\S+)$', text, re.M)}
        for stage in ("receive", "control", "preprocess", "inference", "postprocess", "commit", "object_write",
                      "delivery"):
            assert cpu.get(stage, 0.0) > 0.0, (stage, cpu)
        assert re.search(r"^edged_native_threads_cpu_seconds \S+$", text, re.M)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in files):
            for secret in (str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientID)):
                assert secret not in text
        assert http_get(f"http://127.0.0.1:{edged.http_port}/healthz")[0] == 200
        ready_status, ready = http_get(f"http://127.0.0.1:{edged.http_port}/readyz")
        assert ready_status == 200 and json.loads(ready)["ready"] is True
    finally:
        orthanc.stop()
