"""Operations: Prometheus metrics of servers and clients, health endpoints, graceful drain."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from flexemr import ClusterConfig, ConfigError, EmbeddingClient, EmbeddingServer, JaggedBatch, LocalCluster, TableSpec
from flexemr.client.metrics_export import COUNTERS, GAUGES, RELIABILITY, ClientCollector, start_client_metrics
from flexemr.core.metrics import LocalityMetrics, ReliabilityMetrics
from flexemr.core.plan import ShardingPlan
from flexemr.server.metrics import MetricsServer, ServerCollector, loop_responsive, serve_metrics

SPECS = [TableSpec("user", 4000, 16), TableSpec("item", 600, 8)]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _aget(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, url)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a scrape (parsed by prometheus_client's parser)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _bags(rng: np.random.Generator, n: int) -> JaggedBatch:
    return JaggedBatch.from_lists({"user": [rng.integers(0, 4000, rng.integers(1, 6)).tolist() for _ in range(n)],
                                   "item": [rng.integers(0, 600, rng.integers(0, 4)).tolist() for _ in range(n)]})


# ------------------------------------------------------------------ server metrics


async def test_a_running_server_is_scraped() -> None:
    """Subprocess servers with --metrics-port: the scrape shows readiness, sessions and the pooling work."""
    async with LocalCluster(SPECS, servers=2, seed=3, transport="tcp", metrics=True) as cluster:
        client = await cluster.client(server_pooling=True)
        rng = np.random.default_rng(0)
        model = cluster.model()
        for _ in range(5):
            batch = _bags(rng, 64)
            pooled = await client.lookup_pooled(batch, mode="sum")
            ids = batch.ids("user")
            rows = await client.lookup("user", ids)
            assert np.array_equal(rows, model["user"][ids])
            assert pooled["user"].shape == (64, 16)
        assert client.metrics.pooled_subrequests > 0
        status, text = await _aget(cluster.metrics_url("s0") + "/metrics")
        assert status == 200
        s = _samples(text)
        assert _value(s, "flexemr_server_ready", server="s0") == 1.0
        assert _value(s, "flexemr_server_draining", server="s0") == 0.0
        assert _value(s, "flexemr_server_sessions", server="s0") >= 1
        assert _value(s, "flexemr_server_info", server="s0", transport="tcp", layout="plain") == 1.0
        assert _value(s, "flexemr_server_shards", server="s0") == len(cluster.plan.regions_on("s0"))
        assert _value(s, "flexemr_server_table_bytes", server="s0") == sum(
            sh.nbytes(cluster.plan.spec(sh.table)) for sh in cluster.plan.regions_on("s0"))
        requests = _value(s, "flexemr_server_pool_requests_total", server="s0")
        assert requests > 0
        assert _value(s, "flexemr_server_pool_request_duration_seconds_count", server="s0") == requests
        assert _value(s, "flexemr_server_pool_request_duration_seconds_bucket", server="s0", le="+Inf") == requests
        assert _value(s, "flexemr_server_pool_received_bytes_total", server="s0") > 0
        assert _value(s, "flexemr_server_pool_sent_bytes_total", server="s0") > 0
        assert _value(s, "flexemr_server_pool_channels", server="s0") == 1
        assert s[("process_resident_memory_bytes", ())] > 0  # the process collector of flexemr serve
        # both servers together answered every pooling sub-request the client sent
        s1 = _samples((await _aget(cluster.metrics_url("s1") + "/metrics"))[1])
        assert requests + _value(s1, "flexemr_server_pool_requests_total", server="s1") \
            == client.metrics.pooled_subrequests
        assert await _aget(cluster.metrics_url("s0") + "/healthz") == (200, "ok\n")
        assert await _aget(cluster.metrics_url("s0") + "/readyz") == (200, "ready\n")
        code, body = await _aget(cluster.metrics_url("s0") + "/nope")
        assert code == 404 and "/metrics" in body


async def test_health_follows_the_lifecycle_in_process() -> None:
    plan = ShardingPlan.row_wise(SPECS, ["s0", "s1"], replicas=2)
    server = EmbeddingServer(plan, "s0", transport="tcp")
    assert (server.state, server.ready, server.sessions) == ("new", False, 0)
    ms = serve_metrics(server)
    try:
        base = f"http://127.0.0.1:{ms.port}"
        assert await _aget(base + "/readyz") == (503, "new\n")
        assert await _aget(base + "/healthz") == (200, "ok\n")
        await server.start()
        assert server.ready and server.state == "ready"
        assert await _aget(base + "/readyz") == (200, "ready\n")
        took = await server.drain(timeout=2.0)
        assert 0 <= took < 2.0 and server.state == "closed" and not server.ready
        assert server.stats.drain_seconds == took
        assert await server.drain() == took  # idempotent
        assert await _aget(base + "/readyz") == (503, "closed\n")
        s = _samples((await _aget(base + "/metrics"))[1])
        assert _value(s, "flexemr_server_ready", server="s0") == 0.0
    finally:
        ms.close()
        await server.aclose()


async def test_drain_rejects_a_bad_timeout_and_closes_a_server_never_started() -> None:
    server = EmbeddingServer(ShardingPlan.row_wise(SPECS, ["s0"]), "s0", transport="tcp")
    for bad in (-1, "5", float("nan"), True):
        with pytest.raises(ConfigError, match="drain timeout"):
            await server.drain(bad)  # type: ignore[arg-type]
    assert await server.drain() == 0.0 and server.state == "closed"


def test_liveness_sees_a_stalled_event_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert loop_responsive(loop, 0.05) == (False, "event loop did not answer within 0.05 s")  # not running
        import threading

        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        assert loop_responsive(loop, 5.0) == (True, "ok")
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
    finally:
        loop.close()
    assert loop_responsive(loop, 0.05) == (False, "event loop closed")


def test_metrics_server_errors_are_typed_and_checks_cannot_kill_it() -> None:
    with pytest.raises(ConfigError, match="metrics port"):
        MetricsServer(CollectorRegistry(), port=70000)
    with pytest.raises(ConfigError, match="ServerCollector takes an EmbeddingServer"):
        ServerCollector(object())  # type: ignore[arg-type]

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with MetricsServer(CollectorRegistry(), live=broken) as ms:
        code, body = _get(f"http://127.0.0.1:{ms.port}/healthz")
        assert code == 503 and "RuntimeError: boom" in body
        with pytest.raises(ConfigError, match="cannot listen"):
            MetricsServer(CollectorRegistry(), port=ms.port).start()
        # a client's garbage does not stop the endpoint
        import socket

        with socket.create_connection(("127.0.0.1", ms.port), timeout=5) as sock:
            sock.sendall(b"\x00\xff garbage \r\n\r\n")
            sock.recv(1000)
        assert _get(f"http://127.0.0.1:{ms.port}/readyz") == (200, "ok\n")


# ------------------------------------------------------------------ client metrics


def test_every_client_counter_has_a_prometheus_name() -> None:
    """A counter added to the client's metrics must be mapped (flexemr/client/metrics_export.py)."""
    fields = {f.name for f in dataclasses.fields(LocalityMetrics) if f.type in ("int", int)}
    assert fields == set(COUNTERS) | set(GAUGES)
    assert {f.name for f in dataclasses.fields(ReliabilityMetrics)} == set(RELIABILITY)
    names = [n for n, _ in [*COUNTERS.values(), *GAUGES.values(), *RELIABILITY.values()]]
    assert len(names) == len(set(names))


async def test_client_metrics_are_scraped() -> None:
    async with LocalCluster(SPECS, servers=2, seed=3, transport="tcp", in_process=True, replicas=2) as cluster:
        client = await cluster.client(cache_bytes=1 << 20)
        with pytest.raises(ConfigError, match="ClientCollector takes an EmbeddingClient"):
            ClientCollector("client")  # type: ignore[arg-type]
        ep = start_client_metrics(client, labels={"ranker": "r0"})
        try:
            rng = np.random.default_rng(1)
            for _ in range(4):
                await client.lookup("user", rng.integers(0, 4000, 300))
                await client.lookup_pooled(_bags(rng, 32))
            s = _samples((await _aget(f"http://127.0.0.1:{ep.port}/metrics"))[1])
            m = client.metrics
            assert _value(s, "flexemr_client_lookups_total", ranker="r0") == m.lookups > 0
            assert _value(s, "flexemr_client_read_bytes_total", ranker="r0") == m.bytes_read > 0
            assert _value(s, "flexemr_client_rows_read_total", ranker="r0") == m.rows_read
            assert _value(s, "flexemr_client_cache_hits_total", ranker="r0") == m.cache_hits
            assert _value(s, "flexemr_client_cache_capacity_rows", ranker="r0") == m.cache_capacity > 0
            assert _value(s, "flexemr_client_lookup_latency_seconds_count", ranker="r0") == m.lookup_latency.count
            assert _value(s, "flexemr_client_lookup_latency_seconds_sum", ranker="r0") == pytest.approx(
                m.lookup_latency.total_s)
            assert _value(s, "flexemr_client_failovers_total", ranker="r0") == 0
            assert _value(s, "flexemr_client_healthy", ranker="r0") == 1
            assert _value(s, "flexemr_client_shards_degraded", ranker="r0") == 0
            assert _value(s, "flexemr_client_server_up", ranker="r0", server="s1") == 1
            waits0 = _value(s, "flexemr_client_qp_slot_waits_total", ranker="r0")
            assert waits0 >= 0
            # a server goes away: failover, degraded shards, the server down
            await cluster.kill("s1")
            for _ in range(3):
                await client.lookup("user", rng.integers(0, 4000, 300))
            s = _samples((await _aget(f"http://127.0.0.1:{ep.port}/metrics"))[1])
            assert _value(s, "flexemr_client_server_up", ranker="r0", server="s1") == 0
            assert _value(s, "flexemr_client_server_failures_total", ranker="r0") == 1
            assert _value(s, "flexemr_client_healthy", ranker="r0") == 0
            assert _value(s, "flexemr_client_shards_degraded", ranker="r0") == len(cluster.plan.regions_on("s1"))
            assert _value(s, "flexemr_client_qp_slot_waits_total", ranker="r0") >= waits0
        finally:
            ep.close()


# ------------------------------------------------------------------ drain


async def _looker(client: EmbeddingClient, model: dict[str, np.ndarray], stop: asyncio.Event, seed: int,
                  failures: list[BaseException]) -> int:
    rng = np.random.default_rng(seed)
    n = 0
    while not stop.is_set():
        try:
            if n % 3 == 2:
                batch = _bags(rng, 32)
                out = await client.lookup_pooled(batch, mode="sum")
                want = np.add.reduceat(model["user"][batch.ids("user")], batch.bag_offsets("user")[:-1], axis=0)
                assert np.allclose(out["user"], want, atol=1e-4)
            else:
                ids = rng.integers(0, 4000, 200)
                assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            failures.append(exc)
        n += 1
        await asyncio.sleep(0)
    return n


async def test_draining_a_replicated_server_fails_no_lookup() -> None:
    """SIGTERM to a replicated server while 3 rankers look up: 0 failed lookups, exit code 0, the
    server out of every ranker's routes; it comes back into service when restarted."""
    async with LocalCluster(SPECS, servers=3, seed=5, replicas=2, transport="tcp") as cluster:
        clients = [await cluster.client(server_pooling=True) for _ in range(3)]
        model = cluster.model()
        stop = asyncio.Event()
        failures: list[BaseException] = []
        tasks = [asyncio.ensure_future(_looker(c, model, stop, i, failures)) for i, c in enumerate(clients)]
        await asyncio.sleep(0.5)
        code = await cluster.drain("s1")
        assert code == 0
        await asyncio.sleep(0.5)
        for c in clients:
            assert all("s1" not in servers for servers in c.replica_status().values()), c.replica_status()
            assert not c.healthy()
        await cluster.restart("s1")
        for c in clients:
            assert await c.wait_healthy(15.0)
        await asyncio.sleep(0.3)
        stop.set()
        counts = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert failures == [], failures[:3]
        assert min(counts) > 10
        assert all(c.metrics.errors == 0 for c in clients)
        assert sum(c.reliability.peer_failures for c in clients) == 3  # each ranker saw s1 leave once


def test_flexemr_serve_drains_on_sigterm_and_health_answers(tmp_path: Path) -> None:
    plan = ShardingPlan.row_wise(SPECS, ["s0"])
    from flexemr.core.config import ServerAddress

    cfg = tmp_path / "cluster.toml"
    ClusterConfig(plan, {"s0": ServerAddress("127.0.0.1", 0)}).write_toml(cfg)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "flexemr", "serve", "--config", str(cfg), "--server", "s0",
                             "--transport", "tcp", "--metrics-port", "0", "--ready-json", "--drain-timeout", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        port = ready["metrics_port"]
        assert isinstance(port, int) and port > 0
        health = [sys.executable, "-m", "flexemr", "health", "--port", str(port)]
        r = subprocess.run(health, capture_output=True, text=True, env=env, timeout=60)
        assert (r.returncode, r.stdout) == (0, f"flexemr health: http://127.0.0.1:{port}/readyz: ready\n")
        r = subprocess.run([*health, "--live"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and r.stdout.endswith("/healthz: ok\n")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "flexemr: server s0 drained in" in err
        r = subprocess.run(health, capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 1 and r.stderr.startswith("flexemr health: error: cannot reach"), r.stderr
        r = subprocess.run([sys.executable, "-m", "flexemr", "serve", "--config", str(cfg), "--server", "s0",
                            "--drain-timeout", "-1"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 1 and "--drain-timeout must be >= 0" in r.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
