"""Units: metadata codec, metrics, deterministic init, npy-backed servers, plan checks, doctests, imports."""

from __future__ import annotations

import doctest
import gc
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flexemr
from flexemr import (
    ClientMetrics,
    ClusterConfig,
    ConfigError,
    EmbeddingClient,
    EmbeddingServer,
    LatencyHistogram,
    MetadataError,
    ServerAddress,
    ShardingPlan,
    TableSpec,
    TransportError,
    build_model,
)
from flexemr.core.init import BLOCK_ROWS, init_rows
from flexemr.core.meta import HEADER, MAGIC, ServerMeta, ShardEntry, decode_meta, encode_meta

MODULES = sorted(m.name for m in pkgutil.walk_packages(flexemr.__path__, "flexemr."))


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    """Every docstring example of every flexemr module runs (the server's is a loopback round trip)."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_public_api() -> None:
    for name in flexemr.__all__:
        assert hasattr(flexemr, name), name
    for name in ("TableSpec", "Shard", "ShardingPlan", "ServerAddress", "ClusterConfig", "JaggedBatch",
                 "EmbeddingServer", "EmbeddingClient", "LocalCluster", "ClientMetrics", "FlexEMRError",
                 "split_lookup"):
        assert name in flexemr.__all__


def test_import_touches_no_globals() -> None:
    code = ("import logging, os; before = (dict(os.environ), logging.getLogger().handlers[:], "
            "logging.getLogger().level); import flexemr, flexemr.bench; "
            "assert before == (dict(os.environ), logging.getLogger().handlers[:], logging.getLogger().level)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_private_rdmaio_imports() -> None:
    root = Path(flexemr.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "rdmaio._" not in text and "from rdmaio" not in text, path


# ------------------------------------------------------------------ metadata

ENTRY = ShardEntry("t/0", "t", 0, (0, 10), (0, 4), 160, b"k" * 40, 0)
META = ServerMeta("s0", "tcp", {"servers": ["s0"]}, {"kind": "random", "seed": 1}, b"a" * 40, (ENTRY,))


def test_meta_roundtrip() -> None:
    blob = encode_meta(META)
    assert blob[:4] == MAGIC and len(blob) == HEADER.size + HEADER.unpack_from(blob)[3]
    assert decode_meta(blob) == META
    assert decode_meta(blob + b"\0" * 10) == META  # trailing bytes are ignored


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_meta_garbage_raises_metadata_error(data: bytes) -> None:
    for blob in (data, HEADER.pack(MAGIC, 1, 0, len(data)) + data):
        try:
            decode_meta(blob)
        except MetadataError:
            pass


@pytest.mark.parametrize("mutate", [
    lambda b: b"XXXX" + b[4:],
    lambda b: b[:4] + b"\x02\x00" + b[6:],
    lambda b: b[:8] + (10**9).to_bytes(8, "little") + b[16:],
    lambda b: b[:10],
])
def test_meta_corruption(mutate: object) -> None:
    with pytest.raises(MetadataError):
        decode_meta(mutate(encode_meta(META)))  # type: ignore[operator]


@pytest.mark.parametrize("body", [
    [1, 2], {"server": "s0"},
    {"server": 1, "transport": "tcp", "plan": {}, "init": {}, "arena": None, "shards": []},
    {"server": "s", "transport": "tcp", "plan": {}, "init": {}, "arena": None, "shards": [{"region": "x"}]},
    {"server": "s", "transport": "tcp", "plan": {}, "init": {}, "arena": None,
     "shards": [{**ENTRY.to_wire(), "rows": [5, 1]}]},
    {"server": "s", "transport": "tcp", "plan": {}, "init": {}, "arena": None,
     "shards": [{**ENTRY.to_wire(), "arena_offset": -3}]},
])
def test_meta_bad_bodies(body: object) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(MetadataError):
        decode_meta(HEADER.pack(MAGIC, 1, 0, len(raw)) + raw)


# ------------------------------------------------------------------- metrics


def test_histogram_buckets() -> None:
    h = LatencyHistogram()
    h.observe(np.array([0.0, 0.9e-6, 1e-6, 1.5e-6, 2e-6, 1.0, 1e9]))
    assert h.count == 7
    assert h.counts[0] == 2 and h.counts[1] == 2 and h.counts[2] == 1
    assert h.counts[-1] == 1                  # clipped into the last bucket
    h.observe(5e-3)
    assert h.count == 8
    snap = h.snapshot()
    assert snap["count"] == 8 and snap["p50_us"] > 0 and "<2" in snap["buckets_us"]


def test_histogram_scalar_observations_land_where_the_array_ones_do() -> None:
    values = [0.0, 0.4e-6, 0.9e-6, 1e-6, 1.5e-6, 2e-6, 3.99e-6, 4e-6, 7e-3, 0.25, 1.0, 1e9, -1e-3, 5, np.float64(3e-5)]
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in values:
        one.observe(v)
    many.observe(np.array(values, dtype=np.float64))
    assert one.counts.tolist() == many.counts.tolist()
    assert one.total_s == pytest.approx(many.total_s)


def test_metrics_snapshot_and_str() -> None:
    m = ClientMetrics()
    m.rows_read += 3
    m.lookup_latency.observe([1e-4, 2e-4])
    snap = m.snapshot()
    assert snap["rows_read"] == 3 and snap["lookup_latency"]["count"] == 2
    text = str(m)
    assert "rows_read" in text and "lookup latency" in text
    m.reset()
    assert m.snapshot()["rows_read"] == 0 and m.lookup_latency.count == 0


# ---------------------------------------------------------------------- init


@given(st.integers(1, 3 * BLOCK_ROWS), st.integers(1, 6), st.sampled_from(["float32", "float16", "float64", "int8",
                                                                           "uint8"]), st.data())
@settings(max_examples=30, deadline=None)
def test_init_slices_agree(rows: int, dim: int, dtype: str, data: st.DataObject) -> None:
    spec = TableSpec("t", rows, dim, dtype)
    full = build_model([spec], 5)["t"]
    r0 = data.draw(st.integers(0, rows - 1))
    r1 = data.draw(st.integers(r0 + 1, rows))
    c0 = data.draw(st.integers(0, dim - 1))
    c1 = data.draw(st.integers(c0 + 1, dim))
    assert np.array_equal(init_rows(spec, 5, r0, r1, c0, c1), full[r0:r1, c0:c1])


def test_init_depends_on_seed_and_name() -> None:
    a = build_model([TableSpec("a", 10, 4)], 1)["a"]
    assert not np.array_equal(a, build_model([TableSpec("a", 10, 4)], 2)["a"])
    assert not np.array_equal(a, build_model([TableSpec("b", 10, 4)], 1)["b"])
    assert np.abs(a).max() <= 0.1
    with pytest.raises(ConfigError):
        build_model([TableSpec("a", 10, 4)], -1)


# ------------------------------------------------------------ servers/clients


async def test_npy_tables_and_engine_reuse(tmp_path: Path) -> None:
    import rdmaio

    specs = [TableSpec("a", 300, 6), TableSpec("b", 40, 3, "float16")]
    arr_a = np.arange(300 * 6, dtype=np.float32).reshape(300, 6)
    arr_b = np.arange(40 * 3).astype(np.float16).reshape(40, 3)
    np.save(tmp_path / "a.npy", arr_a)
    np.save(tmp_path / "b.npy", arr_b)
    plan = ShardingPlan({s.name: s for s in specs},
                        {"a": ShardingPlan.row_wise(specs[:1], ["s0"], rows_per_shard=100).shards["a"],
                         "b": ShardingPlan.column_wise(specs[1:], ["s0"], shards_per_table=2).shards["b"]}, ["s0"])
    npy = {"a": tmp_path / "a.npy", "b": tmp_path / "b.npy"}
    async with rdmaio.Engine(transport="tcp") as engine:
        async with EmbeddingServer(plan, "s0", npy=npy, engine=engine) as server:
            assert server.arena_bytes > 0                 # the column shards of b are copied
            cfg = ClusterConfig(plan, {"s0": server.address})
            async with EmbeddingClient(cfg, engine=engine) as client:
                ids = np.array([299, 0, 150, 150])
                assert np.array_equal(await client.lookup("a", ids), arr_a[ids])
                assert np.array_equal(await client.lookup("b", [39, 1]), arr_b[[39, 1]])
                assert client.server_meta("s0").init["kind"] == "mixed"
        assert not engine.closed                          # not ours to close
        # ... but nothing of the server is left on it: no region, no pooling channel
        lst = await engine.listen()
        ep = await engine.connect("127.0.0.1", lst.port)
        with pytest.raises(rdmaio.RegionNotFoundError):
            await ep.remote_key("flexemr/meta")
        with pytest.raises(rdmaio.ChannelRefusedError):
            await ep.channel("flexemr/pool")
    np.save(tmp_path / "bad.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(ConfigError):
        async with EmbeddingServer(plan, "s0", npy={"a": tmp_path / "bad.npy"}, transport="tcp"):
            pass


async def test_client_rejects_a_different_plan() -> None:
    specs = [TableSpec("a", 100, 4)]
    plan = ShardingPlan.row_wise(specs, ["s0"])
    async with EmbeddingServer(plan, "s0", transport="tcp") as server:
        other = ShardingPlan.row_wise([TableSpec("a", 101, 4)], ["s0"])
        client = EmbeddingClient(ClusterConfig(other, {"s0": server.address}), transport="tcp")
        with pytest.raises(MetadataError):
            await client.connect()
        await client.aclose()


async def test_an_unclosed_client_warns_where_it_was_created_and_frees_its_engine() -> None:
    plan = ShardingPlan.row_wise([TableSpec("a", 100, 4)], ["s0"])
    async with EmbeddingServer(plan, "s0", transport="tcp") as server:
        config = ClusterConfig(plan, {"s0": server.address})
        never_connected = EmbeddingClient(config, transport="tcp")
        del never_connected  # holds nothing: no warning (filterwarnings = error would fail the test)
        gc.collect()
        client = EmbeddingClient(config, transport="tcp"); line = sys._getframe().f_lineno  # noqa: E702
        await client.connect()
        assert (await client.lookup("a", [1])).shape == (1, 4)
        engine = client.engine
        with pytest.warns(ResourceWarning, match=rf"unclosed EmbeddingClient created at .*test_units\.py:{line}\b"):
            del client
            gc.collect()
        assert engine.closed  # the owned engine (its workers, memory, connections) is freed with the client
        closed = EmbeddingClient(config, transport="tcp")
        async with closed:
            pass
        del closed  # closed: no warning
        gc.collect()


async def test_an_unclosed_client_on_a_borrowed_engine_frees_only_its_endpoints() -> None:
    import rdmaio

    plan = ShardingPlan.row_wise([TableSpec("a", 100, 4)], ["s0"])
    async with EmbeddingServer(plan, "s0", transport="tcp") as server, rdmaio.Engine(transport="tcp") as engine:
        client = await EmbeddingClient(ClusterConfig(plan, {"s0": server.address}), engine=engine).connect()
        ep = client.endpoint("s0")
        with pytest.warns(ResourceWarning, match="unclosed EmbeddingClient"):
            del client
            gc.collect()
        assert ep.closed and not engine.closed


async def test_client_connect_errors() -> None:
    from tests.flexemr._procs import free_port

    plan = ShardingPlan.row_wise([TableSpec("a", 10, 4)], ["s0"])
    client = EmbeddingClient(ClusterConfig(plan, {"s0": ServerAddress("127.0.0.1", free_port())}), transport="tcp",
                             connect_timeout=2.0)
    with pytest.raises(TransportError):
        await client.connect()
    with pytest.raises(ConfigError):
        EmbeddingClient(ClusterConfig(plan, {"s0": ServerAddress("127.0.0.1", 1)}), coalesce_window_us=10**9)
    with pytest.raises(ConfigError, match="resync_progress must be callable, got str"):
        EmbeddingClient(ClusterConfig(plan, {"s0": ServerAddress("127.0.0.1", 1)}), resync_progress="bar")
    with pytest.raises(ConfigError):
        EmbeddingServer(plan, "s9")


async def test_server_lost_mid_session() -> None:
    specs = [TableSpec("a", 100, 4)]
    plan = ShardingPlan.row_wise(specs, ["s0"])
    server = await EmbeddingServer(plan, "s0", transport="tcp").start()
    async with EmbeddingClient(ClusterConfig(plan, {"s0": server.address}), transport="tcp") as client:
        assert (await client.lookup("a", [1])).shape == (1, 4)
        await server.aclose()
        with pytest.raises(TransportError):
            for _ in range(50):
                await client.lookup("a", [2, 3])
        assert client.metrics.errors >= 1


async def test_small_requests_are_split() -> None:
    from flexemr import LocalCluster

    async with LocalCluster([TableSpec("a", 1000, 4)], servers=1, seed=2, in_process=True, transport="tcp") as c:
        client = await c.client(max_reads_per_request=3)
        ids = np.arange(0, 1000, 10)                     # 100 separate reads
        assert np.array_equal(await client.lookup("a", ids), c.model()["a"][ids])
        assert client.metrics.subrequests == 34 and client.metrics.reads == 100


async def test_client_keeps_its_replica_plumbing_and_options_as_attributes() -> None:
    from flexemr import ClientOptions, LocalCluster, TableSpec

    async with LocalCluster([TableSpec("t", 100, 4)], servers=2, seed=1, replicas=2, in_process=True,
                            transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=1 << 16, server_pooling=False)
        assert client.server_pooling is False and client.cache_bytes == 1 << 16
        assert client.max_batch_rows == ClientOptions().max_batch_rows
        assert client.replica_endpoint("s0") is client.endpoint("s0")
        region = cluster.plan.shards["t"][0].region_name
        assert client.replica_key("s0", region) == client.shard_key(region, "s0")
        assert await client.wait_connected("s1", 1.0)
        import pytest
        with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
            client.frobnicate  # noqa: B018
