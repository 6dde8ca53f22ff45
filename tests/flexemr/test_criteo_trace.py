"""Criteo TSV reader/writer and the lookup-trace format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flexemr.apps.criteo import CriteoFormatError, hash_ids, parse_criteo, read_criteo, write_sample
from flexemr.apps.dlrm import criteo_specs
from flexemr.core.errors import InputError
from flexemr.apps.trace import TraceBatch, TraceFormatError, generate_trace, read_trace, write_trace

LINE = "1\t5\t-2\t\t0\t1\t2\t3\t4\t5\t6\t7\t8\t9\t" + "\t".join(["68fd1e64", ""] * 13)


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


@pytest.mark.parametrize("bad, line, what", [
    ("1\t5", 2, "expected 40 tab-separated fields, found 2"),
    (LINE.replace("\t5\t", "\tx5\t", 1), 2, "field I1: expected an integer"),
    (LINE.replace("68fd1e64", "68fd1g64", 1), 2, "field C1: expected a hex"),
    ("2" + LINE[1:], 2, "field label: label must be 0 or 1"),
    ("\t" + LINE[2:], 2, "field label"),
    ("", 2, "found 1"),
])
def test_malformed_lines_raise_with_line_number(tmp_path: Path, bad: str, line: int, what: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(f"{LINE}\n{bad}\n{LINE}\n")
    with pytest.raises(CriteoFormatError) as ei:
        list(read_criteo(path))
    assert ei.value.line == line and what in str(ei.value) and str(path) in str(ei.value)
    assert isinstance(ei.value, InputError)


def test_sample_file_round_trip_in_batches(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "s.tsv", 1000, seed=4)
    text = path.read_text()
    assert text.count("\n") == 1000 and "\t\t" in text                 # empty fields present
    assert write_sample(tmp_path / "t.tsv", 1000, seed=4).read_text() == text
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


@pytest.mark.parametrize("module", ["flexemr.apps.dlrm", "flexemr.apps.criteo", "flexemr.apps.trace"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
