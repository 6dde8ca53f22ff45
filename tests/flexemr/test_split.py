"""Property and unit tests for flexemr's sharding plan, lookup splitter and coalescer."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.core.errors import (
    ConfigError,
    FlexEMRError,
    InputError,
    LookupIdError,
    UnknownTableError,
)
from flexemr.core.config import ClusterConfig, ServerAddress
from flexemr.core.plan import Shard, ShardingPlan, validate_ids
from flexemr.core.toml import dumps_toml
from flexemr.core.spec import TableSpec
from flexemr.core.split import SplitLookup, SubRequest, split_lookup
from flexemr.testing import execute_locally, execute_subrequests, lookup_locally, shard_region_array

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = ["float32", "float16", "float64", "int8"]


# ------------------------------------------------------------------ strategies


@st.composite
def table_specs(draw: st.DrawFn, max_tables: int = 3) -> list[TableSpec]:
    n = draw(st.integers(1, max_tables))
    names = draw(st.lists(st.sampled_from(["user", "item", "ctx", "geo", "a/b", "x y"]), min_size=n, max_size=n, unique=True))
    return [
        TableSpec(name, draw(st.integers(1, 50)), draw(st.integers(1, 9)), draw(st.sampled_from(DTYPES)))
        for name in names
    ]


@st.composite
def grid_shards(draw: st.DrawFn, spec: TableSpec, servers: list[str]) -> list[Shard]:
    """Random 2-D layout: random row bands, each with its own random column cuts."""
    row_cuts = sorted(draw(st.sets(st.integers(1, spec.num_rows - 1), max_size=6))) if spec.num_rows > 1 else []
    rows = [0, *row_cuts, spec.num_rows]
    out = []
    for r0, r1 in zip(rows[:-1], rows[1:]):
        col_cuts = sorted(draw(st.sets(st.integers(1, spec.dim - 1), max_size=3))) if spec.dim > 1 else []
        cols = [0, *col_cuts, spec.dim]
        for c0, c1 in zip(cols[:-1], cols[1:]):
            out.append(Shard(spec.name, draw(st.sampled_from(servers)), r0, r1, c0, c1))
    return draw(st.permutations(out))


@st.composite
def plans(draw: st.DrawFn, max_tables: int = 3) -> ShardingPlan:
    specs = draw(table_specs(max_tables))
    servers = [f"s{i}" for i in range(draw(st.integers(1, 4)))]
    kind = draw(st.sampled_from(["row_rps", "row_sps", "table", "column", "grid"]))
    if kind == "row_rps":
        # rows_per_shard = 1 gives one-row shards
        rps = draw(st.integers(1, max(s.num_rows for s in specs)))
        return ShardingPlan.row_wise(specs, servers, rows_per_shard=rps)
    if kind == "row_sps":
        return ShardingPlan.row_wise(specs, servers, shards_per_server=draw(st.integers(1, 5)))
    if kind == "table":
        return ShardingPlan.table_wise(specs, servers)
    if kind == "column":
        return ShardingPlan.column_wise(specs, servers, shards_per_table=draw(st.none() | st.integers(1, 6)))
    shards = {s.name: draw(grid_shards(s, servers)) for s in specs}
    return ShardingPlan({s.name: s for s in specs}, shards, servers)


def make_model(plan: ShardingPlan, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(seed)
    model = {}
    for name, spec in plan.tables.items():
        if spec.np_dtype.kind == "f":
            arr = rng.standard_normal((spec.num_rows, spec.dim)).astype(spec.np_dtype)
        else:
            arr = rng.integers(-128, 128, (spec.num_rows, spec.dim)).astype(spec.np_dtype)
        model[name] = arr
    return model


@st.composite
def ids_for(draw: st.DrawFn, spec: TableSpec) -> npt.NDArray[np.int64]:
    base = draw(st.lists(st.integers(0, spec.num_rows - 1), max_size=80))
    if draw(st.booleans()):
        base += [0, spec.num_rows - 1]
    if draw(st.booleans()) and base:
        base += draw(st.lists(st.sampled_from(base), max_size=20))  # duplicates
    if draw(st.booleans()):  # long consecutive runs
        lo = draw(st.integers(0, spec.num_rows - 1))
        base += list(range(lo, min(spec.num_rows, lo + draw(st.integers(1, 30)))))
    arr = np.asarray(draw(st.permutations(base)), dtype=draw(st.sampled_from([np.int64, np.int32, np.uint32])))
    return arr.astype(np.int64) if arr.size == 0 else arr


@st.composite
def plan_and_lookups(draw: st.DrawFn, max_callers: int = 1) -> tuple[ShardingPlan, list[tuple[str, npt.NDArray[Any]]]]:
    plan = draw(plans())
    n = draw(st.integers(1, max_callers))
    lookups = []
    for _ in range(n):
        table = draw(st.sampled_from(sorted(plan.tables)))
        lookups.append((table, draw(ids_for(plan.tables[table]))))
    return plan, lookups


def same(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ---------------------------------------------------------- split properties


@SETTINGS
@given(plan_and_lookups(max_callers=1), st.integers(0, 2**32 - 1))
def test_split_execute_assemble_equals_indexing(pl: Any, seed: int) -> None:
    plan, [(table, ids)] = pl
    model = make_model(plan, seed)
    split = split_lookup(plan, table, ids)
    staging = execute_locally(plan, model, split)
    assert staging.size == split.staging_bytes == split.bytes
    out = split.assemble(staging)
    assert same(out, model[table][ids.astype(np.int64)])
    # memoryview and bytes staging buffers work too, and a larger buffer is fine
    assert same(split.assemble(memoryview(staging.tobytes())), out)
    bigger = np.concatenate([staging, np.full(13, 255, np.uint8)])
    assert same(split.assemble(bigger), out)
    assert same(lookup_locally(plan, model, table, ids), out)


@SETTINGS
@given(plan_and_lookups())
def test_split_covers_unique_ids_exactly_once_within_shards(pl: Any) -> None:
    plan, [(table, ids)] = pl
    spec = plan.tables[table]
    split = split_lookup(plan, table, ids)
    uniq = np.unique(ids.astype(np.int64))
    assert split.num_ids == ids.size
    assert split.num_unique == uniq.size
    assert np.array_equal(split.unique_ids, uniq)
    assert split.num_reads == sum(s.lengths.size for s in split.subrequests)

    cover = np.zeros((spec.num_rows, spec.dim), dtype=np.int64)
    local_spans = []
    for sub in split.subrequests:
        shard = plan.shards[table][sub.shard_index]
        assert sub.server == shard.server
        assert sub.region_name == shard.region_name == f"{table}/{sub.shard_index}"
        assert plan.region(sub.region_name) == shard
        rb = shard.row_bytes(spec)
        lo, ro, ln = sub.local_offsets, sub.remote_offsets, sub.lengths
        assert lo.dtype == ro.dtype == ln.dtype == np.int64
        # inside the shard region, whole rows only
        assert (ro >= 0).all() and (ro + ln <= shard.nbytes(spec)).all()
        assert (ln > 0).all() and (ln % rb == 0).all() and (ro % rb == 0).all()
        assert (lo >= 0).all() and (lo + ln <= split.staging_bytes).all()
        for r, n in zip((ro // rb).tolist(), (ln // rb).tolist()):
            cover[shard.row_start + r : shard.row_start + r + n, shard.col_start : shard.col_end] += 1
        local_spans += list(zip(lo.tolist(), ln.tolist()))
        # maximal coalescing: no two reads adjacent in both remote and local space
        order = np.argsort(ro)
        ro_s, lo_s, ln_s = ro[order], lo[order], ln[order]
        adjacent = (ro_s[:-1] + ln_s[:-1] == ro_s[1:]) & (lo_s[:-1] + ln_s[:-1] == lo_s[1:])
        assert not adjacent.any()
    expected = np.zeros_like(cover)
    expected[uniq] = 1
    assert np.array_equal(cover, expected)
    # local spans tile the staging buffer exactly
    pos = 0
    for start, length in sorted(local_spans):
        assert start == pos
        pos += length
    assert pos == split.staging_bytes


@SETTINGS
@given(plan_and_lookups(), st.integers(0, 2**32 - 1))
def test_staging_layout_contract(pl: Any, seed: int) -> None:
    plan, [(table, ids)] = pl
    spec = plan.tables[table]
    model = make_model(plan, seed)
    split = split_lookup(plan, table, ids)
    staging = execute_locally(plan, model, split)
    uniq_rows = model[table][split.unique_ids]
    if plan.is_full_width(table):
        assert split.full_width
        assert same(staging.view(spec.np_dtype).reshape(split.num_unique, spec.dim), uniq_rows)
    for blk in split.blocks:
        cols = blk.col_end - blk.col_start
        nbytes = blk.count * cols * spec.itemsize
        got = staging[blk.local_base : blk.local_base + nbytes].view(spec.np_dtype).reshape(blk.count, cols)
        assert same(got, np.ascontiguousarray(uniq_rows[blk.first : blk.first + blk.count, blk.col_start : blk.col_end]))


@SETTINGS
@given(plan_and_lookups(), st.sampled_from([None, 64, 1 << 20]))
def test_sorted_unique_fast_path_equals_the_general_path(pl: Any, max_bytes: int | None) -> None:
    plan, [(table, ids)] = pl
    uniq = np.unique(ids.astype(np.int64))
    try:
        slow = split_lookup(plan, table, ids, max_read_bytes=max_bytes)
    except InputError:  # a shard row wider than max_bytes: the fast path refuses it the same way
        with pytest.raises(InputError):
            split_lookup(plan, table, uniq, max_read_bytes=max_bytes, sorted_unique=True)
        return
    fast = split_lookup(plan, table, uniq, max_read_bytes=max_bytes, sorted_unique=True)
    assert fast.unique_ids is uniq and fast.ids is uniq          # used as given: no copy
    assert np.array_equal(fast.inverse, np.arange(uniq.size))
    assert np.array_equal(fast.unique_ids, slow.unique_ids)
    assert (fast.staging_bytes, fast.blocks, fast.full_width) == (slow.staging_bytes, slow.blocks, slow.full_width)
    assert len(fast.subrequests) == len(slow.subrequests)
    for f, s in zip(fast.subrequests, slow.subrequests):
        assert (f.server, f.shard_index, f.region_name) == (s.server, s.shard_index, s.region_name)
        for name in ("local_offsets", "remote_offsets", "lengths"):
            assert np.array_equal(getattr(f, name), getattr(s, name))


def test_sorted_unique_fast_path_neither_validates_nor_deduplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    import flexemr.core.split

    plan = ShardingPlan.row_wise([TableSpec("t", 50, 2)], ["s0", "s1"])
    uniq = np.array([1, 2, 3, 30, 49])
    expected = split_lookup(plan, "t", uniq)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast path must not call this")

    monkeypatch.setattr(flexemr.core.split, "validate_ids", boom)
    monkeypatch.setattr(np, "unique", boom)
    fast = split_lookup(plan, "t", uniq, sorted_unique=True)
    monkeypatch.undo()
    assert [s.lengths.tolist() for s in fast.subrequests] == [s.lengths.tolist() for s in expected.subrequests]
    model = {"t": np.arange(100, dtype=np.float32).reshape(50, 2)}
    assert same(fast.assemble(execute_locally(plan, model, fast)), model["t"][uniq])


@pytest.mark.parametrize(("ids", "error"), [
    ([1, 2], InputError),                             # not an ndarray
    (np.array([1, 2], dtype=np.int32), InputError),   # not int64
    (np.array([[1, 2]]), InputError),                 # not 1-D
    (np.array([-1, 2]), LookupIdError),               # first id below 0
    (np.array([1, 50]), LookupIdError),               # last id past the table
])
def test_sorted_unique_fast_path_rejects_what_it_can_check_in_constant_time(ids: Any, error: type) -> None:
    plan = ShardingPlan.row_wise([TableSpec("t", 50, 2)], ["s0"])
    with pytest.raises(error, match="'t'"):
        split_lookup(plan, "t", ids, sorted_unique=True)
    assert split_lookup(plan, "t", np.zeros(0, np.int64), sorted_unique=True).staging_bytes == 0


@SETTINGS
@given(plan_and_lookups(), st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_max_read_bytes_caps_reads(pl: Any, max_bytes: int, seed: int) -> None:
    plan, [(table, ids)] = pl
    spec = plan.tables[table]
    model = make_model(plan, seed)
    rt = plan.range_table(table)
    touched = []
    for b in np.unique(plan.route_bands(table, ids)).tolist():
        first, n = int(rt.first_shard[b]), int(rt.num_col_shards[b])
        touched += [plan.shards[table][j] for j in range(first, first + n)]
    if any(s.row_bytes(spec) > max_bytes for s in touched):
        with pytest.raises(InputError):
            split_lookup(plan, table, ids, max_read_bytes=max_bytes)
        return
    split = split_lookup(plan, table, ids, max_read_bytes=max_bytes)
    plain = split_lookup(plan, table, ids)
    assert split.staging_bytes == plain.staging_bytes
    for sub in split.subrequests:
        assert (sub.lengths <= max_bytes).all()
    assert same(split.assemble(execute_locally(plan, model, split)), model[table][ids.astype(np.int64)])


@SETTINGS
@given(plan_and_lookups())
def test_route_matches_shard_ranges(pl: Any) -> None:
    plan, [(table, ids)] = pl
    idx = plan.route(table, ids)
    assert idx.shape == ids.shape
    for i, j in zip(ids.tolist(), idx.tolist()):
        sh = plan.shards[table][j]
        assert sh.row_start <= i < sh.row_end and sh.col_start == 0
    rt = plan.range_table(table)
    assert np.all(rt.starts[1:] == rt.ends[:-1]) and rt.starts[0] == 0
    assert rt.ends[-1] == plan.tables[table].num_rows


# ------------------------------------------------------------- examples


def test_empty_lookup_gives_zero_rows() -> None:
    plan = ShardingPlan.row_wise([TableSpec("t", 5, 3, "float16")], ["s0", "s1"])
    ids: Any
    for ids in (np.array([], dtype=np.int64), [], np.array([], dtype=np.uint8)):
        split = split_lookup(plan, "t", ids)
        assert split.subrequests == () and split.staging_bytes == 0
        out = split.assemble(np.zeros(0, np.uint8))
        assert out.shape == (0, 3) and out.dtype == np.float16
        assert split.assemble(memoryview(b"")).shape == (0, 3)


def test_coalescing_example_row_wise() -> None:
    plan = ShardingPlan.row_wise([TableSpec("t", 12, 2)], ["a", "b"], rows_per_shard=4)
    assert [(s.server, s.row_start, s.row_end) for s in plan.shards["t"]] == [
        ("a", 0, 4), ("b", 4, 8), ("a", 8, 12)]
    split = split_lookup(plan, "t", np.array([3, 4, 5, 2, 9, 11, 3]))
    subs = split.subrequests
    assert [s.region_name for s in subs] == ["t/0", "t/1", "t/2"]
    # rows 2,3 | 4,5 (run broken at the shard boundary 3|4) | 9 and 11
    assert subs[0].remote_offsets.tolist() == [16] and subs[0].lengths.tolist() == [16]
    assert subs[1].remote_offsets.tolist() == [0] and subs[1].lengths.tolist() == [16]
    assert subs[2].remote_offsets.tolist() == [8, 24] and subs[2].lengths.tolist() == [8, 8]
    assert [s.local_offsets.tolist() for s in subs] == [[0], [16], [32, 40]]
    assert (split.num_ids, split.num_unique, split.num_reads, split.bytes) == (7, 6, 4, 48)


def test_column_wise_blocks() -> None:
    plan = ShardingPlan.column_wise([TableSpec("t", 6, 5)], ["a", "b"])
    assert [(s.col_start, s.col_end) for s in plan.shards["t"]] == [(0, 3), (3, 5)]
    split = split_lookup(plan, "t", [1, 2, 4])
    a, b = split.subrequests
    # shard a: 12-byte rows, block [3, 3] at 0; shard b: 8-byte rows, block [3, 2] at 36
    assert a.local_offsets.tolist() == [0, 24] and a.lengths.tolist() == [24, 12]
    assert a.remote_offsets.tolist() == [12, 48]
    assert b.local_offsets.tolist() == [36, 52] and b.remote_offsets.tolist() == [8, 32]
    assert b.lengths.tolist() == [16, 8]
    assert split.staging_bytes == 3 * 5 * 4 and not split.full_width
    model = {"t": np.arange(30, dtype=np.float32).reshape(6, 5)}
    assert np.array_equal(lookup_locally(plan, model, "t", [4, 1, 1]), model["t"][[4, 1, 1]])


def test_shard_region_array_is_contiguous_slice() -> None:
    t = np.arange(40, dtype=np.float32).reshape(8, 5)
    arr = shard_region_array(t, Shard("t", "s", 2, 5, 1, 4))
    assert arr.flags.c_contiguous and np.array_equal(arr, t[2:5, 1:4])
    with pytest.raises(InputError):
        shard_region_array(t, Shard("t", "s", 2, 9, 0, 5))
    with pytest.raises(InputError):
        shard_region_array(t[0], Shard("t", "s", 0, 1, 0, 1))


def test_execute_rejects_out_of_bounds_reads() -> None:
    plan = ShardingPlan.row_wise([TableSpec("t", 4, 2)], ["s0"])
    model = {"t": np.zeros((4, 2), np.float32)}
    bad = SubRequest("s0", 0, "t/0", np.array([0]), np.array([24]), np.array([16]))
    with pytest.raises(FlexEMRError):
        execute_subrequests(plan, model, [bad], np.zeros(64, np.uint8))
    with pytest.raises(InputError):
        execute_subrequests(plan, {"t": np.zeros((4, 2), np.float64)}, [bad], np.zeros(64, np.uint8))


def test_subrequest_rejects_arrays_of_different_sizes() -> None:
    with pytest.raises(InputError):
        SubRequest("s0", 0, "t/0", np.array([0, 1]), np.array([0]), np.array([4]))


def test_assemble_rejects_short_staging() -> None:
    plan = ShardingPlan.row_wise([TableSpec("t", 4, 2)], ["s0"])
    split = split_lookup(plan, "t", [0, 1])
    with pytest.raises(InputError):
        split.assemble(np.zeros(split.staging_bytes - 1, np.uint8))
    with pytest.raises(InputError):
        split.assemble(np.zeros((4, 8), np.uint8)[:, ::2])


# ------------------------------------------------------------ bad inputs


@pytest.fixture
def plan4() -> ShardingPlan:
    return ShardingPlan.row_wise([TableSpec("user", 10, 4), TableSpec("item", 3, 2, "float16")], ["s0", "s1"])


@pytest.mark.parametrize("bad", [[-1], [0, 10], [10], [3, -7, 12], np.array([2**40]), np.array([2**63 + 5], np.uint64)])
def test_out_of_range_ids(plan4: ShardingPlan, bad: Any) -> None:
    with pytest.raises(LookupIdError) as ei:
        split_lookup(plan4, "user", np.asarray(bad))
    assert isinstance(ei.value, IndexError) and isinstance(ei.value, FlexEMRError)
    msg = str(ei.value)
    assert "'user'" in msg and "[0, 10)" in msg
    offending = [v for v in np.asarray(bad).tolist() if not 0 <= v < 10]
    assert str(offending[0]) in msg
    with pytest.raises(LookupIdError):
        plan4.route("user", np.asarray(bad))


@pytest.mark.parametrize(
    "bad",
    [np.array([1.0, 2.0]), [0.5], np.array([True, False]), np.array([[1, 2]]), np.array(3), np.array(["1"]),
     np.zeros((0, 2), np.int64)],
)
def test_wrong_dtype_or_shape(plan4: ShardingPlan, bad: Any) -> None:
    with pytest.raises(InputError) as ei:
        split_lookup(plan4, "user", bad)
    assert isinstance(ei.value, ValueError) and not isinstance(ei.value, LookupIdError)
    assert "'user'" in str(ei.value)


def test_unknown_table(plan4: ShardingPlan) -> None:
    with pytest.raises(UnknownTableError) as ei:
        split_lookup(plan4, "nope", [0])
    err = ei.value
    assert isinstance(err, KeyError) and isinstance(err, InputError) and isinstance(err, ValueError)
    assert "'nope'" in str(err) and "user" in str(err)
    with pytest.raises(KeyError):
        plan4.route("nope", [0])


def test_table_checked_before_ids_and_ids_before_work(plan4: ShardingPlan) -> None:
    with pytest.raises(UnknownTableError):
        split_lookup(plan4, "nope", np.array([1.5]))
    with pytest.raises(InputError):
        split_lookup(plan4, "item", np.array([[5]]))


def test_validate_ids_accepts_lists_and_small_ints() -> None:
    spec = TableSpec("t", 300, 1)
    assert validate_ids(spec, [1, 299]).dtype == np.int64
    assert validate_ids(spec, np.array([255], np.uint8)).tolist() == [255]
    assert validate_ids(spec, ()).shape == (0,)


# ----------------------------------------------------------------- plans


def test_row_wise_balanced() -> None:
    plan = ShardingPlan.row_wise([TableSpec("t", 10, 4)], ["a", "b", "c"], shards_per_server=2)
    sizes = [s.num_rows for s in plan.shards["t"]]
    assert len(sizes) == 6 and max(sizes) - min(sizes) <= 1 and sum(sizes) == 10
    assert [s.server for s in plan.shards["t"]] == ["a", "b", "c", "a", "b", "c"]
    tiny = ShardingPlan.row_wise([TableSpec("t", 2, 4)], ["a", "b", "c"])
    assert len(tiny.shards["t"]) == 2
    with pytest.raises(ConfigError):
        ShardingPlan.row_wise([TableSpec("t", 2, 4)], ["a"], rows_per_shard=1, shards_per_server=1)
    with pytest.raises(ConfigError):
        ShardingPlan.row_wise([TableSpec("t", 2, 4)], ["a"], rows_per_shard=0)


def test_table_wise_balances_bytes() -> None:
    specs = [TableSpec("big", 100, 8), TableSpec("m1", 50, 8), TableSpec("m2", 50, 8)]
    plan = ShardingPlan.table_wise(specs, ["a", "b"])
    assert plan.servers_of("big") == ("a",) and plan.servers_of("m1") == ("b",) and plan.servers_of("m2") == ("b",)
    assert plan.server_bytes() == {"a": 3200, "b": 3200}
    assert list(plan.tables) == ["big", "m1", "m2"]
    assert [s.region_name for s in plan.regions_on("b")] == ["m1/0", "m2/0"]


def _shards(*rows: tuple[int, int, int, int, str]) -> list[Shard]:
    return [Shard("t", srv, r0, r1, c0, c1) for r0, r1, c0, c1, srv in rows]


@pytest.mark.parametrize(
    "shards, fragment",
    [
        (_shards((0, 5, 0, 4, "a"), (4, 10, 0, 4, "a")), "overlap"),
        (_shards((0, 5, 0, 4, "a"), (6, 10, 0, 4, "a")), "gap"),
        (_shards((0, 5, 0, 4, "a")), "gap"),
        (_shards((1, 10, 0, 4, "a")), "gap"),
        (_shards((0, 10, 0, 2, "a"), (0, 10, 3, 4, "a")), "gap"),
        (_shards((0, 10, 0, 3, "a"), (0, 10, 2, 4, "a")), "overlap"),
        (_shards((0, 10, 0, 3, "a")), "gap"),
        (_shards((0, 10, 0, 4, "a"), (0, 10, 0, 4, "b")), "overlap"),
        (_shards((0, 10, 0, 4, "zzz")), "unknown server"),
        (_shards((0, 11, 0, 4, "a")), "inside"),
        (_shards((0, 10, 0, 5, "a")), "inside"),
        (_shards((0, 0, 0, 4, "a"), (0, 10, 0, 4, "a")), "inside"),
        (_shards((0, 10, 0, 2, "a"), (0, 5, 2, 4, "a"), (5, 10, 2, 4, "a")), "row bands"),
        ([], "no shards"),
    ],
)
def test_invalid_plans(shards: list[Shard], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ShardingPlan({"t": TableSpec("t", 10, 4)}, {"t": shards}, ("a", "b"))


def test_invalid_plan_misc() -> None:
    spec = TableSpec("t", 10, 4)
    ok = [Shard("t", "a", 0, 10, 0, 4)]
    with pytest.raises(ConfigError):
        ShardingPlan({"t": spec}, {"t": ok}, ())
    with pytest.raises(ConfigError):
        ShardingPlan({"t": spec}, {"t": ok}, ("a", "a"))
    with pytest.raises(ConfigError):
        ShardingPlan({"t": spec}, {"t": ok, "u": ok}, ("a",))
    with pytest.raises(ConfigError):
        ShardingPlan({"x": spec}, {"x": ok}, ("a",))
    with pytest.raises(ConfigError):
        ShardingPlan({"t": spec}, {"t": [Shard("u", "a", 0, 10, 0, 4)]}, ("a",))
    with pytest.raises(ConfigError):
        Shard("t", "a", 0, 1, 0, 1).region_name
    assert isinstance(ConfigError("x"), ValueError)


def test_plan_sorts_shards_and_assigns_indices() -> None:
    spec = TableSpec("t", 10, 4)
    given_order = _shards((5, 10, 2, 4, "b"), (0, 5, 0, 4, "a"), (5, 10, 0, 2, "a"))
    plan = ShardingPlan({"t": spec}, {"t": given_order}, ("a", "b"))
    assert [(s.row_start, s.col_start, s.index) for s in plan.shards["t"]] == [(0, 0, 0), (5, 0, 1), (5, 2, 2)]
    assert plan.route("t", [0, 4, 5, 9]).tolist() == [0, 0, 1, 1]
    assert plan.range_table("t").num_col_shards.tolist() == [1, 2]
    assert not plan.is_full_width("t")
    assert plan == ShardingPlan({"t": spec}, {"t": list(reversed(given_order))}, ("a", "b"))


@SETTINGS
@given(table_specs(), st.integers(1, 5), st.integers(1, 4))
def test_constructors_tile_tables(specs: list[TableSpec], nserv: int, sps: int) -> None:
    servers = [f"s{i}" for i in range(nserv)]
    for plan in (
        ShardingPlan.row_wise(specs, servers, shards_per_server=sps),
        ShardingPlan.row_wise(specs, servers, rows_per_shard=sps),
        ShardingPlan.table_wise(specs, servers),
        ShardingPlan.column_wise(specs, servers),
    ):
        total = sum(plan.server_bytes().values())
        assert total == sum(s.nbytes for s in specs)
        assert ShardingPlan.from_dict(plan.to_dict()) == plan


# ------------------------------------------------------------------ TOML


CLUSTER_TOML = """
[cluster]
secret = "s3cr\\"et"

[servers.s0]
host = "127.0.0.1"
port = 7000

[servers.s1]
host = "10.0.0.2"
port = 7001

[[tables]]
name = "user"
num_rows = 1000
dim = 64

[[tables]]
name = "item"
num_rows = 10
dim = 16
dtype = "float16"

[sharding]
kind = "row_wise"
rows_per_shard = 300
"""


def test_load_cluster_toml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER_TOML)
    cfg = ClusterConfig.from_toml(path)
    assert cfg.secret == 's3cr"et'
    assert cfg.addresses == {"s0": ServerAddress("127.0.0.1", 7000), "s1": ServerAddress("10.0.0.2", 7001)}
    assert str(cfg.address("s1")) == "10.0.0.2:7001"
    specs = [TableSpec("user", 1000, 64), TableSpec("item", 10, 16, "float16")]
    expected = ShardingPlan.row_wise(specs, ["s0", "s1"], rows_per_shard=300)
    assert cfg.plan == expected
    assert ShardingPlan.from_toml(path) == expected
    assert [s.num_rows for s in cfg.plan.shards["user"]] == [300, 300, 300, 100]
    # round trip through the writer
    out = tmp_path / "out.toml"
    cfg.write_toml(out)
    assert ClusterConfig.from_toml(out) == cfg
    assert tomllib.loads(cfg.to_toml()) == cfg.to_dict()


@pytest.mark.parametrize("kind", ["table_wise", "column_wise"])
def test_other_kinds_from_toml(tmp_path: Path, kind: str) -> None:
    text = CLUSTER_TOML.replace('kind = "row_wise"\nrows_per_shard = 300', f'kind = "{kind}"')
    path = tmp_path / "c.toml"
    path.write_text(text)
    specs = [TableSpec("user", 1000, 64), TableSpec("item", 10, 16, "float16")]
    assert ClusterConfig.from_toml(path).plan == getattr(ShardingPlan, kind)(specs, ["s0", "s1"])


def test_explicit_shards_toml(tmp_path: Path) -> None:
    text = """
[servers.a]
host = "h1"
port = 1
[servers.b]
host = "h2"
port = 2

[[tables]]
name = "t"
num_rows = 10
dim = 4

[[shards]]
table = "t"
server = "b"
rows = [6, 10]

[[shards]]
table = "t"
server = "a"
rows = [0, 6]
cols = [0, 4]
"""
    path = tmp_path / "c.toml"
    path.write_text(text)
    cfg = ClusterConfig.from_toml(path)
    assert cfg.secret is None
    assert [(s.server, s.row_start, s.row_end) for s in cfg.plan.shards["t"]] == [("a", 0, 6), ("b", 6, 10)]
    assert ClusterConfig.from_dict(tomllib.loads(cfg.to_toml())) == cfg


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.replace("port = 7001", "port = 70001"),
        lambda s: s.replace("port = 7001\n", ""),
        lambda s: s.replace('kind = "row_wise"', 'kind = "diagonal"'),
        lambda s: s.replace("rows_per_shard = 300", "shards_per_table = 3"),
        lambda s: s.replace('dtype = "float16"', 'dtype = "complex64"'),
        lambda s: s.replace("dim = 16", "dim = 0"),
        lambda s: s.replace("[[tables]]\nname = \"item\"", "[[tables]]\nname = \"user\""),
        lambda s: s + '\n[[shards]]\ntable = "user"\nserver = "s0"\n',
        lambda s: s + "\n[extra]\nx = 1\n",
        lambda s: s.replace("[cluster]", "[cluster]\nfoo = 1"),
        lambda s: s + "\nthis is not toml",
        lambda s: s.replace('kind = "row_wise"\nrows_per_shard = 300', 'kind = "explicit"'),
    ],
)
def test_invalid_cluster_files(tmp_path: Path, mutate: Any) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(mutate(CLUSTER_TOML))
    with pytest.raises(ConfigError):
        ClusterConfig.from_toml(path)


def test_explicit_shards_invalid_in_toml(tmp_path: Path) -> None:
    base = '[servers.a]\nhost = "h"\nport = 1\n[[tables]]\nname = "t"\nnum_rows = 10\ndim = 4\n'
    for shards in (
        '[[shards]]\ntable = "t"\nserver = "a"\nrows = [0, 5]\n',  # gap
        '[[shards]]\ntable = "t"\nserver = "a"\n[[shards]]\ntable = "t"\nserver = "a"\nrows = [5, 10]\n',  # overlap
        '[[shards]]\ntable = "t"\nserver = "nope"\n',  # unknown server
        '[[shards]]\ntable = "u"\nserver = "a"\n',  # unknown table
        '[[shards]]\ntable = "t"\nserver = "a"\nrows = [0, "x"]\n',
    ):
        path = tmp_path / "bad.toml"
        path.write_text(base + shards)
        with pytest.raises(ConfigError):
            ClusterConfig.from_toml(path)
    with pytest.raises(ConfigError):
        ClusterConfig.from_toml(tmp_path / "missing.toml")


def test_cluster_config_validation() -> None:
    plan = ShardingPlan.row_wise([TableSpec("t", 4, 2)], ["a", "b"])
    with pytest.raises(ConfigError):
        ClusterConfig(plan, {"a": ServerAddress("h", 1)})
    with pytest.raises(ConfigError):
        ClusterConfig(plan, {"a": ServerAddress("h", 1), "b": ServerAddress("h", 2), "c": ServerAddress("h", 3)})
    with pytest.raises(ConfigError):
        ServerAddress("", 1)
    with pytest.raises(ConfigError):
        ServerAddress("h", -1)
    cfg = ClusterConfig(plan, {"b": ServerAddress("h", 2), "a": ServerAddress("::1", 1)}, secret="xyzw")
    assert list(cfg.addresses) == ["a", "b"] and str(cfg.address("a")) == "[::1]:1"
    with pytest.raises(ConfigError):
        cfg.address("c")


names = st.text(alphabet=st.sampled_from(list('ab/ .-_"\\\té\x7f\x01')), min_size=1, max_size=8)


@SETTINGS
@given(plans(), st.data())
def test_toml_round_trip_random_plans(tmp_path_factory: pytest.TempPathFactory, plan: ShardingPlan, data: st.DataObject) -> None:
    # rename servers to awkward names to exercise key quoting
    new = data.draw(st.lists(names, min_size=len(plan.servers), max_size=len(plan.servers), unique=True))
    ren = dict(zip(plan.servers, new))
    shards = {t: [Shard(t, ren[s.server], s.row_start, s.row_end, s.col_start, s.col_end) for s in ss]
              for t, ss in plan.shards.items()}
    plan2 = ShardingPlan(plan.tables, shards, [ren[s] for s in plan.servers])
    addrs = {s: ServerAddress(data.draw(names), data.draw(st.integers(0, 65535))) for s in plan2.servers}
    cfg = ClusterConfig(plan2, addrs, secret=data.draw(st.none() | names.map(lambda s: (s * 4)[:8])))
    path = tmp_path_factory.mktemp("toml") / "cluster.toml"
    cfg.write_toml(path)
    assert ClusterConfig.from_toml(path) == cfg
    assert ShardingPlan.from_toml(path) == plan2
    assert tomllib.loads(plan2.to_toml()) == plan2.to_dict()


def test_dumps_toml_scalars() -> None:
    d = {"a": True, "b": 1.5, "c": [1, 2], "t": {"x": "y"}, "arr": [{"k": 1}, {"k": 2}]}
    assert tomllib.loads(dumps_toml(d)) == d
    with pytest.raises(ConfigError):
        dumps_toml({"x": object()})
    with pytest.raises(ConfigError, match="cannot write TOML"):
        dumps_toml({"t": {"x": None}})
    # numpy scalars (what plans computed with numpy hold) become TOML ints, floats and bools
    got = tomllib.loads(dumps_toml({"n": np.int64(7), "f": np.float32(0.5), "b": np.bool_(True),
                                    "l": (np.int32(1), 2)}))
    assert got == {"n": 7, "f": 0.5, "b": True, "l": [1, 2]} and type(got["n"]) is int


def test_table_spec() -> None:
    assert TableSpec("t", 2, 3, np.float16).dtype == "float16"  # type: ignore[arg-type]
    assert TableSpec("t", 2, 3, "f4").row_bytes == 12
    assert TableSpec.from_dict({"name": "t", "num_rows": 2, "dim": 3}).dtype == "float32"
    for bad in (
        dict(name="", num_rows=1, dim=1),
        dict(name="t", num_rows=0, dim=1),
        dict(name="t", num_rows=1, dim=-1),
        dict(name="t", num_rows=True, dim=1),
        dict(name="t", num_rows=1.0, dim=1),
        dict(name="t", num_rows=1, dim=1, dtype="nonsense"),
        dict(name="t", num_rows=1, dim=1, dtype="int64"),
    ):
        with pytest.raises(ConfigError):
            TableSpec(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TableSpec.from_dict({"name": "t", "num_rows": 1, "dim": 1, "colour": "red"})
    with pytest.raises(ConfigError):
        TableSpec.from_dict({"name": "t", "num_rows": 1})


def test_split_lookup_repr_and_types(plan4: ShardingPlan) -> None:
    split = split_lookup(plan4, "user", [1, 2, 8])
    assert isinstance(split, SplitLookup)
    assert "user" in repr(split) and "t/0" not in repr(split)
    assert split.servers == ("s0", "s1")


def test_toml_module_examples_run() -> None:
    import doctest

    import flexemr.core.toml

    result = doctest.testmod(flexemr.core.toml, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
