"""Endpoints: the initiator's handle on one peer.

An endpoint owns one control connection (requests such as
:meth:`Endpoint.remote_key`, heartbeats) and the transport's
:class:`~rdmaio.transports.base.ClientLink`: N queue pairs, one per worker of
its worker group, each owned by exactly one worker (``Engine(qp_per_worker=False)``
instead shares one queue pair between all workers, for comparison).  It never
looks at which transport it runs on.

Placement: when it is created, the endpoint is placed in the worker group of
the NIC that reaches the peer, with the group's least-loaded worker as its
*home* (:meth:`rdmaio._core.Core.place`); queue pair 0 belongs to the home
worker, queue pair ``i`` to the ``i``-th worker after it.  Which queue pair
carries an operation (:attr:`Endpoint.qp_choice`): ``"home"`` (default) —
always queue pair 0, so a peer's operations and completions stay on one worker
and load is balanced when endpoints are created; ``"least_loaded"`` — per
operation, the queue pair with the fewest operations in flight, ties keeping
the one used last; or a fixed index.  A batch travels as one request on one
queue pair (split into requests of at most :data:`~rdmaio._wire.MAX_BATCH`
entries, each placed the same way).  A single read or write of at least
``Engine(stripe_bytes=...)`` bytes is striped in equal chunks, chunk ``i`` on
queue pair ``i``, and completes when every chunk has.

Nothing an endpoint starts keeps it alive: its reader and heartbeat tasks and
its queue pairs' hooks hold it weakly, so an endpoint its owner dropped is
collected (and warns if it was not closed).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
import socket
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._channel import MAX_CHANNELS, Channel, bind_channel, make_rings, route_imm
from ._control import ClientProtocol
from ._credits import Credits
from ._errors import (
    ChannelRefusedError,
    ClosedError,
    EndpointBrokenError,
    ProtocolError,
    RdmaioError,
    RegionNotFoundError,
    TimeoutError,
    UsageError,
)
from ._keys import Access, RemoteKey
from ._region import MemoryRegion
from ._sockets import PeerDialer
from ._wire import MAX_BATCH, MAX_OP_BYTES, Op
from .transports.base import NO_KEY, ClientLink, LinkHooks, QueuePair

from ._core import creation_site, warn_unclosed

if TYPE_CHECKING:
    from ._core import Core, Placement

__all__ = ["Endpoint", "open_endpoint"]

_U64 = (1 << 64) - 1


async def open_endpoint(core: Core, host: str, port: int, timeout: float, device: str | None = None,
                        credits: Credits | None = None) -> Endpoint:
    """Connect an endpoint to the listener at ``host:port`` (the whole handshake within ``timeout``),
    on the NIC named ``device`` or else the one that reaches the peer."""
    ep = Endpoint(core, (host, port))
    ep.credits = credits
    await ep._open(timeout, device)
    return ep


def _weak(method: Callable[..., None]) -> Callable[..., None]:
    """``method``, called only while its object is alive (hooks must not keep an endpoint alive)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        m = ref()
        if m is not None:
            m(*args)

    return call


def _weak_request(ep: Endpoint) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    ref = weakref.ref(ep)

    async def request(msg: dict[str, Any]) -> dict[str, Any]:
        live = ref()
        if live is None:
            raise ClosedError("endpoint is gone")
        return await live._request(msg)

    return request


class _Resources:
    """What an endpoint holds outside itself; released by :meth:`Endpoint.abort` or its finalizer."""

    __slots__ = ("link", "ctl", "tasks", "channels", "placement")

    def __init__(self, channels: dict[int, Channel]) -> None:
        self.link: ClientLink | None = None
        self.ctl: socket.socket | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.channels = channels
        self.placement: Placement | None = None

    def release(self) -> None:
        if self.placement is not None:
            self.placement.release()
        for t in self.tasks:
            t.cancel()
        for ch in list(self.channels.values()):
            ch._abort()
        if self.link is not None:
            self.link.close()
        if self.ctl is not None:
            self.ctl.close()


async def _read_control(ref: weakref.ref[Endpoint], loop: asyncio.AbstractEventLoop, sock: socket.socket,
                        proto: ClientProtocol) -> None:
    """Replies from the peer, matched to their requests (holds the endpoint only while handling them)."""
    try:
        while True:
            data = await loop.sock_recv(sock, 65536)
            ep = ref()
            if ep is None:
                return
            if not data:
                raise EndpointBrokenError("peer closed the control connection")
            ep._last_rx = loop.time()
            proto.receive_data(data)
            while (msg := proto.next_event()) is not None:
                ep._on_reply(msg)
            del ep
    except asyncio.CancelledError:
        raise
    except (OSError, ProtocolError, EndpointBrokenError) as exc:
        ep = ref()
        if ep is not None:
            ep._on_broken(exc if isinstance(exc, EndpointBrokenError) else EndpointBrokenError(str(exc)))


async def _heartbeat(ref: weakref.ref[Endpoint], loop: asyncio.AbstractEventLoop, interval: float,
                     dead_after: float) -> None:
    """Ping the peer; declare it dead after ``dead_after`` s without any message from it.

    Silence is counted in time this event loop was responsive: while our own loop
    is stalled (a long callback, thousands of completions at once, an emulated
    CPU) the peer's answers cannot be read either, so the time this task wakes
    up late is not held against the peer.
    """
    seen = -1.0
    stalled = 0.0  # how late this task woke up since the peer was last heard from
    try:
        while True:
            slept = loop.time()
            await asyncio.sleep(interval)
            now = loop.time()
            ep = ref()
            if ep is None or ep.broken is not None or ep._closed:
                return
            if ep._last_rx != seen:
                seen, stalled = ep._last_rx, 0.0
            stalled += max(0.0, now - slept - interval)
            silent = now - ep._last_rx
            if silent - stalled > dead_after:
                ep._on_broken(EndpointBrokenError(
                    f"no message from the peer for {silent:.1f} s (heartbeat timeout {dead_after} s"
                    + (f"; this event loop was stalled {stalled:.1f} s of it)" if stalled >= 0.1 else ")")))
                return
            # never wait on the send here (a peer that stopped reading must not stall the
            # silence check) and never queue a second ping behind a blocked one
            if ep._ping_task is None or ep._ping_task.done():
                ep._ping_task = loop.create_task(ep._send_ping())
            del ep
    except asyncio.CancelledError:
        pass


async def _wait_all(aws: Sequence[Awaitable[Any]]) -> None:
    """Wait for every part of a split operation (none is abandoned in flight), then raise the first failure."""
    if len(aws) == 1:
        await aws[0]
        return
    for r in await asyncio.gather(*aws, return_exceptions=True):
        if isinstance(r, BaseException):
            raise r


def _as_u64(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise UsageError(f"{name} must be a 1-D integer array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise UsageError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise UsageError(f"{name} has negative values")
    return np.ascontiguousarray(arr, dtype=np.uint64)


class Endpoint:
    """A connection to one peer engine, for one-sided operations on its memory.

    Obtain with :meth:`Engine.connect`; close with :meth:`aclose` (or use
    ``async with``)::

        ep = await engine.connect("127.0.0.1", port)
        key = await ep.remote_key("table0")
        await ep.read(local_mr, 0, key, 4096, 64)     # 64 bytes from remote offset 4096

    ``ep.broken`` is ``None`` while the endpoint works, else the exception that
    broke it (peer gone, silent for ``dead_peer_timeout``, protocol error);
    :meth:`add_broken_callback` tells you when that happens, also while no
    operation is in flight.
    """

    def __init__(self, core: Core, peer: tuple[str, int]) -> None:
        opts = core.check_started()
        self._core = core
        self._transport = core.transport
        self._loop: asyncio.AbstractEventLoop = opts.loop
        self.peer = peer
        self._link: ClientLink | None = None
        self._qps: list[QueuePair] = []
        self._last: QueuePair  # set by _open
        #: the queue pair every operation uses (qp_choice "home" or an index), None: least loaded
        self._fixed: QueuePair | None = None
        self._choice: str | int = core.config.qp_choice
        self._busy_poll = core.config.busy_poll_us
        self._placement: Placement | None = None
        self._dialer: PeerDialer | None = None
        self._ctl: socket.socket | None = None
        self._proto: ClientProtocol | None = None
        self._ctl_lock = asyncio.Lock()
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._req_ids = itertools.count(1)
        self._closed = False
        self.broken: BaseException | None = None
        self._broken_callbacks: list[Callable[[BaseException], object]] = []
        #: the transport refuses requests locally, before posting (verbs: the NIC cannot tell errors apart)
        self._prechecks = self._transport.prechecks
        self._tname = self._transport.name
        self._stripe = core.config.stripe_bytes
        #: channels opened on this endpoint; the link routes the peer's immediates here
        self._channels: dict[int, Channel] = {}
        self._ping_task: asyncio.Task[None] | None = None
        self._last_rx = self._loop.time()
        self._res = _Resources(self._channels)
        self._finalizer: weakref.finalize | None = None
        #: the :class:`Credits` window every one-sided operation takes from (``Engine.connect(credits=...)``)
        self.credits: Credits | None = None

    async def _open(self, timeout: float, device: str | None = None) -> None:
        """The handshake: the transport dials the peer through this endpoint's control connection."""
        core = self._core
        opts = core.check_started()
        c = core.config
        host, port = self.peer
        group = core.group_of(device, await core.source_address(host, port))
        self._placement = self._res.placement = core.place(group, f"{host}:{port}")
        opts = self._placement.options(opts)
        hello = {"t": "hello", "v": 1, "transport": self._transport.name, "nqp": opts.nqp, "hb": c.heartbeat}
        self._dialer = dialer = PeerDialer(self._loop, host, port, hello, c.secret, c.socket_buffer)
        hooks = LinkHooks(_weak(self._on_broken), functools.partial(route_imm, self._channels), _weak_request(self))
        try:
            try:
                self._link = self._res.link = await asyncio.wait_for(self._transport.dial(opts, hooks, dialer),
                                                                     timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"connecting to {host}:{port} took longer than {timeout} s") from None
            except RdmaioError:  # ours already say what happened (some are OSErrors too: keep them as they are)
                raise
            except OSError as exc:
                raise EndpointBrokenError(f"cannot connect to {host}:{port}: {exc}") from exc
            assert dialer.control is not None
            if self.broken is not None:
                raise self.broken
        except BaseException:
            self.abort()
            dialer.close()
            raise
        self._ctl, self._proto = dialer.control
        self._qps = self._link.qps
        self._last = self._qps[0]
        self.qp_choice = self._choice
        res = self._res
        res.ctl = self._ctl
        ref = weakref.ref(self)
        res.tasks.append(self._loop.create_task(_read_control(ref, self._loop, self._ctl, self._proto)))
        self._last_rx = self._loop.time()
        if c.heartbeat:
            res.tasks.append(self._loop.create_task(_heartbeat(ref, self._loop, c.heartbeat, c.dead_peer_timeout)))
        core.endpoints.add(self)
        # dropped without aclose()/abort(): its connections are closed when it is collected, with a warning
        self._finalizer = weakref.finalize(self, warn_unclosed, repr(self), creation_site(), self._loop, res.release)
        self._finalizer.atexit = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self.broken else "open"
        return f"<Endpoint {self.peer[0]}:{self.peer[1]} qps={len(self._qps)} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def num_queue_pairs(self) -> int:
        return len(self._qps)

    @property
    def device(self) -> str:
        """The NIC this endpoint lives on (verbs: the device name; tcp: ``"tcp"``)."""
        p = self._placement
        return self._transport.groups[p.group] if p is not None else self._transport.groups[0]

    @property
    def workers(self) -> tuple[int, ...]:
        """The engine worker that owns (and polls the completions of) each queue pair; the home worker first."""
        p = self._placement
        return tuple(w.index for w in p.workers[:len(self._qps)]) if p is not None else ()

    @property
    def qp_choice(self) -> str | int:
        """Which queue pair carries each operation: ``"home"`` (queue pair 0, owned by the home worker),
        ``"least_loaded"`` (per operation), or a fixed queue-pair index.  Settable.

        >>> # ep.qp_choice = 1   # from now on every operation of ep goes to its queue pair 1
        """
        return self._choice

    @qp_choice.setter
    def qp_choice(self, choice: str | int) -> None:
        if choice == "home":
            fixed: QueuePair | None = self._qps[0] if self._qps else None
        elif choice == "least_loaded":
            fixed = None
        elif isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < max(1, len(self._qps)):
            fixed = self._qps[choice] if self._qps else None
        else:
            raise UsageError(f"qp_choice must be 'home', 'least_loaded' or a queue-pair index in "
                             f"0..{len(self._qps) - 1}, not {choice!r}")
        self._choice = choice
        self._fixed = fixed

    @property
    def busy_poll_us(self) -> int:
        """This endpoint's busy-poll budget in µs (``Engine(busy_poll_us=...)``; 0: off).  Settable.

        >>> # ep.busy_poll_us = 200   # depth-1 operations on ep poll their completion from the loop
        """
        return self._busy_poll

    @busy_poll_us.setter
    def busy_poll_us(self, us: int) -> None:
        if not isinstance(us, int) or isinstance(us, bool) or not 0 <= us <= 10_000:
            raise UsageError("busy_poll_us must be an int in 0..10000")
        self._busy_poll = us

    @property
    def slot_waits(self) -> int:
        """Operations that waited for a free slot on one of this endpoint's queue pairs (all slots --
        the queue pair's send credits -- were taken by operations in flight); cumulative, read-only."""
        return sum(qp.slot_waits for qp in self._qps)

    # -- control ----------------------------------------------------------------
    async def _send_ping(self) -> None:
        try:
            await self._send_control({"t": "ping"})
        except (OSError, ProtocolError) as exc:
            self._on_broken(EndpointBrokenError(f"control connection failed: {exc}"))

    async def _send_control(self, msg: dict[str, Any]) -> None:
        """Send one control frame; frames never interleave (requests, pings and bye share the socket)."""
        assert self._ctl is not None and self._proto is not None
        async with self._ctl_lock:
            await self._loop.sock_sendall(self._ctl, self._proto.send(msg))

    def _on_reply(self, msg: dict[str, Any]) -> None:
        if msg["t"] == "bye":
            self._on_broken(EndpointBrokenError("peer closed the control connection"))
            return
        fut = self._requests.pop(msg.get("id", -1), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._check()
        rid = next(self._req_ids)
        msg["id"] = rid
        fut = self._loop.create_future()
        self._requests[rid] = fut
        try:
            await self._send_control(msg)
            return await fut
        finally:
            self._requests.pop(rid, None)

    async def remote_key(self, name: str) -> RemoteKey:
        """The key of the region the peer exposed as ``name`` (:class:`RegionNotFoundError` if none)."""
        reply = await self._request({"t": "get_key", "name": name})
        if reply["t"] == "error":
            raise RegionNotFoundError(f"peer exposes no region named {name!r}")
        try:
            return RemoteKey.from_bytes(reply["key"])
        except (UsageError, TypeError) as exc:
            raise ProtocolError(f"peer sent a malformed key: {exc}") from None

    # -- lifecycle -------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise ClosedError("endpoint is closed")
        if self.broken is not None:
            raise EndpointBrokenError(f"endpoint is broken: {self.broken}") from self.broken

    def add_broken_callback(self, fn: Callable[[BaseException], object]) -> None:
        """Call ``fn(exc)`` (soon, on the event loop) once the endpoint breaks.

        At once (on the next loop iteration) if it is already broken; never
        if it is closed first by :meth:`aclose` or :meth:`abort`.  Servers
        that die while no operation is in flight are noticed through the
        control connection (EOF at once, silence after ``dead_peer_timeout``).

        >>> # ep.add_broken_callback(lambda exc: print("lost", ep.peer, exc))
        """
        if self.broken is not None:
            self._loop.call_soon(fn, self.broken)
        elif not self._closed:
            self._broken_callbacks.append(fn)

    def remove_broken_callback(self, fn: Callable[[BaseException], object]) -> None:
        """Forget ``fn`` (every registration of it); a no-op if it is not registered."""
        self._broken_callbacks = [f for f in self._broken_callbacks if f != fn]

    def _on_broken(self, exc: BaseException) -> None:
        if self.broken is not None or self._closed:
            return
        self.broken = exc
        callbacks, self._broken_callbacks = self._broken_callbacks, []
        for fn in callbacks:
            self._loop.call_soon(fn, exc)
        for qp in self._qps:
            qp._die(exc)
        for ch in list(self._channels.values()):
            ch._fail(EndpointBrokenError(f"endpoint is broken: {exc}"))
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(EndpointBrokenError(str(exc)))

    async def aclose(self, drain_timeout: float = 1.0) -> None:
        """Let in-flight operations finish (up to ``drain_timeout`` s), then close. Idempotent."""
        if self._closed:
            return
        try:
            if self.broken is None:
                deadline = self._loop.time() + drain_timeout
                while any(qp.in_flight for qp in self._qps) and self._loop.time() < deadline:
                    await asyncio.sleep(0.001)
                try:
                    await asyncio.wait_for(self._send_control({"t": "bye"}), 0.5)
                except (OSError, ProtocolError, asyncio.TimeoutError):
                    pass  # the connection closes below either way
        finally:
            self.abort()

    def abort(self) -> None:
        """Close now: operations still in flight fail with :class:`ClosedError`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        self._broken_callbacks.clear()
        if self._ping_task is not None:
            self._ping_task.cancel()
        self._res.release()
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(ClosedError("endpoint closed"))
        self._core.endpoints.discard(self)

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one-sided operations ----------------------------------------------------
    def _qp(self) -> QueuePair:
        """The queue pair for the next operation (:attr:`qp_choice`): fixed, or the least-loaded
        one with ties keeping the last one used."""
        fixed = self._fixed
        if fixed is not None:
            return fixed
        best = self._last
        load = len(best._pending)
        if load == 0:
            return best
        for qp in self._qps:
            n = len(qp._pending)
            if n < load:
                best, load = qp, n
        self._last = best
        return best

    def _key(self, key: RemoteKey) -> RemoteKey:
        if not isinstance(key, RemoteKey):
            raise UsageError(f"expected a RemoteKey, got {type(key).__name__}")
        if key.transport != self._transport.name:
            raise UsageError(f"a {key.transport} key cannot be used on a {self._transport.name} endpoint")
        return key

    def _single(self, op: Op, what: str, mr: MemoryRegion, local_offset: int, key: RemoteKey,
                remote_offset: int, length: int) -> Awaitable[Any] | None:
        """Check and post one read or write; what to await for it, or ``None`` when it is done
        already (busy-polled).  The common case -- a free slot, no striping -- posts at once and
        returns the operation's future (kept lean: it is the depth-1 latency path)."""
        if self._closed or self.broken is not None:
            self._check()
        if type(key) is not RemoteKey or key.transport != self._tname:
            self._key(key)
        if type(mr) is not MemoryRegion and not isinstance(mr, MemoryRegion):
            raise UsageError(f"expected a MemoryRegion, got {type(mr).__name__}")
        if mr._closed or local_offset < 0 or length < 0 or local_offset + length > mr.length:
            mr._check_local(local_offset, length)
        if not 0 <= remote_offset <= _U64:
            raise UsageError("remote offset must be in 0..2**64-1")
        if self._prechecks:
            self._transport.check(op, what, key, remote_offset, length)
        credits = self.credits
        if credits is not None:
            return self._credited(credits, length, op, what, mr, local_offset, key, remote_offset, length)
        stripe = self._stripe
        if (not stripe or length < stripe) and length <= MAX_OP_BYTES:  # _dispatch's common case, inline
            qp = self._fixed or self._qp()
            if qp._free:
                if self._busy_poll:
                    return qp.post_polled(op, key, remote_offset, length, 0, mr.addr + local_offset, mr, what,
                                          self._busy_poll)
                return qp.post(op, key, remote_offset, length, 0, mr.addr + local_offset, mr, what)
        return self._dispatch(op, what, mr, local_offset, key, remote_offset, length)

    async def _credited(self, credits: Credits, nbytes: int, op: Op, what: str, mr: MemoryRegion,
                        local_offset: int, key: RemoteKey, remote_offset: int, length: int) -> Any:
        """:meth:`_dispatch` inside the endpoint's credit window (taken before posting, given back at the end)."""
        await credits.acquire(nbytes)
        try:
            fut = self._dispatch(op, what, mr, local_offset, key, remote_offset, length)
            return None if fut is None else await fut
        finally:
            credits.release(nbytes)

    def _dispatch(self, op: Op, what: str, mr: MemoryRegion, local_offset: int, key: RemoteKey,
                  remote_offset: int, length: int) -> Awaitable[Any] | None:
        """Post a checked read or write: striped, or on the chosen queue pair (busy-polled if asked)."""
        stripe = self._stripe
        if stripe and length >= stripe and len(self._qps) > 1:
            n = len(self._qps)
            bounds = [length * i // n for i in range(n + 1)]
            return _wait_all([self._post_single(op, what, mr, local_offset + lo, key, remote_offset + lo, hi - lo,
                                                self._qps[i])
                              for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])
        if length > MAX_OP_BYTES:
            raise UsageError(f"one operation moves at most {MAX_OP_BYTES} bytes")
        qp = self._fixed or self._qp()
        if not qp._free:
            return self._post_single(op, what, mr, local_offset, key, remote_offset, length, qp, self._busy_poll)
        if self._busy_poll:
            return qp.post_polled(op, key, remote_offset, length, 0, mr.addr + local_offset, mr, what,
                                  self._busy_poll)
        return qp.post(op, key, remote_offset, length, 0, mr.addr + local_offset, mr, what)

    async def _post_single(self, op: Op, what: str, mr: MemoryRegion, local_offset: int, rkey: RemoteKey,
                           remote_offset: int, length: int, qp: QueuePair, spin: int = 0) -> int:
        """Post on ``qp`` once it has a free slot (a stripe, or a queue pair out of slots)."""
        if length > MAX_OP_BYTES:
            raise UsageError(f"one operation moves at most {MAX_OP_BYTES} bytes")
        if not qp._free:
            await qp.wait_slot()
        if spin:
            fut = qp.post_polled(op, rkey, remote_offset, length, 0, mr.addr + local_offset, mr, what, spin)
            return 0 if fut is None else await fut
        return await qp.post(op, rkey, remote_offset, length, 0, mr.addr + local_offset, mr, what)

    async def read(self, local_mr: MemoryRegion, local_offset: int, key: RemoteKey, remote_offset: int,
                   length: int) -> None:
        """RDMA READ: copy ``length`` bytes at ``remote_offset`` of ``key``'s region into ``local_mr``."""
        fut = self._single(Op.READ, "read", local_mr, local_offset, key, remote_offset, length)
        if fut is not None:  # None: done already (a busy-polled depth-1 read)
            await fut

    async def write(self, local_mr: MemoryRegion, local_offset: int, key: RemoteKey, remote_offset: int,
                    length: int) -> None:
        """RDMA WRITE: copy ``length`` bytes of ``local_mr`` to ``remote_offset`` of ``key``'s region."""
        fut = self._single(Op.WRITE, "write", local_mr, local_offset, key, remote_offset, length)
        if fut is not None:
            await fut

    async def _batch(self, op: Op, what: str, mr: MemoryRegion, local_offsets: Any, key: RemoteKey,
                     remote_offsets: Any, lengths: Any) -> None:
        self._check()
        rkey = self._key(key)
        if not isinstance(mr, MemoryRegion):
            raise UsageError(f"expected a MemoryRegion, got {type(mr).__name__}")
        lo = _as_u64("local_offsets", local_offsets)
        ro = _as_u64("remote_offsets", remote_offsets)
        # a private copy: a read batch's scatter list is read by the worker until the response
        # has landed, and the caller may reuse (mutate) its array meanwhile
        ln = np.array(_as_u64("lengths", lengths), dtype=np.uint64, copy=True)
        if not lo.shape == ro.shape == ln.shape:
            raise UsageError(f"offset/length arrays differ in length: {lo.size}, {ro.size}, {ln.size}")
        if mr.closed:
            raise ClosedError("local memory region is closed")
        if lo.size == 0:
            return
        if int((lo + ln).max()) > mr.length or np.any(lo + ln < lo):
            raise UsageError(f"a local range lies outside the {mr.length}-byte region")
        if self._prechecks:
            self._transport.check_batch(op, what, key, ro, ln)
        local = lo + np.uint64(mr.addr)
        chunks = [(start, min(start + MAX_BATCH, lo.size)) for start in range(0, lo.size, MAX_BATCH)]
        for start, end in chunks:  # every check before anything is posted
            if int(ln[start:end].sum()) > MAX_OP_BYTES:
                raise UsageError(f"one batch request moves at most {MAX_OP_BYTES} bytes "
                                 f"(entries {start}..{end - 1} move more)")
        credits = self.credits
        nbytes = int(ln.sum()) if credits is not None else 0
        if credits is not None:
            await credits.acquire(nbytes)
        futs: list[asyncio.Future[int]] = []
        try:
            try:
                for start, end in chunks:
                    qp = self._qp()
                    if not qp._free:
                        await qp.wait_slot()
                    futs.append(qp.post_batch(op, rkey, ro[start:end], ln[start:end], local[start:end], mr, what))
                if len(futs) == 1 and self._busy_poll and not futs[0].done():
                    qp.busy_poll(futs[0], self._busy_poll)
            except BaseException:
                if futs:  # collect what was posted before failing (no orphaned futures)
                    await asyncio.gather(*futs, return_exceptions=True)
                raise
            await _wait_all(futs)
        finally:
            if credits is not None:
                credits.release(nbytes)

    async def read_batch(self, local_mr: MemoryRegion, local_offsets: Any, key: RemoteKey, remote_offsets: Any,
                         lengths: Any) -> None:
        """Many reads from one region in one request (integer arrays of equal length).

        >>> # await ep.read_batch(mr, np.arange(256) * 64, key, rows * 64, np.full(256, 64))
        """
        await self._batch(Op.READ_BATCH, "read_batch", local_mr, local_offsets, key, remote_offsets, lengths)

    async def write_batch(self, local_mr: MemoryRegion, local_offsets: Any, key: RemoteKey, remote_offsets: Any,
                          lengths: Any) -> None:
        """Many writes to one region; bounds are checked all-or-nothing per request.

        A batch travels as one request of at most 65,536 entries (larger batches are
        several requests, each checked and applied on its own).
        """
        await self._batch(Op.WRITE_BATCH, "write_batch", local_mr, local_offsets, key, remote_offsets, lengths)

    async def _atomic(self, op: Op, what: str, key: RemoteKey, offset: int, a: int, b: int) -> int:
        self._check()
        rkey = self._key(key)
        if not 0 <= offset <= _U64:
            raise UsageError("remote offset must be in 0..2**64-1")
        if not (-(1 << 63) <= a <= _U64 and -(1 << 63) <= b <= _U64):
            raise UsageError("atomic operands must fit in 64 bits")
        if self._prechecks:
            self._transport.check(op, what, key, offset, 8)
        credits = self.credits
        if credits is not None:
            await credits.acquire(8)
        try:
            qp = self._qp()
            if not qp._free:
                await qp.wait_slot()
            fut = qp.post(op, rkey, offset, a & _U64, b & _U64, 0, None, what)
            if self._busy_poll and not fut.done():
                qp.busy_poll(fut, self._busy_poll)
            return await fut
        finally:
            if credits is not None:
                credits.release(8)

    async def fetch_add(self, key: RemoteKey, offset: int, value: int) -> int:
        """Atomically add ``value`` (mod 2**64) to the 8-byte aligned word; returns the old value."""
        return await self._atomic(Op.FETCH_ADD, "fetch_add", key, offset, value, 0)

    async def compare_swap(self, key: RemoteKey, offset: int, expected: int, desired: int) -> int:
        """Atomically replace the word with ``desired`` if it equals ``expected``; returns the old value."""
        return await self._atomic(Op.CMP_SWAP, "compare_swap", key, offset, expected, desired)

    async def write_with_imm(self, local_mr: MemoryRegion, local_offset: int, key: RemoteKey, remote_offset: int,
                             length: int, imm: int) -> None:
        """RDMA WRITE with immediate: once the bytes have landed, the target's application is
        told ``imm`` (a 32-bit value) — the building block of :class:`Channel`.

        Immediates are delivered to the target's channel layer; applications use
        :meth:`channel` rather than calling this directly.
        """
        if not isinstance(imm, int) or isinstance(imm, bool) or not 0 <= imm <= 0xFFFFFFFF:
            raise UsageError("the immediate is a 32-bit unsigned value")
        self._check()
        rkey = self._key(key)
        mr = local_mr
        if not isinstance(mr, MemoryRegion):
            raise UsageError(f"expected a MemoryRegion, got {type(mr).__name__}")
        mr._check_local(local_offset, length)
        if not 0 <= remote_offset <= _U64 or length > MAX_OP_BYTES:
            raise UsageError("remote offset must be in 0..2**64-1 and one write moves at most MAX_OP_BYTES")
        if self._prechecks:  # refused locally, as for write (verbs: the NIC would break the QP)
            self._transport.check(Op.WRITE_IMM, "write_with_imm", key, remote_offset, length)
        qp = self._qp()
        if not qp._free:
            await qp.wait_slot()
        fut = qp.post(Op.WRITE_IMM, rkey, remote_offset, length, imm, mr.addr + local_offset, mr, "write_with_imm")
        if self._busy_poll and not fut.done():
            qp.busy_poll(fut, self._busy_poll)
        await fut

    # -- channels -----------------------------------------------------------------
    async def channel(self, name: str, *, slots: int = 64, slot_size: int = 64 << 10) -> Channel:
        """Open a message channel to the handler the peer serves as ``name``.

        ``slots`` messages of at most ``slot_size - 8`` bytes may be in flight;
        a sender waits for credits beyond that.  See :class:`Channel`.
        """
        self._check()
        if not isinstance(name, str) or not name:
            raise UsageError("channel names are non-empty strings")
        recv_ring, send_ring = make_rings(slots, slot_size)
        assert self._link is not None and self._dialer is not None
        await self._link.reverse(self._dialer)  # the way the peer writes to us (tcp: a reverse queue pair)
        regions = self._core.regions
        recv_mr = regions.register(recv_ring, Access.WRITE)
        send_mr = regions.register(send_ring, Access.NONE)
        try:
            reply = await self._request({"t": "channel_open", "name": name, "slots": slots, "slot_size": slot_size,
                                         "ring": self._link.key_for(recv_mr).to_bytes()})
            if reply["t"] == "error":
                raise ChannelRefusedError(f"peer refused channel {name!r}: {reply.get('message')}")
            chan = reply["chan"]
            if not isinstance(chan, int) or not 0 <= chan < MAX_CHANNELS or chan in self._channels:
                raise ProtocolError(f"peer assigned a bad channel id {chan!r}")
            remote = RemoteKey.from_bytes(reply["ring"])
            try:  # the server's ring must take every slot we may write
                self._key(remote)
                if remote.length < slots * slot_size or not remote.access & Access.WRITE:
                    raise UsageError("ring too small or not writable")
                if self._prechecks:
                    self._transport.check(Op.WRITE_IMM, "channel_open", remote, 0, slots * slot_size)
            except Exception as exc:
                raise ProtocolError(f"peer sent an unusable ring key for channel {name!r}: {exc}") from None
        except BaseException:
            recv_mr.close()
            send_mr.close()
            raise
        # one queue pair per channel: its messages stay in order (on verbs the server answers on
        # the same RC connection, from its side)
        qp = self._qps[chan % len(self._qps)]
        return bind_channel(name, chan, slots, slot_size, (recv_ring, send_ring), (recv_mr, send_mr), qp, remote,
                            self._channels, close_handshake=self._transport.close_handshake)

    async def ping(self) -> None:
        """A round trip through one queue pair's responder (no memory touched)."""
        self._check()
        qp = self._qp()
        if not qp._free:
            await qp.wait_slot()
        fut = qp.post(Op.NOP, NO_KEY, 0, secrets.randbits(32), 0, 0, None, "ping")
        if self._busy_poll and not fut.done():
            qp.busy_poll(fut, self._busy_poll)
        await fut
