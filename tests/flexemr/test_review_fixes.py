"""Regression tests for defects found in review."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr import JaggedBatch, LocalCluster, LookupIdError, TableSpec, UnknownTableError


async def test_lookup_pooled_validates_before_opening_pool_channels() -> None:
    """Bad ids / unknown tables must raise before any network traffic (no pooling channel opened)."""
    spec = TableSpec("t", 100, 8, "float32")
    async with LocalCluster([spec], servers=2, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(server_pooling=True)
        bad_id = JaggedBatch(["t"], np.array([1, 100]), lengths=np.array([2]))
        with pytest.raises(LookupIdError):
            await client.lookup_pooled(bad_id, "sum")
        assert client._pooler.channels == {}
        unknown = JaggedBatch(["nope"], np.array([1]), lengths=np.array([1]))
        with pytest.raises(UnknownTableError):
            await client.lookup_pooled(unknown, "sum")
        assert client._pooler.channels == {}
        assert client.metrics.lookups == 0
        # a valid pooled lookup still opens them and works
        ok = JaggedBatch(["t"], np.array([1, 2, 60, 61]), lengths=np.array([4]))
        got = (await client.lookup_pooled(ok, "sum"))["t"]
        np.testing.assert_allclose(got[0], cluster.model()["t"][[1, 2, 60, 61]].sum(axis=0), rtol=1e-5)
        assert set(client._pooler.channels) == set(cluster.plan.servers)


async def test_aclose_fails_pooled_lookups_with_closed_error_not_cancelled() -> None:
    """aclose() while pooled lookups wait for the pooling channels to open: ClosedError, not CancelledError."""
    import asyncio

    from flexemr import ClosedError

    spec = TableSpec("t", 10_000, 16, "float32")
    async with LocalCluster([spec], servers=2, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(server_pooling=True)
        rng = np.random.default_rng(0)
        jb = JaggedBatch(["t"], rng.integers(0, 10_000, size=400), lengths=np.full(10, 40))
        tasks = [asyncio.ensure_future(client.lookup_pooled(jb, "sum")) for _ in range(3)]
        await asyncio.sleep(0)  # the lookups now wait for the channel-opening task
        await client.aclose()
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        for t in tasks:
            assert not t.cancelled()
            assert isinstance(t.exception(), ClosedError)
