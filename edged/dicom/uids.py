"""UIDs edged derives. Results get UIDs derived deterministically from what they are about
(source series, model, model version, generation), so running the same job again gives the same
UIDs, and a PACS sees a resend as the same object, never a second one."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid


def derived_uid(*parts: object) -> str:
    """A UID under pydicom's root, a hash of ``parts`` (same parts, same UID)."""
    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["edged", *map(str, parts)]))


@dataclass(frozen=True)
class ResultUids:
    """UIDs of the SR and SEG written for one model's report on one source series."""

    sr_series: str
    sr_instance: str
    seg_series: str
    seg_instance: str


def result_uids(source_series_uid: str, model: str, version: str, generation: int) -> ResultUids:
    """Series UIDs stay the same across generations (a superseding report joins the same series);
    instance UIDs differ per generation."""
    return ResultUids(
        sr_series=derived_uid("sr-series", source_series_uid, model, version),
        sr_instance=derived_uid("sr", source_series_uid, model, version, generation),
        seg_series=derived_uid("seg-series", source_series_uid, model, version),
        seg_instance=derived_uid("seg", source_series_uid, model, version, generation),
    )


def device_uid() -> str:
    """This edge box as a device observer (TID 1004): stable for a host name."""
    return derived_uid("device", socket.gethostname())
