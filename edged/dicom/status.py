"""DIMSE status codes edged answers with (PS3.4 Annex B, Storage Service Class; PS3.7 Annex C).

Failure codes in 0xC000-0xCFFF are "Cannot understand" codes whose meaning the standard leaves to the
implementation; edged's are listed here with the comment it sends in (0000,0902) Error Comment.
Comments never carry patient data or UIDs.
"""

from __future__ import annotations

SUCCESS = 0x0000
#: Refused: Out of Resources. Disk below ``min_free_bytes``, ``max_pending`` reached, journal closed.
OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class (class or instance UID differs from the command).
DATASET_MISMATCH = 0xA900
#: Cannot understand: the dataset could not be decoded.
CANNOT_DECODE = 0xC210
#: Cannot understand: the dataset has no SOP Instance UID (0008,0018).
NO_SOP_INSTANCE_UID = 0xC220

#: Short fixed names for logs and metric labels.
NAMES = {
    SUCCESS: "success",
    OUT_OF_RESOURCES: "out_of_resources",
    DATASET_MISMATCH: "dataset_mismatch",
    CANNOT_DECODE: "cannot_decode",
    NO_SOP_INSTANCE_UID: "no_sop_instance_uid",
}
