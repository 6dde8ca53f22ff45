"""Native parsing of text columns into integers, and hashing of categorical values into bags.

A text column is laid out as Apache Arrow lays out a binary/string array:
``offsets`` (int32, ``n + 1`` of them; value ``i`` is
``data[offsets[i]:offsets[i + 1]]``), the bytes ``data`` and an optional
validity bitmap (bit ``bit0 + i``, least significant bit first; 0: null).  A
null or empty value is missing.  Each function is one pass in C (cffi; the GIL
is released), so a reader can hand over a parsed block's buffers without
copying them and without any Python code per value.

>>> data = np.frombuffer(b"12-7x1ff", dtype=np.uint8)
>>> parse_decimal(np.array([0, 2, 4, 4], np.int32), data)[0].tolist()
[12, -7, 0]
>>> parse_hex(np.array([0, 2, 4, 4, 8], np.int32), data)
Traceback (most recent call last):
...
flexemr.core.textcols.MalformedValue: value 1 is malformed
>>> parse_hex(np.array([5, 8, 8], np.int32), data).tolist()
[511, -1]

:func:`hash_bags` maps raw categorical values (``-1``: missing) to table
rows, with the same stable mix as :func:`flexemr.apps.criteo.hash_ids`
(splitmix64's finaliser, then ``% num_rows``), straight into the
``values``/``offsets`` layout of a :class:`~flexemr.JaggedBatch`; and
:func:`first_empty_line` finds an empty line in a block of text (memchr speed):

>>> ids, offsets = hash_bags(np.array([[0x68fd1e64, -1, 0]]), [1460])
>>> ids.tolist(), offsets.tolist()
([693, 415], [0, 1, 1, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._native._flexemr_criteo import ffi, lib
from .errors import InputError

__all__ = ["MAX_HEX_DIGITS", "MalformedValue", "first_empty_line", "hash_bags", "parse_decimal", "parse_hex"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: Hex digits that always fit in an int64 (a longer value is malformed).
MAX_HEX_DIGITS = 15
_I64 = np.iinfo(np.int64)


class MalformedValue(InputError):
    """Value :attr:`row` (0-based) of a text column is malformed (or its offsets are out of bounds)."""

    def __init__(self, row: int, what: str = "is malformed") -> None:
        self.row = int(row)
        super().__init__(f"value {self.row} {what}")


def _column(offsets: Any, data: Any, validity: Any, bit0: int) -> tuple[Any, Any, Any, int, int]:
    """cffi pointers of a text column, checked so that C reads only inside the buffers."""
    offs = np.asarray(offsets)
    if offs.dtype != np.int32 or offs.ndim != 1 or offs.size < 1:
        raise InputError(f"offsets must be a 1-D int32 array of n + 1 entries, got {offs.dtype} {offs.shape}")
    offs = np.ascontiguousarray(offs)
    n = offs.size - 1
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if n and (int(offs[0]) < 0 or int(offs[-1]) > raw.size):
        raise InputError(f"offsets run from {int(offs[0])} to {int(offs[-1])}, outside the {raw.size} data bytes")
    bits = ffi.NULL
    if validity is not None:
        vb = np.frombuffer(validity, dtype=np.uint8)
        if bit0 < 0 or vb.size * 8 < bit0 + n:
            raise InputError(f"the validity bitmap has {vb.size * 8} bits, needs {bit0 + n}")
        bits = ffi.from_buffer("uint8_t[]", vb)
    if not raw.flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
    return ffi.from_buffer("int32_t[]", offs), ffi.from_buffer("uint8_t[]", raw), bits, n, raw.size


def _check(got: int, n_ok: int = -1) -> None:
    if got >= 0:
        raise MalformedValue(got)
    if got != n_ok:
        raise MalformedValue(-2 - got, "has offsets that are decreasing or out of bounds")


def parse_decimal(offsets: npt.ArrayLike, data: Any, *, validity: Any = None, bit0: int = 0, lo: int = int(_I64.min),
                  hi: int = int(_I64.max), missing_ok: bool = True, out: IntArray | None = None,
                  missing: BoolArray | None = None) -> tuple[IntArray, BoolArray]:
    """``(values, missing)`` of a column of decimal integers (missing values: 0 and ``True``).

    A value is an optional ``-`` and at least one digit (no spaces, ``+`` or
    ``0x``) within ``[lo, hi]``; with ``missing_ok=False`` a missing value is
    malformed too.  Into ``out`` and ``missing`` (contiguous) when given.  The
    first malformed value raises :class:`MalformedValue`.
    """
    offs, raw, bits, n, size = _column(offsets, data, validity, bit0)
    out = _into(out, n, np.dtype(np.int64), "out")
    missing = _into(missing, n, np.dtype(np.bool_), "missing")
    _check(lib.fxc_parse_dec(bits, bit0, offs, raw, size, n, int(lo), int(hi), int(bool(missing_ok)),
                             ffi.from_buffer("int64_t[]", out), ffi.from_buffer("uint8_t[]", missing)))
    return out, missing


def _into(arr: Any, n: int, dtype: np.dtype[Any], name: str) -> Any:
    """``arr`` checked to be a writable contiguous ``[n]`` array of ``dtype``, or a new one."""
    if arr is None:
        return np.empty(n, dtype=dtype)
    if arr.dtype != dtype or arr.shape != (n,) or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise InputError(f"{name} must be a writable contiguous {dtype} array of {n}, got {arr.dtype} {arr.shape}")
    return arr


def parse_hex(offsets: npt.ArrayLike, data: Any, *, validity: Any = None, bit0: int = 0,
              max_digits: int = MAX_HEX_DIGITS, out: IntArray | None = None) -> IntArray:
    """Values of a column of hex strings (1 to ``max_digits`` digits, either case), ``-1`` where missing.

    Into ``out`` (int64, contiguous) when given.  The first malformed value raises :class:`MalformedValue`.
    """
    if not 1 <= max_digits <= MAX_HEX_DIGITS:
        raise InputError(f"max_digits must be in [1, {MAX_HEX_DIGITS}], got {max_digits}")
    offs, raw, bits, n, size = _column(offsets, data, validity, bit0)
    out = _into(out, n, np.dtype(np.int64), "out")
    _check(lib.fxc_parse_hex(bits, bit0, offs, raw, size, n, int(max_digits), ffi.from_buffer("int64_t[]", out)))
    return out


def hash_bags(values: npt.ArrayLike, num_rows: Sequence[int], salts: Sequence[int] | None = None
              ) -> tuple[IntArray, IntArray]:
    """``(ids, offsets)`` of the bags of ``values`` (``[features, samples]``, any strides; ``< 0``: missing).

    Feature ``f``'s value ``v`` becomes row ``mix(v, salts[f]) % num_rows[f]``
    (``salts`` default to ``0, 1, ...``: the feature numbers of
    :func:`flexemr.apps.criteo.hash_ids`); a missing value, an empty bag.
    ``ids`` holds the rows, feature by feature, and bag ``f * samples + i``
    is ``ids[offsets[f * samples + i]:offsets[f * samples + i + 1]]`` (0 or 1
    id): a :class:`~flexemr.JaggedBatch`'s ``values`` and ``offsets``.
    """
    v = np.asarray(values)
    if v.ndim != 2 or v.dtype != np.int64:
        raise InputError(f"values must be a 2-D int64 array [features, samples], got {v.dtype} {v.shape}")
    nfeat, n = v.shape
    if v.strides[0] % 8 or v.strides[1] % 8:
        v = np.ascontiguousarray(v)
    rows = np.asarray(num_rows, dtype=np.int64).reshape(-1)
    if rows.size != nfeat or (rows.size and rows.min() < 1):
        raise InputError(f"need one num_rows >= 1 per feature ({nfeat}), got {rows.tolist()}")
    salt = np.arange(nfeat, dtype=np.int64) if salts is None else np.asarray(salts, dtype=np.int64).reshape(-1)
    if salt.size != nfeat:
        raise InputError(f"need one salt per feature ({nfeat}), got {salt.size}")
    ids = np.empty(nfeat * n, dtype=np.int64)
    offsets = np.zeros(1, dtype=np.int64) if ids.size == 0 else np.empty(nfeat * n + 1, dtype=np.int64)
    if ids.size == 0:
        return ids, offsets
    # a pointer to the first element and strides in elements: negative strides are fine too
    base = ffi.cast("int64_t *", v.__array_interface__["data"][0])
    k = lib.fxc_hash_bags(base, v.strides[0] // 8, v.strides[1] // 8, n, nfeat,
                          ffi.from_buffer("int64_t[]", salt), ffi.from_buffer("uint64_t[]", rows.view(np.uint64)),
                          ffi.from_buffer("int64_t[]", ids), ffi.from_buffer("int64_t[]", offsets))
    return ids[:k], offsets


def first_empty_line(data: bytes | bytearray | memoryview) -> int:
    r"""Where the first empty line of ``data`` starts (line ends ``\n``, ``\r`` and ``\r\n``), or ``-1``.

    >>> first_empty_line(b"a\r\nb\n\nc"), first_empty_line(b"a\r\n"), first_empty_line(b"\na")
    (5, -1, 0)
    """
    raw = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    return int(lib.fxc_empty_line(ffi.from_buffer("uint8_t[]", raw), len(raw)))
