"""A report job: the SR (and SEG) for one model's findings on one series, written to the spool.

Reads the findings from the journal and the source headers from the spool (no pixel data: highdicom
copies evidence), builds the objects, writes them durably under ``spool/results/`` and returns what
the journal records. UIDs come from :func:`edged.dicom.uids.result_uids`, so a re-run writes the same
objects under the same UIDs.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from edged.dicom.uids import device_uid, result_uids
from edged.inference.repository import ModelSpec
from edged.results.seg import build_segmentation
from edged.results.sr import SegmentRef, build_sr
from edged.spool.journal import Job, Journal, ResultRecord
from edged.spool.store import RESULTS_DIR, SPOOL_DIR, Spool



def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _store(spool: Spool, ds: Dataset) -> str:
    name = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:40]
    relpath = f"{SPOOL_DIR}/{RESULTS_DIR}/{name}.dcm"
    spool.commit(spool.write_temp(_encode(ds)), relpath)
    return relpath


def build_report(job: Job, spec: ModelSpec, journal: Journal, spool: Spool) -> list[ResultRecord]:
    findings = journal.report_findings(job.model, job.series_instance_uid)
    if not findings:
        return []  # every job on the series died: nothing to report (their errors are in the journal)
    for f in findings:
        f["measurements_dict"] = json.loads(f["measurements"])
    source_uids: list[str] = []
    for f in findings:
        uids = [f["sop_instance_uid"]] if f["level"] == "instance" else json.loads(f["sources"] or "[]")
        for u in uids:
            if u not in source_uids:
                source_uids.append(u)
    evidence = []
    for uid in source_uids:
        relpath = journal.instance_path(uid)
        if relpath is None:
            raise FileNotFoundError("a source instance is not in the journal")
        evidence.append(dcmread(spool.path(relpath), stop_before_pixels=True))
    if findings[0]["level"] == "instance":  # the image library in series order
        order = {u: i for i, u in enumerate(s for s, _ in journal.series_sources(job.series_instance_uid))}
        evidence.sort(key=lambda ds: order.get(str(ds.SOPInstanceUID), 0))

    uids = result_uids(job.series_instance_uid, spec.name, spec.version, job.generation)
    records: list[ResultRecord] = []
    seg_evidence: list[Dataset] = []
    segments: dict[str, SegmentRef] = {}
    masks = []
    label_index = {label.name: i for i, label in enumerate(label for out in spec.outputs for label in out.labels)}
    for f in findings:
        if f["mask_path"] and f["level"] == "series":
            masks.append((label_index[f["label"]], spool.read_mask(f["mask_path"]), f["label"]))
    if masks:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
        series_sources = json.loads(next(f["sources"] for f in findings if f["level"] == "series"))
        seg_sources = [by_uid[u] for u in series_sources]
        seg = build_segmentation(spec=spec, sources=seg_sources, masks=[(i, m) for i, m, _ in masks],
                                 series_uid=uids.seg_series, sop_uid=uids.seg_instance,
                                 instance_number=job.generation + 1)
        records.append(ResultRecord("seg", str(seg.SOPClassUID), uids.seg_instance, _store(spool, seg)))
        del seg.PixelData  # written; the SR needs only its header as evidence (highdicom copies evidence)
        seg_evidence = [seg]
        for number, (_, _, label) in enumerate(masks, start=1):
            segments[label] = SegmentRef(uids.seg_instance, number, uids.seg_series)

    previous = journal.previous_result(spec.name, job.series_instance_uid, "sr", job.generation)
    predecessor = None
    if previous is not None:
        predecessor = _predecessor(previous, evidence[0], uids.sr_series)
    sr = build_sr(spec=spec, evidence=evidence, extra_evidence=seg_evidence, findings=findings, series_uid=uids.sr_series,
                  sop_uid=uids.sr_instance, instance_number=job.generation + 1, device_uid=device_uid(),
                  segments=segments, predecessor=predecessor)
    records.append(ResultRecord("sr", str(sr.SOPClassUID), uids.sr_instance, _store(spool, sr)))
    return records


def _predecessor(previous: dict[str, Any], evidence: Dataset, sr_series: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = previous["sop_class_uid"]
    ds.SOPInstanceUID = previous["sop_instance_uid"]
    ds.StudyInstanceUID = evidence.StudyInstanceUID
    ds.SeriesInstanceUID = sr_series
    return ds

