"""Raw rdmaio between two engines: one-sided read, write, batched reads and 64-bit atomics.

    python examples/rdmaio_read_write.py [--transport auto|tcp|verbs]

A *target* engine registers a 1 MiB region (bytes ``i % 251``) with a counter
word at its end and exposes it as ``"data"``; an *initiator* engine connects
over loopback and works on it without any target code running per operation.
Every result is checked; the last line is ``all checks passed``.  When rdmaio
raises (e.g. ``--transport verbs`` on a host without an RDMA device) it prints
one line saying what is wrong and exits with code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np
import rdmaio

SIZE = 1 << 20
COUNTER = SIZE - 8          # an 8-byte aligned word for the atomics


async def main(transport: str) -> None:
    async with rdmaio.Engine(transport=transport, workers=1) as target, \
            rdmaio.Engine(transport=transport, workers=1) as initiator:
        # -- target: register memory, expose it by name, listen
        data = (np.arange(SIZE, dtype=np.uint64) % 251).astype(np.uint8)
        data[COUNTER:] = 0
        target.expose("data", target.register(data, access=rdmaio.Access.ALL))
        listener = await target.listen("127.0.0.1", 0)
        print(f"target: 1 MiB region 'data' on 127.0.0.1:{listener.port} ({target.transport})")

        # -- initiator: connect, get the remote key, register a local buffer
        async with await initiator.connect("127.0.0.1", listener.port) as ep:
            key = await ep.remote_key("data")
            local = np.zeros(64 << 10, dtype=np.uint8)
            mr = initiator.register(local, access=rdmaio.Access.NONE)

            await ep.read(mr, 0, key, 1000, 4096)                        # one-sided READ
            assert np.array_equal(local[:4096], data[1000:5096])
            print("read 4096 bytes at offset 1000: match")

            local[:256] = 7
            await ep.write(mr, 0, key, 8192, 256)                        # one-sided WRITE
            assert (data[8192 : 8192 + 256] == 7).all()
            print("wrote 256 bytes at offset 8192: the target's memory changed")

            rows = np.array([3, 99, 42, 1023])                           # gather 4 rows of 64 bytes
            await ep.read_batch(mr, np.arange(4) * 64, key, rows * 64, np.full(4, 64))
            assert np.array_equal(local[:256].reshape(4, 64), data[:65536].reshape(1024, 64)[rows])
            print(f"read_batch of rows {rows.tolist()} (64 B each) in one request: match")

            olds = await asyncio.gather(*(ep.fetch_add(key, COUNTER, 1) for _ in range(100)))
            assert sorted(olds) == list(range(100))                      # every add saw a distinct value
            assert await ep.compare_swap(key, COUNTER, 100, 12345) == 100
            assert int(data[COUNTER:].view(np.uint64)[0]) == 12345
            print("100 concurrent fetch_add then compare_swap 100 -> 12345: exact")

            try:
                await ep.read(mr, 0, key, SIZE - 8, 64)
            except rdmaio.OutOfBoundsError as exc:
                print(f"out-of-bounds read refused: {type(exc).__name__}")
            mr.close()
    print("all checks passed")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"])
    try:
        rdmaio.run(main(p.parse_args().transport))
    except rdmaio.TransportUnavailableError as exc:
        sys.exit(f"rdmaio_read_write.py: error: {exc}; run with --transport tcp (or auto) on a host without RDMA")
    except rdmaio.RdmaioError as exc:
        sys.exit(f"rdmaio_read_write.py: error: {exc}")
