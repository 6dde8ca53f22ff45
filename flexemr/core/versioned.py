"""The versioned (updatable) row layout: seqlock headers with checksums (pure numpy, sans I/O).

A plan built with ``versioned=True`` stores every shard region as *slots*
followed by one control block::

    slot r  (r = row - shard.row_start), SLOT = 8 + pad8(row_bytes) bytes at r * SLOT:
        u64 header   low 32 bits: version (even = stable, odd = a writer is at work)
                     high 32 bits: checksum(table, row, version, data)
        row_bytes    the row's values (table dtype), then zero padding to 8 bytes
    control block (CTL_BYTES = 64 bytes at rows * SLOT, 8-byte aligned):
        u64 LOCK     0 = free, else the token of the writer holding the shard
        u64 GEN      mutations (updates, resyncs) applied to this replica
        u64 MEMBERS  bit i set: replica i of the shard is in service (as this replica knows it)

A reader reads whole slots (runs of consecutive rows are still one read, now
strided by ``SLOT``) and accepts a row only if its version is even *and* the
stored checksum equals :func:`checksum` of what it read; anything else -- a
write in progress, a torn mix of two versions, bytes of another row or table
-- fails the check and is read again (FaRM/Pilaf style).  The checksum mixes
the table name, the row id and the version into a 64-bit multiply-add over the
row's 32-bit words, folded to 32 bits; it is computed for a whole batch at once
(:func:`validate_slots`).

>>> from flexemr.core.spec import TableSpec
>>> spec = TableSpec("t", 10, 3)
>>> slot_bytes(spec)                                   # 8 header + 12 data + 4 padding
24
>>> data = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> slots = pack_slots(spec, data, np.array([4, 7]), np.array([0, 2]))
>>> validate_slots(spec, slots, np.array([4, 7])).tolist()
[True, True]
>>> validate_slots(spec, slots, np.array([4, 8])).tolist()   # row 8 is not what was stored there
[True, False]
>>> row_data(spec, slots).tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .spec import TableSpec

__all__ = [
    "CTL_BYTES",
    "CTL_GEN",
    "CTL_LOCK",
    "CTL_MEMBERS",
    "HEADER_BYTES",
    "Ctl",
    "checksum",
    "ctl_offset",
    "pack_slots",
    "region_bytes",
    "row_data",
    "slot_bytes",
    "validate_slots",
    "versions_of",
]

HEADER_BYTES = 8
CTL_BYTES = 64
CTL_LOCK = 0
CTL_GEN = 8
CTL_MEMBERS = 16

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_ROW_MUL = np.uint64(0x9E3779B97F4A7C15)
_VER_MUL = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_WEIGHTS: dict[int, npt.NDArray[np.uint64]] = {}


class Ctl(NamedTuple):
    """The three control words of one shard replica."""

    lock: int
    gen: int
    members: int


def slot_bytes(spec: TableSpec) -> int:
    """Bytes of one slot: the 8-byte header plus the row padded to a multiple of 8."""
    return HEADER_BYTES + -(-spec.row_bytes // 8) * 8


def ctl_offset(spec: TableSpec, num_rows: int) -> int:
    """Offset of the control block in a region of ``num_rows`` slots."""
    return num_rows * slot_bytes(spec)


def region_bytes(spec: TableSpec, num_rows: int) -> int:
    """Bytes of a versioned shard region of ``num_rows`` rows (slots + control block)."""
    return ctl_offset(spec, num_rows) + CTL_BYTES


def _weights(words: int) -> npt.NDArray[np.uint64]:
    w = _WEIGHTS.get(words)
    if w is None:  # odd 64-bit multipliers, one per 32-bit word position (splitmix64 of the position)
        x = (np.arange(1, words + 1, dtype=np.uint64) * _ROW_MUL) & _M64
        x ^= x >> np.uint64(30)
        x = (x * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x ^= x >> np.uint64(27)
        w = _WEIGHTS[words] = x | np.uint64(1)
    return w


def _salt(table: str) -> np.uint64:
    return np.uint64(zlib.crc32(table.encode()) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF)


def checksum(spec: TableSpec, padded: npt.NDArray[np.uint8], rows: npt.NDArray[np.int64],
             versions: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """32-bit checksums (as ``uint64``) of ``[n, pad8(row_bytes)]`` row bytes, one per row.

    Vectorised over the batch: one ``[n, words]`` multiply and a row sum.
    """
    n = padded.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    words = np.ascontiguousarray(padded).view(np.uint32).reshape(n, -1)
    with np.errstate(over="ignore"):
        h = (words.astype(np.uint64) * _weights(words.shape[1])).sum(axis=1, dtype=np.uint64)
        h ^= rows.astype(np.uint64) * _ROW_MUL + versions.astype(np.uint64) * _VER_MUL + _salt(spec.name)
        h ^= h >> np.uint64(33)
        h *= _MIX1
        h ^= h >> np.uint64(29)
        h *= _MIX2
        h ^= h >> np.uint64(32)
    out: npt.NDArray[np.uint64] = h & _LOW32
    return out


def pack_slots(spec: TableSpec, data: npt.NDArray[Any], rows: npt.NDArray[np.int64],
               versions: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """``[n, SLOT]`` slot bytes for rows ``rows`` holding ``data`` at (even) ``versions``."""
    n = int(rows.size)
    slot = slot_bytes(spec)
    out = np.zeros((n, slot), dtype=np.uint8)
    if n:
        out[:, HEADER_BYTES : HEADER_BYTES + spec.row_bytes] = (
            np.ascontiguousarray(data, dtype=spec.np_dtype).view(np.uint8).reshape(n, spec.row_bytes))
        ver = versions.astype(np.uint64)
        hdr = (checksum(spec, out[:, HEADER_BYTES:], rows, ver) << np.uint64(32)) | (ver & _LOW32)
        out[:, :HEADER_BYTES] = hdr.view(np.uint8).reshape(n, HEADER_BYTES)
    return out


def versions_of(slots_or_headers: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Versions in ``[n, >=8]`` slot (or bare header) bytes."""
    hdr = np.ascontiguousarray(slots_or_headers[:, :HEADER_BYTES]).view(np.uint64).reshape(-1)
    out: npt.NDArray[np.uint64] = hdr & _LOW32
    return out


def validate_slots(spec: TableSpec, slots: npt.NDArray[np.uint8], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which of the ``[n, SLOT]`` slots read for table rows ``rows`` hold a stable, intact row."""
    if slots.shape[0] == 0:
        return np.zeros(0, dtype=np.bool_)
    hdr = np.ascontiguousarray(slots[:, :HEADER_BYTES]).view(np.uint64).reshape(-1)
    ver = hdr & _LOW32
    ok: npt.NDArray[np.bool_] = ((ver & np.uint64(1)) == 0) & (
        (hdr >> np.uint64(32)) == checksum(spec, slots[:, HEADER_BYTES:], rows, ver))
    return ok


def row_data(spec: TableSpec, slots: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
    """The ``[n, dim]`` row values inside ``[n, SLOT]`` slots (a strided view, no copy)."""
    n = slots.shape[0]
    if n == 0:
        return np.zeros((0, spec.dim), dtype=spec.np_dtype)
    view: npt.NDArray[Any] = slots[:, HEADER_BYTES : HEADER_BYTES + spec.row_bytes].view(spec.np_dtype)
    return view.reshape(n, spec.dim)
