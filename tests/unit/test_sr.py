"""The TID 1500 document edged writes for a classifier on a series."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from edged.dicom.uids import result_uids
from edged.inference.repository import Repository
from edged.results.sr import build_sr
from edged.synthetic import write_ct_series

REPO = Path(__file__).resolve().parents[2]


def test_one_group_per_label_with_each_positive_image(tmp_path: Path) -> None:
    spec = Repository(REPO / "engines").load(["ct-nodule-cls"])["ct-nodule-cls"]
    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_ct_series(tmp_path, 5)]
    probs = [0.1, 0.9, 0.2, 0.7, 0.3]
    findings = [dict(label="lung nodule", present=p >= 0.5, probability=p, measurements_dict={"threshold": 0.5},
                     level="instance", sop_instance_uid=str(ds.SOPInstanceUID)) for p, ds in zip(probs, evidence)]
    uids = result_uids(str(evidence[0].SeriesInstanceUID), spec.name, spec.version, 0)
    sr = build_sr(spec=spec, evidence=evidence, findings=findings, series_uid=uids.sr_series, sop_uid=uids.sr_instance,
                  instance_number=1, device_uid="1.2.3.4", segments={})
    parsed = hd.sr.srread(_roundtrip(sr, tmp_path))
    (group,) = parsed.content.get_image_measurement_groups()
    assert group.finding_type == codes.SCT.Nodule
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value == codes.SCT.Present
    values = sorted(round(m.value, 3) for m in group.get_measurements())
    assert values == [0.7, 0.9, 0.9]  # the highest, then each positive image's own
    positive = {str(evidence[i].SOPInstanceUID) for i in (1, 3)}
    assert {str(s.referenced_sop_instance_uid) for s in group.source_images} == positive
    listed = {str(r.ReferencedSOPInstanceUID) for study in parsed.CurrentRequestedProcedureEvidenceSequence
              for series in study.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert {str(ds.SOPInstanceUID) for ds in evidence} <= listed  # every source image is evidence
    assert sr.SeriesDescription == "edged ct-nodule-cls 1.0.0" and sr.VerificationFlag == "UNVERIFIED"


def _referenced(item: pydicom.Dataset) -> list[str]:
    out = [str(r.ReferencedSOPInstanceUID) for r in getattr(item, "ReferencedSOPSequence", [])]
    for child in getattr(item, "ContentSequence", []):
        out += _referenced(child)
    return out


def _roundtrip(ds: pydicom.Dataset, tmp_path: Path) -> Path:
    path = tmp_path / "sr.dcm"
    ds.save_as(path)
    return path


def test_warm_up_builds_a_report_for_every_demo_model_and_stores_nothing(tmp_path: Path, monkeypatch) -> None:
    # The daemon runs warm_up once at start so highdicom's first-use loading of the standard's tables
    # does not fall on the first series' report; it must work for any model and write nothing.
    import highdicom._standard_utils as standard

    from edged.results import report

    monkeypatch.chdir(tmp_path)
    for name, spec in Repository(REPO / "engines").load().items():
        report.warm_up(spec)
    assert list(tmp_path.iterdir()) == []
    assert standard.get_module_attribute_map.cache_info().currsize == 1
