"""``python -m flexemr.bench soak [--seconds S] [--json]`` (also ``flexemr soak``): lookups and updates
while embedding-server processes are SIGKILLed and restarted at random.

Set-up: a :class:`~flexemr.LocalCluster` of ``--servers`` (4) server processes
holding one versioned table (``emb``: 20,000 rows x 32 float32) with
``replicas=2``; two rankers that look rows up and update rows (each writer owns
the rows of one parity, so updates of a row are sequential), and a third ranker
that only reads, through a row cache, the hot rows the other two keep updating.
A chaos task kills a random server, restarts it after 0.2-1.5 s, waits until
every ranker is healthy again (so one in-sync replica of every shard is always
alive) and repeats until a few seconds before the end.

Model of the truth (per row, one writer per row, updates sequential): the
history of values written, each with the sequence number at which it was
issued and at which it was *superseded* (a later value of the row was
acknowledged).  A read that started at sequence ``s0`` and ended at ``s1``
may return a value issued at or before ``s1`` and not superseded before ``s0``
(an acknowledged value, or an update in flight or failed since; a value
superseded *at* ``s0`` was replaced before the lookup began).  Anything else
is counted:

``wrong_rows``
    a value that was never written to that row (corruption, a torn row, a row
    of another table or row);
``stale_reads``
    a value of that row that an acknowledged update had already replaced
    before the lookup began (a lookup older than an acknowledged update);
``lost_updates``
    after the run, a fresh client reads every row back: an acknowledged value
    that is gone (replaced by an older one).

A clean run has all three at 0; the exit code is 1 otherwise.  ``--json``
prints :meth:`SoakResult.to_dict`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..apps.cluster import LocalCluster
from ..client.client import EmbeddingClient
from ..core.errors import ConfigError, FlexEMRError
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args

__all__ = ["HELP", "SoakConfig", "SoakResult", "Truth", "configure", "main", "run_soak"]

HELP = "reliability: lookups and updates while servers are killed and restarted (wrong rows, stale reads, lost updates)"

INF = math.inf


#: how long the chaos waits for a restarted server to be back in service everywhere
RESTART_S = 60.0

@dataclass(frozen=True)
class SoakConfig:
    """Parameters of one soak (module docstring)."""

    seconds: float = 60.0
    servers: int = 4
    rows: int = 20_000
    dim: int = 32
    seed: int = 11
    transport: str = "tcp"

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ConfigError(f"--seconds must be > 0, got {self.seconds}")
        if self.servers < 2:
            raise ConfigError(f"--servers must be >= 2 (replicas=2), got {self.servers}")
        if self.rows < 64 or self.dim < 4:
            raise ConfigError(f"--rows must be >= 64 and --dim >= 4, got {self.rows} and {self.dim}")


HELPS = {
    "seconds": "how long the chaos runs, in seconds",
    "servers": "embedding server processes, each shard on 2 of them",
    "rows": "rows of the versioned table",
    "seed": "seed of the tables and of the chaos",
}


@dataclass
class SoakResult:
    """What one soak counted (module docstring)."""

    seconds: float
    servers: int
    replicas: int = 2
    kills: int = 0
    lookups: int = 0
    rows_read: int = 0
    updates: int = 0
    failures_surfaced: int = 0
    wrong_rows: int = 0
    stale_reads: int = 0
    lost_updates: int = 0
    failovers: int = 0
    resync_copies: int = 0
    torn_rereads: int = 0
    stale_replica_reads: int = 0
    cached_hits: int = 0
    cached_stale_hits_reread: int = 0
    off_primary_reads: int = 0
    replica_moves: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """No wrong row, no stale read, no lost update."""
        return self.wrong_rows == 0 and self.stale_reads == 0 and self.lost_updates == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-able), with ``clean``."""
        return {**asdict(self), "clean": self.clean}

    def summary(self) -> str:
        """One line."""
        return (f"flexemr soak: {self.seconds:.0f}s, {self.servers} servers x replicas={self.replicas}, "
                f"kills={self.kills}, ops={self.lookups + self.updates} (lookups={self.lookups} "
                f"rows={self.rows_read} updates={self.updates}), failures surfaced={self.failures_surfaced}, "
                f"wrong rows={self.wrong_rows}, stale reads={self.stale_reads}, "
                f"acknowledged updates lost={self.lost_updates}, failovers={self.failovers} "
                f"resync copies={self.resync_copies} torn re-reads={self.torn_rereads} "
                f"stale-replica re-reads={self.stale_replica_reads}, cached ranker: hits={self.cached_hits} "
                f"stale hits re-read={self.cached_stale_hits_reread}, load-aware reads: off primary="
                f"{self.off_primary_reads} replica moves={self.replica_moves}")


class Truth:
    """What each row may hold (module docstring): the history of values written to every row."""

    def __init__(self, initial: npt.NDArray[np.float32]) -> None:
        self.initial = initial
        self.rows, self.dim = initial.shape
        self.seq = 0
        self.current = np.full(self.rows, -1.0)             # last acknowledged value id (-1: initial)
        self.first_ack = np.full(self.rows, INF)            # when the initial value was superseded
        self.history: dict[int, list[list[float]]] = {}     # row -> [[value, issued, superseded], ...]

    def issue(self, rows: npt.NDArray[np.int64], value: int) -> None:
        """An update of ``rows`` to ``value`` is sent."""
        self.seq += 1
        for r in rows.tolist():
            self.history.setdefault(r, []).append([float(value), self.seq, INF])

    def ack(self, rows: npt.NDArray[np.int64], value: int) -> None:
        """The update of ``rows`` to ``value`` was acknowledged: every other value of them is superseded."""
        self.seq += 1
        for r in rows.tolist():
            for entry in self.history[r]:
                if entry[2] == INF and entry[0] != value:
                    entry[2] = self.seq
            if self.first_ack[r] == INF:
                self.first_ack[r] = self.seq
        self.current[rows] = value

    def pattern(self, value: float, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The rows an update to ``value`` writes: every element ``value``, element 1 the row id."""
        out = np.full((rows.size, self.dim), value, dtype=np.float32)
        out[:, 1] = rows
        return out

    def check(self, ids: npt.NDArray[np.int64], got: npt.NDArray[np.float32], snap: npt.NDArray[np.float64],
              s0: int, s1: int) -> tuple[int, int]:
        """``(wrong rows, stale rows)`` of one read begun at ``s0`` (``snap``: :attr:`current` then), ended at ``s1``.

        Vectorised for the rows equal to the value current at ``s0``; the rest is checked row by row.
        """
        is_init = (got == self.initial[ids]).all(axis=1)
        is_pat = (got[:, 1] == ids) & (got[:, 2:] == got[:, :1]).all(axis=1) & (got[:, 0] >= 1)
        fine = np.where(snap[ids] < 0, is_init, is_pat & (got[:, 0] == snap[ids]))
        wrong = stale = 0
        for k in np.flatnonzero(~fine).tolist():
            r = int(ids[k])
            if is_init[k]:
                ok, old = self.first_ack[r] > s0, True
            elif is_pat[k]:
                entries = [e for e in self.history.get(r, []) if e[0] == float(got[k, 0])]
                ok = any(e[1] <= s1 and e[2] > s0 for e in entries)
                old = bool(entries)
            else:
                ok, old = False, False
            if not ok:
                if old:
                    stale += 1
                else:
                    wrong += 1
        return wrong, stale


async def run_soak(cfg: SoakConfig) -> SoakResult:
    """Run one soak (module docstring)."""
    res = SoakResult(cfg.seconds, cfg.servers)
    deadline = time.monotonic() + cfg.seconds
    specs = [TableSpec("emb", cfg.rows, cfg.dim)]
    reasons: collections.Counter[str] = collections.Counter()
    async with LocalCluster(specs, servers=cfg.servers, seed=cfg.seed, replicas=2, versioned=True,
                            transport=cfg.transport,
                            client_options={"reconnect_base": 0.02, "reconnect_cap": 0.5,
                                            "op_timeout": 2.0}) as cluster:
        truth = Truth(cluster.model()["emb"])
        clients = [await cluster.client(), await cluster.client()]
        # a third ranker only reads, through a cache, rows that the other two keep updating
        cached = await cluster.client(cache_bytes=cfg.rows // 4 * cfg.dim * 4)
        stop = asyncio.Event()
        rng = random.Random(cfg.seed)

        async def reader(client: EmbeddingClient, seed: int, hot: int) -> None:
            g = np.random.default_rng(seed)
            while not stop.is_set():
                ids = g.integers(0, hot, 256)
                snap, s0 = truth.current.copy(), truth.seq
                try:
                    got = await client.lookup("emb", ids)
                except FlexEMRError as exc:
                    res.failures_surfaced += 1
                    reasons[f"lookup: {type(exc).__name__}: {str(exc)[:90]}"] += 1
                    await asyncio.sleep(0.01)
                    continue
                w, s = truth.check(ids, got, snap, s0, truth.seq)
                res.wrong_rows += w
                res.stale_reads += s
                res.lookups += 1
                res.rows_read += int(ids.size)

        async def writer(client: EmbeddingClient, parity: int) -> None:
            g = np.random.default_rng(100 + parity)
            value = parity + 1
            while not stop.is_set():
                value += 2
                rows = np.unique(g.integers(0, cfg.rows // 2, 32) * 2 + parity)  # each writer owns its rows
                truth.issue(rows, value)
                try:
                    await client.update("emb", rows, truth.pattern(value, rows))
                except FlexEMRError as exc:
                    res.failures_surfaced += 1
                    reasons[f"update: {type(exc).__name__}: {str(exc)[:90]}"] += 1
                    await asyncio.sleep(0.01)
                    continue
                truth.ack(rows, value)
                res.updates += 1
                await asyncio.sleep(0.005)

        async def chaos() -> None:
            await asyncio.sleep(min(1.0, cfg.seconds / 10))
            while time.monotonic() < deadline - min(6.0, cfg.seconds / 3):
                victim = rng.choice(cluster.plan.servers)
                await cluster.kill(victim)
                res.kills += 1
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await cluster.restart(victim)
                for c in (*clients, cached):  # all in sync again before the next victim: one in-sync replica always
                    # generous: on a starved machine a restart plus resync took over 20 s (a harness bound,
                    # not a promise; what the soak checks is that nothing is wrong, stale or lost)
                    if not await c.wait_healthy(RESTART_S):
                        raise FlexEMRError(f"{victim} did not come back within {RESTART_S:.0f} s")
                await asyncio.sleep(rng.uniform(0.3, 1.5))

        tasks = [asyncio.ensure_future(t) for t in (
            *(reader(c, 10 * i + j, cfg.rows) for i, c in enumerate(clients) for j in range(2)),
            *(reader(cached, 50 + j, cfg.rows // 8) for j in range(2)),
            *(writer(c, i) for i, c in enumerate(clients)))]
        chaos_task = asyncio.ensure_future(chaos())
        try:
            while time.monotonic() < deadline:
                if chaos_task.done() and chaos_task.exception() is not None:
                    break
                await asyncio.sleep(0.2)
            await asyncio.wait_for(chaos_task, 30)
        finally:
            stop.set()
            chaos_task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        for t in tasks:
            exc = t.exception()
            if exc is not None:
                raise exc
        # every acknowledged update survived: read every row back with a fresh client
        fresh = await cluster.client()
        everything = np.arange(cfg.rows)
        got = await fresh.lookup("emb", everything)
        wrong, lost = truth.check(everything, got, truth.current.copy(), truth.seq, truth.seq)
        res.wrong_rows += wrong
        res.lost_updates = lost
        rel = [c.reliability.snapshot() for c in (*clients, cached)]
        res.failovers = sum(r["failover_reads"] for r in rel)
        res.resync_copies = sum(r["resync_copies"] for r in rel)
        res.torn_rereads = sum(r["torn_rereads"] for r in rel)
        res.stale_replica_reads = sum(r["stale_replica_reads"] for r in rel)
        res.cached_hits = cached.metrics.cache_hits
        res.cached_stale_hits_reread = cached.metrics.cache_stale_hits
        # load-aware replica reads (the clients' default): shard reads served off the primary, moves
        res.off_primary_reads = sum(c.metrics.off_primary_reads for c in (*clients, cached))
        res.replica_moves = sum(c.metrics.replica_moves for c in (*clients, cached))
    res.failure_reasons = dict(reasons.most_common(10))
    return res


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m flexemr.bench soak``."""
    add_config_arguments(p, SoakConfig(), HELPS)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def main(args: argparse.Namespace) -> int:
    """Run the soak; exit code 0 when it was clean (no wrong row, stale read or lost update)."""
    cfg = config_from_args(SoakConfig, args)
    res = rdmaio.run(run_soak(cfg))
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(res.summary())
        for reason, n in res.failure_reasons.items():
            print(f"  failure x{n}: {reason}")
    if not res.clean:
        print(f"flexemr soak: NOT clean: {res.wrong_rows} wrong rows, {res.stale_reads} stale reads, "
              f"{res.lost_updates} lost updates", file=sys.stderr)
    return 0 if res.clean else 1
