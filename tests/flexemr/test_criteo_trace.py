"""Criteo reader/writer (TSV, compressed TSV, Parquet through pyarrow) and the lookup-trace format.

The pyarrow reader is checked against the numpy parser it replaced (``_criteo_oracle``): the same
records on the same files, and the same line and message for a malformed line.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.apps.criteo import (
    CriteoFormatError,
    CriteoRecords,
    criteo_format,
    hash_ids,
    parse_criteo,
    read_criteo,
    write_sample,
)
from flexemr.apps.dlrm import criteo_specs
from flexemr.apps.trace import TraceBatch, TraceFormatError, generate_trace, read_trace, write_trace
from flexemr.core.errors import ConfigError, InputError

from . import _criteo_oracle as oracle

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:      # the tests that need it skip, saying so
    pa = pq = None
needs_arrow = pytest.mark.skipif(pa is None, reason="the Criteo reader needs pyarrow, from the apps extra (make demo)")

LINE = "1\t5\t-2\t\t0\t1\t2\t3\t4\t5\t6\t7\t8\t9\t" + "\t".join(["68fd1e64", ""] * 13)

#: sha256 of what the writer wrote before it wrote through pyarrow: (samples, seed, has_label) -> digest
OLD_WRITER = {
    (1000, 4, True): "06b5ea30398ebaefddfda9d16190697bcd8cc8e2add143cd620ae08d9a9b7661",
    (3000, 7, True): "07768c31885e888357bb731a877a6a063e12b73fbd66478e24e145a7baac5485",
    (500, 2, False): "a1e79dfd9c5716f93db15c2da166115b36d7a324990e133029a384b3fbbe66ce",
}


def _same(recs: CriteoRecords, want: dict[str, np.ndarray]) -> None:
    assert np.array_equal(recs.labels, want["labels"]) and recs.labels.dtype == np.int8
    assert np.array_equal(recs.ints, want["ints"]) and recs.ints.dtype == np.int64
    assert np.array_equal(recs.int_missing, want["int_missing"])
    assert np.array_equal(recs.cats, want["cats"]) and recs.cats.dtype == np.int64


def _write(path: Path, data: bytes) -> Path:
    """``data`` written to ``path``, compressed as its suffix says."""
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".bz2":
        data = bz2.compress(data)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------ reading TSV


@needs_arrow
def test_parse_fields_and_missing_values() -> None:
    recs = parse_criteo((LINE + "\r\n" + LINE.replace("1\t5", "0\t", 1)).encode())
    assert len(recs) == 2
    assert recs.labels.tolist() == [1, 0]
    assert recs.ints[0, :3].tolist() == [5, -2, 0] and recs.int_missing[0, :3].tolist() == [False, False, True]
    assert recs.int_missing[1, 0] and recs.ints[0, 12] == 9
    assert recs.cats[0, 0] == 0x68FD1E64 and recs.cats[0, 1] == -1
    dense = recs.dense_features()
    assert dense.dtype == np.float32 and dense[0, 0] == pytest.approx(np.log1p(5)) and dense[0, 1] == 0
    jb = recs.jagged(criteo_specs(scale=1e-3))
    assert jb.batch_size == 2 and jb.lengths_of("C1").tolist() == [1, 1] and jb.lengths_of("C2").tolist() == [0, 0]
    assert jb.ids("C1").tolist() == hash_ids([0x68FD1E64] * 2, 0, criteo_specs(scale=1e-3)[0].num_rows).tolist()
    assert len(parse_criteo(b"")) == 0


@needs_arrow
@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz", ".txt.bz2"])
@pytest.mark.parametrize("has_label", [True, False])
def test_sample_files_read_as_the_numpy_parser_read_them(tmp_path: Path, suffix: str, has_label: bool) -> None:
    text = write_sample(tmp_path / "s.tsv", 2500, seed=11, has_label=has_label).read_bytes()
    want = oracle.parse(text, has_label=has_label)
    path = _write(tmp_path / f"copy{suffix}", text)
    assert criteo_format(path) == "tsv"
    # small blocks: lines are split across reads, and many blocks are parsed ahead
    parts = list(read_criteo(path, has_label=has_label, chunk_bytes=20_000))
    assert len(parts) > 10 and [p.first_line for p in parts][:2] == [1, 1 + len(parts[0])]
    _same(CriteoRecords.concat(parts), want)
    _same(next(read_criteo(path, has_label=has_label, batch_size=10_000)), want)


tsv_int = st.one_of(st.just(""), st.integers(-(10**17), 10**17).map(str), st.sampled_from(["-0", "007", "0"]))
tsv_hex = st.one_of(st.just(""), st.text("0123456789abcdefABCDEF", min_size=1, max_size=15),
                    st.integers(0, 2**32 - 1).map(lambda v: format(v, "08x")))
tsv_line = st.tuples(st.sampled_from(["0", "1", "00", "01"]), st.lists(tsv_int, min_size=13, max_size=13),
                     st.lists(tsv_hex, min_size=26, max_size=26)).map(lambda t: "\t".join([t[0], *t[1], *t[2]]))


@needs_arrow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lines=st.lists(tsv_line, min_size=1, max_size=60), crlf=st.booleans(), final_newline=st.booleans(),
       chunk=st.integers(400, 5000))
def test_any_valid_lines_read_as_the_numpy_parser_read_them(tmp_path: Path, lines: list[str], crlf: bool,
                                                            final_newline: bool, chunk: int) -> None:
    end = "\r\n" if crlf else "\n"
    data = (end.join(lines) + (end if final_newline else "")).encode()
    want = oracle.parse(data)
    _same(parse_criteo(data), want)
    path = _write(tmp_path / "h.tsv", data)
    _same(CriteoRecords.concat(list(read_criteo(path, chunk_bytes=chunk))), want)


@needs_arrow
def test_jagged_batches_hash_as_hash_ids_did(tmp_path: Path) -> None:
    """CriteoRecords.jagged (one native pass) gives the values and lengths of hash_ids per feature (numpy)."""
    path = write_sample(tmp_path / "s.tsv", 3000, seed=5)
    specs = criteo_specs(scale=1e-3)
    for recs in read_criteo(path, batch_size=700, chunk_bytes=50_000):    # views across and within blocks
        jb = recs.jagged(specs)
        cols = recs.cats.T
        want = np.concatenate([hash_ids(cols[f][cols[f] >= 0], f, specs[f].num_rows) for f in range(26)])
        assert np.array_equal(jb.values, want) and jb.batch_size == len(recs)
        assert np.array_equal(jb.lengths, (cols >= 0).reshape(-1).astype(np.int64))
    with pytest.raises(InputError, match="need 26 tables"):
        recs.jagged(specs[:3])


@needs_arrow
@pytest.mark.parametrize("name", ["s.tsv", "s.parquet"])
def test_reader_threads_stop_when_reading_stops(tmp_path: Path, name: str) -> None:
    """Blocks are converted on worker threads ahead of the one yielded: stopping early, or an error, stops them."""
    import threading

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("flexemr-criteo")]

    path = write_sample(tmp_path / name, 3000, seed=1)
    reader = read_criteo(path, chunk_bytes=20_000)
    assert len(next(reader)) > 0 and workers()
    reader.close()
    assert workers() == []
    bad = tmp_path / "bad.tsv"
    bad.write_text((LINE + "\n") * 2000 + "x" + LINE[1:] + "\n" + (LINE + "\n") * 500)
    with pytest.raises(CriteoFormatError, match="line 2001: field label"):
        list(read_criteo(bad, chunk_bytes=20_000))
    assert workers() == []


#: malformed values by the kind of field they go into (label, integer I1..I13, hex C1..C26)
BAD_VALUES = {"label": ["2", "", "-1", " 1", "1 ", "x"],
              "int": ["x5", "+5", " 5", "0x10", "-", "5-5", "1e3", "12345678x"],
              "hex": ["68fd1g64", "1" * 16, "12z", "0x1f", "68FD1E6 ", "-1", "+1", "g"]}


@needs_arrow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lines=st.lists(tsv_line, min_size=1, max_size=200), row=st.integers(0, 10**6), field=st.integers(0, 38),
       kind=st.sampled_from(sorted(BAD_VALUES)), pick=st.integers(0, 100), chunk=st.integers(400, 9000),
       crlf=st.booleans())
def test_a_malformed_value_anywhere_is_reported_as_the_numpy_parser_reported_it(
        tmp_path: Path, lines: list[str], row: int, field: int, kind: str, pick: int, chunk: int, crlf: bool) -> None:
    """One bad value at a random line and field (the native checks, block boundaries anywhere): the same line
    number and message as the numpy parser's."""
    at = row % len(lines)
    fields = lines[at].split("\t")
    col = {"label": 0, "int": 1 + field % 13, "hex": 14 + field % 26}[kind]
    fields[col] = BAD_VALUES[kind][pick % len(BAD_VALUES[kind])]
    lines[at] = "\t".join(fields)
    data = (("\r\n" if crlf else "\n").join(lines) + "\n").encode()
    with pytest.raises(oracle.OracleError) as want:
        oracle.parse(data)
    path = _write(tmp_path / "bad.tsv", data)
    with pytest.raises(CriteoFormatError) as got:
        list(read_criteo(path, chunk_bytes=chunk))
    assert (got.value.line, str(got.value)) == (at + 1, f"{path}:line {want.value.line}: {want.value.message}")


#: (name, the malformed line); each replaces one line of a file of good ones
BAD_LINES = [
    ("too-few-fields", "1\t5"),
    ("too-many-fields", LINE + "\t7"),
    ("empty-line", ""),
    ("letters-in-int", LINE.replace("\t5\t", "\tx5\t", 1)),
    ("plus-sign", LINE.replace("\t5\t", "\t+5\t", 1)),
    ("space-in-int", LINE.replace("\t5\t", "\t 5\t", 1)),      # pyarrow would take it: the strict way refuses
    ("hex-int", LINE.replace("\t5\t", "\t0x10\t", 1)),          # likewise
    ("minus-alone", LINE.replace("\t5\t", "\t-\t", 1)),
    ("minus-inside", LINE.replace("\t5\t", "\t5-5\t", 1)),
    ("int-beyond-int64", LINE.replace("\t5\t", "\t" + "9" * 20 + "\t", 1)),
    ("not-hex", LINE.replace("68fd1e64", "68fd1g64", 1)),
    ("hex-too-long", LINE.replace("68fd1e64", "1" * 16, 1)),
    ("short-hex-not-hex", LINE.replace("68fd1e64", "12z", 1)),
    ("label-2", "2" + LINE[1:]),
    ("label-empty", LINE[1:]),
    ("label-negative", "-1" + LINE[1:]),
    ("label-spaced", " 1" + LINE[1:]),
]


#: where the malformed line is (an empty last line without a newline is no line: not a case)
PLACES = [(name, bad, where) for name, bad in BAD_LINES for where in ("first", "middle", "last-no-newline", "second-block")
          if (name, where) != ("empty-line", "last-no-newline")]


@needs_arrow
@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz"])
@pytest.mark.parametrize("name, bad, where", PLACES, ids=[f"{n}-{w}" for n, _, w in PLACES])
def test_malformed_line_reported_as_the_numpy_parser_reported_it(tmp_path: Path, suffix: str, where: str,
                                                                 name: str, bad: str) -> None:
    count = {"first": 5, "middle": 9, "last-no-newline": 9, "second-block": 400}[where]
    at = {"first": 0, "middle": 4, "last-no-newline": 8, "second-block": 300}[where]
    lines = [LINE] * count
    lines[at] = bad
    data = ("\n".join(lines) + ("" if where == "last-no-newline" else "\n")).encode()
    with pytest.raises(oracle.OracleError) as want:
        oracle.parse(data)
    path = _write(tmp_path / f"bad{suffix}", data)
    with pytest.raises(CriteoFormatError) as got:
        list(read_criteo(path, chunk_bytes=20_000))
    assert got.value.line == want.value.line == at + 1
    assert str(got.value) == f"{path}:line {want.value.line}: {want.value.message}"
    assert isinstance(got.value, InputError) and got.value.path == str(path)
    with pytest.raises(CriteoFormatError, match=f"^line {at + 7}: ") as mem:      # in memory, numbered from 7
        parse_criteo(data, first_line=7)
    assert str(mem.value).endswith(want.value.message)


@needs_arrow
def test_the_first_malformed_line_is_reported(tmp_path: Path) -> None:
    """The numpy parser reported a bad label before a bad integer on an earlier line; now the earliest line wins."""
    lines = [LINE] * 6
    lines[2] = LINE.replace("\t5\t", "\tx\t", 1)
    lines[4] = "7" + LINE[1:]
    lines[5] = "1\t2"
    with pytest.raises(CriteoFormatError, match=r"^line 3: field I1: expected an integer, got 'x'$"):
        parse_criteo("\n".join(lines).encode())
    lines[1] = LINE + "\t"
    with pytest.raises(CriteoFormatError, match=r"^line 2: expected 40 tab-separated fields, found 41$"):
        parse_criteo("\n".join(lines).encode())


@needs_arrow
def test_labelless_files_and_empty_lines(tmp_path: Path) -> None:
    no_label = LINE[2:]
    recs = parse_criteo(f"{no_label}\n{no_label}\n".encode(), has_label=False)
    assert recs.labels.tolist() == [-1, -1] and recs.ints[0, 0] == 5
    all_missing = "\t" * 38                     # every field empty: a sample with nothing present
    recs = parse_criteo(f"{no_label}\n{all_missing}\n".encode(), has_label=False)
    assert recs.int_missing[1].all() and (recs.cats[1] == -1).all()
    with pytest.raises(CriteoFormatError, match="^line 2: expected 39 tab-separated fields, found 1$"):
        parse_criteo(f"{no_label}\n\n{no_label}\n".encode(), has_label=False)
    with pytest.raises(CriteoFormatError, match="^line 1: expected 39 tab-separated fields, found 40$"):
        parse_criteo(f"{LINE}\n".encode(), has_label=False)


@needs_arrow
def test_reader_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        next(read_criteo(tmp_path / "missing.tsv"))
    with pytest.raises(InputError, match="not a regular file"):
        next(read_criteo(tmp_path))
    (tmp_path / "s.tsv").write_text(LINE + "\n")
    for bad in (0, -3, True, 2.5):
        with pytest.raises(InputError, match="batch_size must be a positive int"):
            next(read_criteo(tmp_path / "s.tsv", batch_size=bad))  # type: ignore[arg-type]
    (tmp_path / "broken.tsv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="broken.tsv.gz: cannot read the lines from 1 on"):
        list(read_criteo(tmp_path / "broken.tsv.gz"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="cannot read Parquet file .*junk.parquet"):
        list(read_criteo(tmp_path / "junk.parquet"))


def test_missing_pyarrow_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from flexemr.apps import criteo_columns

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    monkeypatch.setattr(criteo_columns, "_PYARROW", None)        # as in a process that has not found it yet
    (tmp_path / "s.tsv").write_text(LINE + "\n")
    for call in (lambda: next(read_criteo(tmp_path / "s.tsv")), lambda: parse_criteo(b"x"),
                 lambda: write_sample(tmp_path / "w.tsv", 3)):
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value) == ("reading and writing Criteo files needs pyarrow, from the 'apps' extra: "
                                  "pip install 'flexemr[apps]' (make demo installs it)")


@needs_arrow
def test_progress_reaches_the_whole_file(tmp_path: Path) -> None:
    for name in ("p.tsv", "p.tsv.gz", "p.parquet"):
        path = write_sample(tmp_path / name, 3000, seed=2)
        calls: list[tuple[int, int]] = []
        n = sum(len(r) for r in read_criteo(path, chunk_bytes=50_000, progress=lambda d, t: calls.append((d, t))))
        assert n == 3000 and len(calls) > 3, name
        total = 3000 if name.endswith(".parquet") else path.stat().st_size
        assert calls[-1] == (total, total) and all(t == total for _, t in calls), name
        assert [d for d, _ in calls] == sorted(d for d, _ in calls), name


# ---------------------------------------------------------------- Parquet


@needs_arrow
@pytest.mark.parametrize("has_label", [True, False])
def test_parquet_holds_the_same_samples_as_tsv(tmp_path: Path, has_label: bool) -> None:
    tsv = write_sample(tmp_path / "s.tsv", 4000, seed=9, has_label=has_label)
    par = write_sample(tmp_path / "s.parquet", 4000, seed=9, has_label=has_label)
    assert criteo_format(par) == "parquet" and criteo_format(tmp_path / "S.PQ") == "parquet"
    schema = pq.read_schema(par)
    assert schema.names == (["label"] if has_label else []) + [f"I{i}" for i in range(1, 14)] + \
        [f"C{i}" for i in range(1, 27)]
    assert str(schema.field("I2").type) == "int64" and str(schema.field("C1").type) == "string"
    want = oracle.parse(tsv.read_bytes(), has_label=has_label)
    parts = list(read_criteo(par, has_label=has_label, chunk_bytes=100_000))
    assert len(parts) > 1
    _same(CriteoRecords.concat(parts), want)
    _same(next(read_criteo(par, has_label=has_label, batch_size=4000)), want)


@needs_arrow
def test_parquet_with_other_column_types_and_errors(tmp_path: Path) -> None:
    par = write_sample(tmp_path / "s.parquet", 50, seed=1)
    table = pq.read_table(par)
    want = next(read_criteo(par, batch_size=50))
    # categorical values as integers, integers as text, an extra column: the same samples
    cols = {name: table.column(name) for name in table.column_names}
    for f in range(1, 27):
        cols[f"C{f}"] = pa.array(np.where(want.cats[:, f - 1] < 0, None, want.cats[:, f - 1]).tolist(), pa.int64())
    cols["I3"] = cols["I3"].cast(pa.string())
    cols["extra"] = pa.array(range(50))
    pq.write_table(pa.table(cols), tmp_path / "other.parquet")
    got = next(read_criteo(tmp_path / "other.parquet", batch_size=50))
    assert np.array_equal(got.cats, want.cats) and np.array_equal(got.ints, want.ints)
    assert np.array_equal(got.int_missing, want.int_missing) and np.array_equal(got.labels, want.labels)

    def broken(**change: object) -> Path:
        out = tmp_path / "broken.parquet"
        pq.write_table(pa.table({**cols, **change}), out)
        return out

    labels = table.column("label").to_pylist()
    with pytest.raises(CriteoFormatError, match=r"broken.parquet:row 3: field label: label must be 0 or 1, got ''$"):
        list(read_criteo(broken(label=pa.array(labels[:2] + [None] + labels[3:], pa.int8()))))
    with pytest.raises(CriteoFormatError, match=r":row 5: field label: label must be 0 or 1, got '3'$"):
        list(read_criteo(broken(label=pa.array(labels[:4] + [3] + labels[5:], pa.int8()))))
    with pytest.raises(CriteoFormatError, match=r":row 2: field C4: expected a categorical value >= 0, got '-7'$"):
        list(read_criteo(broken(C4=pa.array([1, -7] + [1] * 48, pa.int64()))))
    with pytest.raises(CriteoFormatError, match=r":row 1: field C5: expected a hex string of at most 15 digits"):
        list(read_criteo(broken(C5=pa.array(["zz"] * 50))))
    with pytest.raises(InputError, match=r"broken.parquet: .*expected integers or text, the column holds double"):
        list(read_criteo(broken(I1=pa.array([1.5] * 50))))
    del cols["C26"], cols["I13"]
    with pytest.raises(InputError, match=r"lacks Criteo columns \['I13', 'C26'\]"):
        list(read_criteo(broken()))


# ---------------------------------------------------------------- writing


@needs_arrow
@pytest.mark.parametrize("key", sorted(OLD_WRITER))
def test_writer_writes_what_the_old_writer_wrote(tmp_path: Path, key: tuple[int, int, bool]) -> None:
    samples, seed, has_label = key
    path = write_sample(tmp_path / "s.tsv", samples, seed=seed, has_label=has_label)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == OLD_WRITER[key]
    gz = write_sample(tmp_path / "s.tsv.gz", samples, seed=seed, has_label=has_label)
    assert gzip.decompress(gz.read_bytes()) == path.read_bytes()


@needs_arrow
def test_sample_file_round_trip_in_batches(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    path = write_sample(tmp_path / "s.tsv", 1000, seed=4, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 1000) and calls[-1] == (1000, 1000)
    text = path.read_text()
    assert text.count("\n") == 1000 and "\t\t" in text                 # empty fields present
    parts = list(read_criteo(path, batch_size=300, chunk_bytes=4096))  # chunks split lines
    assert [len(p) for p in parts] == [300, 300, 300, 100]
    assert [p.first_line for p in parts] == [1, 301, 601, 901]
    whole = next(read_criteo(path, batch_size=5000))
    assert np.array_equal(np.concatenate([p.cats for p in parts]), whole.cats)
    assert 0.15 < whole.labels.mean() < 0.35 and (whole.cats == -1).any() and whole.int_missing.any()
    assert (whole.cats < 1 << 32).all()
    # categorical values are skewed like the workload generator's (hot rows)
    _, counts = np.unique(whole.cats[:, 2][whole.cats[:, 2] >= 0], return_counts=True)
    assert counts.max() > 10
    # no trailing newline is fine too
    (tmp_path / "n.tsv").write_text(LINE)
    assert len(next(read_criteo(tmp_path / "n.tsv"))) == 1
    with pytest.raises(InputError, match="format must be 'tsv' or 'parquet'"):
        write_sample(tmp_path / "x.csv", 3, format="csv")  # type: ignore[arg-type]


# ------------------------------------------------------------------ traces


def test_trace_round_trip_and_validation(tmp_path: Path) -> None:
    specs = criteo_specs(scale=1e-4)
    batches = generate_trace(specs, 4, 32, 3.0, seed=7)
    batches.append(TraceBatch(batches[0].dense[:5], generate_trace(specs, 1, 5, 2.0)[0].sparse, batches[0].labels[:5]))
    path = write_trace(tmp_path / "t.trace", batches, num_rows={s.name: s.num_rows for s in specs})
    trace = read_trace(path)
    assert len(trace) == 5 and trace.keys == tuple(s.name for s in specs) and trace.meta["version"] == 1
    for a, b in zip(trace, batches):
        assert a.sparse == b.sparse and np.array_equal(a.dense, b.dense) and np.array_equal(a.labels, b.labels)
    assert generate_trace(specs, 2, 8, 2.0, seed=1)[1].sparse == generate_trace(specs, 2, 8, 2.0, seed=1)[1].sparse
    # an id beyond its table, a wrong file, a truncated archive
    bad = {s.name: 1 for s in specs}
    write_trace(tmp_path / "bad.npz", batches, num_rows=bad)
    with pytest.raises(TraceFormatError, match="num_rows"):
        read_trace(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceFormatError):
        read_trace(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(TraceFormatError):
        read_trace(tmp_path / "other.npz")


@pytest.mark.parametrize("module", ["flexemr.apps.dlrm", pytest.param("flexemr.apps.criteo", marks=needs_arrow),
                                    "flexemr.apps.trace", "flexemr.apps.extras", "flexemr.apps.progress",
                                    "flexemr.core.textcols"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------- rank --criteo: a stream read ahead, bounded


def test_rank_reads_a_criteo_file_ahead_by_at_most_a_few_batches() -> None:
    """rank --criteo holds READ_AHEAD batches (plus the one being made and the one being ranked), not the file;
    an error of the reader reaches the ranker; stopping early stops the reader and closes its file."""
    import threading
    import time

    from flexemr.apps.rank import READ_AHEAD, _read_ahead

    made: list[int] = []
    closed = threading.Event()

    def source(n: int, fail_at: int | None = None) -> Iterator[Any]:
        try:
            for i in range(n):
                if i == fail_at:
                    raise CriteoFormatError(i + 1, "field I1: expected an integer, got 'x'", "day.tsv")
                made.append(i)
                yield i
        finally:
            closed.set()

    stream = _read_ahead(source(1000), READ_AHEAD)
    for k, item in enumerate(stream):
        assert item == k
        time.sleep(0.01 if k < 3 else 0)
        assert len(made) <= k + READ_AHEAD + 2, (k, len(made))           # never the whole file
        if k == 20:
            break
    stream.close()
    assert closed.wait(5) and len(made) <= 21 + READ_AHEAD + 2
    made.clear()
    with pytest.raises(CriteoFormatError, match="day.tsv:line 8: field I1"):
        list(_read_ahead(source(100, fail_at=7), READ_AHEAD))
    assert made == list(range(7))
