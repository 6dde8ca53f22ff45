"""Embedding servers on separate "hosts": each in its own network namespace, reached over veth links.

Two ``flexemr serve`` processes run in namespaces made by
:class:`tests.flexemr.netns.NetnsLab`, each listening on its own namespace
address (``10.233.x.y``); the ranker (an :class:`EmbeddingClient`) runs in the
test's namespace.  Nothing may assume a single host: lookups must equal the
local model, the queue pairs must be TCP (the same-host UNIX fast path must
not be taken across namespaces), and a server killed mid-run must make
lookups fail with a :class:`FlexEMRError` rather than hang.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from flexemr import (
    ClusterConfig,
    EmbeddingClient,
    FlexEMRError,
    JaggedBatch,
    ServerAddress,
    ShardingPlan,
    TableSpec,
    build_model,
)
from flexemr.core.pooling import pool

from .netns import Netns, NetnsLab, require

SPECS = [TableSpec("user", 4000, 16), TableSpec("item", 600, 8)]
SEED = 3
PORT = 7000  # each namespace is a fresh host: the port is free there
READY_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(60)


@dataclass
class Server:
    """One ``flexemr serve`` process in a namespace."""

    name: str
    ns: Netns
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    pid: int = 0


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    require()
    with NetnsLab(2) as lab:
        yield lab


def _wait_ready(server: Server, log_path: Path) -> dict[str, object]:
    """The server's ready line (JSON); raises if it exits or stays silent for READY_TIMEOUT s."""
    assert server.proc.stdout is not None
    fd = server.proc.stdout.fileno()
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            for line in buf.splitlines():
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    return msg
        elif server.proc.poll() is not None:
            break
    raise AssertionError(f"server {server.name} in {server.ns.name} not ready (exit code {server.proc.poll()}): "
                         f"{log_path.read_text(errors='replace')[-2000:]}")


def _stop(server: Server) -> None:
    """Close stdin (the server exits on EOF), SIGTERM, SIGKILL after 5 s; always reaped."""
    proc = server.proc
    try:
        if proc.poll() is None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        server.log.close()


@pytest.fixture
async def cluster(lab: NetnsLab, tmp_path: Path) -> AsyncIterator[tuple[ClusterConfig, list[Server]]]:
    plan = ShardingPlan.row_wise(SPECS, ["s0", "s1"])
    config = ClusterConfig(plan, {f"s{i}": ServerAddress(ns.address, PORT) for i, ns in enumerate(lab.namespaces)})
    path = tmp_path / "cluster.toml"
    config.write_toml(path)
    servers: list[Server] = []
    try:
        for i, ns in enumerate(lab.namespaces):
            log_path = tmp_path / f"s{i}.log"
            log = open(log_path, "wb")
            try:
                proc = subprocess.Popen(
                    lab.argv(ns, [sys.executable, "-m", "flexemr", "serve", "--config", str(path), "--server",
                                  f"s{i}", "--seed", str(SEED), "--transport", "tcp", "--ready-json",
                                  "--exit-on-stdin-eof"]),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
            except BaseException:
                log.close()
                raise
            servers.append(Server(f"s{i}", ns, proc, log))
        for i, server in enumerate(servers):
            msg = await asyncio.to_thread(_wait_ready, server, tmp_path / f"s{i}.log")
            assert msg["host"] == server.ns.address and msg["port"] == PORT, msg
            server.pid = int(str(msg["pid"]))
        yield ClusterConfig.from_toml(path), servers
    finally:
        for server in servers:
            _stop(server)


def _established_tcp(address: str, port: int) -> int:
    """Established TCP connections from this namespace to ``address:port`` (``/proc/net/tcp``)."""
    ip = ipaddress.IPv4Address(address)
    want = f"{int.from_bytes(ip.packed, 'little'):08X}:{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[2] == want and fields[3] == "01":  # rem_address, st == ESTABLISHED
                count += 1
    return count


def _abstract_sockets(text: str, name_prefix: str) -> list[str]:
    """Rows of a ``/proc/net/unix`` dump whose path is the abstract name ``@<name_prefix>...``."""
    return [line for line in text.splitlines()[1:] if line.split()[-1].startswith("@" + name_prefix)]


async def test_lookups_across_namespaces(lab: NetnsLab, cluster: tuple[ClusterConfig, list[Server]]) -> None:
    config, servers = cluster
    model = build_model(SPECS, SEED)
    async with EmbeddingClient(config, transport="tcp") as client:
        assert client.engine.transport == "tcp"
        ids = np.array([0, 3999, 1999, 2000, 7, 7, 3000])  # both shards of "user", a duplicate
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        many = await client.lookup_many({"user": [5, 2500], "item": [599, 0, 300]})
        assert np.array_equal(many["user"], model["user"][[5, 2500]])
        assert np.array_equal(many["item"], model["item"][[599, 0, 300]])
        jb = JaggedBatch.from_lists({"user": [[1, 3500, 1], [], [2001]], "item": [[4], [590, 10], []]})
        pooled = await client.lookup_pooled(jb, "sum")
        for t in jb.keys:
            want = pool(model[t][jb.ids(t)], jb.bag_offsets(t), "sum")
            np.testing.assert_allclose(pooled[t], want, rtol=1e-5, atol=1e-5)

        for server in servers:
            ep = client.endpoint(server.name)
            assert ep.peer == (server.ns.address, PORT)
            # control + one connection per queue pair, all TCP to the server's namespace address
            assert _established_tcp(server.ns.address, PORT) >= 1 + ep.num_queue_pairs
            # the server offers its UNIX fast path inside its own namespace (a listening socket there),
            # but nothing connected to it: the ranker is on another "host"
            there = _abstract_sockets(lab.run(server.ns, ["cat", "/proc/net/unix"]), f"rdmaio-{server.pid}-")
            assert len(there) == 1, there
            here = Path("/proc/net/unix").read_text()
            assert not _abstract_sockets(here, f"rdmaio-{server.pid}-")


async def test_server_killed_mid_run(cluster: tuple[ClusterConfig, list[Server]]) -> None:
    config, servers = cluster
    model = build_model(SPECS, SEED)
    async with EmbeddingClient(config, transport="tcp", connect_timeout=5.0) as client:
        ids = np.arange(0, 4000, 37)
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        victim = servers[1]  # holds rows 2000.. of "user"
        victim.proc.kill()
        victim.proc.wait()
        t0 = time.monotonic()
        with pytest.raises(FlexEMRError) as info:
            for _ in range(50):  # the first lookups may still be in flight when the kill lands
                await asyncio.wait_for(client.lookup("user", np.array([2500, 10])), 10.0)
                await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 10.0
        assert type(info.value) is not FlexEMRError, "expected a specific FlexEMRError subclass"
        assert str(info.value)
        # the failure is scoped to the dead server: rows held by the other one still come back
        assert np.array_equal(await client.lookup("user", np.array([10, 1999])), model["user"][[10, 1999]])
