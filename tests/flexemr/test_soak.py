"""Soak: lookups and updates while embedding-server processes are SIGKILLed and restarted at random.

Duration: ``FLEXEMR_SOAK_SECONDS`` (default 60).  The summary line is printed
to the terminal (also without ``-s``) and asserted: wrong rows == 0,
acknowledged updates lost == 0.

Model of the truth (per row, one writer per row, updates sequential): the
history of values written, each with the sequence number at which it was
issued and at which it was *superseded* (a later value of the row was
acknowledged).  A read that started at sequence ``s0`` and ended at ``s1``
may return a value issued at or before ``s1`` and not superseded before
``s0`` (an acknowledged value, or an update in flight or failed since);
anything else is a wrong row, or -- if it was an older acknowledged value --
a lost update.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import time

import numpy as np
import pytest

from flexemr import EmbeddingClient, FlexEMRError, LocalCluster, TableSpec

SECONDS = float(os.environ.get("FLEXEMR_SOAK_SECONDS", "60"))
ROWS, DIM = 20_000, 32
SPECS = [TableSpec("emb", ROWS, DIM)]
INF = math.inf


class Truth:
    """What each row may hold (module docstring)."""

    def __init__(self, initial: np.ndarray) -> None:
        self.initial = initial
        self.seq = 0
        self.current = np.full(ROWS, -1.0)                 # last acknowledged value id (-1: initial)
        self.first_ack = np.full(ROWS, INF)                # when the initial value was superseded
        self.history: dict[int, list[list[float]]] = {}    # row -> [[value, issued, superseded], ...]

    def issue(self, rows: np.ndarray, value: int) -> None:
        self.seq += 1
        for r in rows.tolist():
            self.history.setdefault(r, []).append([float(value), self.seq, INF])

    def ack(self, rows: np.ndarray, value: int) -> None:
        self.seq += 1
        for r in rows.tolist():
            for entry in self.history[r]:
                if entry[2] == INF and entry[0] != value:
                    entry[2] = self.seq
            if self.first_ack[r] == INF:
                self.first_ack[r] = self.seq
        self.current[rows] = value

    @staticmethod
    def pattern(value: float, rows: np.ndarray) -> np.ndarray:
        out = np.full((rows.size, DIM), value, dtype=np.float32)
        out[:, 1] = rows
        return out

    def check(self, ids: np.ndarray, got: np.ndarray, snap: np.ndarray, s0: int, s1: int) -> tuple[int, int]:
        """(wrong rows, stale rows) of one read; vectorised for rows equal to the value current at ``s0``."""
        is_init = (got == self.initial[ids]).all(axis=1)
        is_pat = (got[:, 1] == ids) & (got[:, 2:] == got[:, :1]).all(axis=1) & (got[:, 0] >= 1)
        fine = np.where(snap[ids] < 0, is_init, is_pat & (got[:, 0] == snap[ids]))
        wrong = stale = 0
        for k in np.flatnonzero(~fine).tolist():
            r = int(ids[k])
            if is_init[k]:
                ok, old = self.first_ack[r] >= s0, True
            elif is_pat[k]:
                entries = [e for e in self.history.get(r, []) if e[0] == float(got[k, 0])]
                ok = any(e[1] <= s1 and e[2] >= s0 for e in entries)
                old = bool(entries)
            else:
                ok, old = False, False
            if not ok:
                if old:
                    stale += 1
                else:
                    wrong += 1
        return wrong, stale


async def test_soak_kill_restart(capsys: pytest.CaptureFixture[str]) -> None:
    deadline = time.monotonic() + SECONDS
    stats = {"lookups": 0, "rows": 0, "updates": 0, "failures": 0, "wrong": 0, "stale": 0, "kills": 0}
    async with LocalCluster(SPECS, servers=4, seed=11, replicas=2, versioned=True, transport="tcp",
                            client_options={"reconnect_base": 0.02, "reconnect_cap": 0.5,
                                            "op_timeout": 2.0}) as cluster:
        truth = Truth(cluster.model()["emb"])
        clients = [await cluster.client(), await cluster.client()]
        # a third ranker only reads, through a cache, rows that the other two keep updating
        cached = await cluster.client(cache_bytes=ROWS // 4 * DIM * 4)
        stop = asyncio.Event()
        rng = random.Random(7)
        reasons: collections.Counter[str] = collections.Counter()

        async def reader(client: EmbeddingClient, seed: int, hot: int = ROWS) -> None:
            g = np.random.default_rng(seed)
            while not stop.is_set():
                ids = g.integers(0, hot, 256)
                snap, s0 = truth.current.copy(), truth.seq
                try:
                    got = await client.lookup("emb", ids)
                except FlexEMRError as exc:
                    stats["failures"] += 1
                    reasons[f"lookup: {type(exc).__name__}: {str(exc)[:90]}"] += 1
                    await asyncio.sleep(0.01)
                    continue
                w, s = truth.check(ids, got, snap, s0, truth.seq)
                stats["wrong"] += w
                stats["stale"] += s
                stats["lookups"] += 1
                stats["rows"] += int(ids.size)

        async def writer(client: EmbeddingClient, parity: int) -> None:
            g = np.random.default_rng(100 + parity)
            value = parity + 1
            while not stop.is_set():
                value += 2
                rows = np.unique(g.integers(0, ROWS // 2, 32) * 2 + parity)  # each writer owns its rows
                truth.issue(rows, value)
                try:
                    await client.update("emb", rows, Truth.pattern(value, rows))
                except FlexEMRError as exc:
                    stats["failures"] += 1
                    reasons[f"update: {type(exc).__name__}: {str(exc)[:90]}"] += 1
                    await asyncio.sleep(0.01)
                    continue
                truth.ack(rows, value)
                stats["updates"] += 1
                await asyncio.sleep(0.005)

        async def chaos() -> None:
            await asyncio.sleep(1.0)
            while time.monotonic() < deadline - min(6.0, SECONDS / 3):
                victim = rng.choice(cluster.plan.servers)
                await cluster.kill(victim)
                stats["kills"] += 1
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await cluster.restart(victim)
                for c in (*clients, cached):  # all in sync again before the next victim: one in-sync replica always
                    assert await c.wait_healthy(20.0), f"{victim} did not come back"
                await asyncio.sleep(rng.uniform(0.3, 1.5))

        tasks = [asyncio.ensure_future(t) for t in (
            *(reader(c, 10 * i + j) for i, c in enumerate(clients) for j in range(2)),
            *(reader(cached, 50 + j, hot=ROWS // 8) for j in range(2)),
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
            assert t.exception() is None, t.exception()
        # every acknowledged update survived: read every row back with a fresh client
        fresh = await cluster.client()
        got = await fresh.lookup("emb", np.arange(ROWS))
        w, lost = truth.check(np.arange(ROWS), got, truth.current.copy(), truth.seq, truth.seq)
        stats["wrong"] += w
        rel = [c.reliability.snapshot() for c in (*clients, cached)]
    line = (f"flexemr soak: {SECONDS:.0f}s, 4 servers x replicas=2, kills={stats['kills']}, "
            f"ops={stats['lookups'] + stats['updates']} (lookups={stats['lookups']} rows={stats['rows']} "
            f"updates={stats['updates']}), failures surfaced={stats['failures']}, wrong rows={stats['wrong']}, "
            f"acknowledged updates lost={lost + stats['stale']}, "
            f"failovers={sum(r['failover_reads'] for r in rel)} resync copies={sum(r['resync_copies'] for r in rel)} "
            f"torn re-reads={sum(r['torn_rereads'] for r in rel)}, cached ranker: "
            f"hits={cached.metrics.cache_hits} stale hits re-read={cached.metrics.cache_stale_hits}")
    with capsys.disabled():
        print("\n" + line)
        for reason, n in reasons.most_common(5):
            print(f"  failure x{n}: {reason}")
    assert stats["wrong"] == 0
    assert lost + stats["stale"] == 0
    assert stats["kills"] >= (1 if SECONDS < 20 else 3)
    assert cached.metrics.cache_hits > 0 and cached.metrics.cache_stale_hits > 0
    assert stats["updates"] > 0 and stats["lookups"] > 0
