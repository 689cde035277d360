"""The TID 1500 document edged writes for a classifier on a series."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
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


def _plain_highdicom(spec, evidence, findings, uids):
    """The document as highdicom builds it when its constructor gets the whole content tree."""
    from edged.results import sr as srmod

    labels = {label.name: label for out in spec.outputs for label in out.labels}
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    groups = [srmod._image_level_group(spec, labels[name], [f for f in findings if f["label"] == name], by_uid,
                                       uids.sr_series)
              for name in dict.fromkeys(f["label"] for f in findings)]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid="1.2.3.4", name="edged", manufacturer_name="edged", model_name=f"edged {srmod.__version__}"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=srmod.PROCEDURES["CT"], imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=uids.sr_series, series_number=srmod.SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance, instance_number=1, manufacturer="edged", is_complete=True, is_final=False,
        is_verified=False, series_description=f"edged {spec.name} {spec.version}")


def _bytes_without_timestamps(ds: pydicom.Dataset, tmp_path: Path) -> bytes:
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return _roundtrip(ds, tmp_path).read_bytes()


def test_document_equals_highdicom_given_the_whole_content(tmp_path: Path) -> None:
    # build_sr hands highdicom's document constructor the groups without their per-image items and puts
    # them back after; the document must be the one highdicom writes from the whole tree.
    spec = Repository(REPO / "engines").load(["ct-nodule-cls"])["ct-nodule-cls"]
    full = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_ct_series(tmp_path, 12)]
    evidence = [full[0]] + [_uids_only(ds) for ds in full[1:]]  # as report.py gives it
    probs = [0.1, 0.9, 0.2, 0.7, 0.3, 0.55, 0.05, 0.99, 0.4, 0.6, 0.51, 0.2]
    findings = [dict(label="lung nodule", present=p >= 0.5, probability=p, measurements_dict={"threshold": 0.5},
                     level="instance", sop_instance_uid=str(ds.SOPInstanceUID)) for p, ds in zip(probs, evidence)]
    uids = result_uids(str(evidence[0].SeriesInstanceUID), spec.name, spec.version, 0)
    ours = build_sr(spec=spec, evidence=evidence, findings=findings, series_uid=uids.sr_series,
                    sop_uid=uids.sr_instance, instance_number=1, device_uid="1.2.3.4", segments={})
    reference = _plain_highdicom(spec, evidence, findings, uids)
    assert _bytes_without_timestamps(ours, tmp_path) == _bytes_without_timestamps(reference, tmp_path)


def test_all_negative_series_has_no_per_image_items(tmp_path: Path) -> None:
    spec = Repository(REPO / "engines").load(["ct-nodule-cls"])["ct-nodule-cls"]
    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_ct_series(tmp_path, 3)]
    findings = [dict(label="lung nodule", present=False, probability=0.1, measurements_dict={}, level="instance",
                     sop_instance_uid=str(ds.SOPInstanceUID)) for ds in evidence]
    uids = result_uids(str(evidence[0].SeriesInstanceUID), spec.name, spec.version, 0)
    sr = build_sr(spec=spec, evidence=evidence, findings=findings, series_uid=uids.sr_series, sop_uid=uids.sr_instance,
                  instance_number=1, device_uid="1.2.3.4", segments={})
    (group,) = hd.sr.srread(_roundtrip(sr, tmp_path)).content.get_image_measurement_groups()
    assert group.get_qualitative_evaluations()[0].value == codes.SCT.Absent
    assert _referenced(sr) == [] and len(group.get_measurements()) == 1


def _uids_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    out = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(out, keyword, getattr(ds, keyword))
    return out


def test_prebuilt_items_give_the_same_document_and_stale_ones_are_ignored(tmp_path: Path) -> None:
    from edged.results.sr import PrebuiltItems

    spec = Repository(REPO / "engines").load(["ct-nodule-cls"])["ct-nodule-cls"]
    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_ct_series(tmp_path, 6)]
    probs = [0.9, 0.2, 0.7, 0.55, 0.1, 0.8]
    findings = [dict(label="lung nodule", present=p >= 0.5, probability=p, measurements_dict={"threshold": 0.5},
                     level="instance", sop_instance_uid=str(ds.SOPInstanceUID)) for p, ds in zip(probs, evidence)]
    uids = result_uids(str(evidence[0].SeriesInstanceUID), spec.name, spec.version, 0)

    def build(prebuilt):
        return build_sr(spec=spec, evidence=evidence, findings=findings, series_uid=uids.sr_series,
                        sop_uid=uids.sr_instance, instance_number=1, device_uid="1.2.3.4", segments={},
                        prebuilt=prebuilt)

    prebuilt = PrebuiltItems()
    for f, ds in zip(findings, evidence):
        if f["present"]:  # as the pipeline adds them when each instance job finishes
            prebuilt.add(f["label"], str(ds.SOPClassUID), f["sop_instance_uid"], f["probability"], None)
    stale = PrebuiltItems.key("lung nodule", str(evidence[0].SOPClassUID), findings[0]["sop_instance_uid"], 0.42, None)
    prebuilt.add(*stale)  # a finding the journal does not hold (another attempt's): must not be used
    assert len(prebuilt) == 5
    with_items = _bytes_without_timestamps(build(prebuilt), tmp_path)
    assert len(prebuilt) == 1 and prebuilt.take(stale) is not None  # the four matching ones were taken, once
    assert with_items == _bytes_without_timestamps(build(None), tmp_path)


def test_prebuilt_items_are_bounded() -> None:
    from edged.results.sr import PrebuiltItems

    prebuilt = PrebuiltItems(limit=3)
    for i in range(5):
        prebuilt.add("lung nodule", "1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{i}", 0.9, None)
    assert len(prebuilt) == 3
    assert prebuilt.take(PrebuiltItems.key("lung nodule", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.0", 0.9, None)) is None
    assert prebuilt.take(PrebuiltItems.key("lung nodule", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0.9, None)) is not None


def _mixed_findings(tmp_path: Path, with_area: bool):
    """Evidence of two SOP classes, UIDs of odd and even length, probabilities and areas whose decimal
    strings take every length highdicom writes; two labels (the second reusing the first's images)."""
    full = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_ct_series(tmp_path, 14)]
    evidence = [full[0]] + [_uids_only(ds) for ds in full[1:]]
    for i, ds in enumerate(evidence):
        if i % 3 == 1:
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}"[:60] + ("1" if i % 2 else "12")
    probs = [0.1, 0.9, 0.5, 0.7312345678901234, 1.0, 0.55, 1 / 3, 0.99999999999, 0.6, 0.5000001, 2e-7 + 0.5,
             0.75, 0.2, 0.8]
    findings = []
    for label, shift in (("lung nodule", 0), ("second", 5)):
        for k, ds in enumerate(evidence):
            p = probs[(k + shift) % len(probs)]
            m = {"threshold": 0.5}
            if with_area:
                m["area_mm2"] = [12.0, 0.1 + 0.2, 1234567.891011, 3.0e-5, 7.5][k % 5]
            findings.append(dict(label=label, present=p >= 0.5, probability=p, measurements_dict=m,
                                 level="instance", sop_instance_uid=str(ds.SOPInstanceUID)))
    return evidence, findings


def _spec_with_two_labels():
    import dataclasses

    spec = Repository(REPO / "engines").load(["ct-nodule-cls"])["ct-nodule-cls"]
    (out,) = spec.outputs
    second = dataclasses.replace(out.labels[0], name="second")
    return dataclasses.replace(spec, outputs=[dataclasses.replace(out, labels=[*out.labels, second])])


@pytest.mark.parametrize("with_area", [False, True])
def test_per_image_items_from_the_encoded_template_give_highdicoms_document(tmp_path: Path, with_area: bool) -> None:
    # The per-image items are written from a template (raw elements); the document must be the one
    # highdicom writes from the whole tree, whatever the SOP class, UID length, value and area.
    from edged.results import sr as srmod

    spec = _spec_with_two_labels()
    evidence, findings = _mixed_findings(tmp_path, with_area)
    uids = result_uids(str(evidence[0].SeriesInstanceUID), spec.name, spec.version, 0)
    assert srmod._template("1.2.840.10008.5.1.4.1.1.2.1", with_area) is not None  # the template is used
    ours = build_sr(spec=spec, evidence=evidence, findings=findings, series_uid=uids.sr_series,
                    sop_uid=uids.sr_instance, instance_number=1, device_uid="1.2.3.4", segments={})
    reference = _plain_highdicom(spec, evidence, findings, uids)
    written = _bytes_without_timestamps(ours, tmp_path)
    assert written == _bytes_without_timestamps(reference, tmp_path)
    # and it reads back as highdicom's document: every positive image a source with its measurements
    parsed = hd.sr.srread(_roundtrip(ours, tmp_path))
    groups = parsed.content.get_image_measurement_groups()
    assert len(groups) == 2
    positives = sum(f["present"] for f in findings)
    assert sum(len(g.source_images) for g in groups) == positives
    assert sum(len(g.get_measurements()) for g in groups) == 2 + positives * (2 if with_area else 1)


def test_without_a_usable_template_the_items_come_from_highdicom(tmp_path: Path, monkeypatch) -> None:
    from edged.results import sr as srmod

    spec = _spec_with_two_labels()
    evidence, findings = _mixed_findings(tmp_path, True)
    uids = result_uids(str(evidence[0].SeriesInstanceUID), spec.name, spec.version, 0)

    def build():
        return build_sr(spec=spec, evidence=evidence, findings=findings, series_uid=uids.sr_series,
                        sop_uid=uids.sr_instance, instance_number=1, device_uid="1.2.3.4", segments={})

    with_template = _bytes_without_timestamps(build(), tmp_path)
    monkeypatch.setattr(srmod, "_template", lambda *args: None)
    assert _bytes_without_timestamps(build(), tmp_path) == with_template
