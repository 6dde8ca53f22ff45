"""An RPC service over rdmaio message channels: a tiny key-value store with a "sum" call.

    python examples/channel_rpc.py [--transport tcp]

The server registers a handler with ``Engine.serve_channel("kv", handler)``;
the client opens ``Endpoint.channel("kv")`` and sends requests.  Channels are
ordered and flow-controlled (write-with-immediate into the peer's ring plus
credits), so one request/response pair per message needs no extra framing.

Request (one message): ``op (1 byte) | key length (u16) | key | payload``::

    P put    payload = value bytes           -> b"ok"
    G get    payload = empty                 -> value, or b"" when absent
    S sum    payload = float64 numbers       -> their sum as one float64

Several requests may be in flight on one channel: answers come back in order.
The last line is ``all checks passed``.  When rdmaio raises (e.g.
``--transport verbs`` on a host without an RDMA device) it prints one line
saying what is wrong and exits with code 1.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Awaitable, Callable

import numpy as np
import rdmaio

HEAD = struct.Struct("<cH")


def encode(op: bytes, key: bytes = b"", payload: bytes = b"") -> bytes:
    """One request message."""
    return HEAD.pack(op, len(key)) + key + payload


def serve(store: dict[bytes, bytes]) -> Callable[[rdmaio.Channel], Awaitable[None]]:
    """The handler: answers every request of one channel, in order, until the client closes it."""

    async def handler(ch: rdmaio.Channel) -> None:
        async for msg in ch:
            op, klen = HEAD.unpack_from(msg)
            key, payload = msg[HEAD.size : HEAD.size + klen], msg[HEAD.size + klen :]
            if op == b"P":
                store[key] = payload
                await ch.send([b"ok"])
            elif op == b"G":
                await ch.send([store.get(key, b"")])
            elif op == b"S":
                total = float(np.frombuffer(payload, dtype=np.float64).sum())
                await ch.send([struct.pack("<d", total)])
            else:
                await ch.send([b"error: unknown op"])

    return handler


async def main(transport: str) -> None:
    store: dict[bytes, bytes] = {}
    async with rdmaio.Engine(transport=transport, workers=1) as server, \
            rdmaio.Engine(transport=transport, workers=1) as client:
        server.serve_channel("kv", serve(store))
        listener = await server.listen("127.0.0.1", 0)
        print(f"server: channel service 'kv' on 127.0.0.1:{listener.port} ({server.transport})")
        async with await client.connect("127.0.0.1", listener.port) as ep:
            async with await ep.channel("kv", slots=16, slot_size=4096) as ch:
                await ch.send([encode(b"P", b"user:42", b"alice")])
                assert await ch.recv() == b"ok"
                await ch.send([encode(b"G", b"user:42")])
                got = await ch.recv()
                print(f"put user:42=alice, get user:42 -> {got.decode()}")
                assert got == b"alice" and store[b"user:42"] == b"alice"

                numbers = np.arange(1, 101, dtype=np.float64)
                await ch.send([encode(b"S", payload=numbers.tobytes())])
                (total,) = struct.unpack("<d", await ch.recv())
                print(f"sum(1..100) -> {total:.0f}")
                assert total == 5050.0

                # pipelined: 24 puts before reading any answer.  More than the 16 slots: the
                # sender waits for credits (stay below 2 x slots here, or both sides would wait)
                for i in range(24):
                    await ch.send([encode(b"P", f"k{i}".encode(), str(i * i).encode())])
                answers = [await ch.recv() for _ in range(24)]
                assert answers == [b"ok"] * 24 and store[b"k23"] == b"529"
                print(f"24 pipelined puts answered in order; the store holds {len(store)} keys")
                await ch.send([encode(b"G", b"missing")])
                assert await ch.recv() == b""
    print("all checks passed")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", default="tcp", choices=["auto", "tcp", "verbs"],
                   help="tcp (default); channels over verbs depend on the build")
    try:
        rdmaio.run(main(p.parse_args().transport))
    except rdmaio.TransportUnavailableError as exc:
        sys.exit(f"channel_rpc.py: error: {exc}; run with --transport tcp (or auto) on a host without RDMA")
    except rdmaio.RdmaioError as exc:
        sys.exit(f"channel_rpc.py: error: {exc}")
