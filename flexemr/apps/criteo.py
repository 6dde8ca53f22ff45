"""Criteo's TSV click-log format: a vectorised reader, id hashing and a synthetic sample writer.

Format (Criteo Kaggle ``train.txt`` / Criteo 1TB ``day_N``): one sample per
line, 40 tab-separated fields::

    label  I1 ... I13  C1 ... C26
    0/1    integers    32-bit hex strings (8 lowercase digits)

Any ``I``/``C`` field may be empty (missing); the label may not.  ``\\r\\n``
line ends are accepted.  With ``has_label=False`` (Kaggle's ``test.txt``)
lines have 39 fields.

Parsing is vectorised per chunk of bytes: separators are found with one
comparison over the chunk, every field's characters are gathered into a
``[fields, max_len]`` matrix and converted column by column (at most 18
steps), so no Python code runs per line or per field.  A malformed line
raises :class:`CriteoFormatError` with its 1-based line number.

Categorical values become table rows with :func:`hash_ids`, a stable 64-bit
mix (splitmix64 finaliser) of ``(value, feature)`` modulo the table size; a
missing categorical value gives an empty bag.  Dense features go through
DLRM's ``log(1 + max(x, 0))`` (:meth:`CriteoRecords.dense_features`).

:func:`write_sample` writes *synthetic* files in this format (categorical
values drawn from the calibrated workload generator, so they have the skew of
real traces); the real dataset is never downloaded or shipped.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "sample.tsv")
>>> _ = write_sample(path, 100, seed=1)
>>> recs = next(read_criteo(path, batch_size=64))
>>> len(recs), recs.ints.shape, recs.cats.shape
(64, (64, 13), (64, 26))
>>> parse_criteo(b"1\\t\\t5" + b"\\t" * 36 + b"\\n", first_line=7)
Traceback (most recent call last):
...
flexemr.apps.criteo.CriteoFormatError: line 7: expected 40 tab-separated fields, found 39
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..core.errors import InputError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from .dlrm import CATEGORICAL_FEATURES, CRITEO_KAGGLE_CARDINALITIES, NUM_DENSE, dense_transform
from .workload import PROFILE_2022, Profile, generate

__all__ = [
    "CRITEO_POSITIVE_RATE",
    "CriteoFormatError",
    "CriteoRecords",
    "hash_ids",
    "parse_criteo",
    "read_criteo",
    "synthetic_dense",
    "write_sample",
]

IntArray = npt.NDArray[np.int64]

NUM_CAT = len(CATEGORICAL_FEATURES)
#: Fraction of clicks in Criteo Kaggle's training set (about 25.6 %); used by :func:`write_sample`.
CRITEO_POSITIVE_RATE = 0.256
_TAB, _NL, _CR, _MINUS = 9, 10, 13, 45
_MAX_DEC = 18  # digits that always fit in int64
_MAX_HEX = 15

_DEC = np.full(256, 255, dtype=np.uint8)
_DEC[48:58] = np.arange(10)
_HEX = _DEC.copy()
_HEX[97:103] = np.arange(10, 16)
_HEX[65:71] = np.arange(10, 16)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


class CriteoFormatError(InputError):
    """A line of a Criteo TSV file is malformed; :attr:`line` is its 1-based number."""

    def __init__(self, line: int, message: str, path: str | None = None) -> None:
        self.line = int(line)
        self.path = path
        where = f"{path}:" if path else ""
        super().__init__(f"{where}line {self.line}: {message}")


def _field_names(has_label: bool) -> list[str]:
    return (["label"] if has_label else []) + [f"I{i}" for i in range(1, NUM_DENSE + 1)] + list(CATEGORICAL_FEATURES)


@dataclass(frozen=True)
class CriteoRecords:
    """Parsed samples (a chunk of a file).

    ``labels`` int8 ``[n]`` (``-1`` without labels); ``ints`` int64
    ``[n, 13]`` (missing -> 0) with ``int_missing``; ``cats`` int64 ``[n, 26]``
    raw categorical values (missing -> ``-1``); ``first_line``: file line of
    the first sample.
    """

    labels: npt.NDArray[np.int8]
    ints: IntArray
    int_missing: npt.NDArray[np.bool_]
    cats: IntArray
    first_line: int = 1

    def __len__(self) -> int:
        return int(self.labels.size)

    def dense_features(self) -> npt.NDArray[np.float32]:
        """``[n, 13]`` model-ready dense features: ``log(1 + max(x, 0))``, missing -> 0."""
        return dense_transform(self.ints)

    def jagged(self, tables: Sequence[TableSpec] | Sequence[int], keys: Sequence[str] | None = None) -> JaggedBatch:
        """The categorical features as a :class:`JaggedBatch`: one hashed row per present value, empty bag if missing.

        ``tables``: the 26 table specs (or row counts), in feature order;
        ``keys`` default to the specs' names (or ``C1..C26``).
        """
        if len(tables) != NUM_CAT:
            raise InputError(f"need {NUM_CAT} tables for Criteo's categorical features, got {len(tables)}")
        rows = [t.num_rows if isinstance(t, TableSpec) else int(t) for t in tables]
        if keys is None:
            keys = [t.name if isinstance(t, TableSpec) else n for t, n in zip(tables, CATEGORICAL_FEATURES)]
        present = self.cats >= 0                                       # [n, 26]
        cols = self.cats.T                                             # feature-major, like the jagged layout
        vals = [hash_ids(cols[f][present[:, f]], f, rows[f]) for f in range(NUM_CAT)]
        lengths = present.T.reshape(-1).astype(np.int64)
        return JaggedBatch(list(keys), np.concatenate(vals) if vals else np.zeros(0, np.int64), lengths=lengths)

    def slice(self, start: int, stop: int) -> CriteoRecords:
        """Samples ``[start, stop)``."""
        return CriteoRecords(self.labels[start:stop], self.ints[start:stop], self.int_missing[start:stop],
                             self.cats[start:stop], self.first_line + start)

    @staticmethod
    def concat(parts: Sequence[CriteoRecords]) -> CriteoRecords:
        """One record set of several (line numbers follow the first)."""
        if len(parts) == 1:
            return parts[0]
        return CriteoRecords(np.concatenate([p.labels for p in parts]), np.concatenate([p.ints for p in parts]),
                             np.concatenate([p.int_missing for p in parts]), np.concatenate([p.cats for p in parts]),
                             parts[0].first_line if parts else 1)


def hash_ids(values: npt.ArrayLike, feature: int, num_rows: int) -> IntArray:
    """Rows in ``[0, num_rows)`` for raw categorical ``values`` of feature number ``feature``.

    A stable 64-bit mix (splitmix64's finaliser of ``value + golden * (feature + 1)``),
    then ``% num_rows``: the same value of the same feature always lands on the
    same row, on every machine and Python version.

    >>> hash_ids([0x68fd1e64, 0x68fd1e64, 0], 0, 1460).tolist()
    [693, 693, 415]
    """
    if num_rows < 1:
        raise InputError(f"num_rows must be >= 1, got {num_rows}")
    salt = np.uint64((0x9E3779B97F4A7C15 * (int(feature) + 1)) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):  # wrap-around arithmetic modulo 2**64 is the point
        x = np.asarray(values, dtype=np.int64).astype(np.uint64) + salt
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    out: IntArray = (x % np.uint64(num_rows)).astype(np.int64)
    return out


def _parse_numbers(buf: npt.NDArray[np.uint8], starts: IntArray, lens: IntArray, hexa: bool,
                   signed: bool) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """Values of the fields ``buf[starts[i] : starts[i] + lens[i]]`` and whether each is well formed."""
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


def parse_criteo(data: bytes | bytearray | memoryview, *, first_line: int = 1, has_label: bool = True,
                 path: str | None = None) -> CriteoRecords:
    """Parse whole lines of Criteo TSV (the last newline may be missing)."""
    nf = 1 + NUM_DENSE + NUM_CAT if has_label else NUM_DENSE + NUM_CAT
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return CriteoRecords(np.zeros(0, np.int8), np.zeros((0, NUM_DENSE), np.int64),
                             np.zeros((0, NUM_DENSE), np.bool_), np.zeros((0, NUM_CAT), np.int64), first_line)
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
        raise CriteoFormatError(first_line + i, f"expected {nf} tab-separated fields, found {int(fields[i])}", path)
    n = nl.size
    flat_starts = np.empty(seps.size, dtype=np.int64)
    flat_starts[0] = 0
    flat_starts[1:] = seps[:-1] + 1
    lens = (seps - flat_starts).reshape(n, nf)
    starts = flat_starts.reshape(n, nf)
    names = _field_names(has_label)
    off = 1 if has_label else 0

    def check(ok: npt.NDArray[np.bool_], col0: int, what: str) -> None:
        if not ok.all():
            r, c = np.argwhere(~ok)[0]
            s, ln = int(starts[r, col0 + c]), int(lens[r, col0 + c])
            text = bytes(buf[s : s + min(ln, 24)]).decode("latin-1")
            raise CriteoFormatError(first_line + int(r), f"field {names[col0 + c]}: {what}, got {text!r}", path)

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
    return CriteoRecords(labels, ints.reshape(n, NUM_DENSE), il == 0, cats.reshape(n, NUM_CAT), first_line)


def read_criteo(path: str | os.PathLike[str], *, batch_size: int | None = None, has_label: bool = True,
                chunk_bytes: int = 8 << 20) -> Iterator[CriteoRecords]:
    """Yield the samples of a Criteo TSV file, ``batch_size`` at a time (the last batch may be
    smaller), or chunk by chunk (about ``chunk_bytes`` each) when ``batch_size`` is ``None``."""
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    name = os.fspath(path)
    if not os.path.isfile(name):
        why = "no such file" if not os.path.exists(name) else "not a regular file"
        raise InputError(f"cannot read Criteo file {name}: {why}")
    pending: list[CriteoRecords] = []
    held = 0

    def chunks() -> Iterator[CriteoRecords]:
        line = 1
        rest = b""
        with open(name, "rb") as f:
            while True:
                block = f.read(chunk_bytes)
                data = rest + block
                if not block:
                    if data:
                        yield parse_criteo(data, first_line=line, has_label=has_label, path=name)
                    return
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    rest = data
                    continue
                recs = parse_criteo(memoryview(data)[:cut], first_line=line, has_label=has_label, path=name)
                line += len(recs)
                rest = data[cut:]
                yield recs

    for recs in chunks():
        if batch_size is None:
            yield recs
            continue
        pending.append(recs)
        held += len(recs)
        while held >= batch_size:
            allrecs = CriteoRecords.concat(pending)
            yield allrecs.slice(0, batch_size)
            rest_recs = allrecs.slice(batch_size, len(allrecs))
            pending = [rest_recs] if len(rest_recs) else []
            held = len(rest_recs)
    if batch_size is not None and held:
        yield CriteoRecords.concat(pending)


def synthetic_dense(rng: np.random.Generator, n: int) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """``n`` rows of 13 synthetic Criteo-like integer features and their missing mask.

    Counts are log-normal with a per-feature median (1 to ~2000); ``I2`` can be
    negative (as in Criteo); each feature is missing with its own rate (0-45 %).
    """
    feat = np.random.default_rng(0x13)                                  # per-feature shape, fixed
    mu = feat.uniform(0.0, 7.5, NUM_DENSE)
    sigma = feat.uniform(0.5, 1.8, NUM_DENSE)
    miss_rate = feat.uniform(0.0, 0.45, NUM_DENSE)
    vals = np.floor(np.expm1(rng.normal(mu, sigma, (n, NUM_DENSE)).clip(0, 20))).astype(np.int64)
    vals[:, 1] -= (rng.random(n) < 0.1).astype(np.int64) * rng.integers(1, 4, n)
    missing = rng.random((n, NUM_DENSE)) < miss_rate
    vals[missing] = 0
    return vals, missing


def write_sample(path: str | os.PathLike[str], samples: int, *, seed: int = 0,
                 cardinalities: Sequence[int] = CRITEO_KAGGLE_CARDINALITIES, profile: Profile = PROFILE_2022,
                 has_label: bool = True) -> Path:
    """Write ``samples`` synthetic lines in Criteo's TSV format to ``path`` (returned).

    Categorical ids come from :func:`flexemr.apps.workload.generate` over tables of
    the given ``cardinalities`` (default: Criteo Kaggle's), one id per feature,
    encoded as 8-digit hex (``id * 0x9E3779B1 + salt mod 2**32``, a bijection);
    each feature is missing with its own rate (0-30 %).  Labels are clicks
    with probability :data:`CRITEO_POSITIVE_RATE`.  Deterministic in ``seed``.
    """
    if len(cardinalities) != NUM_CAT:
        raise InputError(f"need {NUM_CAT} cardinalities, got {len(cardinalities)}")
    n = int(samples)
    rng = np.random.default_rng([int(seed), 0xC817E0])
    specs = [TableSpec(name, int(c), 1) for name, c in zip(CATEGORICAL_FEATURES, cardinalities)]
    jb = generate(specs, n, 1.0, profile, seed=int(seed), pooling="fixed")
    ids = jb.values.reshape(NUM_CAT, n).T.astype(np.uint64)            # [n, 26]
    salt = np.random.default_rng(0xC0).integers(0, 1 << 32, NUM_CAT, dtype=np.uint64)
    hexvals = (ids * np.uint64(0x9E3779B1) + salt[None, :]) & np.uint64(0xFFFFFFFF)
    cat_missing = rng.random((n, NUM_CAT)) < np.random.default_rng(0xCA).uniform(0.0, 0.3, NUM_CAT)
    ints, int_missing = synthetic_dense(rng, n)
    labels = (rng.random(n) < CRITEO_POSITIVE_RATE).astype(np.int64)

    cols: list[list[str]] = []  # column-wise string conversion, then one join per line
    if has_label:
        cols.append(labels.astype(str).tolist())
    for f in range(NUM_DENSE):
        cols.append(np.where(int_missing[:, f], "", ints[:, f].astype(str)).tolist())
    for f in range(NUM_CAT):
        col = [format(v, "08x") for v in hexvals[:, f].tolist()]
        cols.append([("" if m else v) for v, m in zip(col, cat_missing[:, f].tolist())])
    out = Path(path)
    with open(out, "w", encoding="ascii", newline="\n") as fh:
        fh.writelines("\t".join(row) + "\n" for row in zip(*cols))
    return out
