"""Two-sided message channels built from one-sided writes (RDMA write-with-immediate).

Design (the message-ring scheme the FlexEMR paper describes for its
server-side pooling RPCs):

* Each side of a channel owns a *receive ring* of ``slots`` fixed-size slots in
  registered memory that only its peer writes into, and a local *staging ring*
  of the same shape it sends from.
* ``send`` copies the message into its staging slot and issues one
  ``WRITE_IMM`` into the same slot of the peer's receive ring.  The 32-bit
  immediate reaches the peer's application only after the bytes have landed,
  so a notification never precedes its data.
* Credit-based flow control: a sender holds one credit per free slot of the
  peer's ring and waits when it has none — it never drops or overwrites.  The
  receiver returns credits when the application has *consumed* messages
  (``recv``), piggybacked on its own sends or, once a quarter of the ring is
  owed, in a zero-length credit notice (not one notice per message consumed:
  each notice is a write and a wake-up on both sides).  A sender only ever
  waits when it has no credit left, that is when the receiver holds every
  slot's; the receiver then owes a quarter of the ring at the latest once it
  consumed them (or its sends carrying the rest land), so batching never
  deadlocks.  Credits can therefore never go negative, and a slow receiver
  slows its sender down instead of growing memory.
* Immediate layout: ``channel id (8 bits) | credits returned (12) | slot (12)``;
  slot ``0xFFF`` is a credit notice, ``0xFFE`` announces close.  Each slot
  starts with ``u32 length, u32 sequence``: a receiver checks that messages
  arrive in order, once each.

Transports.  The client's writes always use one fixed queue pair of its
endpoint (``chan % num_queue_pairs``), so they stay in order.  On tcp, queue
pairs are one-directional: the server's writes go through a *reverse* queue
pair the client attaches when it opens its first channel (the client's engine
is the target there).  On verbs, RC queue pairs are bidirectional: the server
posts WRITE_WITH_IMM on its end of that same RC connection (the session's QP
``chan % nqp``), and every QP keeps receive WRs posted so immediates arrive as
receive completions (see ``docs/verbs.md``).

Closing on verbs (``Channel._close_handshake``): a write into a ring its owner already
deregistered would be a remote access error, which moves *both* RC queue pairs
to the error state.  So there the side that closes first keeps its receive ring
registered until the peer answers with its own CLOSE (at most 2 s), and a side
that receives CLOSE answers only after its in-flight writes completed (it sends
nothing else afterwards, credit notices included).
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, Union

import numpy as np

from ._errors import ClosedError, EndpointBrokenError, ProtocolError, UsageError
from ._wire import Op

if TYPE_CHECKING:
    from ._keys import RemoteKey
    from ._region import MemoryRegion
    from .transports.base import QueuePair

__all__ = ["Channel", "ChannelHandler", "MAX_CHANNELS", "MAX_RING_BYTES", "MAX_SLOTS", "bind_channel", "make_rings",
           "route_imm"]

SLOT_MASK = 0xFFF
CREDIT_ONLY = 0xFFF
CLOSE = 0xFFE
MAX_SLOTS = 4094
MAX_CREDITS = 0xFFF
MAX_CHANNELS = 256
#: one ring (receive or staging) is at most this large; a server also caps all its rings together
MAX_RING_BYTES = 64 << 20
HEADER = struct.Struct("<II")  # length, sequence

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]
#: posts one WRITE_IMM: (local offset in the staging ring, remote offset, length, immediate)
PostFn = Callable[[int, int, int, int], Awaitable[Any]]
#: the same without waiting: the write's future, or ``None`` when the queue pair has no free slot now
PostNowFn = Callable[[int, int, int, int], "asyncio.Future[Any] | None"]
#: posts one WRITE_IMM from registered memory: (region, address, remote offset, length, immediate); with
#: ``wait`` false it returns ``None`` instead of waiting when the queue pair has no free slot now
PostFromFn = Callable[["MemoryRegion", int, int, int, int, bool], Any]
ChannelHandler = Callable[["Channel"], Awaitable[None]]
_T = TypeVar("_T")


def _no_cork(more: bool) -> None:
    pass


def pack_imm(chan: int, credits: int, slot: int) -> int:
    return (chan << 24) | (credits << 12) | slot


def unpack_imm(imm: int) -> tuple[int, int, int]:
    return imm >> 24, (imm >> 12) & 0xFFF, imm & SLOT_MASK


class Channel:
    """An ordered, flow-controlled message channel to one peer.

    Open one with :meth:`Endpoint.channel` (client) or receive it in the
    handler given to :meth:`Engine.serve_channel` (server)::

        async def echo(ch: rdmaio.Channel) -> None:
            async for msg in ch:
                await ch.send([msg])

        server.serve_channel("echo", echo)
        ch = await ep.channel("echo")
        await ch.send([b"hello"])
        assert await ch.recv() == b"hello"
    """

    def __init__(self, name: str, chan_id: int, slots: int, slot_size: int, recv_ring: np.ndarray,
                 send_ring: np.ndarray, post: PostFn, release: Callable[[], None],
                 post_now: PostNowFn | None = None, post_from: PostFromFn | None = None,
                 cork: Callable[[bool], None] | None = None) -> None:
        self.name = name
        self.id = chan_id
        self.slots = slots
        self.slot_size = slot_size
        self._recv_ring = recv_ring
        self._send_ring = send_ring
        self._post = post
        self._post_now = post_now
        self._post_from = post_from
        #: the queue pair's doorbell batching (QueuePair.cork): the messages of one call leave together
        self._cork = cork if cork is not None else _no_cork
        self._release = release
        self._credits = slots
        self._tx_slot = 0
        self._tx_seq = 0
        self._rx_slot = 0
        self._rx_seq = 0
        self._ready: collections.deque[int] = collections.deque()  # filled slots, in order
        self._owed = 0
        self._waiters: list[asyncio.Future[None]] = []  # woken on any state change
        self._closed = False
        self._peer_closed = False
        self._error: BaseException | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._notice_task: asyncio.Task[None] | None = None
        #: verbs: CLOSE is answered, and the first closer keeps its ring until then (set by the opener)
        self._close_handshake = False
        self._sent_close = False
        self._ack_task: asyncio.Task[None] | None = None
        #: recv_batch_with: an error of ``consume`` raised on the next call (results came first)
        self._deferred: Exception | None = None
        #: aclose began: no message is sent any more (a sender waiting for credits ends at once)
        self._closing = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "peer-closed" if self._peer_closed else "open"
        return f"<Channel {self.name!r} #{self.id} credits={self._credits}/{self.slots} {state}>"

    @property
    def max_message(self) -> int:
        """The largest message this channel carries, in bytes."""
        return self.slot_size - HEADER.size

    @property
    def credits(self) -> int:
        """Messages this side may still send before the peer consumes some."""
        return self._credits

    # -- state changes -------------------------------------------------------
    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._closed:
            self._error = exc
        self._wake()

    def _on_imm(self, credits: int, slot: int) -> None:
        """A notification from the peer (called on the event loop)."""
        if credits:
            self._credits += credits
            if self._credits > self.slots:
                self._fail(ProtocolError(f"channel {self.name!r}: peer returned more credits than it was given"))
                return
        if slot == CLOSE:
            self._peer_closed = True
            if self._close_handshake and not self._sent_close and not self._closed and self._ack_task is None:
                self._ack_task = asyncio.ensure_future(self._ack_close())
        elif slot != CREDIT_ONLY:
            if slot != self._rx_slot:
                self._fail(ProtocolError(f"channel {self.name!r}: message in slot {slot}, expected {self._rx_slot}"))
                return
            self._rx_slot = (self._rx_slot + 1) % self.slots
            self._ready.append(slot)
            if len(self._ready) > self.slots:
                self._fail(ProtocolError(f"channel {self.name!r}: peer overran its credits"))
                return
        self._wake()

    def _check_open(self) -> None:
        """Raise if this side closed, the channel failed, or the peer closed it."""
        if self._closed:
            raise ClosedError(f"channel {self.name!r} is closed")
        if self._error is not None:
            raise self._error
        if self._peer_closed:
            raise ClosedError(f"channel {self.name!r}: the peer closed it")

    def _check_send(self) -> None:
        """:meth:`_check_open`, and not closing: a sender that waits for credits when :meth:`aclose` begins
        ends with :class:`ClosedError` then (the peer returns no credits after our close), and ``aclose``
        only waits for the writes already posted."""
        self._check_open()
        if self._closing:
            raise ClosedError(f"channel {self.name!r} is closing")

    # -- sending ---------------------------------------------------------------
    async def send(self, buffers: Iterable[Buffer]) -> None:
        """Send one message made of ``buffers`` (gathered); waits while out of credits."""
        await self._write(*await self._stage(buffers))

    async def send_many(self, messages: Iterable[Iterable[Buffer]]) -> None:
        """Send several messages, in order, each made of its buffers (gathered); returns once all are written.

        The same as awaiting :meth:`send` for each message concurrently, without a task per message:
        each is copied into its slot and posted as soon as a credit allows (waiting while out of
        credits), then every write is awaited together.  Messages already posted when an error is
        raised still complete.  The writes of one call leave together when they can (doorbell batching:
        :meth:`~rdmaio.transports.base.QueuePair.cork`).
        """
        writes = _Writes(asyncio.get_running_loop())
        self._cork(True)
        try:
            for buffers in messages:
                writes.add(await self._start_send(buffers))
        finally:
            self._cork(False)
            await self._await_writes(writes)

    async def _stage(self, buffers: Iterable[Buffer]) -> tuple[int, int, int, int]:
        """Take a credit (waiting while there is none), copy one message into its slot behind the
        header, and return the arguments of the write that sends it."""
        parts = [memoryview(b).cast("B") if not isinstance(b, np.ndarray) else np.ascontiguousarray(b).data.cast("B")
                 for b in buffers]
        n = sum(p.nbytes for p in parts)
        if n > self.max_message:
            raise UsageError(f"message of {n} bytes exceeds this channel's {self.max_message}-byte slots")
        slot = await self._take_slot()
        base = slot * self.slot_size
        ring = self._send_ring
        imm = self._header(ring, base, n, slot)
        pos = base + HEADER.size
        for p in parts:
            ring[pos:pos + p.nbytes] = np.frombuffer(p, dtype=np.uint8)
            pos += p.nbytes
        return base, base, HEADER.size + n, imm

    async def _take_slot(self) -> int:
        """Take a credit (waiting while there is none: :meth:`_check_send` after each wait) and the next
        send slot."""
        self._check_send()
        while self._credits == 0:
            await self._wait()
            self._check_send()
        self._credits -= 1
        slot = self._tx_slot
        self._tx_slot = (slot + 1) % self.slots
        return slot

    def _header(self, buf: Any, at: int, n: int, slot: int) -> int:
        """Write the header of the next ``n``-byte message at ``buf[at]``; the immediate of its write to
        ``slot`` (the credits owed to the peer go back with it)."""
        HEADER.pack_into(buf, at, n, self._tx_seq)
        self._tx_seq = (self._tx_seq + 1) & 0xFFFFFFFF
        owed, self._owed = min(self._owed, MAX_CREDITS), self._owed - min(self._owed, MAX_CREDITS)
        return pack_imm(self.id, owed, slot)

    async def _start_send(self, buffers: Iterable[Buffer]) -> asyncio.Future[Any]:
        """Copy one message into its slot and post its write; the write's future (not awaited)."""
        args = await self._stage(buffers)
        fut = None
        if self._post_now is not None:
            try:
                fut = self._post_now(*args)  # no task when the queue pair has a free slot
            except (EndpointBrokenError, ClosedError) as exc:
                self._fail(exc)
                raise
        if fut is None:
            fut = asyncio.ensure_future(self._post(*args))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return fut

    async def send_region(self, region: MemoryRegion, spans: Iterable[tuple[int, int]]) -> None:
        """Send messages that already lie in registered memory, in order, without copying them.

        Each span ``(offset, length)`` of ``region`` (registered with this channel's engine) is one
        message: the ``length`` bytes from ``offset + 8`` on.  The 8 bytes at ``offset`` are
        scratch space: this channel's header goes there (overwritten).  Like :meth:`send_many`:
        each message is posted as soon as a credit allows, and this returns once all are written;
        ``region`` must stay registered and unchanged until then.
        """
        if self._post_from is None:
            raise UsageError("this channel cannot send from registered memory")
        view = region.buffer
        writes = _Writes(asyncio.get_running_loop())
        self._inflight.add(writes.fut)
        writes.fut.add_done_callback(self._inflight.discard)
        self._cork(True)
        try:
            for offset, n in spans:
                if n > self.max_message:
                    raise UsageError(f"message of {n} bytes exceeds this channel's {self.max_message}-byte slots")
                region._check_local(offset, HEADER.size + n)
                slot = await self._take_slot()
                args = (region, region.addr + offset, slot * self.slot_size, HEADER.size + n,
                        self._header(view, offset, n, slot))
                try:
                    fut = self._post_from(*args, False)  # no task when the queue pair has a free slot
                except (EndpointBrokenError, ClosedError) as exc:
                    self._fail(exc)
                    raise
                if fut is None:
                    fut = asyncio.ensure_future(self._post_from(*args, True))
                writes.add(fut)
        finally:
            self._cork(False)
            await self._await_writes(writes)

    async def _await_writes(self, writes: _Writes) -> None:
        """Wait until every write added to ``writes`` is done (shielded: a cancelled sender leaves them be),
        then raise the first failed one's error, if any: the memory they read from is free again once this
        returns."""
        writes.seal()
        await asyncio.shield(writes.fut)
        if writes.error is not None:
            if isinstance(writes.error, (EndpointBrokenError, ClosedError)):
                self._fail(writes.error)
            raise writes.error

    async def _write(self, local: int, remote: int, length: int, imm: int) -> None:
        fut = asyncio.ensure_future(self._post(local, remote, length, imm))
        self._inflight.add(fut)
        try:
            await asyncio.shield(fut)  # a cancelled sender must not abandon a half-sent message
        except (EndpointBrokenError, ClosedError) as exc:
            self._fail(exc)
            raise
        finally:
            if fut.done():
                self._inflight.discard(fut)
            else:
                fut.add_done_callback(self._inflight.discard)

    def _notice_due(self) -> bool:
        """A credit notice is due: a quarter of the ring is owed (and the peer still sends)."""
        # no credits to a peer that closed: it sends nothing more (and may be releasing its ring)
        return self._owed >= max(1, self.slots // 4) and not self._closed and self._error is None \
            and not self._peer_closed

    def _maybe_return_credits(self) -> None:
        if self._notice_due() and (self._notice_task is None or self._notice_task.done()):
            self._notice_task = asyncio.ensure_future(self._credit_notice())

    async def _credit_notice(self) -> None:
        while self._notice_due():
            owed = min(self._owed, MAX_CREDITS)
            self._owed -= owed
            try:
                await self._write(0, 0, 0, pack_imm(self.id, owed, CREDIT_ONLY))
            except (EndpointBrokenError, ClosedError, ProtocolError):
                return

    # -- receiving -------------------------------------------------------------
    async def _take_message(self) -> tuple[int, int]:
        """Wait for the next filled slot and check its header; ``(offset of the message in the receive ring,
        length)``.  The caller reads it, then owes the peer its credit."""
        while not self._ready:
            self._check_open()
            await self._wait()
        return self._take_ready()

    def _take_ready(self) -> tuple[int, int]:
        """:meth:`_take_message` for a slot already in ``_ready``."""
        slot = self._ready.popleft()
        base = slot * self.slot_size
        n, seq = HEADER.unpack_from(self._recv_ring, base)  # type: ignore[arg-type]
        if seq != self._rx_seq or n > self.max_message:
            self._fail(ProtocolError(f"channel {self.name!r}: bad message header (seq {seq}, expected "
                                     f"{self._rx_seq}; length {n})"))
            raise self._error  # type: ignore[misc]
        self._rx_seq = (self._rx_seq + 1) & 0xFFFFFFFF
        return base + HEADER.size, n

    async def recv(self) -> bytes:
        """The next message; :class:`ClosedError` once the peer closed and all were read."""
        start, n = await self._take_message()
        data = self._recv_ring[start: start + n].tobytes()
        self._owed += 1
        self._maybe_return_credits()
        return data

    async def recv_with(self, consume: Callable[[memoryview], _T]) -> _T:
        """Hand the next message to ``consume`` as a read-only view of the receive ring; returns its result.

        No copy: ``consume`` copies what it keeps, since the view is valid only during the call (the
        slot's credit goes back to the peer once ``consume`` returns or raises).  What :meth:`recv`
        raises, this raises.
        """
        start, n = await self._take_message()
        try:
            return consume(self._recv_ring.data[start: start + n].toreadonly())
        finally:
            self._owed += 1
            self._maybe_return_credits()

    async def recv_batch_with(self, consume: Callable[[memoryview], _T]) -> list[_T]:
        """:meth:`recv_with` for every message ready now (waiting for one while there is none): their results, in
        order.

        One call (and one wake-up) for a burst of messages, e.g. the frames of one request, instead of
        one each; their credits go back together.  If ``consume`` raises, the results of the messages
        before are returned and the error is raised by the next call (the message it raised on is
        consumed: its credit goes back).
        """
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc
        start, n = await self._take_message()
        out: list[_T] = []
        ring = self._recv_ring.data
        try:
            while True:
                try:
                    out.append(consume(ring[start: start + n].toreadonly()))
                finally:
                    self._owed += 1
                if not self._ready:
                    return out
                start, n = self._take_ready()
        except Exception as exc:  # noqa: BLE001 - handed to the caller, now or on its next call
            if not out:
                raise
            self._deferred = exc
            return out
        finally:
            self._maybe_return_credits()

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ClosedError:
            raise StopAsyncIteration from None

    # -- closing ---------------------------------------------------------------
    async def _ack_close(self) -> None:
        """close_handshake: answer the peer's CLOSE once our writes into its ring have landed."""
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=2.0)
        if self._sent_close or self._closed or self._error is not None:
            return
        self._sent_close = True
        try:
            await asyncio.wait_for(self._write(0, 0, 0, pack_imm(self.id, 0, CLOSE)), 2.0)
        except Exception:  # noqa: BLE001 - best effort: the peer stops waiting after 2 s
            pass

    async def aclose(self) -> None:
        """Tell the peer (its ``recv`` ends after the messages already sent) and release the rings."""
        if self._closed:
            return
        self._closing = True
        self._wake()  # senders waiting for credits end now
        try:
            sent = False
            if self._error is None and not self._peer_closed and not self._sent_close:
                self._sent_close = True
                try:
                    await asyncio.wait_for(self._write(0, 0, 0, pack_imm(self.id, 0, CLOSE)), 2.0)
                    sent = True
                except (EndpointBrokenError, ClosedError, ProtocolError, asyncio.TimeoutError):
                    pass
            if self._ack_task is not None:
                await asyncio.wait([self._ack_task], timeout=2.5)
            if self._inflight:
                await asyncio.wait(list(self._inflight), timeout=2.0)
            if sent and self._close_handshake:  # keep our ring registered until the peer's answer
                deadline = asyncio.get_running_loop().time() + 2.0
                while not self._peer_closed and self._error is None and not self._closed:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._wait(), left)
                    except asyncio.TimeoutError:
                        break
        finally:
            self._abort()

    def _abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._notice_task is not None:
            self._notice_task.cancel()
        if self._ack_task is not None:
            self._ack_task.cancel()
        self._wake()
        self._release()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Writes:
    """Writes awaited together (:meth:`Channel.send_many`, :meth:`Channel.send_region`): ``fut`` is done
    once every write added is and :meth:`seal` was called; ``error`` is the first failed write's error, if
    any.  One done-callback per write, no gathering future."""

    __slots__ = ("fut", "left", "sealed", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fut: asyncio.Future[None] = loop.create_future()
        self.left = 0
        self.sealed = False
        self.error: BaseException | None = None

    def add(self, fut: asyncio.Future[Any]) -> None:
        self.left += 1
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self.left -= 1
        if self.error is None:
            self.error = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        self._settle()

    def seal(self) -> None:
        self.sealed = True
        self._settle()

    def _settle(self) -> None:
        if self.sealed and self.left == 0 and not self.fut.done():
            self.fut.set_result(None)


def bind_channel(name: str, chan: int, slots: int, slot_size: int, rings: tuple[np.ndarray, np.ndarray],
                 mrs: tuple[MemoryRegion, MemoryRegion], qp: QueuePair, key: RemoteKey, registry: dict[int, Channel],
                 close_handshake: bool, on_release: Callable[[], None] | None = None) -> Channel:
    """A channel whose messages go out as WRITE_IMMs on ``qp`` into the peer's ring ``key``.

    ``rings``/``mrs`` are (receive, staging) arrays and their registrations; the
    channel enters ``registry`` (where incoming immediates are routed: :func:`route_imm`)
    and leaves it, releasing both registrations and calling ``on_release``, when it
    closes.  Used by both ends.
    """
    recv_mr, send_mr = mrs

    async def post(local: int, roff: int, length: int, imm: int) -> Any:
        if not qp._free:
            await qp.wait_slot()
        return await qp.post(Op.WRITE_IMM, key, roff, length, imm, send_mr.addr + local, send_mr, "channel send")

    def post_now(local: int, roff: int, length: int, imm: int) -> asyncio.Future[Any] | None:
        if not qp._free:
            return None
        return qp.post(Op.WRITE_IMM, key, roff, length, imm, send_mr.addr + local, send_mr, "channel send")

    def post_from(mr: MemoryRegion, addr: int, roff: int, length: int, imm: int, wait: bool) -> Any:
        if wait:
            return _post_from_waiting(mr, addr, roff, length, imm)
        if not qp._free:
            return None
        return qp.post(Op.WRITE_IMM, key, roff, length, imm, addr, mr, "channel send")

    async def _post_from_waiting(mr: MemoryRegion, addr: int, roff: int, length: int, imm: int) -> Any:
        if not qp._free:
            await qp.wait_slot()
        return await qp.post(Op.WRITE_IMM, key, roff, length, imm, addr, mr, "channel send")

    def release() -> None:
        registry.pop(chan, None)
        recv_mr.close()
        send_mr.close()
        if on_release is not None:
            on_release()

    ch = Channel(name, chan, slots, slot_size, rings[0], rings[1], post, release, post_now, post_from, qp.cork)
    ch._close_handshake = close_handshake
    registry[chan] = ch
    return ch


def route_imm(registry: dict[int, Channel], imm: int) -> None:
    """Hand an immediate that landed in our memory to the channel it names (if still open)."""
    chan, credits, slot = unpack_imm(imm)
    ch = registry.get(chan)
    if ch is not None:
        ch._on_imm(credits, slot)


def make_rings(slots: int, slot_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(receive ring, staging ring) for a channel, validated, and resident: every page is written here, as
    registering pins it on verbs, so that the channel's first messages do not each pay page faults."""
    if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        raise UsageError(f"slots must be an int in 1..{MAX_SLOTS}")
    if not isinstance(slot_size, int) or not HEADER.size < slot_size <= 16 << 20:
        raise UsageError(f"slot_size must be in {HEADER.size + 1}..{16 << 20} bytes")
    if slots * slot_size > MAX_RING_BYTES:
        raise UsageError(f"a ring of {slots} x {slot_size} bytes exceeds {MAX_RING_BYTES >> 20} MiB")
    rings = np.empty(slots * slot_size, dtype=np.uint8), np.empty(slots * slot_size, dtype=np.uint8)
    for ring in rings:
        ring.fill(0)
    return rings
