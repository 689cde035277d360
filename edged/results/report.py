"""A report job: the SR (and SEG) for one model's findings on one series, written to the spool.

Reads the findings from the journal and the source headers from the spool (no pixel data: highdicom
copies evidence), builds the objects, writes them durably under ``spool/results/`` and returns what
the journal records. Per-image content items built ahead (``prebuilt``, filled by the pipeline as
each image's finding is made) are used where they match the journal's findings. UIDs come from
:func:`edged.dicom.uids.result_uids`, so a re-run writes the same objects under the same UIDs.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from edged.dicom.uids import derived_uid, device_uid, result_uids
from edged.inference.repository import ModelSpec
from edged.results.seg import build_segmentation
from edged.results.sr import PrebuiltItems, SegmentRef, build_sr
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


def build_report(job: Job, spec: ModelSpec, journal: Journal, spool: Spool,
                 prebuilt: PrebuiltItems | None = None) -> list[ResultRecord]:
    findings = journal.report_findings(job.model, job.series_instance_uid)
    if not findings:
        return []  # every job on the series died: nothing to report (their errors are in the journal)
    for f in findings:
        f["measurements_dict"] = json.loads(f["measurements"])
    sources: dict[str, None] = {}
    for f in findings:
        sources.update(dict.fromkeys([f["sop_instance_uid"]] if f["level"] == "instance"
                                     else json.loads(f["sources"] or "[]")))
    source_uids = list(sources)
    on_file = {row[0]: row for row in journal.series_instances(job.series_instance_uid)}  # arrival order
    if any(u not in on_file for u in source_uids):
        raise FileNotFoundError("a source instance is not in the journal")
    if findings[0]["level"] == "instance":  # the evidence in series order
        order = {u: i for i, u in enumerate(on_file)}
        source_uids.sort(key=order.__getitem__)
    evidence = _evidence(spool, job.series_instance_uid, [on_file[u] for u in source_uids])

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
        series_sources = json.loads(next(f["sources"] for f in findings if f["level"] == "series"))
        # the SEG needs each source's geometry: full headers (no pixel data: highdicom copies them)
        seg_sources = [dcmread(spool.path(on_file[u][3]), stop_before_pixels=True) for u in series_sources]
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
                  segments=segments, predecessor=predecessor, prebuilt=prebuilt)
    records.append(ResultRecord("sr", str(sr.SOPClassUID), uids.sr_instance, _store(spool, sr)))
    return records


def _evidence(spool: Spool, series_uid: str, rows: list[tuple[str, str, str, str]]) -> list[Dataset]:
    """The SR's evidence: the first source's header read from the spool (highdicom copies the patient and
    study modules from it), the others as the four UIDs the evidence sequences list, from the journal.
    highdicom deep-copies and searches its evidence, so every attribute left out is time saved."""
    first = dcmread(spool.path(rows[0][3]), stop_before_pixels=True)
    evidence = [first]
    for sop_uid, sop_class, study_uid, _ in rows[1:]:
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        evidence.append(ds)
    return evidence


def _predecessor(previous: dict[str, Any], evidence: Dataset, sr_series: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = previous["sop_class_uid"]
    ds.SOPInstanceUID = previous["sop_instance_uid"]
    ds.StudyInstanceUID = evidence.StudyInstanceUID
    ds.SeriesInstanceUID = sr_series
    return ds


def warm_up(spec: ModelSpec) -> None:
    """Build and encode (in memory, nothing stored) one small SR for ``spec`` from a synthetic header.

    highdicom reads its tables of the DICOM standard (module and attribute maps, JSON) on first use:
    ~0.6 s of CPU that would otherwise fall on the first report after each start, between a series'
    quiet period and its SR reaching the PACS. The daemon runs this once at start-up, before its
    listener binds."""
    from edged.synthetic import ct_slice

    series = derived_uid("warm-up", spec.name, spec.version)
    header = ct_slice(0, study_uid=derived_uid("warm-up", "study"), series_uid=series, rows=8, columns=8)
    del header.PixelData
    labels = [label for out in spec.outputs for label in out.labels]
    findings = [{"label": label.name, "present": True, "probability": 0.5, "measurements_dict": {},
                 "level": "instance", "sop_instance_uid": str(header.SOPInstanceUID)} for label in labels]
    uids = result_uids(series, spec.name, spec.version, 0)
    sr = build_sr(spec=spec, evidence=[header], findings=findings, series_uid=uids.sr_series,
                  sop_uid=uids.sr_instance, instance_number=1, device_uid=device_uid(), segments={})
    _encode(sr)
