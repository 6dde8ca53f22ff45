"""The benchmark's target: an engine in its own process exposing region "bench".

``python -m rdmaio.bench._target --workers N --progress MODE --size BYTES [--spin-us US]``
prints the listening port on stdout, then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import numpy as np

import rdmaio


async def serve(workers: int, progress: str, size: int, transport: str, spin_us: int | None = None) -> None:
    opts: dict[str, Any] = {} if spin_us is None else {"poll_spin_us": spin_us}
    async with rdmaio.Engine(transport=transport, workers=workers, progress=progress,  # type: ignore[arg-type]
                             **opts) as engine:
        region = (np.arange(size, dtype=np.uint64) % 251).astype(np.uint8)
        engine.expose("bench", engine.register(region, access=rdmaio.Access.ALL))
        listener = await engine.listen("127.0.0.1", 0)
        print(listener.port, flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # returns when the parent closes our stdin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--progress", default="thread")
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--size", type=int, default=64 << 20)
    ap.add_argument("--spin-us", type=int, default=None, help="poll_spin_us (default: the engine's)")
    a = ap.parse_args()
    rdmaio.run(serve(a.workers, a.progress, a.size, a.transport, a.spin_us))


if __name__ == "__main__":
    main()
