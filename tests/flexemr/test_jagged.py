"""Tests for flexemr's JaggedBatch (KeyedJaggedTensor-like) and bag pooling."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.core.errors import InputError, UnknownTableError
from flexemr.core.jagged import JaggedBatch, pool_bags

per_key_lists = st.integers(0, 6).flatmap(
    lambda batch: st.dictionaries(
        st.sampled_from(["user", "item", "ctx", "geo"]),
        st.lists(st.lists(st.integers(0, 1000), max_size=5), min_size=batch, max_size=batch),
        max_size=4,
    )
)


@settings(max_examples=200, deadline=None)
@given(per_key_lists)
def test_from_lists_round_trip(per_key: dict[str, list[list[int]]]) -> None:
    jb = JaggedBatch.from_lists(per_key)
    assert jb.keys == tuple(per_key)
    batch = len(next(iter(per_key.values()))) if per_key else 0
    assert jb.batch_size == batch
    assert jb.lengths.size == len(per_key) * batch
    assert jb.offsets[0] == 0 and jb.offsets[-1] == len(jb) == jb.values.size
    tables = jb.per_table()
    assert list(tables) == list(per_key)
    flat = np.concatenate([tables[k] for k in per_key]) if per_key else np.zeros(0, np.int64)
    assert np.array_equal(flat, jb.values)
    for key, samples in per_key.items():
        offs = jb.bag_offsets(key)
        assert offs.shape == (batch + 1,) and offs[0] == 0 and offs[-1] == tables[key].size
        got = [tables[key][offs[b] : offs[b + 1]].tolist() for b in range(batch)]
        assert got == samples
        assert jb.lengths_of(key).tolist() == [len(s) for s in samples]
        assert np.array_equal(jb.ids(key), tables[key])
    # the same batch from offsets, and from per-table pieces
    if per_key:
        assert JaggedBatch(jb.keys, jb.values, offsets=jb.offsets) == jb
        rebuilt = JaggedBatch.from_per_table({k: (tables[k], jb.bag_offsets(k)) for k in per_key})
        assert rebuilt == jb


def test_kjt_layout_example() -> None:
    # TorchRec convention: values grouped by key, lengths key-major
    jb = JaggedBatch(["f1", "f2"], np.array([10, 11, 12, 20, 21]), lengths=np.array([2, 0, 1, 1, 1, 0]))
    assert jb.batch_size == 3
    assert jb.per_table()["f1"].tolist() == [10, 11, 12]
    assert jb.per_table()["f2"].tolist() == [20, 21]
    assert jb.bag_offsets("f1").tolist() == [0, 2, 2, 3]
    assert jb.bag_offsets("f2").tolist() == [0, 1, 2, 2]
    assert jb.offsets.tolist() == [0, 2, 2, 3, 4, 5, 5]
    assert not jb.values.flags.writeable
    assert "f1" in repr(jb)


def test_empty_batches() -> None:
    jb = JaggedBatch([], [], lengths=[])
    assert jb.batch_size == 0 and jb.per_table() == {} and len(jb) == 0
    jb = JaggedBatch(["a"], [], lengths=[0, 0])
    assert jb.batch_size == 2 and jb.per_table()["a"].shape == (0,)
    assert jb.bag_offsets("a").tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(keys=["a"], values=[1, 2], lengths=[1]),  # sum mismatch
        dict(keys=["a"], values=[1], lengths=[2, -1]),  # negative length
        dict(keys=["a", "b"], values=[1, 2, 3], lengths=[1, 1, 1]),  # not a multiple of keys
        dict(keys=["a", "a"], values=[1, 2], lengths=[1, 1]),  # duplicate keys
        dict(keys=[""], values=[1], lengths=[1]),
        dict(keys=["a"], values=[1.5], lengths=[1]),  # float values
        dict(keys=["a"], values=[[1]], lengths=[1]),  # 2-D values
        dict(keys=["a"], values=[1], lengths=[1], offsets=[0, 1]),  # both
        dict(keys=["a"], values=[1]),  # neither
        dict(keys=["a"], values=[1], offsets=[1, 1]),  # offsets not from 0
        dict(keys=["a"], values=[1, 2], offsets=[0, 2, 1, 2]),  # decreasing
        dict(keys=["a"], values=[1, 2], offsets=[0, 1]),  # wrong end
        dict(keys=["a"], values=[1], lengths=[1], batch_size=2),
        dict(keys=[], values=[], lengths=[1]),
    ],
)
def test_invalid_batches(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        JaggedBatch(**kwargs)


def test_unknown_key_and_uneven_lists() -> None:
    jb = JaggedBatch.from_lists({"a": [[1], [2]]})
    with pytest.raises(UnknownTableError):
        jb.bag_offsets("b")
    with pytest.raises(KeyError):
        jb.ids("b")
    with pytest.raises(InputError):
        JaggedBatch.from_lists({"a": [[1]], "b": [[1], [2]]})


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 4), max_size=8),
    st.integers(1, 5),
    st.sampled_from(["sum", "mean"]),
    st.sampled_from([np.float32, np.float16, np.float64]),
)
def test_pool_bags_matches_naive(lengths: list[int], dim: int, mode: str, dtype: Any) -> None:
    offs = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    rows = np.random.default_rng(len(lengths)).standard_normal((int(offs[-1]), dim)).astype(dtype)
    out = pool_bags(rows, offs, mode)  # type: ignore[arg-type]
    acc = np.float32 if dtype == np.float16 else dtype
    assert out.shape == (len(lengths), dim) and out.dtype == acc
    for b in range(len(lengths)):
        seg = rows[offs[b] : offs[b + 1]].astype(acc)
        want = np.zeros(dim, acc) if seg.shape[0] == 0 else (seg.sum(0) if mode == "sum" else seg.mean(0))
        np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5)


def test_pool_bags_rejects_bad_offsets() -> None:
    rows = np.zeros((3, 2), np.float32)
    for offs in ([0, 2], [1, 3], [0, 2, 1, 3], []):
        with pytest.raises(InputError):
            pool_bags(rows, offs)
    with pytest.raises(InputError):
        pool_bags(rows, [0, 3], mode="max")  # type: ignore[arg-type]
