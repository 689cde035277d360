"""DICOM SCU helpers: C-ECHO and C-STORE of files, used by ``edged echo`` and ``edged send``.

Files with complete file meta are sent as they are on disk, without decoding
(pynetdicom's chunked send); files without file meta are decoded and sent as datasets.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edged.dicom import requestor
from edged.errors import DicomNetworkError

#: Send files from disk as they are (no decode/re-encode) when they have file meta.
_config.STORE_SEND_CHUNKED_DATASET = True

#: A-ASSOCIATE-RQ may propose at most 128 presentation contexts (PS3.8 9.3.2.2: odd IDs 1..255).
MAX_CONTEXTS = 128


def _ae(aet: str, timeout: float) -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def _associate(ae: AE, host: str, port: int, aec: str, tls: object | None = None) -> object:
    peer = f"{host}:{port}"
    try:
        # requestor: a quick rejection is reported as one, responses stay for the call that waits for them
        assoc = requestor.associate(ae, host, port, ae_title=aec, tls_args=tls)
    except OSError as exc:
        raise DicomNetworkError(peer, f"cannot connect: {exc}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise DicomNetworkError(peer, "association rejected (check the called and calling AE titles)")
    raise DicomNetworkError(peer, "association aborted or connection failed")


def echo(host: str, port: int, *, aet: str = "EDGED", aec: str = "ANY-SCP", timeout: float = 30.0) -> int:
    """C-ECHO the peer; returns the DIMSE status. Raises DicomNetworkError if it can't associate."""
    ae = _ae(aet, timeout)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, aec)
    try:
        rsp = assoc.send_c_echo()  # type: ignore[attr-defined]
        if not rsp or "Status" not in rsp:
            raise DicomNetworkError(f"{host}:{port}", "no C-ECHO response")
        return int(rsp.Status)
    finally:
        assoc.release()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SendItem:
    """One file to send: raw (path, as on disk) or decoded (dataset)."""

    path: Path
    sop_class: str
    transfer_syntax: str
    dataset: Dataset | None = None


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under the given files and folders, in a stable order."""
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield p


def prepare(path: Path) -> SendItem:
    """Work out how to send ``path``. Raises ValueError with a reason when it can't be sent."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        if all(k in meta for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")):
            return SendItem(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    except InvalidDicomError:
        pass
    except Exception as exc:
        raise ValueError(f"not readable as DICOM ({type(exc).__name__})") from None
    try:
        ds = dcmread(path, force=True)
        sop_class = str(ds.SOPClassUID)
        str(ds.SOPInstanceUID)
    except Exception as exc:
        raise ValueError(f"not a DICOM dataset ({type(exc).__name__})") from None
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return SendItem(path, sop_class, str(ts or ImplicitVRLittleEndian), dataset=ds)


def _chunks(items: list[SendItem]) -> Iterator[tuple[list[SendItem], list[tuple[str, str]]]]:
    """Group items so each association proposes at most MAX_CONTEXTS contexts."""
    batch: list[SendItem] = []
    contexts: list[tuple[str, str]] = []
    for item in items:
        key = (item.sop_class, item.transfer_syntax)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch, contexts
            batch, contexts = [], []
        if key not in contexts:
            contexts.append(key)
        batch.append(item)
    if batch:
        yield batch, contexts


def send_iter(
    paths: Iterable[Path],
    host: str,
    port: int,
    *,
    aet: str = "EDGED",
    aec: str = "ANY-SCP",
    timeout: float = 60.0,
) -> Iterator[tuple[Path, str]]:
    """C-STORE every file, yielding ``(path, outcome)`` as each is answered.

    Outcomes: the DIMSE status as ``0xNNNN``; ``unreadable`` (not DICOM), ``no_context`` (the peer
    accepted no presentation context for the file's SOP class and transfer syntax), ``not_sendable``
    (pynetdicom could not encode it) or ``no_response`` (association lost before an answer).
    """
    items: list[SendItem] = []
    for f in iter_files(paths):
        try:
            items.append(prepare(f))
        except ValueError:
            yield f, "unreadable"
    for batch, contexts in _chunks(items):
        ae = _ae(aet, timeout)
        for sop_class, ts in contexts:
            ae.add_requested_context(sop_class, [ts])
        assoc = _associate(ae, host, port, aec)
        try:
            for item in batch:
                if not assoc.is_established:  # type: ignore[attr-defined]
                    assoc = _associate(ae, host, port, aec)
                accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                            for cx in assoc.accepted_contexts}  # type: ignore[attr-defined]
                if (item.sop_class, item.transfer_syntax) not in accepted:
                    yield item.path, "no_context"
                    continue
                try:
                    rsp = assoc.send_c_store(item.dataset if item.dataset is not None else item.path)  # type: ignore[attr-defined]
                    outcome = f"0x{int(rsp.Status):04X}" if rsp and "Status" in rsp else "no_response"
                except (ValueError, AttributeError, TypeError):
                    outcome = "not_sendable"
                yield item.path, outcome
        finally:
            if assoc.is_established:  # type: ignore[attr-defined]
                assoc.release()  # type: ignore[attr-defined]


def send(
    paths: Iterable[Path],
    host: str,
    port: int,
    *,
    aet: str = "EDGED",
    aec: str = "ANY-SCP",
    timeout: float = 60.0,
    progress: Callable[[int, int], None] | None = None,
) -> Counter[str]:
    """C-STORE every file; returns a count per outcome (see :func:`send_iter`)."""
    files = list(iter_files(paths))
    outcomes: Counter[str] = Counter()
    for _, outcome in send_iter(files, host, port, aet=aet, aec=aec, timeout=timeout):
        outcomes[outcome] += 1
        if progress:
            progress(sum(outcomes.values()), len(files))
    return outcomes
