"""DICOM Segmentation (binary) for a segmentation model's masks, with highdicom."""

from __future__ import annotations

import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.seg import Segmentation, SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from edged import __version__
from edged.inference.repository import Code, ModelSpec
from highdicom.sr.coding import CodedConcept

SEG_SERIES_NUMBER = 9902


def coded(code: Code) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def algorithm_identification(spec: ModelSpec) -> AlgorithmIdentificationSequence:
    """Algorithm Identification (PS3.3 C.8.20.2, the SEG counterpart of TID 4019)."""
    return AlgorithmIdentificationSequence(name=spec.name, family=codes.cid7162.ArtificialIntelligence,
                                           version=spec.version, source="edged")


def build_segmentation(*, spec: ModelSpec, sources: list[Dataset], masks: list[tuple[int, np.ndarray]],
                       series_uid: str, sop_uid: str, instance_number: int) -> Segmentation:
    """A binary SEG: ``masks`` are (label index, bool mask of shape (planes, rows, columns)) in the order of
    ``sources`` (header-only datasets of the source images, one per plane). Segment n describes label n
    with its coded category and type and the algorithm that made it."""
    labels = [label for out in spec.outputs for label in out.labels]
    descriptions = []
    stacked = []
    for number, (label_index, _) in enumerate(masks, start=1):
        label = labels[label_index]
        assert label.category is not None  # model.toml validation requires it for segmentation models
        descriptions.append(SegmentDescription(
            segment_number=number, segment_label=label.name, segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.code), algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(spec)))
    for _, mask in masks:
        stacked.append(mask.astype(bool))
    pixel_array = np.stack(stacked, axis=-1)  # (planes, rows, columns, segments)
    return Segmentation(
        source_images=sources, pixel_array=pixel_array, segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer="edged",
        manufacturer_model_name="edged", software_versions=__version__, device_serial_number="0",
        series_description=f"edged {spec.name} {spec.version} SEG"[:64], omit_empty_frames=True,
        content_label="EDGED_SEG", content_description=f"{spec.name} {spec.version}"[:64],
    )
