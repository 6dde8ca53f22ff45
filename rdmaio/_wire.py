"""The rdmaio wire protocol, without I/O.

Everything here turns bytes into events and events into buffers; nothing
touches a socket, so it can be tested byte by byte and fuzzed.  Two layers:

Control (handshake and requests such as "give me the key of region X")
    Every connection opens with an 8-byte preamble ``b"RDMAIO"`` + ``u16``
    protocol version, then length-prefixed msgpack maps (``u32`` length, at
    most :data:`MAX_CONTROL_FRAME` bytes).  :class:`ControlCodec` frames and
    parses them.  Each map has a ``"t"`` (type) key; see :data:`CONTROL_TYPES`.

Data (one queue pair = one stream connection after its ``attach`` handshake)
    Requests are a 48-byte header — ``u8 op, u8 flags, u16 0, u32 count,
    u64 wr_id, u64 key, u64 remote, u64 arg0, u64 arg1`` — followed, for batch
    ops, by ``count`` entries ``{u64 remote, u64 length}`` and, for writes, by
    the payload.  A WRITE or WRITE_IMM with flag :data:`PULL` carries, instead
    of its payload, ``{u64 source, u64 generation address, u64 generation}``:
    same host only, the target copies the payload from the initiator's memory
    at ``source`` (``process_vm_readv``) and fails the write (status
    INVALID_REQUEST, no immediate) unless the ``u64`` at the generation address
    holds the generation before and after the copy (see ``rio.c``).  ``arg0`` is the length (READ/WRITE), the addend (FETCH_ADD)
    or the expected value (CMP_SWAP); ``arg1`` is the swap value.  Responses
    are a 24-byte header — ``u8 op, u8 status, u16 0, u32 0, u64 wr_id,
    u64 value`` — followed, for successful reads, by ``value`` payload bytes.
    Atomics return the old value in ``value``.  All integers little-endian.

The native data path (``rdmaio/_native/rio.c``) implements the data layer for
speed; :class:`RequestDecoder` and :class:`ResponseDecoder` here are the
reference implementation that the tests hold it to.  Invariant of every
decoder: any input either yields events or raises :class:`ProtocolError` —
never another exception.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from ._errors import ProtocolError

__all__ = [
    "CONTROL_TYPES",
    "MAX_BATCH",
    "MAX_CONTROL_FRAME",
    "MAX_OP_BYTES",
    "PREAMBLE",
    "PULL",
    "PROTOCOL_VERSION",
    "ControlCodec",
    "Op",
    "Request",
    "RequestDecoder",
    "Response",
    "ResponseDecoder",
    "Status",
    "encode_request",
    "encode_response",
]

PROTOCOL_VERSION = 1
PREAMBLE = b"RDMAIO" + struct.pack("<H", PROTOCOL_VERSION)
MAX_CONTROL_FRAME = 1 << 20
MAX_BATCH = 65536
MAX_OP_BYTES = 1 << 30

REQ_HDR = struct.Struct("<BBHIQQQQQ")
RESP_HDR = struct.Struct("<BBHIQQ")
ENTRY = struct.Struct("<QQ")
#: request flag: the write's payload is pulled from the initiator's memory (same host)
PULL = 1
PULL_TRAILER = struct.Struct("<QQQ")
_LEN = struct.Struct("<I")

#: control message types and the keys each one must carry
CONTROL_TYPES: dict[str, tuple[str, ...]] = {
    # client -> server, first on a control connection; verbs adds "qps": [{qpn, psn, gid (16 bytes), lid, mtu}]
    "hello": ("v", "transport", "nqp"),
    # server -> client; verbs adds "qps" (the server's QPs, same order) and "ping": [addr, rkey]
    "welcome": ("v", "session", "nqp"),
    "attach": ("session", "qp"),  # client -> server, first on a data connection
    "attached": ("qp",),  # server -> client, then the connection carries data frames
    "get_key": ("id", "name"),  # client -> server
    "key": ("id", "key"),  # server -> client
    "error": ("code", "message"),  # either way; "id" when it answers a request
    "qp_reset": ("id", "qp", "psn"),  # verbs, client -> server: reset QP #qp after an error; client's new PSN
    "qp_reset_ok": ("id", "psn"),  # verbs, server -> client: QP back in RTS; server's new PSN
    "bye": (),  # either way, orderly close
    "challenge": ("nonce",),  # listener -> client, when the listener has a secret (see rdmaio._auth)
    "auth": ("nonce", "mac"),  # client -> listener: the answer
    "ping": (),  # client -> server on the control connection (heartbeat)
    "pong": (),  # server -> client
    # client -> server: a queue pair on which the SERVER initiates (channels); tcp may add "pull": True (the
    # client copies large writes' payloads from the server's memory itself, same host; see transports/tcp.py)
    "attach_reverse": ("session",),
    "channel_open": ("id", "name", "slots", "slot_size", "ring"),  # client -> server; ring: client's key
    "channel": ("id", "chan", "ring"),  # server -> client: channel id and the server's ring key
}


class Op(enum.IntEnum):
    READ = 1
    WRITE = 2
    FETCH_ADD = 3
    CMP_SWAP = 4
    READ_BATCH = 5
    WRITE_BATCH = 6
    NOP = 7
    WRITE_IMM = 8  # WRITE, then the target's application gets (queue pair, arg1 as 32-bit immediate)


class Status(enum.IntEnum):
    OK = 0
    INVALID_KEY = 1
    ACCESS = 2
    BOUNDS = 3
    ALIGN = 4
    INVALID_REQUEST = 5


Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Request:
    """One request on a data connection (what an initiator's work request becomes)."""

    op: Op
    wr_id: int
    key: int
    remote: int = 0
    arg0: int = 0
    arg1: int = 0
    entries: tuple[tuple[int, int], ...] = ()  # batch ops: (remote, length)
    payload: bytes = b""  # writes
    #: a pulled write (flag PULL): (source address, generation word address, generation), no payload
    pull: tuple[int, int, int] | None = None

    @property
    def payload_length(self) -> int:
        if self.pull is not None:
            return 0
        if self.op in (Op.WRITE, Op.WRITE_IMM):
            return self.arg0
        if self.op == Op.WRITE_BATCH:
            return sum(n for _, n in self.entries)
        return 0


@dataclass(frozen=True)
class Response:
    """One response: status, the echoed wr_id, a value and (reads) the payload."""

    op: Op
    status: Status
    wr_id: int
    value: int = 0
    payload: bytes = field(default=b"", repr=False)


def encode_request(req: Request) -> list[Buffer]:
    """Buffers for ``req`` (header, entries, payload) — the payload is not copied."""
    count = len(req.entries) if req.op in (Op.READ_BATCH, Op.WRITE_BATCH) else 1
    flags = 0 if req.pull is None else PULL
    out: list[Buffer] = [REQ_HDR.pack(req.op, flags, 0, count, req.wr_id, req.key, req.remote, req.arg0, req.arg1)]
    if req.entries:
        out.append(b"".join(ENTRY.pack(r, n) for r, n in req.entries))
    if req.pull is not None:
        out.append(PULL_TRAILER.pack(*req.pull))
    elif req.payload:
        out.append(req.payload)
    return out


def encode_response(resp: Response) -> list[Buffer]:
    out: list[Buffer] = [RESP_HDR.pack(resp.op, resp.status, 0, 0, resp.wr_id, resp.value)]
    if resp.payload:
        out.append(resp.payload)
    return out


class _Decoder:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    def receive_data(self, data: Buffer) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def _fail(self, message: str) -> ProtocolError:
        self._error = ProtocolError(message)
        return self._error


class RequestDecoder(_Decoder):
    """Bytes in, :class:`Request` events out (the responder's view).

    >>> d = RequestDecoder()
    >>> d.receive_data(b"".join(encode_request(Request(Op.READ, 1, 99, 0, 8))))
    >>> d.next_events()
    [Request(op=<Op.READ: 1>, wr_id=1, key=99, remote=0, arg0=8, arg1=0, entries=(), payload=b'', pull=None)]
    """

    def next_events(self) -> list[Request]:
        events: list[Request] = []
        while True:
            if self._error is not None:
                raise self._error
            if len(self._buf) < REQ_HDR.size:
                return events
            op, flags, _rsv, count, wr, key, remote, arg0, arg1 = REQ_HDR.unpack_from(self._buf)
            if op not in Op._value2member_map_:
                raise self._fail(f"unknown request opcode {op}")
            op = Op(op)
            if flags & ~PULL:
                raise self._fail(f"unknown request flags {flags:#x}")
            if flags & PULL and op not in (Op.WRITE, Op.WRITE_IMM):
                raise self._fail(f"flag PULL on a {op.name}")
            need = REQ_HDR.size
            entries: tuple[tuple[int, int], ...] = ()
            if op in (Op.READ_BATCH, Op.WRITE_BATCH):
                if not 1 <= count <= MAX_BATCH:
                    raise self._fail(f"batch count {count} outside 1..{MAX_BATCH}")
                need += count * ENTRY.size
                if len(self._buf) < need:
                    return events
                raw = [ENTRY.unpack_from(self._buf, REQ_HDR.size + i * ENTRY.size) for i in range(count)]
                if any(n > MAX_OP_BYTES for _, n in raw) or sum(n for _, n in raw) > MAX_OP_BYTES:
                    raise self._fail("batch moves more than MAX_OP_BYTES")
                entries = tuple(raw)
            else:
                if count != 1:
                    raise self._fail(f"single operation with count {count}")
                if op in (Op.READ, Op.WRITE, Op.WRITE_IMM) and arg0 > MAX_OP_BYTES:
                    raise self._fail(f"operation of {arg0} bytes exceeds MAX_OP_BYTES")
            pull = None
            if flags & PULL:
                need += PULL_TRAILER.size
                if len(self._buf) < need:
                    return events
                pull = PULL_TRAILER.unpack_from(self._buf, REQ_HDR.size)
            req = Request(op, wr, key, remote, arg0, arg1, entries, pull=pull)
            plen = req.payload_length
            if len(self._buf) < need + plen:
                return events
            if plen:
                req = Request(op, wr, key, remote, arg0, arg1, entries, bytes(self._buf[need : need + plen]))
            del self._buf[: need + plen]
            events.append(req)


class ResponseDecoder(_Decoder):
    """Bytes in, :class:`Response` events out (the initiator's view).

    It needs to know which wr_ids are outstanding and how many payload bytes a
    successful read brings: call :meth:`expect` when posting.
    """

    def __init__(self) -> None:
        super().__init__()
        self._expect: dict[int, tuple[Op, int]] = {}

    def expect(self, wr_id: int, op: Op, read_bytes: int = 0) -> None:
        self._expect[wr_id] = (op, read_bytes)

    def next_events(self) -> list[Response]:
        events: list[Response] = []
        while True:
            if self._error is not None:
                raise self._error
            if len(self._buf) < RESP_HDR.size:
                return events
            op, status, _r1, _r2, wr, value = RESP_HDR.unpack_from(self._buf)
            if wr not in self._expect or self._expect[wr][0] != op:
                raise self._fail(f"response for unknown wr_id {wr:#x} / opcode {op}")
            if status not in Status._value2member_map_:
                raise self._fail(f"unknown status {status}")
            exp_op, nbytes = self._expect[wr]
            plen = 0
            if exp_op in (Op.READ, Op.READ_BATCH) and status == Status.OK:
                if value != nbytes:
                    raise self._fail(f"read response of {value} bytes, expected {nbytes}")
                plen = value
            if len(self._buf) < RESP_HDR.size + plen:
                return events
            payload = bytes(self._buf[RESP_HDR.size : RESP_HDR.size + plen])
            del self._buf[: RESP_HDR.size + plen]
            del self._expect[wr]
            events.append(Response(exp_op, Status(status), wr, value, payload))


class ControlCodec:
    """Frames msgpack control messages; checks the preamble first.

    >>> a, b = ControlCodec(), ControlCodec()
    >>> b.receive_data(a.encode({"t": "bye"}))
    >>> b.next_events()
    [{'t': 'bye'}]
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._saw_preamble = False
        self._sent_preamble = False
        self._error: ProtocolError | None = None

    def encode(self, msg: dict[str, Any]) -> bytes:
        """Frame ``msg``; the first frame a codec encodes carries the preamble."""
        body = msgpack.packb(msg, use_bin_type=True)
        if len(body) > MAX_CONTROL_FRAME:
            raise ProtocolError(f"control message of {len(body)} bytes exceeds {MAX_CONTROL_FRAME}")
        head = b"" if self._sent_preamble else PREAMBLE
        self._sent_preamble = True
        return head + _LEN.pack(len(body)) + body

    def receive_data(self, data: Buffer) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def buffered(self) -> bytes:
        """Bytes received past the last complete frame (handed to the data layer after attach)."""
        return bytes(self._buf)

    def _fail(self, message: str) -> ProtocolError:
        self._error = ProtocolError(message)
        return self._error

    def next_event(self) -> dict[str, Any] | None:
        """The next complete message, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        if not self._saw_preamble:
            if len(self._buf) < len(PREAMBLE):
                if not PREAMBLE.startswith(bytes(self._buf[:6])[: len(self._buf)]):
                    raise self._fail("not an rdmaio peer (bad preamble)")
                return None
            if self._buf[:6] != PREAMBLE[:6]:
                raise self._fail("not an rdmaio peer (bad preamble)")
            (version,) = struct.unpack_from("<H", self._buf, 6)
            if version != PROTOCOL_VERSION:
                raise self._fail(f"peer speaks rdmaio protocol {version}, this side speaks {PROTOCOL_VERSION}")
            del self._buf[: len(PREAMBLE)]
            self._saw_preamble = True
        if len(self._buf) < _LEN.size:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > MAX_CONTROL_FRAME:
            raise self._fail(f"control frame of {n} bytes exceeds {MAX_CONTROL_FRAME}")
        if len(self._buf) < _LEN.size + n:
            return None
        body = bytes(self._buf[_LEN.size : _LEN.size + n])
        del self._buf[: _LEN.size + n]
        try:
            msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise self._fail(f"undecodable control frame: {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            raise self._fail("control frame is not a map with a type")
        need = CONTROL_TYPES.get(msg["t"])
        if need is None:
            raise self._fail(f"unknown control message type {msg['t']!r}")
        missing = [k for k in need if k not in msg]
        if missing:
            raise self._fail(f"control message {msg['t']!r} lacks {', '.join(missing)}")
        return msg

    def next_events(self) -> list[dict[str, Any]]:
        out = []
        while (msg := self.next_event()) is not None:
            out.append(msg)
        return out
