"""DICOM Comprehensive 3D SR following TID 1500 (Measurement Report), with highdicom.

One document per source series and model (and generation): a radiologist's viewer shows one report
beside the series, not one per slice. Content:

* TID 1001 observation context with edged as the device observer (TID 1004);
* procedure reported; no Image Library (TID 1600; highdicom makes it optional): describing every source
  slice costs highdicom ~35 ms each (several content items per image, each deep-copied and searched
  again), more than the whole rest of the document. The source images are listed in the Current Requested
  Procedure Evidence Sequence instead, and each image with a finding is referenced by its measurements;
* per finding, a measurement group: TID 1501 (image-level: classification, one group per label for the
  series, present if any image is, with the highest probability and each positive image's probability
  inferred from that image) or TID 1411 (volumetric: segmentation, referencing the SEG
  segment), each with the algorithm identification (TID 4019: model name, version, parameters), the
  finding type, a qualitative evaluation (present / absent) and measurements in UCUM units
  (probability {1}; area mm2 or volume mm3), and for a lesion its centroid as a 3D point (a TID 1411
  group with geometric purpose Center of Mass).

The document is neither complete nor verified (``is_final`` / ``is_verified`` false): it is an
algorithm's output awaiting a radiologist.
"""

from __future__ import annotations

import math
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues3D,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumeSurface,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import SegmentationStorage
from pydicom.valuerep import DS

from edged import __version__
from edged.dicom.uids import derived_uid
from edged.inference.repository import ModelSpec
from edged.results.seg import coded

SR_SERIES_NUMBER = 9901
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
UNITLESS = CodedConcept("1", "UCUM", "no units")
MM2 = CodedConcept("mm2", "UCUM", "square millimeter")
MM3 = CodedConcept("mm3", "UCUM", "cubic millimeter")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
#: Procedure reported by modality (CID 100), with a generic fallback.
PROCEDURES = {
    "CT": CodedConcept("77477000", "SCT", "Computed tomography"),
    "MR": CodedConcept("113091000", "SCT", "Magnetic resonance imaging"),
}
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class SegmentRef:
    """Where a label's mask went: the SEG instance and its segment number."""

    sop_instance_uid: str
    segment_number: int
    series_instance_uid: str


def algorithm(spec: ModelSpec, threshold: float) -> AlgorithmIdentification:
    """TID 4019 Algorithm Identification."""
    return AlgorithmIdentification(name=spec.name, version=spec.version,
                                   parameters=[f"threshold={threshold:g}", f"task={spec.task}"], manufacturer="edged")


def _common(finding: dict[str, Any], label: Any) -> tuple[list[Measurement], QualitativeEvaluation]:
    measurements = [Measurement(name=PROBABILITY, value=float(finding["probability"]), unit=UNITLESS)]
    evaluation = QualitativeEvaluation(name=coded(label.code), value=PRESENT if finding["present"] else ABSENT)
    return measurements, evaluation


def _size_measurements(m: dict[str, Any]) -> list[Measurement]:
    if "volume_mm3" in m:
        return [Measurement(name=codes.SCT.Volume, value=float(m["volume_mm3"]), unit=MM3)]
    if "area_mm2" in m:
        return [Measurement(name=codes.SCT.Area, value=float(m["area_mm2"]), unit=MM2)]
    return []


def _centroid_group(tracking: TrackingIdentifier, spec: ModelSpec, label: Any, m: dict[str, Any],
                    frame_of_reference: str | None, source_series: str) -> Any:
    """TID 1411 group whose volume surface is a POINT with geometric purpose Center of Mass: the lesion
    centroid in patient coordinates (mm), tracked as the same finding as the group referencing the SEG."""
    if "centroid_mm" not in m or not frame_of_reference:
        return None
    surface = VolumeSurface(graphic_type=GraphicTypeValues3D.POINT,
                            graphic_data=np.array([m["centroid_mm"]], dtype=float),
                            frame_of_reference_uid=frame_of_reference,
                            source_series=SourceSeriesForSegmentation(source_series))
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_volume_surface=surface, geometric_purpose=codes.DCM.CenterOfMass,
        finding_type=coded(label.code), algorithm_id=algorithm(spec, label.threshold))


def image_items(sop_class_uid: str, sop_instance_uid: str, probability: float,
                area_mm2: float | None) -> tuple[SourceImageForMeasurementGroup, list[Measurement]]:
    """The content items one positive image adds to its label's image-level group: the image as a source
    of the group, and its probability (and area) as measurements inferred from that image."""
    ref = [SourceImageForMeasurement(sop_class_uid, sop_instance_uid)]
    measurements = [Measurement(name=PROBABILITY, value=probability, unit=UNITLESS, referenced_images=ref)]
    if area_mm2 is not None:
        measurements.append(Measurement(name=codes.SCT.Area, value=area_mm2, unit=MM2, referenced_images=ref))
    return SourceImageForMeasurementGroup(sop_class_uid, sop_instance_uid), measurements


# -- per-image items as encoded bytes ---------------------------------------------------------------------
#
# highdicom builds each positive image's items as a dozen small datasets (~1 ms), and pydicom encodes them
# again when the document is written (~1 ms more): with one measurement and one source image per positive
# slice, that was most of a series' report. The items of every image differ only in the image's UIDs and the
# values, so they are made from one template that highdicom built (encoded once by pydicom): the constant
# elements as pydicom wrote them, the ones holding the UIDs and values written here the way pydicom writes
# them, each item a dataset of raw elements that pydicom writes out as they are. A template whose encoding
# at the template's own values is not byte for byte pydicom's is not used (the items come from highdicom as
# before); tests/unit/test_sr.py checks the documents equal plain highdicom's.

_ITEM = b"\xfe\xff\x00\xe0"
_REFERENCED_SOP = Tag(0x00081199)
_MEASURED_VALUE = Tag(0x0040A300)
_CONTENT = Tag(0x0040A730)
_UNITS = Tag(0x004008EA)
_FLOATING_POINT_VALUE = Tag(0x0040A161)
_NUMERIC_VALUE = Tag(0x0040A30A)
_TEMPLATE_UID = "1.2.3.4.5.6.7.8.9"
_PLAIN_UID = re.compile(r"[0-9.]{1,64}")  # anything else (padding, other characters): highdicom's items


def _explicit(tag: int, vr: str, value: bytes) -> bytes:
    """One element, explicit VR little endian (value already padded to even length)."""
    if vr in ("SQ", "OB", "OW", "UN", "UT", "UC", "UR"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _items(*items: bytes) -> bytes:
    """A sequence's value: each item with its (defined) length."""
    return b"".join(_ITEM + struct.pack("<L", len(item)) + item for item in items)


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _element_bytes(ds: Dataset, tag: int) -> bytes:
    """The value of one element of ``ds`` as pydicom writes it (explicit VR little endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, ds[tag])
    data = fp.getvalue()
    return data[12:] if data[4:6] in (b"SQ", b"OB", b"OW", b"UN", b"UT", b"UC", b"UR") else data[8:]


def _raw(elements: list[tuple[int, str, bytes]]) -> Dataset:
    """A dataset of raw elements (tag, VR, value bytes), as pydicom keeps a dataset it has read: written as is."""
    ds = Dataset({Tag(tag): RawDataElement(Tag(tag), vr, len(value), value, 0, False, True, True, False)
                  for tag, vr, value in elements})
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


class _Template:
    """One kind of per-image items (SOP Class, with or without an area), from highdicom's at placeholder values."""

    def __init__(self, sop_class_uid: str, with_area: bool) -> None:
        source, measurements = image_items(sop_class_uid, _TEMPLATE_UID, 0.5,
                                                      1.5 if with_area else None)
        self.sop_class = _uid(sop_class_uid)
        self.source = [(int(e.tag), e.VR, _element_bytes(source, e.tag)) for e in source
                       if e.tag != _REFERENCED_SOP]
        self.measurements = []
        for m in measurements:
            (item,) = m
            (value_item,) = item.MeasuredValueSequence
            (inferred,) = item.ContentSequence
            constant = [(int(e.tag), e.VR, _element_bytes(item, e.tag)) for e in item
                        if e.tag not in (_MEASURED_VALUE, _CONTENT)]
            units = _explicit(_UNITS, "SQ", _element_bytes(value_item, _UNITS))
            inferred_rest = b"".join(_explicit(e.tag, e.VR, _element_bytes(inferred, e.tag)) for e in inferred
                                     if e.tag != _REFERENCED_SOP)
            self.measurements.append((constant, units, inferred_rest))
        # used only where it writes exactly what pydicom writes for highdicom's items
        built_source, built = self.build(_TEMPLATE_UID, 0.5, 1.5 if with_area else None)
        self.ok = _encoded(built_source) == _encoded(source) and \
            [_encoded(d) for d in built] == [_encoded(m[0]) for m in measurements]

    def _referenced(self, sop_instance_uid: bytes) -> bytes:
        return _items(_explicit(0x00081150, "UI", self.sop_class) + _explicit(0x00081155, "UI", sop_instance_uid))

    def build(self, sop_instance_uid: str, probability: float, area_mm2: float | None) -> tuple[Dataset, list[Dataset]]:
        uid = _uid(sop_instance_uid)
        referenced = self._referenced(uid)
        source = _raw([(int(_REFERENCED_SOP), "SQ", referenced), *self.source])
        inferred = _items(_explicit(_REFERENCED_SOP, "SQ", referenced) + self.measurements[0][2])
        out = []
        for (constant, units, _), value in zip(self.measurements, (probability, area_mm2)):
            text = str(DS(value, auto_format=True)).encode("ascii")
            measured = _items(units + _explicit(_FLOATING_POINT_VALUE, "FD", struct.pack("<d", value))
                              + _explicit(_NUMERIC_VALUE, "DS", text + b" " if len(text) % 2 else text))
            out.append(_raw([*constant, (int(_MEASURED_VALUE), "SQ", measured), (int(_CONTENT), "SQ", inferred)]))
        return source, out


@lru_cache(maxsize=64)
def _template(sop_class_uid: str, with_area: bool) -> _Template | None:
    if not _PLAIN_UID.fullmatch(sop_class_uid):
        return None
    try:
        template = _Template(sop_class_uid, with_area)
    except Exception:  # anything unexpected in highdicom's items: they come from highdicom
        return None
    return template if template.ok else None


def image_item_datasets(sop_class_uid: str, sop_instance_uid: str, probability: float,
                        area_mm2: float | None) -> tuple[Dataset, list[Dataset]]:
    """The content items of :func:`image_items` as the datasets the document holds: the source image item
    and the measurement items (from the encoded template, else highdicom's own)."""
    template = _template(sop_class_uid, area_mm2 is not None)
    values = [probability] if area_mm2 is None else [probability, area_mm2]
    if (template is not None and _PLAIN_UID.fullmatch(sop_instance_uid)
            and all(isinstance(v, float) and math.isfinite(v) for v in values)):
        return template.build(sop_instance_uid, probability, area_mm2)
    source, measurements = image_items(sop_class_uid, sop_instance_uid, probability, area_mm2)
    return source, [m[0] for m in measurements]


ItemsKey = tuple[str, str, str, float, Optional[float]]


class PrebuiltItems:
    """Per-image content items built ahead, as each image's finding is made, so that a series' report
    (written after its quiet period) has only the document to assemble; see :func:`image_item_datasets`.

    A memo, never a source of truth: the report reads its findings from the journal and looks each positive
    image up by everything its items are made from (label, SOP class and instance, probability, area);
    a miss (evicted, a restart, another process) builds them there as before. An entry is taken once; the
    least recently added go first past ``limit`` entries (each a few small datasets of raw elements, a
    few KiB)."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._items: OrderedDict[ItemsKey, tuple[Dataset, list[Dataset]]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(label: str, sop_class_uid: str, sop_instance_uid: str, probability: float,
            area_mm2: float | None) -> ItemsKey:
        return (label, sop_class_uid, sop_instance_uid, float(probability),
                None if area_mm2 is None else float(area_mm2))

    def add(self, label: str, sop_class_uid: str, sop_instance_uid: str, probability: float,
            area_mm2: float | None) -> None:
        key = self.key(label, sop_class_uid, sop_instance_uid, probability, area_mm2)
        items = image_item_datasets(*key[1:])
        with self._lock:
            self._items[key] = items
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def take(self, key: ItemsKey) -> tuple[Dataset, list[Dataset]] | None:
        with self._lock:
            return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def _image_level_group(spec: ModelSpec, label: Any, findings: list[dict[str, Any]], by_uid: dict[str, Dataset],
                       series_uid: str, per_image: bool = True) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one label over a series' images: present if any image is; the highest probability;
    and for each image where the finding is present, its probability (and area) inferred from that image.

    One group per label and series, not per image: a viewer shows the slices with findings, and the
    document stays small (highdicom's cost grows with every content item). ``per_image=False``: the
    same group without the per-image items (:func:`build_sr` adds them to the document, see
    :func:`_put_back_per_image_items`)."""
    positives = [f for f in findings if f["present"]]
    top = max(findings, key=lambda f: f["probability"])
    measurements = [Measurement(name=PROBABILITY, value=float(top["probability"]), unit=UNITLESS)]
    images = []
    for f in positives if per_image else ():
        ds = by_uid[f["sop_instance_uid"]]
        source, image_measurements = image_items(str(ds.SOPClassUID), str(ds.SOPInstanceUID), f["probability"],
                                                 f["measurements_dict"].get("area_mm2"))
        images.append(source)
        measurements += image_measurements
    evaluation = QualitativeEvaluation(name=coded(label.code), value=PRESENT if positives else ABSENT)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid("tracking", series_uid, spec.name, spec.version,
                                                               label.name), identifier=f"{label.name}"[:64]),
        finding_type=coded(label.code), algorithm_id=algorithm(spec, label.threshold), measurements=measurements,
        qualitative_evaluations=[evaluation], source_images=images or None)


def _per_image_items(label: str, positives: list[dict[str, Any]], by_uid: dict[str, Dataset],
                     prebuilt: PrebuiltItems | None) -> list[tuple[Dataset, list[Dataset]]]:
    """Each positive image's items (:func:`image_item_datasets`), taken from ``prebuilt`` where they match."""
    out = []
    for f in positives:
        ds = by_uid[f["sop_instance_uid"]]
        key = PrebuiltItems.key(label, str(ds.SOPClassUID), str(ds.SOPInstanceUID), f["probability"],
                                f["measurements_dict"].get("area_mm2"))
        items = prebuilt.take(key) if prebuilt is not None else None
        out.append(items if items is not None else image_item_datasets(*key[1:]))
    return out


def build_sr(*, spec: ModelSpec, evidence: list[Dataset], findings: list[dict[str, Any]], series_uid: str,
             sop_uid: str, instance_number: int, device_uid: str, segments: dict[str, SegmentRef],
             predecessor: Dataset | None = None, extra_evidence: list[Dataset] = (),  # type: ignore[assignment]
             prebuilt: PrebuiltItems | None = None) -> Comprehensive3DSR:
    """The TID 1500 report for one model on one series.

    ``evidence``: header-only datasets of the source images (highdicom copies them; no pixel data).
    ``findings``: journal rows (label, present, probability, measurements, level, sop_instance_uid).
    ``segments``: label name -> SEG segment, for labels whose mask went into a SEG.
    ``predecessor``: the report this one supersedes (a reopened series), referenced as a previous version.
    ``extra_evidence``: other objects the content references (the SEG), header only.
    ``prebuilt``: per-image items built ahead (taken from it where they match the findings).
    """
    labels = {label.name: label for out in spec.outputs for label in out.labels}
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    frame_of_reference = str(getattr(evidence[0], "FrameOfReferenceUID", "") or "") or None
    groups: list[Any] = []
    # Groups whose per-image items highdicom's document constructor need not see: index -> those items
    full_groups: dict[int, list[tuple[Dataset, list[Dataset]]]] = {}
    per_image = [f for f in findings if f["level"] == "instance"]
    for label_name in dict.fromkeys(f["label"] for f in per_image):
        label_findings = [f for f in per_image if f["label"] == label_name]
        positives = [f for f in label_findings if f["present"]]
        if positives:
            full_groups[len(groups)] = _per_image_items(label_name, positives, by_uid, prebuilt)
        groups.append(_image_level_group(spec, labels[label_name], label_findings, by_uid, series_uid, per_image=False))
    for f in (f for f in findings if f["level"] != "instance"):
        label = labels[f["label"]]
        measurements, evaluation = _common(f, label)
        m = f["measurements_dict"]
        tracking = TrackingIdentifier(uid=derived_uid("tracking", series_uid, spec.name, spec.version, label.name),
                                      identifier=f"{label.name}"[:64])
        if label.name in segments:
            seg = segments[label.name]
            groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=ReferencedSegment(
                    sop_class_uid=SegmentationStorage, sop_instance_uid=seg.sop_instance_uid,
                    segment_number=seg.segment_number,
                    source_series=SourceSeriesForSegmentation(seg.series_instance_uid)),
                finding_type=coded(label.code), algorithm_id=algorithm(spec, label.threshold),
                measurements=measurements + _size_measurements(m), qualitative_evaluations=[evaluation]))
            centroid = _centroid_group(tracking, spec, label, m, frame_of_reference,
                                       str(evidence[0].SeriesInstanceUID))
            if centroid is not None:
                groups.append(centroid)
        else:  # a series-level finding without a mask (absent): image-level group over the series
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, finding_type=coded(label.code), algorithm_id=algorithm(spec, label.threshold),
                measurements=measurements, qualitative_evaluations=[evaluation]))
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="edged", manufacturer_name="edged", model_name=f"edged {__version__}"))
    modality = str(getattr(evidence[0], "Modality", ""))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURES.get(modality, IMAGING_PROCEDURE),
        imaging_measurements=groups)
    sr = Comprehensive3DSR(
        evidence=[*evidence, *extra_evidence], content=report[0], series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer="edged",
        is_complete=True, is_final=False, is_verified=False,
        series_description=f"edged {spec.name} {spec.version}"[:64],
        previous_versions=[predecessor] if predecessor is not None else None,
    )
    if full_groups:
        _put_back_per_image_items(sr, full_groups)
    return sr


def _put_back_per_image_items(sr: Comprehensive3DSR, full_groups: dict[int, list[tuple[Dataset, list[Dataset]]]]) -> None:
    """Give the document's image-level groups their per-image items.

    highdicom's document constructor deep-copies its whole content tree, parses the copy back into its
    own classes and searches it twice for image references: with one measurement and one source image
    per positive slice that was most of an SR's cost, growing with the findings. So the constructor gets
    each group without its per-image items, and here they are put where highdicom puts them in a group
    built with them (:func:`_image_level_group`): each image's measurements after the group's own
    probability, before its qualitative evaluation, and the source images last (tests/unit/test_sr.py:
    the documents are the same). What the constructor's search would have checked, that every image
    referenced is evidence, holds by construction: :func:`_per_image_items` finds each image it references
    among the evidence. The returned object's parsed ``content`` view is highdicom's of the constructor's
    content; the dataset (what is written and sent) is the full document."""
    (container,) = [item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value]
    for index, items in full_groups.items():
        target = container.ContentSequence[index]
        content = list(target.ContentSequence)
        # per_image=False: [... the group's probability (NUM), its qualitative evaluation (CODE)]
        assert content[-1].ValueType == "CODE" and content[-2].ValueType == "NUM"
        full = [*content[:-1], *(m for _, measurements in items for m in measurements), content[-1],
                *(source for source, _ in items)]
        # as a plain pydicom sequence: highdicom's own checks its items are its classes (the raw ones are not)
        Dataset.__setitem__(target, _CONTENT, DataElement(_CONTENT, "SQ", Sequence(full)))
    # pydicom corrects ambiguous VRs (US or SS, ...) when it writes a dataset it did not read, walking all
    # of its tree, and that walk parses every raw sequence it meets: the per-image items would be parsed and
    # encoded again after all. Their ancestors (none has an element of ambiguous VR itself) are marked as
    # read in the encoding the document is written in, so the walk starts below them: every other dataset
    # in the document is still corrected by pydicom as it is written (its own encoding is unknown).
    for ds in (sr, container, *(container.ContentSequence[i] for i in full_groups)):
        if any(" or " in e.VR for e in ds.elements()):
            return
    syntax = sr.file_meta.TransferSyntaxUID
    for ds in (sr, container, *(container.ContentSequence[i] for i in full_groups)):
        ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, ds._character_set)
