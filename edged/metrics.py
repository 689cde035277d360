"""Every Prometheus metric edged exports, in one place.

Metrics live on a :class:`Metrics` object built around a registry, so each test (and each daemon) gets
its own. Label values come only from small fixed sets (status names, rejection reasons), never from a
UID or a patient attribute.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

#: Fixed label values for rejected associations.
REJECT_REASONS = ("calling_ae", "called_ae", "busy", "other")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "edged_associations_total",
            "DICOM associations requested, by result (accepted, or rejected:<reason>).",
            ["result"],
            registry=r,
        )
        self.instances_received = Counter(
            "edged_instances_received_total",
            "C-STORE requests answered, by status (success, duplicate, out_of_resources, ...).",
            ["status"],
            registry=r,
        )
        self.bytes_received = Counter(
            "edged_received_bytes_total", "Bytes of datasets stored in the spool.", registry=r
        )
        self.store_seconds = Histogram(
            "edged_store_seconds",
            "Time from C-STORE request to answer (decode header, write, fsync, journal commit).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.jobs = Counter(
            "edged_jobs_total", "Jobs finished, by model and result (done, failed, dead).", ["model", "result"], registry=r
        )
        self.batch_size = Histogram(
            "edged_batch_size", "Inputs per inference batch.", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.stage_seconds = Histogram(
            "edged_stage_seconds",
            "Time spent per pipeline stage (read, preprocess, queue_wait, inference, postprocess, commit).",
            ["model", "stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )
        self.deliveries = Counter(
            "edged_deliveries_total",
            "Delivery attempts' outcomes per destination (delivered, warning, failed, dead).",
            ["destination", "result"], registry=r,
        )
        self.reports = Counter(
            "edged_reports_total", "Report jobs (SR/SEG) finished, by model and result.", ["model", "result"],
            registry=r,
        )
