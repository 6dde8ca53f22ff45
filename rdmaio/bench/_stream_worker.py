"""Server side of the plain asyncio/uvloop streams peer benchmark.

Run as a script (``python path/to/_stream_worker.py --port 0``) or as a
module (``python -m rdmaio.bench._stream_worker --port 0``).  It listens on
``--host``/``--port``, prints the bound port on one stdout line and then
serves request/response pairs until its stdin reaches EOF (the parent closes
it, or dies), so it never outlives the benchmark that started it.

Wire format: each request is an 8-byte little-endian unsigned size ``n``;
the reply is exactly ``n`` bytes taken from a preallocated buffer filled with
:func:`pattern` (so the client can verify what it received).

The module deliberately imports nothing from ``rdmaio`` so that it starts
quickly and independently of the package's own import-time work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import struct
import sys

import numpy as np

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<Q")
"""Request header: the number of bytes the client wants back."""

PATTERN_MODULUS = 251
"""The reply buffer holds ``i % 251`` at offset ``i`` (251 is prime, so the
pattern does not line up with power-of-two sizes)."""


def pattern(nbytes: int) -> np.ndarray:
    """Return the ``nbytes``-long uint8 pattern the server replies with."""
    return (np.arange(nbytes, dtype=np.uint64) % PATTERN_MODULUS).astype(np.uint8)


async def _serve(host: str, port: int, max_size: int) -> None:
    """Serve until stdin hits EOF."""
    payload = memoryview(pattern(max_size).tobytes())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                (size,) = HEADER.unpack(header)
                if size > max_size:
                    logger.error("request of %d bytes exceeds --max-size %d", size, max_size)
                    break
                writer.write(payload[:size])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    bound_port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{bound_port}\n")
    sys.stdout.flush()

    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    stdin_fd = sys.stdin.fileno()

    def on_stdin() -> None:
        try:
            data = os.read(stdin_fd, 4096)
        except OSError:
            data = b""
        if not data and not stdin_closed.done():
            stdin_closed.set_result(None)

    loop.add_reader(stdin_fd, on_stdin)
    try:
        await stdin_closed
    finally:
        loop.remove_reader(stdin_fd)
        server.close()
        await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-size", type=int, default=64 << 20, help="largest reply in bytes")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(_serve(args.host, args.port, args.max_size))
    else:
        uvloop.run(_serve(args.host, args.port, args.max_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
