"""The pooling RPC's wire format, sans I/O: requests, responses and their framing on a channel.

Every :class:`~flexemr.EmbeddingServer` serves the message channel
:data:`POOL_CHANNEL` (``"flexemr/pool"``; :mod:`flexemr.server.pooling`).  A ranker opens one channel per
server (lazily, on its first pooled sub-request) and keeps it for the life of
the client.  One *pooling request* covers one ``(server, table)``
sub-request: the ids of the rows the server holds, grouped by bag, optional
per-row weights and the reduction; the server answers with one partial row
per bag it was asked about (:func:`~flexemr.core.pooling.server_partial_pool`),
which the ranker merges with :func:`~flexemr.core.pooling.combine_partials`.

Framing
    A logical message (request or response) may be larger than a channel
    slot.  It is cut into *frames* of at most ``slot_size - 8 - 12`` payload
    bytes; each frame is one channel message starting with :data:`FRAME`
    ``(request id u32, frame index u32, frame count u32)``.  Frames of
    concurrent requests may interleave on the channel; the receiver
    reassembles by request id (:class:`FrameAssembler`).  So there is no limit
    on a request's size other than memory; the slot size only sets the frame
    size.  Several requests are in flight per channel (one credit per slot);
    responses come back in the order the server finishes them.  :func:`frames`
    cuts a message; the channel I/O is the caller's (the ranker's
    :class:`~flexemr.client.pooled.PoolChannel`, the server's
    :class:`~flexemr.server.pooling.PoolService`).

Request (little-endian, no pickle; each array section padded to 8 bytes)::

    REQUEST  "FXPQ" u8 version=1, u8 op (0 = sum, 1 = max), u8 flags, u8 len(table),
             u32 n (rows), u32 k (bags)
    table    utf-8 name, padded
    ids      n x (u32 if flags & IDS32 else i64)      rows, grouped by bag (bag order)
    weights  n x (f64 if flags & W64 else f32)        only if flags & WEIGHTS
    lengths  k x u32                                  rows of each bag, in request order

Response::

    RESPONSE "FXPR" u8 status (0 ok, 1 error), u8 dtype (0 f32, 1 f64), u16 0, u32 k, u32 dim
    values   k x dim of dtype                         partial sums (op 0) or maxima (op 1)
    (status 1: the payload is a utf-8 error message)

Counts need not travel back: the ranker knows how many rows it sent per bag.

>>> req = encode_request("t", np.array([5, 9, 2]), np.array([2, 1]), None, "sum", num_rows=10)
>>> d = decode_request(b"".join(bytes(p) for p in req))
>>> d.table, d.ids.tolist(), d.lengths.tolist(), d.op
('t', [5, 9, 2], [2, 1], 'sum')
>>> resp = encode_response(np.ones((2, 3), np.float32))
>>> decode_response(b"".join(bytes(p) for p in resp)).tolist()
[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InputError, TransportError

__all__ = [
    "FRAME",
    "POOL_CHANNEL",
    "Buffer",
    "FrameAssembler",
    "PoolRequest",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
    "frames",
]

IntArray = npt.NDArray[np.int64]

#: Name of the channel every embedding server serves for pooling requests.
POOL_CHANNEL = "flexemr/pool"
#: Frame header: request id, frame index, frame count.
FRAME = struct.Struct("<III")
_REQ = struct.Struct("<4sBBBBII")
_RESP = struct.Struct("<4sBBHII")
_REQ_MAGIC = b"FXPQ"
_RESP_MAGIC = b"FXPR"
_VERSION = 1
_F_WEIGHTS, _F_IDS32, _F_W64 = 1, 2, 4
_OPS = {"sum": 0, "mean": 0, "max": 1}

Buffer = bytes | bytearray | memoryview


def _pad(n: int) -> bytes:
    return bytes(-n % 8)


# ------------------------------------------------------------------ encoding


def encode_request(
    table: str,
    ids: npt.NDArray[Any],
    lengths: npt.NDArray[Any],
    weights: npt.NDArray[Any] | None,
    mode: str,
    *,
    num_rows: int,
    weight_dtype: npt.DTypeLike = np.float32,
) -> list[Buffer]:
    """The buffers of one pooling request (module docstring); ``ids`` grouped by bag, ``lengths`` per bag."""
    name = table.encode()
    if len(name) > 255:
        raise InputError(f"table name {table!r} is longer than 255 bytes")
    flags = 0
    if num_rows <= 1 << 32:
        flags |= _F_IDS32
        id_arr = np.ascontiguousarray(ids, dtype=np.uint32)
    else:
        id_arr = np.ascontiguousarray(ids, dtype=np.int64)
    parts: list[Buffer] = [b"", name, _pad(len(name)), id_arr.data.cast("B"), _pad(id_arr.nbytes)]
    if weights is not None:
        flags |= _F_WEIGHTS
        wdt = np.dtype(weight_dtype)
        if wdt == np.float64:
            flags |= _F_W64
        w = np.ascontiguousarray(weights, dtype=np.float64 if wdt == np.float64 else np.float32)
        parts += [w.data.cast("B"), _pad(w.nbytes)]
    parts.append(np.ascontiguousarray(lengths, dtype=np.uint32).data.cast("B"))
    parts[0] = _REQ.pack(_REQ_MAGIC, _VERSION, _OPS[mode], flags, len(name), id_arr.size, lengths.size)
    return parts


@dataclass(frozen=True)
class PoolRequest:
    """A decoded pooling request."""

    table: str
    ids: IntArray
    lengths: IntArray
    weights: npt.NDArray[Any] | None
    op: str


def decode_request(data: Buffer) -> PoolRequest:
    """Parse a request; :class:`InputError` when malformed."""
    buf = memoryview(data).cast("B")
    if buf.nbytes < _REQ.size:
        raise InputError("pooling request too short")
    magic, version, op, flags, name_len, n, k = _REQ.unpack_from(buf, 0)
    if magic != _REQ_MAGIC or version != _VERSION or op not in (0, 1):
        raise InputError("not a flexemr pooling request (bad magic, version or op)")
    pos = _REQ.size
    table = bytes(buf[pos : pos + name_len]).decode()
    pos += name_len + (-name_len % 8)
    id_dt = np.dtype(np.uint32 if flags & _F_IDS32 else np.int64)
    w_dt = np.dtype(np.float64 if flags & _F_W64 else np.float32)
    need = pos + n * id_dt.itemsize + (-(n * id_dt.itemsize) % 8) + 4 * k
    if flags & _F_WEIGHTS:
        need += n * w_dt.itemsize + (-(n * w_dt.itemsize) % 8)
    if buf.nbytes != need:
        raise InputError(f"pooling request of {buf.nbytes} bytes, its header implies {need}")
    ids = np.frombuffer(buf, dtype=id_dt, count=n, offset=pos).astype(np.int64)
    pos += n * id_dt.itemsize
    pos += -pos % 8
    weights = None
    if flags & _F_WEIGHTS:
        weights = np.frombuffer(buf, dtype=w_dt, count=n, offset=pos)
        pos += n * w_dt.itemsize
        pos += -pos % 8
    lengths = np.frombuffer(buf, dtype=np.uint32, count=k, offset=pos).astype(np.int64)
    if int(lengths.sum()) != n:
        raise InputError(f"bag lengths sum to {int(lengths.sum())}, the request has {n} rows")
    return PoolRequest(table, ids, lengths, weights, "max" if op == 1 else "sum")


def encode_response(values: npt.NDArray[Any]) -> list[Buffer]:
    """The buffers of an ok response carrying ``values`` ``[k, dim]`` (float32 or float64)."""
    v = np.ascontiguousarray(values)
    code = 1 if v.dtype == np.float64 else 0
    if code == 0 and v.dtype != np.float32:
        v = v.astype(np.float32)
    k, dim = v.shape
    return [_RESP.pack(_RESP_MAGIC, 0, code, 0, k, dim), v.data.cast("B")]


def encode_error(message: str) -> list[Buffer]:
    """The buffers of an error response."""
    return [_RESP.pack(_RESP_MAGIC, 1, 0, 0, 0, 0), message.encode()]


def decode_response(data: Buffer) -> npt.NDArray[Any]:
    """The ``[k, dim]`` values of a response; :class:`TransportError` for an error response."""
    buf = memoryview(data).cast("B")
    if buf.nbytes < _RESP.size:
        raise TransportError("pooling response too short")
    magic, status, code, _, k, dim = _RESP.unpack_from(buf, 0)
    if magic != _RESP_MAGIC:
        raise TransportError("not a flexemr pooling response")
    if status != 0:
        raise TransportError(f"server pooling failed: {bytes(buf[_RESP.size:]).decode(errors='replace')}")
    dt = np.dtype(np.float64 if code == 1 else np.float32)
    if buf.nbytes != _RESP.size + k * dim * dt.itemsize:
        raise TransportError("pooling response has the wrong size")
    out: npt.NDArray[Any] = np.frombuffer(buf, dtype=dt, count=k * dim, offset=_RESP.size).reshape(k, dim)
    return out


# ------------------------------------------------------------------- framing


def _frames(parts: Sequence[Buffer], max_payload: int) -> Iterator[list[memoryview]]:
    """Cut the concatenation of ``parts`` into frames of at most ``max_payload`` bytes (no copies)."""
    views = [memoryview(p).cast("B") for p in parts]
    frame: list[memoryview] = []
    room = max_payload
    yielded = False
    for v in views:
        while v.nbytes:
            take = v[:room]
            frame.append(take)
            room -= take.nbytes
            v = v[take.nbytes :]
            if room == 0:
                yield frame
                yielded = True
                frame, room = [], max_payload
    if frame or not yielded:
        yield frame


def frames(req_id: int, parts: Sequence[Buffer], max_message: int) -> Iterator[tuple[bytes, list[memoryview]]]:
    """The channel messages of one logical message: ``(FRAME header, payload pieces)`` each (no copies).

    ``max_message``: the channel's largest message (:attr:`rdmaio.Channel.max_message`).

    >>> [(FRAME.unpack(h), b"".join(p)) for h, p in frames(7, [b"abc", b"de"], FRAME.size + 4)]
    [((7, 0, 2), b'abcd'), ((7, 1, 2), b'e')]
    """
    max_payload = max_message - FRAME.size
    total = sum(memoryview(p).nbytes for p in parts)
    count = max(1, -(-total // max_payload))
    for i, frame in enumerate(_frames(parts, max_payload)):
        yield FRAME.pack(req_id, i, count), frame


class FrameAssembler:
    """Reassembles frames into logical messages, per request id.

    >>> fa = FrameAssembler()
    >>> fa.add(FRAME.pack(7, 0, 2) + b"ab"), fa.add(FRAME.pack(7, 1, 2) + b"c")
    (None, (7, b'abc'))
    """

    def __init__(self) -> None:
        self._parts: dict[int, list[bytes]] = {}

    def add(self, frame: bytes) -> tuple[int, bytes] | None:
        """Add one frame; returns ``(request id, message)`` when a message is complete."""
        if len(frame) < FRAME.size:
            raise TransportError("pooling frame too short")
        rid, idx, count = FRAME.unpack_from(frame, 0)
        if count == 1 and idx == 0:
            return rid, frame[FRAME.size :]
        got = self._parts.setdefault(rid, [])
        if idx != len(got) or idx >= count:
            raise TransportError(f"pooling frame {idx}/{count} of request {rid} out of order")
        got.append(frame[FRAME.size :])
        if len(got) < count:
            return None
        del self._parts[rid]
        return rid, b"".join(got)
