"""The shared supported contexts: one list for every association, and negotiation still right."""

from __future__ import annotations

import copy

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from edged.config import DicomConfig
from edged.dicom.contexts import SharedContexts
from edged.dicom.scp import build_ae


def _rq(context_id: int, syntaxes: list[str]) -> PresentationContext:
    cx = PresentationContext()
    cx.context_id = context_id
    cx.abstract_syntax = CTImageStorage
    cx.transfer_syntax = syntaxes
    return cx


def test_deepcopy_shares_the_list() -> None:
    shared = SharedContexts(build_ae(DicomConfig()).supported_contexts)
    assert len(shared) > 100 and all(len(cx.transfer_syntax) >= 13 for cx in shared[1:])  # storage classes x syntaxes
    assert copy.deepcopy(shared) is shared


def test_negotiation_reads_and_does_not_change_the_shared_contexts() -> None:
    shared = SharedContexts(build_ae(DicomConfig()).supported_contexts)
    before = [(str(cx.abstract_syntax), list(cx.transfer_syntax)) for cx in shared]
    for _ in range(3):  # as three associations would
        result, _ = negotiate_as_acceptor([_rq(1, [RLELossless]), _rq(3, [ImplicitVRLittleEndian])], shared, {})
        accepted = {cx.context_id: str(cx.transfer_syntax[0]) for cx in result if cx.result == 0}
        assert accepted == {1: RLELossless, 3: ImplicitVRLittleEndian}
    assert [(str(cx.abstract_syntax), list(cx.transfer_syntax)) for cx in shared] == before
    assert all(r is not s for r in result for s in shared)  # results are new objects
    assert ExplicitVRLittleEndian in shared[-1].transfer_syntax
