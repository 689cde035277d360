"""A seeded mutator of encoded DICOM datasets and DICOM upper-layer byte streams, for the fuzz tests.

Everything here is deterministic for a given seed: the same case number always gives the same bytes,
so a failure found by ``tests/integration/test_fuzz.py`` is reproduced with ``case(n)`` alone.

Datasets are mutated as encoded bytes (never through pydicom, which would refuse or repair them):
bit flips, truncation, elements cut short, wrong VR codes, huge and undefined lengths, bogus sequences
and items, bad pixel data (wrong length, wrong Rows/BitsAllocated, corrupt encapsulated fragments),
and missing or garbled SOP Instance UIDs. Every case gets its own SOP Instance UID before it is mutated,
so the instances a daemon stores can be counted and compared byte for byte with what was sent.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from edged.synthetic import ct_slice

#: Per-case UIDs: a fixed-width number keeps every case's encoded length equal to its seed's.
_SOP_ROOT = "1.2.826.0.1.3680043.8.498.77."
_SERIES_ROOT = "1.2.826.0.1.3680043.8.498.78."
_STUDY_UID = "1.2.826.0.1.3680043.8.498.79.1"
_WIDTH = 10
#: Cases of one seed share a series in groups of this many (a report per series stays small).
SERIES_SIZE = 100

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
        b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
        b"UL", b"UN", b"UR", b"US", b"UT", b"UV"]
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def sop_uid(case: int) -> str:
    return f"{_SOP_ROOT}{10**_WIDTH + case}"


def _series_uid(group: int) -> str:
    return f"{_SERIES_ROOT}{10**_WIDTH + group}"


@dataclass(frozen=True)
class Element:
    """One top-level element of an encoded dataset: byte offsets of its header and value."""

    start: int
    tag: int
    vr: bytes | None  # None in implicit VR
    value_start: int
    end: int
    length: int  # as encoded (0xFFFFFFFF: undefined)
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4


def _skip_undefined(data: bytes, pos: int) -> int:
    """Offset just past the Sequence Delimitation Item matching an undefined length at ``pos``."""
    depth = 1
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END or tag == _ITEM_END:
            if tag == _SEQ_END:
                depth -= 1
                if depth == 0:
                    return pos
            continue
        if tag == _ITEM:
            if length != _UNDEFINED:
                pos += length
            continue
        # an element inside an item of undefined length: step over it (explicit or implicit alike)
        vr = data[pos - 4 : pos - 2]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos)
            pos += 4
        elif vr.isalpha() and vr.isupper():
            length = struct.unpack_from("<H", data, pos - 2)[0]
        if length == _UNDEFINED:
            depth += 1
        else:
            pos += length
    raise ValueError("no sequence delimiter")


def elements(data: bytes, explicit: bool) -> list[Element]:
    """The top-level elements of a little-endian dataset (a valid seed: mutated data is never parsed)."""
    out: list[Element] = []
    pos = 0
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | elem
        if explicit:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                length_at, size = pos + 8, 4
            else:
                length_at, size = pos + 6, 2
        else:
            vr, length_at, size = None, pos + 4, 4
        length = struct.unpack_from("<I" if size == 4 else "<H", data, length_at)[0]
        value_start = length_at + size
        end = _skip_undefined(data, value_start) if length == _UNDEFINED else value_start + length
        out.append(Element(pos, tag, vr, value_start, end, length, length_at, size))
        pos = end
    return out


@dataclass(frozen=True)
class Seed:
    name: str
    transfer_syntax: str
    data: bytes  # encoded dataset (no file meta); deflated seeds are kept inflated here

    @property
    def explicit(self) -> bool:
        return self.transfer_syntax != ImplicitVRLittleEndian


def _encode(ds: Dataset, ts: str) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    return buf.getvalue()


def _slice(rows: int, cols: int, index: int) -> Dataset:
    ds = ct_slice(index, study_uid=_STUDY_UID, series_uid=_series_uid(0), rows=rows, columns=cols, seed=index)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid(0)
    return ds


def seeds() -> list[Seed]:
    """Small valid CT slices in the transfer syntaxes edged accepts most often."""
    out = []
    plain = _slice(64, 64, 0)
    out.append(Seed("ct64-explicit", ExplicitVRLittleEndian, _encode(plain, ExplicitVRLittleEndian)))
    out.append(Seed("ct64-implicit", ImplicitVRLittleEndian, _encode(_slice(64, 64, 1), ImplicitVRLittleEndian)))
    out.append(Seed("ct64-deflated", DeflatedExplicitVRLittleEndian, _encode(_slice(64, 64, 2), ExplicitVRLittleEndian)))
    rle = _slice(64, 64, 3)
    rle.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    out.append(Seed("ct64-rle", RLELossless, _encode(rle, ExplicitVRLittleEndian)))
    # With a sequence (undefined length), so sequence mutations have something to bite on.
    seq = _slice(48, 80, 4)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    seq.AnatomicRegionSequence = [item]
    out.append(Seed("ct48x80-sequence", ExplicitVRLittleEndian, _encode(seq, ExplicitVRLittleEndian)))
    return out


# -- mutations: each takes (rng, seed, data, elements) and returns new bytes --------------------------


def _u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def _pick(rng: random.Random, els: list[Element], *, before_pixels: bool = True) -> Element:
    pool = [e for e in els if e.tag < _PIXEL_DATA] if before_pixels else els
    return rng.choice(pool or els)


def _set_length(data: bytearray, e: Element, value: int) -> None:
    if e.length_size == 4:
        struct.pack_into("<I", data, e.length_at, value & 0xFFFFFFFF)
    else:
        struct.pack_into("<H", data, e.length_at, value & 0xFFFF)


def bit_flips(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    out = bytearray(data)
    header_end = next((e.start for e in els if e.tag >= _PIXEL_DATA), len(data))
    if not out:
        return data
    for _ in range(rng.randint(1, 8)):
        # mostly in the header, where a flip changes structure; sometimes anywhere
        pos = rng.randrange(min(header_end, len(out)) if rng.random() < 0.8 else len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def cut_element(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    """An element's value cut short while its length still claims the whole value."""
    e = _pick(rng, [e for e in els if e.end > e.value_start] or els, before_pixels=rng.random() < 0.7)
    keep = rng.randrange(e.value_start, max(e.value_start + 1, e.end))
    return data[:keep] + data[e.end :] if rng.random() < 0.7 else data[:keep]


def wrong_vr(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    if not seed.explicit:
        return bit_flips(rng, seed, data, els)
    e = _pick(rng, els, before_pixels=rng.random() < 0.8)
    vr = rng.choice(_VRS) if rng.random() < 0.8 else bytes(rng.randrange(256) for _ in range(2))
    out = bytearray(data)
    out[e.start + 4 : e.start + 6] = vr
    return bytes(out)


def huge_length(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    e = _pick(rng, els, before_pixels=rng.random() < 0.7)
    out = bytearray(data)
    big = rng.choice([_UNDEFINED, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, len(data) + rng.randint(1, 1 << 20),
                      rng.randrange(1 << 32)]) if e.length_size == 4 else rng.choice([0xFFFF, 0xFFFE, 0x8000])
    _set_length(out, e, big)
    return bytes(out)


def _item(payload: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(payload) if length is None else length) + payload


def bogus_sequence(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    """A sequence or item where none belongs, unterminated, nested deep, or with lying lengths."""
    e = _pick(rng, els)
    at = e.start if rng.random() < 0.5 else e.end
    tag = struct.pack("<HH", 0x0040, 0xA730)  # Content Sequence: not in a CT image
    head = tag + (b"SQ\x00\x00" if seed.explicit else b"")
    kind = rng.randrange(6)
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    if kind == 0:  # undefined length, never delimited
        blob = head + struct.pack("<I", _UNDEFINED) + _item(junk, _UNDEFINED)
    elif kind == 1:  # deeply nested undefined-length sequences
        depth = rng.randint(50, 400)
        blob = (head + struct.pack("<I", _UNDEFINED) + _item(b"", _UNDEFINED)) * depth
        blob += (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * rng.randint(0, depth)
    elif kind == 2:  # item length past the sequence's
        inner = _item(junk, len(junk) + rng.randint(1, 5000))
        blob = head + struct.pack("<I", len(inner)) + inner
    elif kind == 3:  # an item tag at top level
        blob = _item(junk, rng.choice([len(junk), _UNDEFINED, 0xFFFFFFF0]))
    elif kind == 4:  # delimiters at top level
        blob = struct.pack("<HHI", 0xFFFE, rng.choice([0xE00D, 0xE0DD]), rng.choice([0, 4, _UNDEFINED]))
    else:  # a defined-length sequence whose items hold garbage elements
        inner = _item(junk + bytes(rng.randrange(256) for _ in range(rng.randint(0, 20))))
        blob = head + struct.pack("<I", len(inner)) + inner
    return data[:at] + blob + data[at:]


def _set_us(data: bytes, els: list[Element], tag: int, value: int) -> bytes:
    for e in els:
        if e.tag == tag and e.end - e.value_start == 2:
            return data[: e.value_start] + _u16(value) + data[e.end :]
    return data


def _set_text(data: bytes, els: list[Element], tag: int, text: bytes) -> bytes:
    """Replace a short-VR element's value (length field rewritten; padded to even length)."""
    for e in els:
        if e.tag == tag:
            if len(text) % 2:
                text += b" "
            out = bytearray(data[: e.end])
            if e.length_size == 2 and len(text) > 0xFFFF:
                text = text[:0xFFFE]
            _set_length(out, e, len(text))
            return bytes(out[: e.value_start]) + text + data[e.end :]
    return data


def bad_pixels(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    kind = rng.randrange(7)
    pix = next((e for e in els if e.tag == _PIXEL_DATA), None)
    if kind == 0:
        return _set_us(data, els, 0x00280010, rng.choice([0, 1, 63, 65, 512, 4096, 0xFFFF]))  # Rows
    if kind == 1:
        return _set_us(data, els, 0x00280100, rng.choice([0, 1, 7, 8, 12, 24, 32, 64, 0xFFFF]))  # BitsAllocated
    if kind == 2:
        tag = rng.choice([0x00280002, 0x00280011, 0x00280101, 0x00280102, 0x00280103])
        return _set_us(data, els, tag, rng.choice([0, 2, 3, 31, 0x8000, 0xFFFF]))
    if kind == 3:
        text = rng.choice([b"RGB", b"MONOCHROME1", b"PALETTE COLOR", b"YBR_FULL_422", b"", b"\xff\xfe\x00"])
        return _set_text(data, els, 0x00280004, text)  # Photometric Interpretation
    if kind == 4:
        tag = rng.choice([0x00281052, 0x00281053, 0x00280008])  # Rescale Intercept/Slope, Number of Frames
        text = rng.choice([b"nan", b"inf", b"-1e308", b"0", b"abc", b"1\\2\\3", b"99999999", b"-5"])
        if tag == 0x00280008 and not any(e.tag == tag for e in els):
            return data
        return _set_text(data, els, tag, text)
    if pix is None:
        return data
    if pix.length != _UNDEFINED or kind == 5:
        # native: value shorter/longer with a matching length field, or odd
        value = data[pix.value_start : pix.end]
        new_len = rng.choice([0, 1, len(value) // 2, len(value) - 1, len(value) + 2, len(value) * 2 + 2])
        value = (value * 3)[:new_len]
        if pix.length == _UNDEFINED:
            return data[: pix.value_start] + value
        out = bytearray(data[: pix.end])
        _set_length(out, pix, new_len)
        return bytes(out[: pix.value_start]) + value + data[pix.end :]
    # encapsulated: corrupt fragments, lying fragment lengths, a missing delimiter, a bogus offset table
    value = bytearray(data[pix.value_start : pix.end])
    what = rng.randrange(4)
    if what == 0:
        for _ in range(rng.randint(1, 30)):
            p = rng.randrange(8, len(value))
            value[p] = rng.randrange(256)
    elif what == 1:
        # second item (the first fragment) claims a wrong length
        bot_len = struct.unpack_from("<I", value, 4)[0]
        frag_at = 8 + bot_len
        if frag_at + 8 <= len(value):
            struct.pack_into("<I", value, frag_at + 4, rng.choice([0, 1, 3, 0xFFFFFFF0, _UNDEFINED]))
    elif what == 2:
        value = value[:-8]  # no Sequence Delimitation Item
    else:
        struct.pack_into("<I", value, 4, 4)
        value[8:8] = struct.pack("<I", rng.randrange(1 << 32))  # an offset table pointing anywhere
    return data[: pix.value_start] + bytes(value) + data[pix.end :]


def garble_uid(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    tag = rng.choice([0x00080018, 0x00080018, 0x00080016, 0x0020000D, 0x0020000E])
    kind = rng.randrange(5)
    e = next(e for e in els if e.tag == tag)
    if kind == 0:  # removed
        return data[: e.start] + data[e.end :]
    if kind == 1:  # empty
        return _set_text(data, els, tag, b"")
    text = data[e.value_start : e.end]
    if kind == 2:  # multi-valued
        return _set_text(data, els, tag, text.rstrip(b"\x00") + b"\\" + text.rstrip(b"\x00"))
    if kind == 3:  # not a UID at all
        return _set_text(data, els, tag, bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))))
    return _set_text(data, els, tag, text * rng.randint(2, 40))  # far too long


def shuffle_elements(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    """Two elements swapped (tags out of order) or one duplicated."""
    a, b = sorted(rng.sample(range(len(els)), 2))
    ea, eb = els[a], els[b]
    if rng.random() < 0.5:
        return data[: ea.start] + data[eb.start : eb.end] + data[ea.end : eb.start] + data[ea.start : ea.end] + data[eb.end :]
    return data[: ea.end] + data[ea.start : ea.end] + data[ea.end :]


def splice_junk(rng: random.Random, seed: Seed, data: bytes, els: list[Element]) -> bytes:
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[at:]
    return data[:at] + data[at + rng.randint(1, 64) :]


MUTATIONS = [bit_flips, truncate, cut_element, wrong_vr, huge_length, bogus_sequence, bad_pixels, garble_uid,
             shuffle_elements, splice_junk]


@dataclass(frozen=True)
class Case:
    number: int
    seed: str
    transfer_syntax: str
    mutations: tuple[str, ...]
    data: bytes  # the encoded dataset as it goes on the wire (deflated for the deflated seed)
    sop_instance_uid: str  # the UID the C-STORE request carries

    def file_bytes(self) -> bytes:
        """A DICOM file: preamble, valid file meta naming the case's UID, then the mutated dataset."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
        fp = BytesIO()
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(fp), meta, enforce_standard=True)
        return fp.getvalue() + self.data


class Mutator:
    """``case(n)``: the n-th mutated dataset for ``master_seed``; cases are independent of each other."""

    def __init__(self, master_seed: int = 0) -> None:
        self.master_seed = master_seed
        self.seeds = seeds()
        self._els = [elements(s.data, s.explicit) for s in self.seeds]
        self._sop0 = sop_uid(0).encode()
        self._series0 = _series_uid(0).encode()

    def case(self, n: int) -> Case:
        rng = random.Random(self.master_seed * 1_000_003 + n)
        i = n % len(self.seeds)
        seed = self.seeds[i]
        uid = sop_uid(n)
        data = seed.data.replace(self._sop0, uid.encode()).replace(self._series0, _series_uid(n // SERIES_SIZE).encode())
        els = self._els[i]  # same offsets: the replacements keep every length
        names = []
        for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3)):
            op = rng.choice(MUTATIONS)
            names.append(op.__name__)
            # a second mutation uses the seed's offsets, which may no longer fit: more damage, still seeded
            try:
                data = op(rng, seed, data, els)
            except (IndexError, ValueError, struct.error, StopIteration):
                data = splice_junk(rng, seed, data, els)  # offsets past a shortened stream
        if seed.transfer_syntax == DeflatedExplicitVRLittleEndian:
            c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = c.compress(data) + c.flush()
            if rng.random() < 0.2:  # now and then break the deflate stream itself
                out = bytearray(data)
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
                data = bytes(out)
                names.append("deflate_bit_flip")
        return Case(n, seed.name, seed.transfer_syntax, tuple(names), data, uid)

    def write(self, n: int, folder: Path) -> tuple[Case, Path]:
        c = self.case(n)
        path = folder / f"case{n:06d}.dcm"
        path.write_bytes(c.file_bytes())
        return c, path

