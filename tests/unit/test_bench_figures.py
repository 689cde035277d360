"""The figures benchmarks/e2e.py and benchmarks/soak.py compute from what edged exports (< 1 s).

The scripts themselves need DCMTK, Orthanc and minutes; these check their arithmetic on edged's real
/metrics text (a Metrics object with its own registry) and on made-up soak samples.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edged.metrics import Metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import e2e  # noqa: E402
import soak  # noqa: E402


def _scrape(cpu: dict[tuple[str, str], float]) -> e2e.MetricFigures:
    m = Metrics(CollectorRegistry())
    for (model, stage), seconds in cpu.items():
        m.stage_cpu_seconds.labels(model, stage).inc(seconds)
    return e2e.metric_figures(generate_latest(m.registry).decode())


def test_cpu_table_rows_are_the_deltas_and_sum_to_the_daemons_cpu() -> None:
    ready = _scrape({("-", "receive"): 1.0, ("all", "control"): 0.5})
    end = _scrape({("-", "receive"): 3.0, ("all", "control"): 1.0, ("all", "commit"): 0.25,
                   ("ct-nodule-cls", "preprocess"): 2.0, ("ct-nodule-cls", "inference"): 1.5,
                   ("ct-nodule-cls", "object_write"): 4.0, ("all", "delivery"): 0.5})
    assert end.native_cpu is not None  # the collector is registered and parsed
    ready.native_cpu, end.native_cpu = 10.0, 13.0
    r = SimpleNamespace(metrics=end, metrics_ready=ready, cpu=SimpleNamespace(edged_cpu_seconds=16.0))
    rows = {(x.row, x.model): x.seconds for x in e2e.cpu_rows(r)}  # type: ignore[arg-type]
    assert rows[("receive", "-")] == pytest.approx(2.0)
    assert rows[("journal", "all")] == pytest.approx(0.75)  # control + commit, from ready on
    assert rows[("decode/preprocess", "ct-nodule-cls")] == pytest.approx(2.0)
    assert rows[("inference", "ct-nodule-cls")] == pytest.approx(1.5)
    assert rows[("inference", "pool threads")] == pytest.approx(3.0)
    assert rows[("report authoring", "ct-nodule-cls")] == pytest.approx(4.0)
    assert rows[("delivery", "all")] == pytest.approx(0.5)
    assert rows[("not attributed", "-")] == pytest.approx(16.0 - 13.75)
    assert sum(rows.values()) == pytest.approx(16.0)


def _samples(rss: list[float]) -> list[soak.Sample]:
    n = len(rss)
    return [soak.Sample(t=10.0 * i, sent=min(1000 * (i + 1), 1000 * (n - 2)), received=1000 * i, rss_mib=v, fds=12,
                        threads=14, cpu_s=float(i), journal_mib=0.1 * i, wal_mib=4.0, spool_mib=500.0,
                        spool_files=900, backlog=3, jobs_unfinished=2, deliveries_pending=1, purged=0)
            for i, v in enumerate(rss)]


def test_soak_verdict_flat_and_growing() -> None:
    flat = _samples([200.0 + (i % 2) for i in range(21)])
    t = soak.trend(flat, "rss_mib", warmup=0.1)
    assert t.flat and abs(t.slope_per_1000) < 0.2 and t.max == 201.0

    leaking = _samples([200.0 + 2.0 * i for i in range(21)])  # 2 MiB per 1,000 instances
    t = soak.trend(leaking, "rss_mib", warmup=0.1)
    assert not t.flat and t.slope_per_1000 == pytest.approx(2.0)

    t = soak.trend(leaking, "journal_mib", warmup=0.1)  # 0.1 MiB per 1,000: 2 MiB over 20,000 > 1 MiB
    assert not t.flat and t.slope_per_1000 == pytest.approx(0.1)
    assert soak.trend(leaking, "fds", warmup=0.1).flat


def _point(batch: int, rate: float, cores: float | None) -> e2e.EnginePoint:
    return e2e.EnginePoint(e2e.CLASSIFIER, batch, rate, 1.0, 2.0, "onnxruntime", cores, 0.0)


def test_cpu_ceiling_is_the_cores_over_the_cpu_per_slice_and_the_budget_the_target_leaves() -> None:
    r = SimpleNamespace(slices=1000, cpu_affinity=2, cpu_count=2, cpu=SimpleNamespace(edged_cpu_seconds=10.0),
                        engine=[_point(1, 700.0, None), _point(4, 800.0, 1.6), _point(16, 750.0, 1.9)])
    cap = e2e.cpu_ceiling(r)  # type: ignore[arg-type]
    assert cap["findings_per_s"] == pytest.approx(200.0)  # 2 cores / 10 ms per slice
    assert cap["ratio_to_bare_engine"] == pytest.approx(0.25)  # against the best batch, 4: 800 images/s
    assert cap["target_findings_per_s"] == pytest.approx(560.0)
    assert cap["budget_ms_per_slice"] == pytest.approx(2000 / 560)
    assert cap["bench_inference_ms_per_image"] == pytest.approx(2.0)  # 1.6 cores at 800 images/s
    assert cap["outside_inference_budget_ms"] == pytest.approx(2000 / 560 - 2.0)

    r.engine = [_point(1, 900.0, None), _point(4, 800.0, 1.6)]  # best is the first size: its CPU is unknown
    cap = e2e.cpu_ceiling(r)  # type: ignore[arg-type]
    assert cap["budget_ms_per_slice"] == pytest.approx(2000 / 630)
    assert math.isnan(cap["bench_inference_ms_per_image"]) and math.isnan(cap["outside_inference_budget_ms"])
