"""A peer engine in its own process, for tests that kill the peer mid-flight.

Run as ``python peer_server.py TRANSPORT PROGRESS SIZE``: exposes region
"table" (SIZE bytes, byte i == i % 251) and prints the listening port.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

import rdmaio


async def main(transport: str, progress: str, size: int) -> None:
    async with rdmaio.Engine(transport=transport, workers=2, progress=progress) as engine:
        table = (np.arange(size) % 251).astype(np.uint8)
        engine.expose("table", engine.register(table, access=rdmaio.Access.ALL))
        listener = await engine.listen("127.0.0.1", 0)
        print(listener.port, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    rdmaio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
