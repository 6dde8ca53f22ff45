"""Criteo click logs: a pyarrow reader of TSV and Parquet files, id hashing and a synthetic sample writer.

TSV format (Criteo Kaggle ``train.txt`` / Criteo 1TB ``day_N``): one sample per
line, 40 tab-separated fields::

    label  I1 ... I13  C1 ... C26
    0/1    integers    32-bit hex strings (8 lowercase digits)

Any ``I``/``C`` field may be empty (missing); the label may not.  ``\\r\\n``
line ends are accepted.  With ``has_label=False`` (Kaggle's ``test.txt``)
lines have 39 fields.  Compressed files are read as they are: ``.gz``,
``.bz2``, ``.zst``, ``.lz4``.  Parquet (``.parquet``/``.pq``): columns named
``label``, ``I1``..``I13``, ``C1``..``C26`` (other columns are ignored);
``I`` columns integers, ``C`` columns hex strings or integers; a null is a
missing value (:func:`write_sample` writes both formats).

Reading goes through pyarrow (the ``apps`` extra): ``pyarrow.csv`` splits
each block of lines into fields in C++ (every field as bytes, several blocks
at once on worker threads), then each column is checked and converted whole,
from its Arrow buffers, by :mod:`flexemr.core.textcols` (C: decimal integers
-- no spaces, ``+`` or ``0x`` -- and hex strings, eight digits a word at a
time), so no Python code runs per line or per field.  A malformed line raises
:class:`CriteoFormatError` with its 1-based line number (for Parquet: its row
number), naming the field and quoting the value.

Categorical values become table rows with :func:`hash_ids`, a stable 64-bit
mix (splitmix64 finaliser) of ``(value, feature)`` modulo the table size; a
missing categorical value gives an empty bag.  :meth:`CriteoRecords.jagged`
computes the same rows for all 26 features in one native pass
(:func:`flexemr.core.textcols.hash_bags`).  Dense features go through
DLRM's ``log(1 + max(x, 0))`` (:meth:`CriteoRecords.dense_features`).

:func:`write_sample` writes *synthetic* files in these formats (categorical
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

import io
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from ..core.errors import InputError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from ..core.textcols import first_empty_line, hash_bags
from .criteo_columns import BadValue, arrow, convert, field_names
from .dlrm import CATEGORICAL_FEATURES, CRITEO_KAGGLE_CARDINALITIES, NUM_DENSE, dense_transform
from .workload import PROFILE_2022, Profile, generate

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "CRITEO_POSITIVE_RATE",
    "CriteoFormatError",
    "CriteoRecords",
    "criteo_format",
    "hash_ids",
    "parse_criteo",
    "read_criteo",
    "synthetic_dense",
    "write_sample",
]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
#: ``progress(done, total)``: bytes of the file read for TSV (compressed bytes when compressed), rows for Parquet.
ReadProgress = Callable[[int, int], None]

NUM_CAT = len(CATEGORICAL_FEATURES)
#: Fraction of clicks in Criteo Kaggle's training set (about 25.6 %); used by :func:`write_sample`.
CRITEO_POSITIVE_RATE = 0.256
_PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
_WRITE_ROWS = 1 << 16               # rows per chunk (and Parquet row group) that write_sample writes

_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


class CriteoFormatError(InputError):
    """A line of a Criteo file is malformed; :attr:`line` is its 1-based number (a row's, for Parquet)."""

    def __init__(self, line: int, message: str, path: str | None = None, *, unit: str = "line") -> None:
        self.line = int(line)
        self.path = path
        where = f"{path}:" if path else ""
        super().__init__(f"{where}{unit} {self.line}: {message}")


def criteo_format(path: str | os.PathLike[str]) -> Literal["tsv", "parquet"]:
    """``"parquet"`` for a name ending in ``.parquet`` or ``.pq``, else ``"tsv"`` (compressed or not)."""
    return "parquet" if os.fspath(path).lower().endswith(_PARQUET_SUFFIXES) else "tsv"


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
    int_missing: BoolArray
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
        if min(rows) < 1:
            raise InputError(f"num_rows must be >= 1, got {min(rows)}")
        ids, offsets = hash_bags(self.cats.T, rows)       # hash_ids of every present value, in one native pass
        return JaggedBatch(list(keys), ids, offsets=offsets)

    def slice(self, start: int, stop: int) -> CriteoRecords:
        """Samples ``[start, stop)``."""
        return CriteoRecords(self.labels[start:stop], self.ints[start:stop], self.int_missing[start:stop],
                             self.cats[start:stop], self.first_line + start)

    @staticmethod
    def concat(parts: Sequence[CriteoRecords]) -> CriteoRecords:
        """One record set of several (line numbers follow the first)."""
        if len(parts) == 1:
            return parts[0]

        def join(arrays: Sequence[npt.NDArray[Any]]) -> npt.NDArray[Any]:   # feature-major, as the reader makes them
            return np.concatenate([a.T for a in arrays], axis=1).T

        return CriteoRecords(np.concatenate([p.labels for p in parts]), join([p.ints for p in parts]),
                             join([p.int_missing for p in parts]), join([p.cats for p in parts]),
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
        x = np.asarray(values, dtype=np.int64).view(np.uint64) + salt
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    np.remainder(x, np.uint64(num_rows), out=x)
    out: IntArray = x.view(np.int64)
    return out


# ------------------------------------------------------------------ TSV


def _records(batch: pa.RecordBatch, first_line: int, has_label: bool) -> CriteoRecords:
    labels, ints, int_missing, cats = convert(batch, has_label)
    return CriteoRecords(labels, ints.T, int_missing.T, cats.T, first_line)


@dataclass(frozen=True)
class _Block:
    """One block of whole lines, split and converted: its records (``None`` after a malformed value), its
    row count, the first line with a wrong number of fields (``(line, fields)``, lines counted from 1 in the
    block, or ``None``) and the first malformed value before that line (or ``None``)."""

    recs: CriteoRecords | None
    rows: int
    wrong: tuple[int, int] | None
    bad: BadValue | None


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else arrow().RecordBatch.from_pylist([], schema=table.schema)


def _parse_block(data: memoryview, has_label: bool) -> _Block:
    """Split ``data`` (whole lines) into columns with pyarrow, every field as bytes (an empty field as an
    empty value, not a null), then check and convert them in C (:func:`_records`).  One pyarrow block per
    call (no threads of pyarrow's): the reader runs several calls at once."""
    pa = arrow()
    import pyarrow.csv as pacsv

    names = field_names(has_label)
    nf = len(names)
    wrong: list[tuple[int | None, int]] = []

    def on_invalid(row: Any) -> str:
        wrong.append((row.number, row.actual_columns))
        return "skip"

    def read(handler: Callable[[Any], str] | None) -> Any:
        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=names, block_size=max(len(data), 1 << 16), use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, double_quote=False,
                                             ignore_empty_lines=False, invalid_row_handler=handler),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in names}, null_values=[],
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False))

    try:
        table = read(None)                # the fast way: every line has its fields
    except pa.ArrowInvalid:               # a line has too few or too many: again, to know which
        table = read(on_invalid)
    bad: list[tuple[int, int]] = []
    if wrong:
        number, fields = wrong[0]
        if number is None:                # not numbered: count the fields of every line
            number = next(i + 1 for i, text in enumerate(bytes(data).splitlines()) if text.count(b"\t") + 1 != nf)
        bad.append((number, fields))
    empty = first_empty_line(data)
    if empty >= 0:                        # pyarrow reads an empty line as a row of empty fields
        bad.append((len(bytes(data[:empty]).splitlines()) + 1, 1))
    batch = _one_batch(table)
    n = batch.num_rows
    first_wrong = min(bad) if bad else None
    # after a skipped line (wrong field count) rows are shifted: only the rows before it are checked
    limit = n if first_wrong is None else max(0, min(n, first_wrong[0] - 1))
    try:
        recs = _records(batch.slice(0, limit) if limit < n else batch, 1, has_label)
    except BadValue as value:
        return _Block(None, n, first_wrong, value)
    return _Block(recs, n, first_wrong, None)


#: blocks split and converted at once (each by one thread; pyarrow and the C parts release the GIL)
_WORKERS = max(1, min(4, os.cpu_count() or 1))


def _ahead(items: Iterator[Any],
           work: Callable[[Any], Any]) -> Generator[tuple[Any, Future[Any] | None], None, None]:
    """``(item, future of work(item))`` for each of ``items``, in order, with up to :data:`_WORKERS` + 1 items
    being worked on by :data:`_WORKERS` threads ahead of the one yielded.  An item that is an exception is
    passed through as ``(exception, None)``, and is the last."""
    pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="flexemr-criteo")
    queue: deque[tuple[Any, Future[Any] | None]] = deque()
    try:
        ended = False
        while True:
            while not ended and len(queue) < _WORKERS + 1:
                item = next(items, None)
                ended = item is None or isinstance(item, Exception)
                if item is not None:
                    queue.append((item, None if isinstance(item, Exception) else pool.submit(work, item)))
            if not queue:
                return
            yield queue.popleft()
    finally:
        for _, future in queue:
            if future is not None:
                future.cancel()
        pool.shutdown(wait=True)


def _tsv_records(stream: Any, *, first_line: int, has_label: bool, block_bytes: int, path: str | None,
                 progress: Callable[[], None] | None = None) -> Iterator[CriteoRecords]:
    """The samples of the TSV ``stream`` (``readinto(buffer) -> int``), one :class:`CriteoRecords` per block.

    This thread reads blocks of whole lines; :data:`_WORKERS` threads split and convert them
    (:func:`_parse_block`), a few blocks ahead of the one yielded, so the blocks are parsed on
    every core while the caller uses the records; lines are numbered as the blocks are yielded.
    """
    pa = arrow()
    nf = len(field_names(has_label))

    spare: list[bytearray] = []        # buffers of blocks already converted, read into again

    def blocks() -> Iterator[tuple[memoryview, bytearray] | Exception]:
        rest = b""
        while True:          # each block in a buffer of its own, read into after the previous one's last line
            need = len(rest) + block_bytes
            buf = spare.pop() if spare and len(spare[-1]) >= need else bytearray(need + (1 << 16))
            view = memoryview(buf)
            view[: len(rest)] = rest
            try:
                got = stream.readinto(view[len(rest) : need])
            except (pa.ArrowException, OSError) as exc:
                yield exc
                return
            end = len(rest) + got
            if not got:
                if end:
                    yield view[:end], buf
                return
            cut = buf.rfind(b"\n", 0, end) + 1
            rest = bytes(view[cut:end])
            if cut:
                yield view[:cut], buf
            else:
                spare.append(buf)

    def failed(exc: BaseException, line: int) -> InputError:
        return InputError(f"{path or 'Criteo data'}: cannot read the lines from {line} on: {exc}")

    line = first_line
    jobs = _ahead(blocks(), lambda got: _parse_block(got[0], has_label))
    with closing(jobs):                         # closed (its threads stopped) however this generator ends
        for item, future in jobs:
            if future is None:
                raise failed(item, line) from None
            try:
                block = future.result()
            except (pa.ArrowException, OSError) as exc:
                raise failed(exc, line) from None
            spare.append(item[1])                # converted: the records hold none of its bytes
            if block.bad is not None:
                raise CriteoFormatError(line + block.bad.row, f"{block.bad.what}, got {block.bad.text!r}",
                                        path) from None
            if block.wrong is not None:
                raise CriteoFormatError(line - 1 + block.wrong[0],
                                        f"expected {nf} tab-separated fields, found {block.wrong[1]}", path)
            assert block.recs is not None
            recs = replace(block.recs, first_line=line)
            line += block.rows
            if progress is not None:
                progress()
            yield recs


def parse_criteo(data: bytes | bytearray | memoryview, *, first_line: int = 1, has_label: bool = True,
                 path: str | None = None) -> CriteoRecords:
    """Parse whole lines of Criteo TSV held in memory (the last newline may be missing)."""
    arrow()
    raw = bytes(data)
    parts = list(_tsv_records(io.BytesIO(raw), first_line=first_line, has_label=has_label,
                              block_bytes=max(1 << 20, len(raw)), path=path))
    if not parts:
        return CriteoRecords(np.zeros(0, np.int8), np.zeros((0, NUM_DENSE), np.int64),
                             np.zeros((0, NUM_DENSE), np.bool_), np.zeros((0, NUM_CAT), np.int64), first_line)
    return CriteoRecords.concat(parts)


# --------------------------------------------------------------- reading


def _open_tsv(name: str) -> tuple[Any, Any]:
    """``(stream, raw file)`` of a TSV file, decompressed by its suffix (:data:`_COMPRESSION`)."""
    pa = arrow()
    codec = _COMPRESSION.get(os.path.splitext(name)[1].lower())
    raw = pa.OSFile(name, "rb")
    return (pa.CompressedInputStream(raw, codec) if codec else raw), raw


def _parquet_records(name: str, *, has_label: bool, rows: int,
                     progress: ReadProgress | None) -> Iterator[CriteoRecords]:
    pa = arrow()
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(name)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read Parquet file {name}: {exc}") from None
    names = field_names(has_label)
    lacking = [c for c in names if c not in pf.schema_arrow.names]
    if lacking:
        raise InputError(f"Parquet file {name} lacks Criteo columns {lacking[:6]}{' ...' if len(lacking) > 6 else ''} "
                         f"(needs {names[0]}, ..., C26)")
    total = pf.metadata.num_rows
    row = 1
    # pyarrow decodes the next batches while worker threads convert the ones before (the C parts release the GIL)
    jobs = _ahead(pf.iter_batches(batch_size=rows, columns=names), lambda batch: _records(batch, 1, has_label))
    with closing(jobs):
        for batch, future in jobs:
            assert future is not None
            try:
                recs = replace(future.result(), first_line=row)
            except BadValue as bad:
                raise CriteoFormatError(row + bad.row, f"{bad.what}, got {bad.text!r}", name, unit="row") from None
            except InputError as exc:
                raise InputError(f"Parquet file {name}: {exc}") from None
            row += batch.num_rows
            if progress is not None:
                progress(row - 1, total)
            yield recs


def read_criteo(path: str | os.PathLike[str], *, batch_size: int | None = None, has_label: bool = True,
                chunk_bytes: int = 8 << 20, progress: ReadProgress | None = None) -> Iterator[CriteoRecords]:
    """Yield the samples of a Criteo file (TSV, compressed TSV or Parquet: :func:`criteo_format`),
    ``batch_size`` at a time (the last batch may be smaller), or block by block (about
    ``chunk_bytes`` of TSV, or the rows in that many bytes of Parquet) when ``batch_size`` is ``None``.

    ``progress(done, total)`` is called after each block (:data:`ReadProgress`).
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    name = os.fspath(path)
    if not os.path.isfile(name):
        why = "no such file" if not os.path.exists(name) else "not a regular file"
        raise InputError(f"cannot read Criteo file {name}: {why}")
    arrow()

    def blocks() -> Iterator[CriteoRecords]:
        if criteo_format(name) == "parquet":
            yield from _parquet_records(name, has_label=has_label, rows=max(1, chunk_bytes // 256), progress=progress)
            return
        stream, raw = _open_tsv(name)
        size = os.path.getsize(name)
        tick = None if progress is None else (lambda: progress(min(raw.tell(), size), size))
        try:
            yield from _tsv_records(stream, first_line=1, has_label=has_label, block_bytes=int(chunk_bytes),
                                    path=name, progress=tick)
        finally:
            stream.close()
            raw.close()

    if batch_size is None:
        yield from blocks()
        return
    pending: deque[CriteoRecords] = deque()        # records not handed out yet, in order
    held = 0
    for recs in blocks():
        if len(recs):
            pending.append(recs)
            held += len(recs)
        while held >= batch_size:
            yield _take(pending, batch_size)
            held -= batch_size
    if held:
        yield CriteoRecords.concat(list(pending))


def _take(pending: deque[CriteoRecords], n: int) -> CriteoRecords:
    """The first ``n`` samples of ``pending`` (which holds at least ``n``), taken off it: a view of the
    first records when they hold ``n``, else the parts copied together (at most ``n`` samples copied)."""
    parts: list[CriteoRecords] = []
    need = n
    while need:
        first = pending.popleft()
        if len(first) > need:
            pending.appendleft(first.slice(need, len(first)))
            first = first.slice(0, need)
        parts.append(first)
        need -= len(first)
    return CriteoRecords.concat(parts)


# --------------------------------------------------------------- writing


def synthetic_dense(rng: np.random.Generator, n: int) -> tuple[IntArray, BoolArray]:
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


def _hex_strings(values: npt.NDArray[np.uint64], missing: BoolArray) -> pa.Array:
    """A string array of 8-digit lowercase hex of 32-bit ``values`` (nulls where ``missing``)."""
    pa = arrow()
    present = ~missing
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    chars = _HEX_CHARS[((values[present][:, None] >> shifts[None, :]) & np.uint64(0xF)).astype(np.intp)]
    offsets = np.zeros(values.size + 1, dtype=np.int32)
    np.cumsum(present * 8, out=offsets[1:])
    validity = pa.py_buffer(np.packbits(present, bitorder="little"))
    return pa.Array.from_buffers(pa.string(), values.size, [validity, pa.py_buffer(offsets), pa.py_buffer(chars)],
                                 null_count=int(missing.sum()))


def write_sample(path: str | os.PathLike[str], samples: int, *, seed: int = 0,
                 cardinalities: Sequence[int] = CRITEO_KAGGLE_CARDINALITIES, profile: Profile = PROFILE_2022,
                 has_label: bool = True, format: Literal["tsv", "parquet"] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``samples`` synthetic Criteo samples to ``path`` (returned).

    ``format``: ``"tsv"`` (compressed when the name ends in ``.gz``, ``.bz2``,
    ``.zst`` or ``.lz4``) or ``"parquet"`` (columns ``label`` int8,
    ``I1``..``I13`` int64, ``C1``..``C26`` hex strings; nulls for missing
    values); default :func:`criteo_format` of ``path``.  Categorical ids come
    from :func:`flexemr.apps.workload.generate` over tables of the given
    ``cardinalities`` (default: Criteo Kaggle's), one id per feature, encoded
    as 8-digit hex (``id * 0x9E3779B1 + salt mod 2**32``, a bijection); each
    feature is missing with its own rate (0-30 %).  Labels are clicks with
    probability :data:`CRITEO_POSITIVE_RATE`.  Deterministic in ``seed``.
    ``progress(rows written, samples)`` is called after each chunk of rows.
    """
    if len(cardinalities) != NUM_CAT:
        raise InputError(f"need {NUM_CAT} cardinalities, got {len(cardinalities)}")
    fmt = format or criteo_format(path)
    if fmt not in ("tsv", "parquet"):
        raise InputError(f"format must be 'tsv' or 'parquet', got {fmt!r}")
    pa = arrow()
    n = int(samples)
    if progress is not None:
        progress(0, n)
    rng = np.random.default_rng([int(seed), 0xC817E0])
    specs = [TableSpec(name, int(c), 1) for name, c in zip(CATEGORICAL_FEATURES, cardinalities)]
    jb = generate(specs, n, 1.0, profile, seed=int(seed), pooling="fixed")
    ids = jb.values.reshape(NUM_CAT, n).T.astype(np.uint64)            # [n, 26]
    salt = np.random.default_rng(0xC0).integers(0, 1 << 32, NUM_CAT, dtype=np.uint64)
    hexvals = (ids * np.uint64(0x9E3779B1) + salt[None, :]) & np.uint64(0xFFFFFFFF)
    cat_missing = rng.random((n, NUM_CAT)) < np.random.default_rng(0xCA).uniform(0.0, 0.3, NUM_CAT)
    ints, int_missing = synthetic_dense(rng, n)
    labels = (rng.random(n) < CRITEO_POSITIVE_RATE).astype(np.int8)

    names = field_names(has_label)
    schema = pa.schema([(c, pa.int8() if c == "label" else pa.int64() if c.startswith("I") else pa.string())
                        for c in names])

    def chunk(a: int, b: int) -> Any:
        cols = [pa.array(labels[a:b])] if has_label else []
        cols += [pa.array(ints[a:b, f], mask=int_missing[a:b, f]) for f in range(NUM_DENSE)]
        cols += [_hex_strings(np.ascontiguousarray(hexvals[a:b, f]), cat_missing[a:b, f]) for f in range(NUM_CAT)]
        return pa.RecordBatch.from_arrays(cols, schema=schema)

    out = Path(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            writer: Any = pq.ParquetWriter(out, schema)
        else:
            import pyarrow.csv as pacsv

            codec = _COMPRESSION.get(out.suffix.lower())
            sink = pa.CompressedOutputStream(str(out), codec) if codec else pa.OSFile(str(out), "wb")
            writer = pacsv.CSVWriter(sink, schema, write_options=pacsv.WriteOptions(
                include_header=False, delimiter="\t", quoting_style="none"))
        with writer:
            for a in range(0, n, _WRITE_ROWS):
                writer.write_batch(chunk(a, min(n, a + _WRITE_ROWS)))
                if progress is not None:
                    progress(min(n, a + _WRITE_ROWS), n)
        if fmt == "tsv":
            sink.close()
    except pa.ArrowException as exc:
        raise InputError(f"cannot write {out}: {exc}") from None
    return out
