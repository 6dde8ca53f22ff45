"""flexemr.core.textcols: the native text-column parsers and bag hasher against plain-Python references.

Columns come as pyarrow lays them out (validity bitmap, int32 offsets, bytes), sliced so the
bitmap starts mid-byte; values are random bytes around the edges of what is accepted (SWAR
paths: exactly 8 hex digits, up to 8 decimal digits with 8 bytes readable after them).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.apps.criteo import hash_ids
from flexemr.core.errors import InputError
from flexemr.core.textcols import MalformedValue, first_empty_line, hash_bags, parse_decimal, parse_hex

try:
    import pyarrow as pa
except ImportError:      # the tests that need it skip, saying so
    pa = None
needs_arrow = pytest.mark.skipif(pa is None, reason="columns are built with pyarrow, from the apps extra (make demo)")

_DEC = re.compile(rb"-?[0-9]+")
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}")


def _ref_dec(values: list[bytes | None], lo: int, hi: int, missing_ok: bool) -> tuple[list[int], list[bool]] | int:
    """(values, missing), or the row of the first malformed value."""
    out, missing = [], []
    for i, v in enumerate(values):
        if not v:
            if not missing_ok:
                return i
            out.append(0)
            missing.append(True)
            continue
        if not _DEC.fullmatch(v) or not lo <= int(v) <= hi:
            return i
        out.append(int(v))
        missing.append(False)
    return out, missing


def _ref_hex(values: list[bytes | None]) -> list[int] | int:
    out = []
    for i, v in enumerate(values):
        if not v:
            out.append(-1)
        elif not _HEX.fullmatch(v):
            return i
        else:
            out.append(int(v, 16))
    return out


def _column(values: list[bytes | None], skip: int) -> dict[str, object]:
    """``values`` as the buffers of a pyarrow binary array that starts ``skip`` values into its buffers."""
    arr = pa.array([b"0"] * skip + values, pa.binary()).slice(skip)
    validity, offsets, data = arr.buffers()
    return {"offsets": np.frombuffer(offsets, np.int32)[arr.offset : arr.offset + len(arr) + 1],
            "data": data if data is not None else b"", "validity": validity, "bit0": arr.offset}


#: bytes near the accepted classes: digits, hex letters of both cases, and their neighbours
_NEAR = b"0123456789abcdefABCDEF-+ /:@G`gx\x00\x7f\x80\xb0\xe6\xff"
near_text = st.binary(min_size=0, max_size=20).map(lambda b: bytes(_NEAR[x % len(_NEAR)] for x in b))
dec_text = st.one_of(st.integers(-(2**63), 2**63 - 1).map(lambda v: str(v).encode()),
                     st.integers(-(10**9), 10**9).map(lambda v: str(v).encode()),
                     st.sampled_from([b"9223372036854775808", b"-9223372036854775809", b"-", b"007", b"-0",
                                      b"0" * 25 + b"7", b"99999999", b"123456789", b"+5", b" 5", b"5 ", b"0x10",
                                      b"5-5", b"--5", b"1234567/", b"/1234567", b"12:45"]),
                     near_text)
hex_text = st.one_of(st.integers(0, 2**32 - 1).map(lambda v: format(v, "08x").encode()),
                     st.integers(0, 2**60 - 1).map(lambda v: format(v, "X").encode()),
                     st.binary(min_size=8, max_size=8).map(lambda b: bytes(_NEAR[x % len(_NEAR)] for x in b)),
                     st.sampled_from([b"0x10", b"1" * 16, b"68fd1g64", b"68FD1E6 ", b"68fd1e6@", b"`8fd1e64", b"-1"]),
                     near_text)


@needs_arrow
@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.none(), dec_text), max_size=40), skip=st.integers(0, 9),
       label=st.booleans())
def test_parse_decimal_matches_python(values: list[bytes | None], skip: int, label: bool) -> None:
    lo, hi, missing_ok = (0, 1, False) if label else (-(2**63), 2**63 - 1, True)
    want = _ref_dec(values, lo, hi, missing_ok)
    col = _column(values, skip)
    if isinstance(want, int):
        with pytest.raises(MalformedValue) as err:
            parse_decimal(lo=lo, hi=hi, missing_ok=missing_ok, **col)  # type: ignore[arg-type]
        assert err.value.row == want
    else:
        got, missing = parse_decimal(lo=lo, hi=hi, missing_ok=missing_ok, **col)  # type: ignore[arg-type]
        assert got.tolist() == want[0] and missing.tolist() == want[1]


@needs_arrow
@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.none(), hex_text), max_size=40), skip=st.integers(0, 9))
def test_parse_hex_matches_python(values: list[bytes | None], skip: int) -> None:
    want = _ref_hex(values)
    col = _column(values, skip)
    if isinstance(want, int):
        with pytest.raises(MalformedValue) as err:
            parse_hex(**col)  # type: ignore[arg-type]
        assert err.value.row == want
    else:
        out = np.full(len(values), 7, np.int64)
        assert parse_hex(out=out, **col).tolist() == want and out.tolist() == want  # type: ignore[arg-type]


def test_columns_out_of_bounds_are_refused_not_read() -> None:
    data = np.frombuffer(b"12345678", np.uint8)
    with pytest.raises(InputError, match="outside the 8 data bytes"):
        parse_hex(np.array([0, 4, 9], np.int32), data)
    with pytest.raises(MalformedValue, match="value 1 has offsets that are decreasing"):
        parse_decimal(np.array([0, 4, 2, 8], np.int32), data)
    with pytest.raises(InputError, match="the validity bitmap has 8 bits, needs 10"):
        parse_hex(np.array([0] * 11, np.int32), data, validity=b"\xff", bit0=0)
    with pytest.raises(InputError, match="int32"):
        parse_hex(np.array([0, 4], np.int64), data)
    with pytest.raises(InputError, match="max_digits"):
        parse_hex(np.array([0, 4], np.int32), data, max_digits=16)
    with pytest.raises(InputError, match="writable contiguous int64 array of 1"):
        parse_hex(np.array([0, 4], np.int32), data, out=np.zeros(2, np.int64))
    out, miss = np.full(2, 9, np.int64), np.zeros(2, np.bool_)        # straight into the arrays given
    got, missing = parse_decimal(np.array([0, 2, 2], np.int32), data, out=out, missing=miss)
    assert got is out and missing is miss and out.tolist() == [12, 0] and miss.tolist() == [False, True]
    with pytest.raises(InputError, match="missing must be a writable contiguous bool array of 2"):
        parse_decimal(np.array([0, 2, 2], np.int32), data, missing=np.ones(3, np.bool_))
    # 8 digits at the very end of the bytes: the word path reads no further
    assert parse_decimal(np.array([4, 8], np.int32), data)[0].tolist() == [5678]
    assert parse_hex(np.array([0, 8], np.int32), data).tolist() == [0x12345678]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), features=st.integers(1, 30), samples=st.integers(0, 300),
       layout=st.sampled_from(["c", "transposed", "strided", "reversed"]))
def test_hash_bags_matches_hash_ids(seed: int, features: int, samples: int, layout: str) -> None:
    rng = np.random.default_rng(seed)
    full = rng.integers(0, 2**63 - 1, (features * 2, samples * 2), dtype=np.int64)
    full[rng.random(full.shape) < 0.3] = -1
    values = {"c": np.ascontiguousarray(full[:features, :samples]),
              "transposed": np.ascontiguousarray(full[:features, :samples].T).T,
              "strided": full[::2, ::2][:features, :samples],
              "reversed": full[:features, :samples][::-1, ::-1]}[layout]
    rows = rng.integers(1, 2**63 - 1, features)
    rows[rng.random(features) < 0.3] = 1
    rows[rng.random(features) < 0.3] = rng.integers(1, 5000)
    rows[rng.random(features) < 0.2] = 2**63 - 1
    ids, offsets = hash_bags(values, rows.tolist())
    present = values >= 0
    want = [hash_ids(values[f][present[f]], f, int(rows[f])) for f in range(features)]
    assert ids.tolist() == (np.concatenate(want).tolist() if want else [])
    assert np.diff(offsets).tolist() == present.reshape(-1).astype(int).tolist() and offsets[0] == 0
    salted, _ = hash_bags(values, rows.tolist(), salts=list(range(5, 5 + features)))
    assert salted.tolist() == np.concatenate(
        [hash_ids(values[f][present[f]], 5 + f, int(rows[f])) for f in range(features)]).tolist()


def test_hash_bags_input_errors() -> None:
    with pytest.raises(InputError, match="2-D int64"):
        hash_bags(np.zeros(3, np.int64), [1])
    with pytest.raises(InputError, match="num_rows >= 1 per feature"):
        hash_bags(np.zeros((2, 3), np.int64), [5, 0])
    with pytest.raises(InputError, match="one salt per feature"):
        hash_bags(np.zeros((2, 3), np.int64), [5, 5], salts=[1])


def _ref_empty(data: bytes) -> int:
    start = 0
    for line in data.splitlines(keepends=True):
        if line in (b"\n", b"\r", b"\r\n"):
            return start
        start += len(line)
    return -1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60).map(lambda b: bytes(b"ab\t\n\r"[x % 5] for x in b)))
def test_first_empty_line_matches_splitlines(data: bytes) -> None:
    assert first_empty_line(data) == _ref_empty(data)
    assert first_empty_line(bytearray(data)) == _ref_empty(data)
