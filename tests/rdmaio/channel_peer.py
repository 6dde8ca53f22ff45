"""An echo channel server in its own process (for the peer-death test); prints its port."""

from __future__ import annotations

import asyncio

import rdmaio


async def main() -> None:
    async with rdmaio.Engine(transport="tcp", workers=1) as engine:
        async def echo(ch: rdmaio.Channel) -> None:
            async for m in ch:
                await ch.send([m])

        engine.serve_channel("echo", echo)
        lst = await engine.listen()
        print(lst.port, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    rdmaio.run(main())
