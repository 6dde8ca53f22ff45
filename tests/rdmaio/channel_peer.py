"""An echo channel server in its own process (for the peer-death test); prints its port.

``python channel_peer.py [TRANSPORT [PROGRESS]]`` (default: tcp, thread).
"""

from __future__ import annotations

import asyncio
import sys

import rdmaio


async def main(transport: str, progress: str) -> None:
    async with rdmaio.Engine(transport=transport, workers=1, progress=progress) as engine:  # type: ignore[arg-type]
        async def echo(ch: rdmaio.Channel) -> None:
            async for m in ch:
                await ch.send([m])

        engine.serve_channel("echo", echo)
        lst = await engine.listen()
        print(lst.port, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    rdmaio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tcp", sys.argv[2] if len(sys.argv) > 2 else "thread"))
