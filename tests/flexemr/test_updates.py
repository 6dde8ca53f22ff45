"""Online updates of versioned tables: torn-row freedom, visibility (cache too), resync, bad input."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from flexemr import (
    ConfigError,
    EmbeddingClient,
    FlexEMRError,
    InputError,
    LocalCluster,
    LookupIdError,
    TableSpec,
    TransportError,
    UnknownTableError,
)
from flexemr.core.versioned import CTL_GEN, ctl_offset, row_data, validate_slots
from tests.flexemr.transports import TRANSPORTS

DIM = 96  # 384-byte rows: several copies per row on the wire
SPECS = [TableSpec("emb", 3000, DIM), TableSpec("small", 64, 4, "float16")]
HOT = np.arange(0, 3000, 50)  # rows the writers hammer (all three shards)


def _pattern(gen: int, rows: np.ndarray) -> np.ndarray:
    """Row ``r`` at generation ``gen``: every element ``gen * 4096 + r % 4096`` (exact in float32)."""
    vals = (gen * 4096 + rows % 4096).astype(np.float32)
    return np.repeat(vals[:, None], DIM, axis=1)


def _check_rows(rows: np.ndarray, ids: np.ndarray, initial: np.ndarray, max_gen: int) -> None:
    """Each row is the initial row or one whole written generation -- never a mix."""
    is_init = (rows == initial[ids]).all(axis=1)
    first = rows[:, :1]
    whole = (rows == first).all(axis=1)
    gen, rem = np.divmod(first[:, 0].astype(np.int64), 4096)
    written = whole & (rem == ids % 4096) & (gen >= 1) & (gen <= max_gen)
    bad = ~(is_init | written)
    assert not bad.any(), f"torn/foreign rows {ids[bad][:5]}: {rows[bad][:2, :6]}"


async def _torn_run(cluster: LocalCluster, seconds: float) -> dict[str, int]:
    writer_a = await cluster.client()
    writer_b = await cluster.client()
    reader = await cluster.client(cache_bytes=0)
    initial = cluster.model()["emb"]
    gens = {"a": 1, "b": 2}  # last generation acknowledged by each writer (in flight: +2)
    stop = asyncio.Event()
    reads = 0

    async def write(name: str, client: EmbeddingClient, parity: int) -> None:
        g = parity
        while not stop.is_set():
            g += 2
            await client.update("emb", HOT, _pattern(g, HOT))
            gens[name] = g

    async def read(seed: int) -> None:
        nonlocal reads
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            ids = np.concatenate((HOT, rng.integers(0, 3000, 200)))
            rows = await reader.lookup("emb", ids)
            _check_rows(rows, ids, initial, max(gens.values()) + 2)
            reads += 1

    tasks = [asyncio.ensure_future(write("a", writer_a, 1)), asyncio.ensure_future(write("b", writer_b, 2)),
             *(asyncio.ensure_future(read(i)) for i in range(3))]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    # serialised writers: both replicas of every hot row hold the same, final generation
    final = await reader.lookup("emb", HOT)
    _check_rows(final, HOT, initial, max(gens.values()))
    assert set((final[:, 0] // 4096).astype(int).tolist()) <= {gens["a"], gens["b"]}
    return {"reads": reads, "gen": max(gens.values()), "torn": reader.reliability.torn_rereads}


async def test_no_torn_rows_in_process() -> None:
    async with LocalCluster(SPECS, servers=3, seed=2, replicas=2, versioned=True, in_process=True,
                            transport="tcp") as cluster:
        stats = await _torn_run(cluster, 2.0)
        assert stats["reads"] > 20 and stats["gen"] > 10
        # raw replica memory: every slot valid, both replicas byte-identical
        for sh in cluster.plan.shards["emb"]:
            spec = cluster.plan.spec("emb")
            images = []
            for srv in sh.replicas:
                buf = cluster.server(srv).shard_slots(sh.region_name)
                slots = buf[: ctl_offset(spec, sh.num_rows)].reshape(sh.num_rows, -1)
                assert validate_slots(spec, slots, np.arange(sh.row_start, sh.row_end)).all()
                images.append(buf.copy())
                gen = int(buf[ctl_offset(spec, sh.num_rows) + CTL_GEN:][:8].view(np.uint64)[0])
                assert gen > 0
            assert np.array_equal(images[0][: ctl_offset(spec, sh.num_rows)],
                                  images[1][: ctl_offset(spec, sh.num_rows)])
            hot = HOT[(HOT >= sh.row_start) & (HOT < sh.row_end)] - sh.row_start
            assert (row_data(spec, slots)[hot] % 4096 == (hot + sh.row_start)[:, None] % 4096).all()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_torn_rows_with_processes(transport: str) -> None:
    async with LocalCluster(SPECS, servers=2, seed=2, replicas=2, versioned=True, transport=transport) as cluster:
        # long enough for a meaningful number of updates (the emulated VM is ~15x slower)
        stats = await _torn_run(cluster, 2.0 if transport == "tcp" else 8.0)
        assert stats["reads"] > 10 and stats["gen"] > 5


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_update_is_visible_to_every_later_lookup_and_cache(transport: str) -> None:
    async with LocalCluster(SPECS, servers=2, seed=4, replicas=2, versioned=True, in_process=True,
                            transport=transport) as cluster:
        model = {k: v.copy() for k, v in cluster.model().items()}
        cached = await cluster.client(cache_bytes=1 << 20)
        other = await cluster.client()
        ids = np.arange(0, 3000, 3)
        assert np.array_equal(await cached.lookup("emb", ids), model["emb"][ids])   # fills the cache
        assert cached.metrics.cache_inserts > 0
        rng = np.random.default_rng(0)
        for step in range(5):
            upd = rng.choice(3000, 40, replace=False)
            vals = rng.standard_normal((40, DIM)).astype(np.float32)
            inflight = asyncio.ensure_future(cached.lookup("emb", ids))  # sent before the update
            await asyncio.sleep(0)
            await cached.update("emb", upd, vals)
            model["emb"][upd] = vals
            await inflight
            assert np.array_equal(await cached.lookup("emb", ids), model["emb"][ids]), step
            assert np.array_equal(await cached.lookup("emb", upd), vals)
            assert np.array_equal(await other.lookup("emb", upd), vals)
        # duplicates: the last occurrence wins; float16 table; lookup_pooled sees the update too
        await other.update("small", [5, 9, 5], np.array([[1] * 4, [2] * 4, [3] * 4], dtype=np.float16))
        assert (await cached.lookup("small", [5, 9])).tolist() == [[3.0] * 4, [2.0] * 4]
        from flexemr import JaggedBatch

        pooled = await cached.lookup_pooled(JaggedBatch.from_lists({"small": [[5, 9], [9]]}), mode="sum")
        assert pooled["small"].tolist() == [[5.0] * 4, [2.0] * 4]
        assert cached.reliability.updates == 5 and other.reliability.updates == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_clients_update_reaches_every_rankers_cache(transport: str) -> None:
    from flexemr import JaggedBatch
    from flexemr.core.pooling import pool

    async with LocalCluster(SPECS, servers=3, seed=5, replicas=2, versioned=True, in_process=True,
                            transport=transport) as cluster:
        model = {k: v.copy() for k, v in cluster.model().items()}
        reader = await cluster.client(cache_bytes=4 << 20)
        writer = await cluster.client()
        ids = np.arange(0, 3000, 3)
        bags = JaggedBatch.from_lists({"emb": [ids[:40].tolist(), ids[40:41].tolist(), []]})
        await reader.lookup("emb", ids)
        assert np.array_equal(await reader.lookup("emb", ids), model["emb"][ids])
        m = reader.metrics
        assert m.cache_hits >= ids.size
        warm_stale = m.cache_stale_hits        # first sight of each shard's GEN may drop what it had
        rng = np.random.default_rng(1)
        for step in range(4):
            upd = rng.choice(3000, 30, replace=False)
            vals = rng.standard_normal((30, DIM)).astype(np.float32)
            await writer.update("emb", upd, vals)
            model["emb"][upd] = vals
            assert np.array_equal(await reader.lookup("emb", ids), model["emb"][ids]), step
            want = pool(model["emb"][bags.ids("emb")], bags.bag_offsets("emb"), "sum")
            got = (await reader.lookup_pooled(bags, mode="sum"))["emb"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert m.cache_stale_hits > warm_stale
        # no update since: the cache serves again, nothing is found stale
        stale = m.cache_stale_hits
        hits = m.cache_hits
        for _ in range(2):
            assert np.array_equal(await reader.lookup("emb", ids), model["emb"][ids])
        assert m.cache_stale_hits == stale and m.cache_hits - hits >= ids.size
        assert m.unique_ids == m.rows_read + m.rows_shared + m.cache_hits


async def test_a_restarted_server_reusing_gen_numbers_does_not_fool_the_cache() -> None:
    # GEN restarts at 0 with the server: "GEN 1" before and after a restart are different states.
    async with LocalCluster([TableSpec("emb", 100, 8)], servers=1, seed=3, versioned=True, in_process=True,
                            transport="tcp") as cluster:
        reader = await cluster.client(cache_bytes=1 << 20, reconnect_base=0.02, reconnect_cap=0.1)
        writer = await cluster.client(reconnect_base=0.02, reconnect_cap=0.1)
        x = np.array([5])
        await writer.update("emb", x, np.full((1, 8), 1.0, np.float32))      # GEN 0 -> 1
        for _ in range(4):                                                    # cached under GEN 1
            assert (await reader.lookup("emb", x) == 1.0).all()
        assert reader.metrics.cache_hits >= 2
        await cluster.kill("s0")
        await cluster.restart("s0")                                           # GEN 0, initial rows
        assert await writer.wait_healthy(5.0) and await reader.wait_healthy(5.0)
        await writer.update("emb", x, np.full((1, 8), 2.0, np.float32))      # GEN 0 -> 1 again, acknowledged
        assert (await reader.lookup("emb", x) == 2.0).all()


async def test_gen_reads_travel_in_the_batch_of_the_lookups_misses() -> None:
    from flexemr import JaggedBatch

    async with LocalCluster([TableSpec("emb", 100, 8)], servers=2, seed=3, replicas=2, versioned=True,
                            in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=1 << 20)
        await client.lookup("emb", [1, 2, 3, 4, 5])                       # cached
        m = client.metrics
        for call in (lambda: client.lookup("emb", np.array([1, 2, 3, 80, 90])),
                     lambda: client.lookup_pooled(JaggedBatch.from_lists({"emb": [[1, 2, 3], [60, 70]]}))):
            before, hits = m.batches, m.cache_hits
            await call()
            assert m.batches - before == 1 and m.cache_hits - hits == 3    # hits checked, misses read: one batch


async def test_cached_lookups_see_every_update_acknowledged_before_they_began() -> None:
    """Writer generations are acknowledged one by one; a lookup that starts after
    generation g was acknowledged must return generation >= g for every hot row,
    whatever its cache holds (linearisable reads through the cache)."""
    async with LocalCluster(SPECS, servers=2, seed=6, replicas=2, versioned=True, in_process=True,
                            transport="tcp") as cluster:
        initial = cluster.model()["emb"]
        readers = [await cluster.client(cache_bytes=4 << 20) for _ in range(2)]
        writer = await cluster.client()
        acked = 0
        stop = asyncio.Event()
        checked = 0

        async def write() -> None:
            nonlocal acked
            g = 0
            while not stop.is_set():
                g += 1
                await writer.update("emb", HOT, _pattern(g, HOT))
                acked = g
                await asyncio.sleep(0.005)

        async def read(client: EmbeddingClient, seed: int) -> None:
            nonlocal checked
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                floor = acked
                ids = np.concatenate((HOT, rng.integers(0, 3000, 100)))
                rows = await client.lookup("emb", ids)
                _check_rows(rows, ids, initial, acked + 1)
                hot = rows[: HOT.size, 0].astype(np.int64) // 4096
                assert (hot >= floor).all(), f"a lookup begun after generation {floor} returned {hot.min()}"
                checked += 1

        tasks = [asyncio.ensure_future(write()),
                 *(asyncio.ensure_future(read(c, i)) for i, c in enumerate(readers) for _ in range(2))]
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert acked > 5 and checked > 20
        assert sum(r.metrics.cache_hits for r in readers) > 0          # the cache did serve rows
        assert sum(r.metrics.cache_stale_hits for r in readers) > 0    # ... and stale ones were caught


@pytest.mark.parametrize("versioned", [False, True])
async def test_versioned_lookups_never_borrow_reads_sent_before_they_began(versioned: bool) -> None:
    # a sent read may predate an update acknowledged since: updatable tables re-read instead
    async with LocalCluster(SPECS, servers=2, seed=7, versioned=versioned, in_process=True,
                            transport="tcp") as cluster:
        client = await cluster.client()
        ids = np.arange(0, 3000, 7)
        first = asyncio.ensure_future(client.lookup("emb", ids))
        for _ in range(2):                          # the first lookup joins a batch, then the batch is sent
            await asyncio.sleep(0)
        second = await client.lookup("emb", ids)
        assert np.array_equal(await first, second)
        m = client.metrics
        if versioned:
            assert m.inflight_hits == 0 and m.rows_read == 2 * ids.size
        else:
            assert m.inflight_hits == ids.size and m.rows_read == ids.size


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_replica_down_during_update_is_resynced(transport: str) -> None:
    async with LocalCluster(SPECS, servers=3, seed=4, replicas=2, versioned=True, in_process=True,
                            transport=transport) as cluster:
        model = {k: v.copy() for k, v in cluster.model().items()}
        copies: list[tuple[str, int, int]] = []         # what resync_progress was told

        def progress(region: str, done: int, total: int) -> None:
            copies.append((region, done, total))

        client = await cluster.client(reconnect_base=0.02, reconnect_cap=0.1, resync_progress=progress)
        bystander = await cluster.client(reconnect_base=0.02, reconnect_cap=0.1, resync_progress=progress)
        await cluster.kill("s1")
        upd = np.arange(0, 3000, 7)                      # rows of every shard; s1 holds two of them
        vals = np.random.default_rng(1).standard_normal((upd.size, DIM)).astype(np.float32)
        await client.update("emb", upd, vals)
        model["emb"][upd] = vals
        assert client.reliability.fenced >= 1
        await cluster.restart("s1")                      # fresh memory: initial (stale) values
        assert await bystander.wait_healthy(5.0)         # the bystander resyncs (copies) before routing there
        assert await client.wait_healthy(5.0)
        assert bystander.reliability.resync_copies + client.reliability.resync_copies == 2
        # each copy was reported: read from the in-sync replica, then written to s1, up to the whole image
        finished = {r for r, done, total in copies if done == total}
        assert len(finished) == 2 and all(0 < done <= total for _, done, total in copies)
        shard_bytes = {sh.region_name: ctl_offset(SPECS[0] if sh.table == "emb" else SPECS[1], sh.num_rows)
                       for sh in cluster.plan.shards["emb"] + cluster.plan.shards["small"]}
        assert {(r, total) for r, _, total in copies} == {(r, 2 * shard_bytes[r]) for r in finished}
        # now every shard that s1 holds is read from s1 alone: kill its partners one at a time
        for partner in ("s0", "s2"):
            await cluster.kill(partner)
            all_ids = np.arange(3000)
            live = [sh for sh in cluster.plan.shards["emb"] if partner not in sh.replicas]
            for c in (client, bystander):
                for sh in live:
                    ids = all_ids[sh.row_start : sh.row_end]
                    assert np.array_equal(await c.lookup("emb", ids), model["emb"][ids]), (partner, sh)
            await cluster.restart(partner)
            assert await client.wait_healthy(5.0)
            assert await bystander.wait_healthy(5.0)
        assert np.array_equal(await client.lookup("emb", np.arange(3000)), model["emb"])


BAD_UPDATES = [
    ("nope", [1], np.zeros((1, DIM), np.float32), UnknownTableError),
    ("emb", [3000], np.zeros((1, DIM), np.float32), LookupIdError),
    ("emb", [-1], np.zeros((1, DIM), np.float32), LookupIdError),
    ("emb", [1.0], np.zeros((1, DIM), np.float32), InputError),
    ("emb", [[1]], np.zeros((1, DIM), np.float32), InputError),
    ("emb", [1], np.zeros((1, DIM), np.float64), InputError),
    ("emb", [1], np.zeros((2, DIM), np.float32), InputError),
    ("emb", [1], np.zeros((1, DIM - 1), np.float32), InputError),
    ("emb", [1], np.zeros(DIM, np.float32), InputError),
    ("emb", [1], [[0.0] * DIM], InputError),
]


async def test_bad_updates_fail_before_any_traffic() -> None:
    async with LocalCluster(SPECS, servers=2, seed=4, replicas=2, versioned=True, in_process=True,
                            transport="tcp") as cluster:
        client = await cluster.client()
        before = (client.metrics.snapshot(), client.reliability.snapshot())
        for table, ids, rows, exc in BAD_UPDATES:
            with pytest.raises(exc):
                await client.update(table, ids, rows)
        await client.update("emb", [], np.zeros((0, DIM), np.float32))   # empty: nothing to do
        assert (client.metrics.snapshot(), client.reliability.snapshot()) == before
        assert np.array_equal(await client.lookup("emb", [1]), cluster.model()["emb"][[1]])
    async with LocalCluster(SPECS, servers=2, seed=4, in_process=True, transport="tcp") as plain:
        client = await plain.client()
        with pytest.raises(ConfigError, match="not updatable"):
            await client.update("emb", [1], np.zeros((1, DIM), np.float32))
        assert isinstance(ConfigError("x"), FlexEMRError)


@pytest.mark.parametrize("cached", [False, True])
async def test_a_replica_fenced_by_another_writer_is_never_read(cached: bool) -> None:
    """The soak's stale read: a writer that cannot reach a replica (its operation timed out, or its
    reconnection lags) fences it, while a reader still reaches it.  The reader must not return the
    fenced replica's rows, which miss the acknowledged update, and it brings the replica back."""
    specs = [TableSpec("emb", 1000, 8)]
    async with LocalCluster(specs, servers=2, seed=3, replicas=2, versioned=True, in_process=True,
                            transport="tcp") as cluster:
        shard = cluster.plan.shards["emb"][0]
        fenced = shard.replicas[0]                      # the primary
        ids = np.arange(shard.row_start, shard.row_start + 20)
        reader = await cluster.client(cache_bytes=1 << 20 if cached else 0)
        assert np.array_equal(await reader.lookup("emb", ids), cluster.model()["emb"][ids])   # cached now
        writer = await cluster.client(reconnect_base=30.0, reconnect_cap=30.0)

        async def unreachable(server: str, timeout: float) -> None:
            raise TransportError(f"{server} is unreachable from this client")

        writer._peers._open_peer = unreachable          # type: ignore[method-assign]
        writer._peers.writer.reconnect_wait = 0.1
        writer.peer_failed(fenced, TransportError("simulated timeout"))
        new = np.full((ids.size, 8), 7.0, dtype=np.float32)
        await writer.update("emb", ids, new)            # acknowledged by the other replica alone
        assert writer.reliability.fenced >= 1
        # load-aware reads would pick whichever replica looks faster: make it the fenced one
        other = [s for s in shard.replicas if s != fenced][0]
        reader._lanes.tracker.observe(other, work=1 << 10, ahead=0, seconds=100.0)
        got = await reader.lookup("emb", ids)
        assert np.array_equal(got, new), "a lookup begun after the update returned the fenced replica's rows"
        assert reader.reliability.stale_replica_reads >= 1
        # the reader resynced the fenced replica and reads from it again
        assert await reader.wait_healthy(5.0)
        assert reader.replica_status()[shard.region_name][0] == fenced
        assert np.array_equal(await reader.lookup("emb", ids), new)
