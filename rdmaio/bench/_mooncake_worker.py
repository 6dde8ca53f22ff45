"""Target side of the Mooncake Transfer Engine (TCP) peer benchmark.

Run as a script (``python path/to/_mooncake_worker.py --size N``) or as a
module (``python -m rdmaio.bench._mooncake_worker --size N``).  It starts a
``mooncake.engine.TransferEngine`` in P2P-handshake mode over the ``tcp``
protocol, allocates and registers an ``N``-byte buffer filled with
:func:`pattern`, prints one stdout line::

    <session id "host:rpc_port"> <buffer address>

and then idles (Mooncake serves reads from its own threads) until its stdin
reaches EOF, so it never outlives the benchmark that started it.

Failures are reported on stdout as a single line starting with ``ERROR``.
The module imports nothing from ``rdmaio``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

logger = logging.getLogger(__name__)

PATTERN_MODULUS = 251
"""The buffer holds ``i % 251`` at offset ``i`` (same as the streams peer)."""


def pattern(nbytes: int) -> np.ndarray:
    """Return the ``nbytes``-long uint8 pattern the target buffer is filled with."""
    return (np.arange(nbytes, dtype=np.uint64) % PATTERN_MODULUS).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    """Start the engine, publish the buffer and wait for stdin EOF."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes to register")
    args = parser.parse_args(argv)

    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        print(f"ERROR mooncake not importable: {exc}", flush=True)
        return 1

    engine = TransferEngine()
    rc = engine.initialize(args.host, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        print(f"ERROR TransferEngine.initialize returned {rc}", flush=True)
        return 1
    # Keep the numpy array alive for as long as the buffer is registered.
    buf = pattern(args.size)
    addr = int(buf.ctypes.data)
    rc = engine.register_memory(addr, args.size)
    if rc != 0:
        print(f"ERROR TransferEngine.register_memory returned {rc}", flush=True)
        return 1
    print(f"{args.host}:{engine.get_rpc_port()} {addr}", flush=True)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        engine.unregister_memory(addr)
    del buf
    return 0


if __name__ == "__main__":
    sys.exit(main())
