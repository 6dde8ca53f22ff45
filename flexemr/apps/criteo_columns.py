"""The columns of Criteo samples as pyarrow hands them over, checked and converted in C.

:func:`convert` turns the columns of one block (``label``, ``I1``..``I13``,
``C1``..``C26``; text as bytes, or already integers) into feature-major numpy
arrays.  A text column's Arrow buffers (validity bitmap, offsets, bytes) go
as they are to :mod:`flexemr.core.textcols`, which checks and converts every
value in one native pass -- decimal integers are digits with at most a
leading ``-``, hex strings at most 15 hex digits -- and the first malformed
value raises :class:`BadValue` with its row, what was expected and its text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..core.errors import InputError
from ..core.textcols import MalformedValue, parse_decimal, parse_hex
from .dlrm import CATEGORICAL_FEATURES, NUM_DENSE
from .extras import require

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["BadValue", "arrow", "convert", "field_names"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

NUM_CAT = len(CATEGORICAL_FEATURES)

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


def _is_text(t: Any) -> bool:
    pa = arrow()
    return bool(pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t)
                or pa.types.is_large_string(t) or pa.types.is_binary_view(t) or pa.types.is_string_view(t))


def _buffers(arr: pa.Array) -> dict[str, Any]:
    """The Arrow buffers of a text column, as :func:`~flexemr.core.textcols.parse_hex` takes them (no copy
    for ``binary``/``string``; other text types are cast to ``binary`` first)."""
    pa = arrow()
    if not (pa.types.is_binary(arr.type) or pa.types.is_string(arr.type)):
        arr = arr.cast(pa.binary())
    validity, offsets, data = arr.buffers()[:3]
    offs = np.frombuffer(offsets, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1] if offsets is not None \
        else np.zeros(len(arr) + 1, np.int32)
    return {"offsets": offs, "data": data if data is not None else b"",
            "validity": validity if arr.null_count else None, "bit0": arr.offset}


def _text(arr: pa.Array, row: int) -> str:
    """The value at ``row``, as text (at most 24 characters; ``''`` for a null)."""
    v = arr[row].as_py()
    return ("" if v is None else v.decode("latin-1") if isinstance(v, bytes) else str(v))[:24]


def _hex_column(arr: pa.Array, out: IntArray) -> None:
    """Values of a column of hex strings into ``out`` (missing: ``-1``), or :class:`BadValue`."""
    try:
        parse_hex(out=out, **_buffers(arr))
    except MalformedValue as bad:
        raise BadValue(bad.row, "expected a hex string of at most 15 digits", _text(arr, bad.row)) from None


def _int_column(arr: pa.Array, what: str = "expected an integer", *, label: bool = False,
                into: tuple[IntArray, BoolArray] | None = None) -> tuple[IntArray, BoolArray]:
    """``(values, missing)`` of a column of decimal integers (text) or integers; missing -> 0; :class:`BadValue`.
    A ``label`` (text) must be 0 or 1 and present.  Text is parsed straight ``into`` the arrays given."""
    pa = arrow()
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_integer(t):
        missing = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(len(arr), np.bool_)
        vals = pc.fill_null(arr, 0) if arr.null_count else arr
        return np.asarray(vals.to_numpy(zero_copy_only=False), dtype=np.int64), missing
    if not _is_text(t):
        raise InputError(f"expected integers or text, the column holds {t}")
    out, missing = into if into is not None else (None, None)
    try:
        if label:
            return parse_decimal(lo=0, hi=1, missing_ok=False, **_buffers(arr))
        return parse_decimal(out=out, missing=missing, **_buffers(arr))
    except MalformedValue as bad:
        raise BadValue(bad.row, what, _text(arr, bad.row)) from None


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
        got = attempt(0, lambda: _int_column(batch.column(0), "label must be 0 or 1", label=True))
        if got is not None:
            lab, missing = got
            wrong = np.flatnonzero(missing | (lab < 0) | (lab > 1))
            if wrong.size:
                r = int(wrong[0])
                problems.append((r, 0, BadValue(r, "label must be 0 or 1", _text(batch.column(0), r))))
            labels = lab.astype(np.int8)
    off = 1 if has_label else 0
    # feature-major (each feature's column contiguous): the arrays handed out are their transposes, [n, features]
    ints = np.empty((NUM_DENSE, n), dtype=np.int64)
    int_missing = np.empty((NUM_DENSE, n), dtype=np.bool_)
    for f in range(NUM_DENSE):
        got = attempt(off + f, lambda: _int_column(batch.column(off + f), into=(ints[f], int_missing[f])))
        if got is not None and not np.may_share_memory(got[0], ints):   # integers already (Parquet): copied in
            ints[f], int_missing[f] = got
    cats = np.empty((NUM_CAT, n), dtype=np.int64)
    for f in range(NUM_CAT):
        attempt(off + NUM_DENSE + f, lambda: _cat_column(batch.column(off + NUM_DENSE + f), cats[f]))
    if problems:
        row, i, bad = min(problems, key=lambda p: (p[0], p[1]))
        raise BadValue(row, f"field {names[i]}: {bad.what}", bad.text)
    return labels, ints, int_missing, cats
