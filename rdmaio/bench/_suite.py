"""rdmaio's own measurements for ``python -m rdmaio.bench``.

Every measurement runs a target engine in a separate process
(:mod:`rdmaio.bench._target`, progress threads, so its responders run in C
without the GIL) and an initiator in this process; it counts completed
operations for ``duration`` seconds after a short warm-up, keeping ``depth``
operations in flight with ``depth`` tasks.  Read payloads are spot-checked
against the target's pattern, so a broken transport cannot post good numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import numpy as np

import rdmaio

REGION = 64 << 20


@dataclass
class Row:
    """One rdmaio measurement."""

    name: str
    size: int
    depth: int
    ops_per_s: float
    gb_per_s: float
    rows_per_s: float | None = None
    note: str = ""


@contextlib.contextmanager
def target(workers: int = 4, transport: str = "tcp", spin_us: int | None = None) -> Iterator[int]:
    """Start a target process (``spin_us``: its ``poll_spin_us``); yields its port; always stops it."""
    spin = [] if spin_us is None else ["--spin-us", str(spin_us)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdmaio.bench._target", "--workers", str(workers), "--progress", "thread",
         "--transport", transport, "--size", str(REGION), *spin],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip():
            raise RuntimeError("benchmark target failed to start")
        yield int(line)
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


async def _drive(depth: int, duration: float, op: Callable[[int], Awaitable[None]]) -> float:
    """Keep ``depth`` tasks looping over ``op``; returns completed ops per second."""
    warm_until = time.perf_counter() + min(0.2, duration / 3)
    stop = [False]
    counts = [0] * depth

    async def loop(i: int) -> None:
        while time.perf_counter() < warm_until:
            await op(i)
        while not stop[0]:
            await op(i)
            counts[i] += 1

    tasks = [asyncio.create_task(loop(i)) for i in range(depth)]
    await asyncio.sleep(min(0.2, duration / 3))
    t0 = time.perf_counter()
    c0 = sum(counts)
    await asyncio.sleep(duration)
    c1 = sum(counts)
    t1 = time.perf_counter()
    stop[0] = True
    await asyncio.gather(*tasks)
    return (c1 - c0) / (t1 - t0)


def _check(local: np.ndarray, remote_off: int, n: int) -> None:
    want = (np.arange(remote_off, remote_off + n, dtype=np.uint64) % 251).astype(np.uint8)
    if not np.array_equal(local[:n], want):
        raise RuntimeError("read returned wrong bytes: the benchmark refuses to report")


async def measure_reads(port: int, sizes: list[int], depths: list[int], progress: str, workers: int,
                        duration: float, fast_path: bool = True) -> list[Row]:
    rows = []
    label = progress if fast_path else f"{progress}, loopback TCP"
    async with rdmaio.Engine(transport="tcp", workers=workers, progress=progress,  # type: ignore[arg-type]
                             same_host_fast_path=fast_path) as engine:
        ep = await engine.connect("127.0.0.1", port)
        key = await ep.remote_key("bench")
        for size in sizes:
            for depth in depths:
                bufs = [np.zeros(size, dtype=np.uint8) for _ in range(depth)]
                mrs = [engine.register(b, access=rdmaio.Access.NONE) for b in bufs]
                roff = 4096 * 7

                async def op(i: int) -> None:
                    await ep.read(mrs[i], 0, key, roff, size)

                ops = await _drive(depth, duration, op)
                _check(bufs[0], roff, size)
                rows.append(Row(f"rdmaio read ({label})", size, depth, ops, ops * size / 1e9))
                for mr in mrs:
                    mr.close()
        await ep.aclose()
    return rows


async def measure_batches(port: int, row_sizes: list[int], batch: int, progress: str, depth: int,
                          duration: float) -> list[Row]:
    out = []
    async with rdmaio.Engine(transport="tcp", workers=2, progress=progress) as engine:  # type: ignore[arg-type]
        ep = await engine.connect("127.0.0.1", port)
        key = await ep.remote_key("bench")
        rng = np.random.default_rng(0)
        for row in row_sizes:
            nrows = REGION // row
            bufs = [np.zeros(batch * row, dtype=np.uint8) for _ in range(depth)]
            mrs = [engine.register(b, access=rdmaio.Access.NONE) for b in bufs]
            ids = [np.sort(rng.choice(nrows, batch, replace=False)) for _ in range(depth)]
            local = np.arange(batch, dtype=np.uint64) * row
            lengths = np.full(batch, row, dtype=np.uint64)
            remote = [(i * row).astype(np.uint64) for i in ids]

            async def op(i: int) -> None:
                await ep.read_batch(mrs[i], local, key, remote[i], lengths)

            ops = await _drive(depth, duration, op)
            _check(bufs[0], int(remote[0][0]), row)
            out.append(Row(f"rdmaio read_batch ({progress})", row, depth, ops, ops * batch * row / 1e9,
                           rows_per_s=ops * batch, note=f"{batch} rows/batch"))
            for mr in mrs:
                mr.close()
        await ep.aclose()
    return out


async def measure_atomics(port: int, depths: list[int], progress: str, duration: float) -> list[Row]:
    out = []
    async with rdmaio.Engine(transport="tcp", workers=2, progress=progress) as engine:  # type: ignore[arg-type]
        ep = await engine.connect("127.0.0.1", port)
        key = await ep.remote_key("bench")
        for depth in depths:
            async def op(i: int) -> None:
                await ep.fetch_add(key, 8 * i, 1)

            ops = await _drive(depth, duration, op)
            out.append(Row(f"rdmaio fetch_add ({progress})", 8, depth, ops, ops * 8 / 1e9))
        await ep.aclose()
    return out


async def measure_workers(port: int, counts: list[int], depth: int, size: int, duration: float) -> list[Row]:
    """Per-thread queue pairs against the same workers sharing one queue pair (one endpoint, its
    operations spread per operation: ``qp_choice="least_loaded"``)."""
    out = []
    for shared in (False, True):
        for n in counts:
            async with rdmaio.Engine(transport="tcp", workers=n, progress="thread",
                                     qp_per_worker=not shared, qp_choice="least_loaded") as engine:
                ep = await engine.connect("127.0.0.1", port)
                key = await ep.remote_key("bench")
                bufs = [np.zeros(size, dtype=np.uint8) for _ in range(depth)]
                mrs = [engine.register(b, access=rdmaio.Access.NONE) for b in bufs]

                async def op(i: int) -> None:
                    await ep.read(mrs[i], 0, key, 64 * i, size)

                ops = await _drive(depth, duration, op)
                label = "shared QP" if shared else "QP per worker"
                out.append(Row(f"rdmaio {n} worker(s), {label}", size, depth, ops, ops * size / 1e9,
                               note=f"{ep.num_queue_pairs} QP(s)"))
                await ep.aclose()
    return out
