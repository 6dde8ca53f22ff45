"""``python -m rdmaio.demo``: a target process and an initiator on loopback, no configuration.

The target exposes a 64 MiB region; the initiator reads, writes, gathers rows
with ``read_batch``, runs atomics, checks every byte, and prints what it did
with a few throughput figures.  Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np

import rdmaio
from rdmaio.bench._suite import REGION, target


def _expected(offset: int, n: int) -> np.ndarray:
    return (np.arange(offset, offset + n, dtype=np.uint64) % 251).astype(np.uint8)


async def _rate(seconds: float, op: object, depth: int) -> float:
    stop = time.perf_counter() + seconds
    count = 0

    async def loop() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await op()  # type: ignore[operator]
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(depth)))
    return count / (time.perf_counter() - t0)


async def demo(port: int, transport: str, seconds: float) -> int:
    async with rdmaio.Engine(transport=transport, workers=2, progress="loop") as engine:  # type: ignore[arg-type]
        ep = await engine.connect("127.0.0.1", port)
        print(f"connected: {ep} ({engine.transport} transport, {ep.num_queue_pairs} queue pairs)")
        key = await ep.remote_key("bench")
        print(f"remote region 'bench': {key.length >> 20} MiB, access {key.access!r}")
        local = np.zeros(8 << 20, dtype=np.uint8)
        mr = engine.register(local, access=rdmaio.Access.NONE)

        await ep.read(mr, 0, key, 12345, 1 << 20)
        assert np.array_equal(local[: 1 << 20], _expected(12345, 1 << 20)), "read returned wrong bytes"
        print("read 1 MiB at offset 12345: bytes verified")

        rows = np.random.default_rng(0).choice(REGION // 256, 4096, replace=False)
        await ep.read_batch(mr, np.arange(4096) * 256, key, rows * 256, np.full(4096, 256))
        got = local[: 4096 * 256].reshape(4096, 256)
        assert all(np.array_equal(got[i], _expected(int(r) * 256, 256)) for i, r in enumerate(rows[:64]))
        print("read_batch of 4096 random 256-byte rows: verified (one request)")

        local[:4096] = 42
        await ep.write(mr, 0, key, REGION - 4096, 4096)
        await ep.read(mr, 8192, key, REGION - 4096, 4096)
        assert (local[8192:8192 + 4096] == 42).all()
        print("write 4 KiB, read it back: verified")

        base = await ep.fetch_add(key, 0, 0)
        await asyncio.gather(*(ep.fetch_add(key, 0, 1) for _ in range(1000)))
        assert await ep.compare_swap(key, 0, base + 1000, 7) == base + 1000
        print("1000 concurrent fetch_add + compare_swap: exact")

        try:
            await ep.read(mr, 0, key, REGION - 8, 16)
        except rdmaio.OutOfBoundsError as exc:
            print(f"out-of-bounds read refused by the target: {exc}")

        small = engine.register(np.zeros(64 * 32, dtype=np.uint8), access=rdmaio.Access.NONE)
        r1 = await _rate(seconds, lambda: ep.read(small, 0, key, 0, 64), 1)
        r32 = await _rate(seconds, lambda: ep.read(small, 0, key, 0, 64), 32)
        big = engine.register(np.zeros(1 << 20, dtype=np.uint8), access=rdmaio.Access.NONE)
        rb = await _rate(seconds, lambda: ep.read(big, 0, key, 0, 1 << 20), 1)
        print(f"64 B reads: {r1:,.0f} ops/s at depth 1, {r32:,.0f} ops/s at depth 32; "
              f"1 MiB reads: {rb * (1 << 20) / 1e9:.2f} GB/s")
        print("full benchmark with peers: python -m rdmaio.bench")
        await ep.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rdmaio.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="tcp", choices=["tcp", "verbs", "auto"])
    ap.add_argument("--seconds", type=float, default=0.5, help="length of each throughput sample")
    a = ap.parse_args(argv)
    with target(workers=2, transport=a.transport) as port:
        return rdmaio.run(demo(port, a.transport, a.seconds))


if __name__ == "__main__":
    sys.exit(main())
