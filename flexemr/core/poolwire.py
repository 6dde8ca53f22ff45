"""The pooling RPC's wire format, sans I/O: requests, responses and their framing on a channel.

Every :class:`~flexemr.EmbeddingServer` serves the message channel
:data:`POOL_CHANNEL` (``"flexemr/pool"``; :mod:`flexemr.server.pooling`).  A ranker opens one channel per
server (lazily, on its first pooled lookup) and keeps it for the life of the
client.  One *pooling request* covers everything a lookup asks one server to
pool: one *job* per shard (row band of a table) the server holds, each the
bags of the whole batch (dense: ``B + 1`` offsets, empty bags included) and
the ids of the rows of that shard, relative to the shard's first row; the
server answers with one dense ``[B, dim]`` partial per job (the sums, or the
maxima with ``-inf`` for empty bags), written there by the native kernel
(:func:`flexemr.core.kernel.pool_many`), which the ranker adds up.

Framing
    A logical message (request or response) may be larger than a channel
    slot.  It is cut into *frames* of at most ``slot_size - 8 - 12`` payload
    bytes; each frame is one channel message starting with :data:`FRAME`
    ``(request id u32, frame index u32, frame count u32)``.  Frames of
    concurrent requests may interleave on the channel; the receiver
    reassembles by request id (:class:`FrameAssembler`).  So there is no limit
    on a request's size other than memory; the slot size only sets the frame
    size.  Every frame of a request but its last carries exactly
    ``slot_size - 8 - 12`` payload bytes (what :func:`frames` cuts: the server
    copies each frame straight to its place, :meth:`FrameAssembler.add_view`);
    a response's frames may carry fewer (a server cuts them between rows:
    :func:`framed_layout`).  Several requests are in flight per channel (one credit per slot);
    responses come back in the order the server finishes them.  :func:`frames`
    cuts a message; the channel I/O is the caller's (the ranker's
    :class:`~flexemr.client.pooled.PoolChannel`, the server's
    :class:`~flexemr.server.pooling.PoolService`).

Request (little-endian, no pickle; every section after the job headers is padded to a multiple of 8 bytes)::

    HEAD     "FXPQ" u8 version=2, u8 op (0 = sum, 1 = max), u16 jobs, u32 0
    JOB      u64 n (ids), u32 B (bags), u32 shard, u16 len(table), u8 id bytes (4|8),
             u8 flags (1: weights, 2: one id per bag), 4 x 0     -- once per job
    names    the jobs' table names, utf-8, back to back, padded
    per job  offsets  (B + 1) x i64      bag b: ids[offsets[b] .. offsets[b+1]);
                                         not sent with flags & 2 (n == B, bag b is ids[b])
             ids      n x (i32 | i64)    row - shard.row_start, padded
             weights  n x f32            only with flags & 1, padded

One id per bag (e.g. Criteo's categorical features) is common enough that its
offsets, two thirds of such a request with int32 ids, are left out.

Response::

    HEAD     "FXPR" u8 status (0 ok, 1 error), u8 0, u16 jobs, u32 0
    JOB      u32 B, u32 dim, u8 dtype (0 f32, 1 f64), 7 x 0          -- once per job
    per job  values   B x dim of dtype, padded
    (status 1: after HEAD, a utf-8 error message)

Mean pooling travels as sum (the ranker divides by the bag lengths it knows).

>>> job = RequestJob("t", 1, np.array([0, 2, 2, 3]), np.array([5, 9, 2], np.int32), None)
>>> req = decode_request(b"".join(bytes(p) for p in encode_request([job], "sum")))
>>> req.op, [(j.table, j.shard, j.offsets.tolist(), j.ids.tolist()) for j in req.jobs]
('sum', [('t', 1, [0, 2, 2, 3], [5, 9, 2])])
>>> resp = encode_response([np.ones((3, 2), np.float32)])
>>> [v.tolist() for v in decode_response(b"".join(bytes(p) for p in resp), [(3, 2)])]
[[[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]]
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InputError, TransportError

__all__ = [
    "FRAME",
    "FRAME_GAP",
    "FramedLayout",
    "MAX_ASSEMBLY_BYTES",
    "MAX_BAGS",
    "POOL_CHANNEL",
    "Buffer",
    "FrameAssembler",
    "PoolRequest",
    "RequestJob",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
    "framed_layout",
    "frames",
    "request_key",
    "response_layout",
]

#: Name of the channel every embedding server serves for pooling requests.
POOL_CHANNEL = "flexemr/pool"
#: Frame header: request id, frame index, frame count.
FRAME = struct.Struct("<III")
#: Most bags one job may ask for (a server allocates ``B x dim`` values per job).
MAX_BAGS = 1 << 26
#: :meth:`FrameAssembler.add_view`: most bytes reserved for one message, and for all partial messages together.
MAX_ASSEMBLY_BYTES = 1 << 31
_HEAD = struct.Struct("<4sBBHI")
_REQ_JOB = struct.Struct("<QIIHBB4x")
_RESP_JOB = struct.Struct("<IIB7x")
_REQ_MAGIC = b"FXPQ"
_RESP_MAGIC = b"FXPR"
_VERSION = 2
_F_WEIGHTS = 1
_F_ONE = 2  # one id per bag: no offsets on the wire
_OPS = {"sum": 0, "mean": 0, "max": 1}
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_I64 = np.dtype(np.int64)
_F32 = np.dtype(np.float32)

Buffer = bytes | bytearray | memoryview


def _pad(n: int) -> int:
    return -n % 8


_ZEROS = bytes(8)


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class RequestJob:
    """One job of a pooling request: the bags of one shard (``ids`` relative to its first row)."""

    table: str
    shard: int
    offsets: npt.NDArray[np.int64]
    ids: npt.NDArray[Any]
    weights: npt.NDArray[np.float32] | None


@dataclass(frozen=True)
class PoolRequest:
    """A decoded pooling request: ``"sum"`` or ``"max"`` over every job (arrays are views of the message)."""

    op: str
    jobs: list[RequestJob]


def encode_request(jobs: Sequence[RequestJob], mode: str) -> list[Buffer]:
    """The buffers of one request (module docstring), without copying the arrays.

    ``offsets`` are sent as int64 and weights as float32 (converted when
    needed); ``ids`` as int32 when they are int32, else int64.
    """
    if len(jobs) > 0xFFFF:
        raise InputError(f"a pooling request holds at most 65535 jobs, got {len(jobs)}")
    heads: list[bytes] = [_HEAD.pack(_REQ_MAGIC, _VERSION, _OPS[mode], len(jobs), 0)]
    names: list[bytes] = []
    body: list[Buffer] = []
    for job in jobs:
        name = job.table.encode()
        if len(name) > 0xFFFF:
            raise InputError(f"table name {job.table!r} is too long")
        offs = np.ascontiguousarray(job.offsets, dtype=_I64)
        ids = job.ids if job.ids.dtype in (np.int32, np.int64) else job.ids.astype(np.int64)
        ids = np.ascontiguousarray(ids)
        flags = 0
        if ids.size == offs.size - 1 and np.array_equal(offs, _one_per_bag(ids.size)):
            flags |= _F_ONE
        else:
            body.append(offs.data.cast("B"))
        body += [ids.data.cast("B"), _ZEROS[: _pad(ids.nbytes)]]
        if job.weights is not None:
            flags |= _F_WEIGHTS
            w = np.ascontiguousarray(job.weights, dtype=_F32)
            body += [w.data.cast("B"), _ZEROS[: _pad(w.nbytes)]]
        heads.append(_REQ_JOB.pack(ids.size, offs.size - 1, job.shard, len(name), ids.itemsize, flags))
        names.append(name)
    blob = b"".join(names)
    return [b"".join(heads), blob, _ZEROS[: _pad(len(blob))], *body]


@functools.lru_cache(maxsize=8)
def _one_per_bag(n: int) -> npt.NDArray[np.int64]:
    """``0, 1, .., n``: the offsets of ``n`` bags of one id each (read only; shared)."""
    out = np.arange(n + 1, dtype=_I64)
    out.flags.writeable = False
    return out


def _view(buf: memoryview, dtype: np.dtype[Any], count: int, pos: int) -> npt.NDArray[Any]:
    out: npt.NDArray[Any] = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
    return out


def decode_request(data: Buffer) -> PoolRequest:
    """Parse a request into views of ``data`` (O(jobs) work); :class:`InputError` when malformed.

    Only the layout is checked here; offsets and ids are checked by the
    kernel that pools them.
    """
    buf = memoryview(data).cast("B")
    size = buf.nbytes
    if size < _HEAD.size:
        raise InputError("pooling request too short")
    magic, version, op, n_jobs, _ = _HEAD.unpack_from(buf, 0)
    if magic != _REQ_MAGIC or version != _VERSION or op not in (0, 1):
        raise InputError("not a flexemr pooling request of this version (bad magic, version or op)")
    pos = _HEAD.size
    if size < pos + n_jobs * _REQ_JOB.size:
        raise InputError(f"pooling request of {size} bytes is too short for {n_jobs} jobs")
    heads = [_REQ_JOB.unpack_from(buf, pos + i * _REQ_JOB.size) for i in range(n_jobs)]
    pos += n_jobs * _REQ_JOB.size
    name_bytes = sum(h[3] for h in heads)
    if size < pos + name_bytes:
        raise InputError("pooling request too short for its table names")
    names = bytes(buf[pos : pos + name_bytes])
    pos += name_bytes + _pad(name_bytes)
    jobs = []
    npos = 0
    for n, nb, shard, name_len, id_bytes, flags in heads:
        try:
            table = names[npos : npos + name_len].decode()
        except UnicodeDecodeError:
            raise InputError("pooling request: a table name is not utf-8") from None
        npos += name_len
        one = flags & _F_ONE
        if id_bytes not in (4, 8) or flags & ~(_F_WEIGHTS | _F_ONE) or nb > MAX_BAGS or (one and n != nb):
            raise InputError(f"pooling request: bad job header for table {table!r}")
        need = (0 if one else 8 * (nb + 1)) + n * id_bytes + _pad(n * id_bytes)
        if flags & _F_WEIGHTS:
            need += 4 * n + _pad(4 * n)
        if size < pos + need:
            raise InputError(f"pooling request of {size} bytes, its headers imply more")
        if one:  # a new array each time: a server keeps it with the native jobs of the request's kind
            offs = np.arange(nb + 1, dtype=_I64)
        else:
            offs = _view(buf, _I64, nb + 1, pos)
            pos += 8 * (nb + 1)
        ids = _view(buf, np.dtype(np.int32 if id_bytes == 4 else np.int64), n, pos)
        pos += n * id_bytes + _pad(n * id_bytes)
        w = None
        if flags & _F_WEIGHTS:
            w = _view(buf, _F32, n, pos)
            pos += 4 * n + _pad(4 * n)
        jobs.append(RequestJob(table, shard, offs, ids, w))
    if pos != size:
        raise InputError(f"pooling request of {size} bytes, its headers imply {pos}")
    return PoolRequest("max" if op == 1 else "sum", jobs)


def request_key(data: Buffer) -> tuple[bytes, int] | None:
    """``(kind, ids)`` of a request: its head (``HEAD``, the ``JOB`` headers, the names) with every job's id
    count zeroed, and its ids over all jobs (as its headers say: modulo 2**64); ``None`` when too short for its head or not a request.

    Requests of one kind ask for the same tables, shards, bags, id widths, weights and op: they differ only in
    their ids and offsets (a server binds them to the same native jobs: :mod:`flexemr.core.poolbind`).
    O(jobs), in numpy.

    >>> a = RequestJob("t", 0, np.array([0, 1, 3]), np.array([5, 9, 2], np.int32), None)
    >>> b = RequestJob("t", 0, np.array([0, 0, 1]), np.array([7], np.int32), None)
    >>> ka, kb = (request_key(b"".join(bytes(p) for p in encode_request([j], "sum"))) for j in (a, b))
    >>> ka[0] == kb[0], ka[1], kb[1]
    (True, 3, 1)
    """
    buf = memoryview(data).cast("B")
    if buf.nbytes < _HEAD.size or bytes(buf[:4]) != _REQ_MAGIC:
        return None
    n_jobs = _HEAD.unpack_from(buf, 0)[3]
    end = _HEAD.size + n_jobs * _REQ_JOB.size
    if buf.nbytes < end:
        return None
    words = np.frombuffer(buf, np.uint64, 3 * n_jobs, _HEAD.size)  # per job: n, (B, shard), (name_len, ...)
    end += int((words[2::3] & 0xFFFF).sum())
    if buf.nbytes < end:
        return None
    key = bytearray(buf[:end])
    np.frombuffer(key, np.uint64, 3 * n_jobs, _HEAD.size)[0::3] = 0
    return bytes(key), int(words[0::3].sum())


# ----------------------------------------------------------------- responses


def response_layout(shapes: Sequence[tuple[int, int, np.dtype[Any]]]) -> tuple[bytes, list[int], int]:
    """``(head, value offsets, total bytes)`` of an ok response with jobs of ``(B, dim, dtype)``.

    The server allocates ``total`` bytes, writes ``head`` at 0 and job ``i``'s
    ``[B, dim]`` values at ``offsets[i]`` (the kernel writes them in place).
    """
    heads = [_HEAD.pack(_RESP_MAGIC, 0, 0, len(shapes), 0)]
    for nb, dim, dt in shapes:
        heads.append(_RESP_JOB.pack(nb, dim, _DTYPES.index(np.dtype(dt))))
    head = b"".join(heads)
    pos = len(head)
    offsets = []
    for nb, dim, dt in shapes:
        offsets.append(pos)
        n = nb * dim * np.dtype(dt).itemsize
        pos += n + _pad(n)
    return head, offsets, pos


#: Bytes before every frame's payload in a :class:`FramedLayout`: the channel's message header (8, rdmaio
#: writes it) and the :data:`FRAME` header.
FRAME_GAP = 8 + FRAME.size


@dataclass(frozen=True)
class FramedLayout:
    """An ok response laid out as the frames that carry it, each after room for its headers (no copy to send).

    ``frames``: ``(payload start, payload bytes)`` of each frame in the buffer
    (its :data:`FRAME` header goes in the 12 bytes before the payload, the
    channel's in the 8 before those: :data:`FRAME_GAP`); ``head``: where the
    response's head goes (the start of frame 0's payload); ``rows``: per job,
    where its row 0 goes and its ``out_blocks`` (:class:`flexemr.core.kernel.PoolJob`):
    no row straddles two frames; ``pads``: ``(start, bytes)`` of the zero
    padding after each job's values; ``size``: the buffer's bytes.  Rows are
    aligned to their dtype when the buffer is 8-byte aligned.
    """

    frames: list[tuple[int, int]]
    head: int
    rows: list[tuple[int, tuple[int, int, int]]]
    pads: list[tuple[int, int]]
    size: int

    def spans(self, buf: npt.NDArray[np.uint8], base: int, req_id: int) -> list[tuple[int, int]]:
        """Write the frame headers of request ``req_id`` into ``buf`` (the layout at ``base``); returns each
        frame's ``(offset of its channel header, message bytes)`` (:meth:`rdmaio.Channel.send_region`)."""
        count = len(self.frames)
        out = []
        for i, (start, n) in enumerate(self.frames):
            FRAME.pack_into(buf, base + start - FRAME.size, req_id, i, count)  # type: ignore[arg-type]
            out.append((base + start - FRAME_GAP, FRAME.size + n))
        return out


def _align8(n: int) -> int:
    return n + _pad(n)


def framed_layout(head_bytes: int, shapes: Sequence[tuple[int, int, np.dtype[Any]]],
                  max_payload: int) -> FramedLayout | None:
    """Where the head and the ``[B, dim]`` values of jobs of ``shapes`` go in frames of at most ``max_payload``
    bytes (:class:`FramedLayout`); ``None`` when a head or a row is larger than a frame, or a job's rows
    would not be aligned to their dtype (e.g. float64 values after float32 ones that ended mid-frame).

    O(jobs + frames): rows are placed by arithmetic, each job's in blocks of whole rows per frame.

    >>> lay = framed_layout(16, [(5, 2, np.dtype(np.float32))], 40)   # rows of 8 bytes, 5 per full frame
    >>> lay.frames, lay.rows                                          # 3 rows after the head, then 2
    ([(24, 40), (88, 16)], [(40, (5, 24, 2))])
    """
    if head_bytes > max_payload:
        return None
    frames: list[tuple[int, int]] = []
    head = FRAME_GAP + _pad(FRAME_GAP + head_bytes)  # the values after the head 8-byte aligned
    start, used = head, head_bytes
    rows: list[tuple[int, tuple[int, int, int]]] = []
    pads: list[tuple[int, int]] = []

    def close() -> None:
        nonlocal start, used
        frames.append((start, used))
        start, used = _align8(start + used + FRAME_GAP), 0

    for nb, dim, dt in shapes:
        item = np.dtype(dt).itemsize
        rb = dim * item
        if nb == 0 or rb == 0:
            rows.append((start + used, (1, 0, 0)))
        else:
            if rb > max_payload:
                return None
            fpr = max_payload // rb
            r0 = (max_payload - used) // rb
            if r0 == 0:
                close()
                r0 = fpr
            gap = _align8(fpr * rb + FRAME_GAP) - fpr * rb  # from the end of a full frame's rows to the next's
            if (start + used) % item:
                return None
            rows.append((start + used, (fpr, gap, fpr - r0)))
            if nb <= r0:
                used += nb * rb
            else:
                end = start + used + r0 * rb
                frames.append((start, used + r0 * rb))
                full, last = divmod(nb - r0, fpr)
                if last == 0:
                    full, last = full - 1, fpr
                for _ in range(full):  # O(frames)
                    frames.append((end + gap, fpr * rb))
                    end += gap + fpr * rb
                start, used = end + gap, last * rb
        pad = _pad(nb * rb)
        if pad:
            if used + pad > max_payload:
                close()
            pads.append((start + used, pad))
            used += pad
    frames.append((start, used))
    return FramedLayout(frames, head, rows, pads, start + used)


def encode_response(values: Sequence[npt.NDArray[Any]]) -> list[Buffer]:
    """The buffers of an ok response carrying one ``[B, dim]`` (float32 or float64) array per job."""
    arrs = [np.ascontiguousarray(v) for v in values]
    head, _, _ = response_layout([(a.shape[0], a.shape[1], a.dtype) for a in arrs])
    parts: list[Buffer] = [head]
    for a in arrs:
        parts += [a.data.cast("B"), _ZEROS[: _pad(a.nbytes)]]
    return parts


def encode_error(message: str) -> list[Buffer]:
    """The buffers of an error response."""
    return [_HEAD.pack(_RESP_MAGIC, 1, 0, 0, 0), message.encode()]


def decode_response(data: Buffer, shapes: Sequence[tuple[int, int]]) -> list[npt.NDArray[Any]]:
    """The ``[B, dim]`` values (views of ``data``) of a response to jobs of ``shapes``.

    :class:`TransportError` for an error response or one that does not match ``shapes``.
    """
    buf = memoryview(data).cast("B")
    if buf.nbytes < _HEAD.size:
        raise TransportError("pooling response too short")
    magic, status, _, n_jobs, _ = _HEAD.unpack_from(buf, 0)
    if magic != _RESP_MAGIC:
        raise TransportError("not a flexemr pooling response")
    if status != 0:
        raise TransportError(f"server pooling failed: {bytes(buf[_HEAD.size:]).decode(errors='replace')}")
    if n_jobs != len(shapes) or buf.nbytes < _HEAD.size + n_jobs * _RESP_JOB.size:
        raise TransportError(f"pooling response has {n_jobs} jobs, {len(shapes)} were asked for")
    got = []
    for i in range(n_jobs):
        nb, dim, code = _RESP_JOB.unpack_from(buf, _HEAD.size + i * _RESP_JOB.size)
        if (nb, dim) != tuple(shapes[i]) or code >= len(_DTYPES):
            raise TransportError(f"pooling response job {i} is [{nb}, {dim}], [{shapes[i][0]}, {shapes[i][1]}] "
                                 f"was asked for")
        got.append((nb, dim, _DTYPES[code]))
    _, offsets, total = response_layout(got)
    if buf.nbytes != total:
        raise TransportError("pooling response has the wrong size")
    return [np.frombuffer(buf, dtype=dt, count=nb * dim, offset=off).reshape(nb, dim)
            for (nb, dim, dt), off in zip(got, offsets)]


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

    A message of one frame is returned as a view of that frame (no copy).

    >>> fa = FrameAssembler()
    >>> fa.add(FRAME.pack(7, 1, 2) + b"c"), fa.add(FRAME.pack(7, 0, 2) + b"ab")
    (None, (7, b'abc'))
    """

    def __init__(self, max_payload: int | None = None) -> None:
        self._parts: dict[int, tuple[int, dict[int, memoryview]]] = {}
        #: :meth:`add_view`: frame payload size, and per request id (frame count, buffer, frames got, last size)
        self._max_payload = max_payload
        self._bufs: dict[int, tuple[int, npt.NDArray[np.uint8], set[int], int]] = {}
        self._reserved = 0

    def add(self, frame: Buffer) -> tuple[int, Buffer] | None:
        """Add one frame (the frames of a message may come in any order); returns ``(request id, message)``
        when a message is complete."""
        view = memoryview(frame).cast("B")
        if view.nbytes < FRAME.size:
            raise TransportError("pooling frame too short")
        rid, idx, count = FRAME.unpack_from(view, 0)
        if count == 1 and idx == 0:
            return rid, view[FRAME.size :]
        want, got = self._parts.setdefault(rid, (count, {}))
        if count != want or idx >= count or idx in got:
            raise TransportError(f"pooling frame {idx}/{count} of request {rid} does not fit its message")
        got[idx] = view[FRAME.size :]
        if len(got) < count:
            return None
        del self._parts[rid]
        return rid, b"".join(got[i] for i in range(count))

    def add_view(self, frame: memoryview) -> tuple[int, Buffer] | None:
        """:meth:`add` for a frame valid only during the call (e.g. a view of a channel's receive ring:
        :meth:`rdmaio.Channel.recv_with`): the payload is copied once, straight to its place in the message.

        Needs ``max_payload`` (the frame payload size of :func:`frames`: ``max_message - FRAME.size``):
        every frame of a message but its last carries exactly that many bytes.  The buffer of a message
        is reserved when its first frame comes (at most :data:`MAX_ASSEMBLY_BYTES` per message, and
        as much for all partial messages together).

        >>> fa = FrameAssembler(max_payload=2)
        >>> first = fa.add_view(memoryview(FRAME.pack(7, 1, 2) + b"c"))
        >>> first, bytes(fa.add_view(memoryview(FRAME.pack(7, 0, 2) + b"ab"))[1])
        (None, b'abc')
        """
        mp = self._max_payload
        if mp is None or mp < 1:
            raise TypeError("FrameAssembler.add_view needs max_payload")
        if frame.nbytes < FRAME.size:
            raise TransportError("pooling frame too short")
        rid, idx, count = FRAME.unpack_from(frame, 0)
        n = frame.nbytes - FRAME.size
        if count == 1 and idx == 0 and rid not in self._bufs:
            return rid, bytes(frame[FRAME.size:])
        entry = self._bufs.get(rid)
        if entry is None:
            size = count * mp
            if count < 2 or size > MAX_ASSEMBLY_BYTES or self._reserved + size > MAX_ASSEMBLY_BYTES:
                raise TransportError(f"pooling message of {count} frames of {mp} bytes is too large (or too many "
                                     f"are partly received)")
            entry = (count, np.empty(size, dtype=np.uint8), set(), 0)
            self._reserved += size
            self._bufs[rid] = entry
        want, buf, got, last = entry
        if count != want or idx >= count or idx in got or n > mp or (idx < count - 1 and n != mp):
            raise TransportError(f"pooling frame {idx}/{count} of request {rid} does not fit its message")
        buf[idx * mp: idx * mp + n] = np.frombuffer(frame, dtype=np.uint8, count=n, offset=FRAME.size)
        got.add(idx)
        if idx == count - 1:
            self._bufs[rid] = entry = (want, buf, got, n)
            last = n
        if len(got) < count:
            return None
        del self._bufs[rid]
        self._reserved -= buf.nbytes
        return rid, buf.data[: (count - 1) * mp + last]

    def pending(self) -> int:
        """Messages partly received."""
        return len(self._parts) + len(self._bufs)

