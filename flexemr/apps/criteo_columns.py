"""The columns of Criteo samples as pyarrow hands them over, checked and converted with numpy.

:func:`convert` turns the columns of one block (``label``, ``I1``..``I13``,
``C1``..``C26``; text as bytes, or already integers) into feature-major numpy
arrays.  Text is checked byte class by byte class -- decimal integers are
digits with at most a leading ``-`` (then ``pyarrow.compute.cast`` converts
them), hex strings at most 15 hex digits -- and the first malformed value
raises :class:`BadValue` with its row, what was expected and its text; an
8-digit hex column (Criteo's) is converted two digits per table lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..core.errors import InputError
from .dlrm import CATEGORICAL_FEATURES, NUM_DENSE
from .extras import require

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["BadValue", "arrow", "convert", "field_names"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

NUM_CAT = len(CATEGORICAL_FEATURES)
_MAX_HEX = 15                       # hex digits that always fit in int64

# byte classes: hex digit value (255: not a hex digit); decimal digit value, 10 for '-' (255: other)
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[48:58] = np.arange(10)
_HEX[97:103] = np.arange(10, 16)
_HEX[65:71] = np.arange(10, 16)
_DEC = np.full(256, 255, dtype=np.uint8)
_DEC[48:58] = np.arange(10)
_DEC[45] = 10
# two hex digits at once: a little-endian uint16 of two characters -> their byte value (> 255: not two hex digits)
_HEX2 = np.where((_HEX[:, None] < 16) & (_HEX[None, :] < 16),
                 (_HEX[None, :].astype(np.uint16) << 4) | _HEX[:, None], 0xFFFF).astype(np.uint16).reshape(-1)

_PYARROW: Any = None


def arrow() -> Any:
    """pyarrow (:class:`~flexemr.ConfigError` naming the ``apps`` extra when it is missing)."""
    global _PYARROW
    if _PYARROW is None:                 # looked for once: the reader asks per column and block
        require("pyarrow", "reading and writing Criteo files")
        import pyarrow

        _PYARROW = pyarrow
    return _PYARROW


class BadValue(Exception):
    """A malformed value: ``row`` (0-based in its batch), ``what`` was expected, the value's ``text``."""

    def __init__(self, row: int, what: str, text: str) -> None:
        super().__init__(row, what, text)
        self.row, self.what, self.text = row, what, text


def _texts(arr: pa.Array) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.uint8]]:
    """``(starts, lens, data)`` of a binary/string array: value ``i`` is ``data[starts[i]:starts[i]+lens[i]]``;
    nulls have length 0."""
    pa = arrow()
    t = arr.type
    if not (pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t)
            or pa.types.is_large_string(t)):
        arr = arr.cast(pa.large_binary())      # e.g. string views
    large = pa.types.is_large_binary(arr.type) or pa.types.is_large_string(arr.type)
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int64 if large else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    lens = np.diff(offs)
    if arr.null_count and np.count_nonzero(lens) > len(arr) - arr.null_count:   # nulls with bytes behind them
        lens[arr.is_null().to_numpy(zero_copy_only=False)] = 0
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offs[:-1], lens, data


def _text(arr: pa.Array, row: int) -> str:
    """The value at ``row``, as text (at most 24 characters; ``''`` for a null)."""
    v = arr[row].as_py()
    return ("" if v is None else v.decode("latin-1") if isinstance(v, bytes) else str(v))[:24]


def _packed(starts: npt.NDArray[Any], lens: npt.NDArray[Any], rows: IntArray) -> bool:
    """Whether the values ``rows`` (present, in order) lie back to back in the data buffer."""
    return int(starts[rows[-1]]) + int(lens[rows[-1]]) - int(starts[rows[0]]) == int(lens[rows].sum())


def _hex_column(arr: pa.Array, out: IntArray) -> None:
    """Values of a column of hex strings into ``out`` (missing: ``-1``), or :class:`BadValue`."""
    what = "expected a hex string of at most 15 digits"
    starts, lens, data = _texts(arr)
    out[:] = -1
    rows = np.flatnonzero(lens)
    if not rows.size:
        return
    plens = lens[rows]
    long = np.flatnonzero(plens > _MAX_HEX)
    if long.size:
        r = int(rows[long[0]])
        raise BadValue(r, what, _text(arr, r))
    if (plens == 8).all() and _packed(starts, lens, rows):
        # every value 8 digits, back to back (Criteo's case): pairs of digits by one table lookup, as big-endian u32
        base = int(starts[rows[0]])
        pairs = _HEX2.take(data[base : base + 8 * rows.size].view(np.uint16))
        if pairs.max() > 255:
            r = int(rows[int(np.argmax(pairs > 255)) // 4])
            raise BadValue(r, what, _text(arr, r))
        out[rows] = pairs.astype(np.uint8).view(">u4")
        return
    width = int(plens.max())
    cols = np.arange(width)
    inside = cols[None, :] < plens[:, None]
    digit = _HEX.take(data[np.where(inside, starts[rows][:, None] + cols[None, :], 0)])
    bad = np.flatnonzero(((digit > 15) & inside).any(axis=1))
    if bad.size:
        r = int(rows[bad[0]])
        raise BadValue(r, what, _text(arr, r))
    val = np.zeros(rows.size, dtype=np.int64)
    for c in range(width):
        val = np.where(inside[:, c], val * 16 + digit[:, c], val)
    out[rows] = val


def _int_column(arr: pa.Array, what: str = "expected an integer") -> tuple[IntArray, BoolArray]:
    """``(values, missing)`` of a column of decimal integers (text) or integers; missing -> 0; :class:`BadValue`."""
    pa = arrow()
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_integer(t):
        missing = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(len(arr), np.bool_)
        vals = pc.fill_null(arr, 0) if arr.null_count else arr
        return np.asarray(vals.to_numpy(zero_copy_only=False), dtype=np.int64), missing
    if not (pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t)
            or pa.types.is_large_string(t)):
        raise InputError(f"expected integers or text, the column holds {t}")
    starts, lens, data = _texts(arr)
    missing = lens == 0
    rows = np.flatnonzero(~missing)
    if rows.size:     # decimal only: digits and a leading '-' (pyarrow would also take spaces and 0x...)
        plens = lens[rows]
        chunk = (data[int(starts[rows[0]]) : int(starts[rows[0]]) + int(plens.sum())] if _packed(starts, lens, rows)
                 else np.concatenate([data[int(s) : int(s) + int(k)] for s, k in zip(starts[rows], plens)]))
        cls = _DEC.take(chunk)
        if cls.max() >= 10:
            ends = np.cumsum(plens)
            where = np.flatnonzero(cls >= 10)
            k = np.searchsorted(ends, where, side="right")          # the value each such byte is in
            ok = (cls[where] == 10) & (where == ends[k] - plens[k]) & (plens[k] > 1)
            if not ok.all():
                r = int(rows[k[int(np.argmin(ok))]])
                raise BadValue(r, what, _text(arr, r))
    large = pa.types.is_large_binary(t) or pa.types.is_large_string(t)
    text = arr.view(pa.large_string() if large else pa.string())
    if int(missing.sum()) > arr.null_count:      # empty strings that are not nulls
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)
    try:
        vals = pc.cast(text, pa.int64())
    except pa.ArrowInvalid:      # out of int64's range: find which
        for r in rows.tolist():
            if abs(int(arr[r].as_py())) >= 1 << 63:
                raise BadValue(r, what, _text(arr, r)) from None
        raise
    if vals.null_count:
        vals = pc.fill_null(vals, 0)
    return np.asarray(vals.to_numpy(zero_copy_only=False), dtype=np.int64), missing


def _cat_column(arr: pa.Array, out: IntArray) -> None:
    pa = arrow()
    if pa.types.is_integer(arr.type):
        vals, missing = _int_column(arr)
        neg = np.flatnonzero((vals < 0) & ~missing)
        if neg.size:
            raise BadValue(int(neg[0]), "expected a categorical value >= 0", str(vals[neg[0]]))
        out[:] = np.where(missing, -1, vals)
    else:
        _hex_column(arr, out)


def field_names(has_label: bool) -> list[str]:
    """``label`` (when ``has_label``), ``I1``..``I13``, ``C1``..``C26``."""
    return (["label"] if has_label else []) + [f"I{i}" for i in range(1, NUM_DENSE + 1)] + list(CATEGORICAL_FEATURES)


Columns = tuple[npt.NDArray[np.int8], IntArray, BoolArray, IntArray]


def convert(batch: pa.RecordBatch, has_label: bool) -> Columns:
    """``(labels [n], ints [13, n], int_missing [13, n], cats [26, n])`` of one batch of columns (labels
    ``-1`` without a label column; missing ints 0, missing categorical values ``-1``).  A malformed value
    raises :class:`BadValue` for the first bad row (and the first bad field of that row), the field named."""
    names = field_names(has_label)
    n = batch.num_rows
    problems: list[tuple[int, int, BadValue]] = []          # (row, field index, problem)

    def attempt(i: int, convert: Callable[[], Any]) -> Any:
        try:
            return convert()
        except BadValue as bad:
            problems.append((bad.row, i, bad))
            return None

    labels = np.full(n, -1, dtype=np.int8)
    if has_label:
        got = attempt(0, lambda: _int_column(batch.column(0), "label must be 0 or 1"))
        if got is not None:
            lab, missing = got
            wrong = np.flatnonzero(missing | (lab < 0) | (lab > 1))
            if wrong.size:
                r = int(wrong[0])
                problems.append((r, 0, BadValue(r, "label must be 0 or 1", _text(batch.column(0), r))))
            labels = lab.astype(np.int8)
    off = 1 if has_label else 0
    # feature-major (each feature's column contiguous): the arrays handed out are their transposes, [n, features]
    ints = np.zeros((NUM_DENSE, n), dtype=np.int64)
    int_missing = np.zeros((NUM_DENSE, n), dtype=np.bool_)
    for f in range(NUM_DENSE):
        got = attempt(off + f, lambda: _int_column(batch.column(off + f)))
        if got is not None:
            ints[f], int_missing[f] = got
    cats = np.empty((NUM_CAT, n), dtype=np.int64)
    for f in range(NUM_CAT):
        attempt(off + NUM_DENSE + f, lambda: _cat_column(batch.column(off + NUM_DENSE + f), cats[f]))
    if problems:
        row, i, bad = min(problems, key=lambda p: (p[0], p[1]))
        raise BadValue(row, f"field {names[i]}: {bad.what}", bad.text)
    return labels, ints, int_missing, cats
