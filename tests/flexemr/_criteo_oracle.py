"""The numpy-only Criteo TSV parser that flexemr.apps.criteo used before it read through pyarrow.

Kept here, unchanged in what it computes, as the oracle of tests/flexemr/test_criteo_trace.py:
the pyarrow reader must give the same records (labels, ints, missing masks, raw categorical
values) and report the same malformed line, with the same message, on the same files.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

NUM_DENSE, NUM_CAT = 13, 26
_TAB, _NL, _CR, _MINUS = 9, 10, 13, 45
_MAX_DEC = 18
_MAX_HEX = 15

_DEC = np.full(256, 255, dtype=np.uint8)
_DEC[48:58] = np.arange(10)
_HEX = _DEC.copy()
_HEX[97:103] = np.arange(10, 16)
_HEX[65:71] = np.arange(10, 16)

IntArray = npt.NDArray[np.int64]


class OracleError(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


def _names(has_label: bool) -> list[str]:
    return ((["label"] if has_label else []) + [f"I{i}" for i in range(1, NUM_DENSE + 1)]
            + [f"C{i}" for i in range(1, NUM_CAT + 1)])


def _parse_numbers(buf: npt.NDArray[np.uint8], starts: IntArray, lens: IntArray, hexa: bool,
                   signed: bool) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    n = starts.size
    if n == 0:
        return np.zeros(0, np.int64), np.ones(0, np.bool_)
    limit = _MAX_HEX if hexa else _MAX_DEC + int(signed)
    width = int(min(int(lens.max()), limit))
    ok = lens <= limit
    val = np.zeros(n, dtype=np.int64)
    if width == 0:
        return val, ok
    cols = np.arange(width)
    inside = cols[None, :] < lens[:, None]
    ch = buf[np.where(inside, starts[:, None] + cols[None, :], 0)]
    digit = (_HEX if hexa else _DEC)[ch]
    base = 16 if hexa else 10
    good = digit < base
    neg = np.zeros(n, np.bool_)
    if signed:
        neg = (lens > 1) & (ch[:, 0] == _MINUS)
        good[:, 0] |= neg
    ok &= (good | ~inside).all(axis=1)
    for c in range(width):
        take = inside[:, c] & (digit[:, c] < base)
        val = np.where(take, val * base + digit[:, c], val)
    return np.where(neg, -val, val), ok


def parse(data: bytes, *, first_line: int = 1, has_label: bool = True) -> dict[str, np.ndarray]:
    """``labels``, ``ints``, ``int_missing``, ``cats`` of whole lines of Criteo TSV, or :class:`OracleError`."""
    nf = 1 + NUM_DENSE + NUM_CAT if has_label else NUM_DENSE + NUM_CAT
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return {"labels": np.zeros(0, np.int8), "ints": np.zeros((0, NUM_DENSE), np.int64),
                "int_missing": np.zeros((0, NUM_DENSE), np.bool_), "cats": np.zeros((0, NUM_CAT), np.int64)}
    if buf[-1] != _NL:
        buf = np.concatenate([buf, np.array([_NL], np.uint8)])
    cr = np.flatnonzero(buf[:-1] == _CR)
    if cr.size:
        crlf = cr[buf[cr + 1] == _NL]
        if crlf.size:
            buf = np.delete(buf, crlf)
    nl = np.flatnonzero(buf == _NL)
    seps = np.flatnonzero((buf == _TAB) | (buf == _NL))
    line_of_sep = np.searchsorted(nl, seps)
    fields = np.bincount(line_of_sep, minlength=nl.size)
    bad = np.flatnonzero(fields != nf)
    if bad.size:
        i = int(bad[0])
        raise OracleError(first_line + i, f"expected {nf} tab-separated fields, found {int(fields[i])}")
    n = nl.size
    flat_starts = np.empty(seps.size, dtype=np.int64)
    flat_starts[0] = 0
    flat_starts[1:] = seps[:-1] + 1
    lens = (seps - flat_starts).reshape(n, nf)
    starts = flat_starts.reshape(n, nf)
    names = _names(has_label)
    off = 1 if has_label else 0

    def check(ok: npt.NDArray[np.bool_], col0: int, what: str) -> None:
        if not ok.all():
            r, c = np.argwhere(~ok)[0]
            s, ln = int(starts[r, col0 + c]), int(lens[r, col0 + c])
            text = bytes(buf[s : s + min(ln, 24)]).decode("latin-1")
            raise OracleError(first_line + int(r), f"field {names[col0 + c]}: {what}, got {text!r}")

    if has_label:
        lab, ok = _parse_numbers(buf, starts[:, 0], lens[:, 0], hexa=False, signed=False)
        check((ok & (lens[:, 0] > 0) & (lab <= 1))[:, None], 0, "label must be 0 or 1")
        labels = lab.astype(np.int8)
    else:
        labels = np.full(n, -1, dtype=np.int8)
    il, is_ = lens[:, off : off + NUM_DENSE], starts[:, off : off + NUM_DENSE]
    ints, ok = _parse_numbers(buf, is_.reshape(-1), il.reshape(-1), hexa=False, signed=True)
    check(ok.reshape(n, NUM_DENSE), off, "expected an integer")
    cl, cs = lens[:, off + NUM_DENSE :], starts[:, off + NUM_DENSE :]
    cats, ok = _parse_numbers(buf, cs.reshape(-1), cl.reshape(-1), hexa=True, signed=False)
    check(ok.reshape(n, NUM_CAT), off + NUM_DENSE, "expected a hex string of at most 15 digits")
    cats = np.where(cl.reshape(-1) == 0, -1, cats)
    return {"labels": labels, "ints": ints.reshape(n, NUM_DENSE), "int_missing": il == 0,
            "cats": cats.reshape(n, NUM_CAT)}
