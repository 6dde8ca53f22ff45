"""The engine: transport choice, registration, workers, listeners and endpoints.

An :class:`Engine` is bound to one running event loop.  It owns

* the native region table (what remote peers may touch),
* ``workers`` progress contexts (:mod:`rdmaio._progress`), each with its own
  epoll set and completion queue, driven by a thread or by the loop,
* the listeners and endpoints it created; closing the engine closes them, joins
  the threads and releases every native object: nothing outlives it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
import socket
import weakref
from typing import TYPE_CHECKING, Any, Literal

from . import _auth as auth
from ._channel import MAX_CHANNELS, Channel, ChannelHandler, bind_channel, make_rings, unpack_imm
from ._errors import (
    ClosedError,
    EndpointBrokenError,
    ProtocolError,
    TimeoutError,
    TransportUnavailableError,
    UsageError,
)
from ._keys import Access, RemoteKey
from ._native._rdmaio_native import ffi, lib
from ._progress import Batch, Worker
from ._region import MemoryRegion
from ._endpoint import host_identity
from .transports.tcp import TcpQueuePair, TcpResponder, describe_death
from ._wire import ControlCodec

if TYPE_CHECKING:
    from ._endpoint import Endpoint
    from .transports._ibv import VerbsContext
    from .transports.verbs import ServerSession

__all__ = ["Engine", "Listener", "available_transports"]

log = logging.getLogger(__name__)

TransportName = Literal["tcp", "verbs", "auto"]
ProgressMode = Literal["thread", "loop"]


def available_transports() -> dict[str, str | None]:
    """Each transport's availability: ``None`` if usable here, else the reason it is not.

    Probing verbs loads libibverbs (the optional ``_rdmaio_verbs`` extension) on first use.
    """
    from .transports._ibv import unavailable_reason

    return {"tcp": None, "verbs": unavailable_reason()}


def _resolve_transport(name: str) -> str:
    avail = available_transports()
    if name == "auto":
        return "verbs" if avail["verbs"] is None else "tcp"
    if name not in avail:
        raise UsageError(f"unknown transport {name!r}; choose 'tcp', 'verbs' or 'auto'")
    if avail[name] is not None:
        raise TransportUnavailableError(f"transport {name!r} unavailable: {avail[name]}")
    return name


class Engine:
    """An asyncio RDMA engine.

    >>> import asyncio, numpy as np, rdmaio
    >>> async def main():
    ...     async with rdmaio.Engine(transport="tcp", workers=2) as engine:
    ...         table = np.arange(1024, dtype=np.uint8)
    ...         engine.expose("t", engine.register(table, access=rdmaio.Access.READ))
    ...         listener = await engine.listen("127.0.0.1", 0)
    ...         async with await engine.connect("127.0.0.1", listener.port) as ep:
    ...             key = await ep.remote_key("t")
    ...             out = engine.register(np.zeros(16, dtype=np.uint8))
    ...             await ep.read(out, 0, key, 100, 16)
    ...             return out.buffer.tolist()[:3]
    >>> rdmaio.run(main())
    [100, 101, 102]

    Parameters
    ----------
    transport:
        ``"tcp"`` (software transport, any machine), ``"verbs"`` (RDMA NICs) or
        ``"auto"`` (verbs when an active device exists, else tcp).
    workers:
        Progress contexts; every endpoint gets one queue pair per worker.
    progress:
        ``"thread"``: each worker is a thread blocked on its epoll fd.
        ``"loop"``: no threads; workers are polled from the event loop via ``add_reader``.
    qp_per_worker:
        ``False`` gives each endpoint a single queue pair; on tcp it is polled by all
        workers under a lock, on verbs it belongs to worker 0 — the contended design the per-thread layout replaces; for benchmarks.
    sq_depth:
        Operations in flight per queue pair; more wait for a free slot (backpressure).
    op_timeout:
        If set, an operation not completed after this many seconds fails with
        :class:`~rdmaio.TimeoutError` (its memory stays pinned until the transfer ends).
    stripe_bytes:
        Single reads/writes at least this large are split over all queue pairs (0: never).
    device, port, gid_index:
        verbs only: the RDMA device (e.g. ``"mlx5_0"``; default: the first with an
        ACTIVE port), its port (default: the first ACTIVE one) and the GID table index
        (default: the first RoCE v2 IPv4-mapped entry; see ``docs/verbs.md``).
    socket_buffer:
        Kernel send/receive buffer for queue-pair sockets (tcp transport; 0 keeps the
        system's autotuning).  Large buffers mean fewer wake-ups per large transfer.
    same_host_fast_path:
        tcp transport: when both engines run on the same host and network namespace,
        queue pairs use a UNIX-domain socket instead of loopback TCP (the control
        connection stays TCP).  Cheaper per message; same protocol, same checks.
    secret:
        Shared secret (str or bytes, at least 4 bytes; default ``$RDMAIO_SECRET``).  With a
        secret, every connection is authenticated both ways by HMAC challenge-response
        before anything is served (:mod:`rdmaio._auth`); peers must share it.
    heartbeat, dead_peer_timeout:
        Endpoints ping their peer every ``heartbeat`` s on the control connection and
        fail every operation in flight when nothing has been heard for
        ``dead_peer_timeout`` s (a hung or unreachable peer); 0 disables heartbeats.
        A connection that breaks outright (process death, reset) fails its operations
        at once; silence is only judged after ``dead_peer_timeout`` because a loaded
        peer may answer late (lower it where peers have cores to spare).
    max_sessions:
        Endpoints a listener serves at once; more are refused with a protocol error.
    channel_memory:
        Bytes of ring memory all channels that peers open to this engine may use
        together (each ring is also capped at 64 MiB); beyond it ``channel()`` is
        refused with :class:`ChannelRefusedError`.
    poll_spin_us:
        tcp transport, thread progress: after a round that did work, a worker keeps
        polling (yielding the CPU to runnable threads) for up to this many µs before
        it blocks (default 50; 0 never spins).  An idle worker never spins: the
        poll only bridges the gap to the next request of a busy peer, which would
        otherwise pay for waking a sleeping CPU (on VMs, tens of µs; see
        ``docs/performance.md``).  At most ``poll_spin_us`` of CPU per round, but
        a worker that gets a request at least every ``poll_spin_us`` never
        sleeps: under such a steady stream it keeps its core busy.  Use 0 where
        CPU time matters more than depth-1 latency.
    """

    def __init__(self, transport: TransportName = "auto", workers: int = 2, progress: ProgressMode = "thread", *,
                 qp_per_worker: bool = True, sq_depth: int = 1024, max_regions: int = 4096,
                 op_timeout: float | None = None, connect_timeout: float = 10.0,
                 handshake_timeout: float = 5.0, stripe_bytes: int = 0,
                 socket_buffer: int = 4 << 20, same_host_fast_path: bool = True, poll_spin_us: int = 50,
                 secret: bytes | str | None = None, heartbeat: float = 1.0, dead_peer_timeout: float = 5.0,
                 max_sessions: int = 1024, channel_memory: int = 1 << 30,
                 device: str | None = None, port: int | None = None, gid_index: int | None = None) -> None:
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise UsageError("workers must be an int in 1..64")
        if progress not in ("thread", "loop"):
            raise UsageError(f"progress must be 'thread' or 'loop', not {progress!r}")
        if not 1 <= sq_depth <= 65536:
            raise UsageError("sq_depth must be in 1..65536")
        if not qp_per_worker and workers > 8:
            raise UsageError("a shared queue pair can be polled by at most 8 workers")
        if device is not None or port is not None or gid_index is not None:
            from .transports._ibv import check_device_args

            check_device_args(device, port, gid_index)
        self.transport = _resolve_transport(transport)
        self._verbs: VerbsContext | None = None
        if self.transport == "verbs":  # opens the device now: TransportUnavailableError if it cannot
            from .transports._ibv import VerbsContext

            self._verbs = VerbsContext(device, port, gid_index)
        self.progress = progress
        self.num_workers = workers
        self._qp_per_worker = qp_per_worker
        self._nqp = workers if qp_per_worker else 1
        self._sq_depth = sq_depth
        self._op_timeout = op_timeout
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._stripe_bytes = stripe_bytes
        self._socket_buffer = socket_buffer
        self._same_host_fast_path = same_host_fast_path
        self._secret = auth.resolve_secret(secret)
        if heartbeat < 0 or (heartbeat and dead_peer_timeout <= heartbeat):
            raise UsageError("heartbeat must be >= 0 and dead_peer_timeout larger than it")
        self._heartbeat = float(heartbeat)
        self._dead_peer_timeout = float(dead_peer_timeout)
        if max_sessions < 1:
            raise UsageError("max_sessions must be >= 1")
        self._max_sessions = max_sessions
        if channel_memory < 0:
            raise UsageError("channel_memory must be >= 0")
        self._channel_memory = channel_memory
        self._channel_bytes = 0  # rings of channels peers opened to this engine
        if not isinstance(max_regions, int) or not 1 <= max_regions <= 1 << 24:
            raise UsageError("max_regions must be an int in 1..16777216")
        if not 0 <= poll_spin_us <= 10_000:
            raise UsageError("poll_spin_us must be in 0..10000")
        self._poll_spin_us = poll_spin_us
        self._rt = lib.rio_rtable_new(max_regions)
        if self._rt == ffi.NULL:
            raise MemoryError("could not allocate the region table")
        self._max_regions = max_regions
        self._regions: weakref.WeakSet[MemoryRegion] = weakref.WeakSet()
        self._zombies: set[MemoryRegion] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._exposed: dict[str, MemoryRegion] = {}
        self._channel_handlers: dict[str, ChannelHandler] = {}
        self._workers: list[Worker] = []
        self._conns: dict[int, Any] = {}
        self._worker_failure: str | None = None
        self._conn_ids = itertools.count(1)
        self._endpoints: set[Endpoint] = set()
        self._listeners: set[Listener] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return (f"<Engine transport={self.transport} workers={self.num_workers} progress={self.progress}"
                f"{' closed' if self._closed else ''}>")

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> Engine:
        """Bind to the running loop and start the workers (``async with`` does this)."""
        self._check_open()
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        try:
            for i in range(self.num_workers):
                if self._verbs is None:
                    w = Worker(i, self, self.progress, self._loop)
                    w.c.spin_us = self._poll_spin_us
                else:
                    w = self._verbs_worker(i)
                self._workers.append(w)
                w.start()
        except BaseException:
            self.abort()
            raise
        self._started = True
        return self

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("engine is closed")

    def _check_started(self) -> asyncio.AbstractEventLoop:
        self._check_open()
        if not self._started or self._loop is None:
            raise UsageError("engine not started: use 'async with Engine(...)' or 'await engine.start()'")
        if self._worker_failure is not None:
            raise EndpointBrokenError(f"engine unusable: {self._worker_failure}")
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close listeners and endpoints (letting in-flight operations drain briefly), then abort. Idempotent."""
        if self._closed:
            return
        try:
            for lst in list(self._listeners):
                await lst.aclose()
            for ep in list(self._endpoints):
                await ep.aclose()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close everything now; pending operations fail with :class:`ClosedError`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for lst in list(self._listeners):
            lst._abort()
        for ep in list(self._endpoints):
            ep.abort()
        for w in self._workers:
            w.stop()
        for owner in list(self._conns.values()):
            owner.close()
        self._conns.clear()
        for w in self._workers:
            w.free()
        self._workers.clear()
        for mr in list(self._regions):
            if not mr.closed:
                mr._closed = True
            self._release(mr)
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        self._zombies.clear()
        self._exposed.clear()
        lib.rio_rtable_free(self._rt)
        self._rt = None
        if self._verbs is not None:
            self._verbs.close()

    # -- memory -----------------------------------------------------------------
    def register(self, buf: Any, access: Access = Access.READ | Access.WRITE) -> MemoryRegion:
        """Register a writable, C-contiguous buffer; ``access`` is what peers may do to it.

        Registering ``Access.NONE`` gives a region usable only as the local side of
        operations.  The engine keeps a reference to the buffer until the region is
        closed and every operation on it has completed.
        """
        self._check_open()
        try:
            mv = memoryview(buf)
        except TypeError:
            raise UsageError(f"cannot register {type(buf).__name__}: it does not support the buffer protocol") from None
        if mv.readonly:
            raise UsageError("cannot register a read-only buffer")
        if not mv.c_contiguous:
            raise UsageError("cannot register a non-contiguous buffer")
        if mv.nbytes == 0:
            raise UsageError("cannot register an empty buffer")
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        access = Access(access)
        cdata = ffi.from_buffer(mv, require_writable=True)
        addr = int(ffi.cast("uintptr_t", cdata))
        key = 0
        index = -1
        if self._verbs is not None:  # NIC registration (cached); key = rkey << 32 | lkey
            lkey, rkey = self._verbs.register(addr, mv.nbytes, access)
            key = (rkey << 32) | lkey
        elif access:
            while key == 0:
                key = secrets.randbits(64)
            index = lib.rio_rtable_insert(self._rt, key, addr, mv.nbytes, int(access))
            if index < 0:
                raise UsageError(f"region table full ({self._max_regions} regions): close unused regions")
        mr = MemoryRegion(self, mv, access, cdata, addr, key, index)
        self._regions.add(mr)
        return mr

    def _transport_key(self, mr: MemoryRegion) -> RemoteKey:
        if self._verbs is not None:
            return RemoteKey("verbs", mr.addr, mr._key >> 32, mr.length, mr.access, 0)
        return RemoteKey("tcp", 0, mr._key, mr.length, mr.access, mr._index)

    def _release(self, mr: MemoryRegion) -> None:
        """Drop the buffer (and, on verbs, the NIC registration) of a region nothing uses any more."""
        if self._verbs is not None and mr._view is not None:
            self._verbs.unregister(mr.addr, mr.length, mr.access)
        mr._release()

    def _verbs_worker(self, i: int) -> Worker:
        from .transports._ibv import VerbsWorker

        assert self._verbs is not None and self._loop is not None
        return VerbsWorker(i, self, self.progress, self._loop, self._verbs)

    def _remote_busy(self, mr: MemoryRegion) -> int:
        if mr._index < 0 or self._rt is None:
            return 0
        return int(lib.rio_rtable_busy(self._rt, mr._index))

    def _deregister(self, mr: MemoryRegion) -> None:
        for name in [n for n, r in self._exposed.items() if r is mr]:
            del self._exposed[name]
        if self._rt is not None and mr._index >= 0:
            lib.rio_rtable_invalidate(self._rt, mr._index)
        if mr._in_use():
            self._zombies.add(mr)  # released by _reap once nothing touches it
            self._schedule_reaper()
        else:
            self._release(mr)

    def _reap(self, mr: MemoryRegion) -> None:
        if not mr._in_use():
            self._zombies.discard(mr)
            self._release(mr)

    def _schedule_reaper(self) -> None:
        """One timer polls every closed-but-busy region (remote busy counts have no event)."""
        if self._reaper is None and self._zombies and not self._closed and self._loop is not None:
            self._reaper = self._loop.call_later(0.01, self._reap_zombies)

    def _reap_zombies(self) -> None:
        self._reaper = None
        for mr in list(self._zombies):
            self._reap(mr)
        self._schedule_reaper()

    def expose(self, name: str, mr: MemoryRegion) -> None:
        """Serve ``mr``'s key to peers that ask for ``name`` (:meth:`Endpoint.remote_key`)."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise UsageError("region names are non-empty strings")
        if mr.closed or mr._engine is not self:
            raise UsageError("expose a live region registered with this engine")
        if not mr.access:
            raise UsageError("a region registered with Access.NONE cannot be exposed")
        self._exposed[name] = mr

    def unexpose(self, name: str) -> None:
        """Stop serving the key of region ``name`` to peers (a no-op for unknown names).

        Peers that already hold the key keep access until the region is
        closed: keys are capabilities.
        """
        self._exposed.pop(name, None)

    def serve_channel(self, name: str, handler: ChannelHandler) -> None:
        """Run ``await handler(channel)`` for every channel a peer opens as ``name``.

        The channel is closed when the handler returns.  See :class:`Channel`.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise UsageError("channel names are non-empty strings")
        if not callable(handler):
            raise UsageError("the channel handler must be an async callable")
        self._channel_handlers[name] = handler

    def unserve_channel(self, name: str) -> None:
        """Refuse new channels named ``name`` from now on (a no-op for unknown names).

        Channels already open keep running until their handler returns or
        either side closes them.

        >>> # engine.serve_channel("echo", echo); ...; engine.unserve_channel("echo")
        """
        self._channel_handlers.pop(name, None)

    # -- connections ------------------------------------------------------------
    def _new_conn_id(self) -> int:
        return next(self._conn_ids) & 0xFFFFFFFF

    def _on_batch(self, batch: Batch) -> None:
        conns, wrs, statuses, values, ev_conns, ev_codes, rx_conns, rx_imms = batch
        get = self._conns.get
        for i in range(len(wrs)):
            owner = get(conns[i])
            if owner is not None:
                owner._complete(wrs[i], statuses[i], values[i])
        for c, imm in zip(rx_conns, rx_imms):  # WRITE_IMM landed in our memory
            owner = get(c)
            if owner is not None:
                owner._on_imm(imm)
        for c, code in zip(ev_conns, ev_codes):
            owner = get(c)
            if owner is not None:
                owner._on_dead(code)

    def _on_worker_failed(self, index: int, err: int) -> None:
        """A progress worker died (its poll failed with ``err``): completions it owed will never come.

        Every connection is failed with that errno (their operations raise
        :class:`EndpointBrokenError`), the listeners stop accepting, and
        ``connect``/``listen`` raise: peers see this engine go away instead of
        one that answers its control connection but never completes an
        operation.  :attr:`failure` says why; close the engine and start another.
        """
        if self._closed or self._worker_failure is not None:
            return
        self._worker_failure = f"progress worker {index} failed: {os.strerror(err)}"
        log.error("engine unusable: %s", self._worker_failure)
        for lst in list(self._listeners):
            lst._abort()
        for ep in list(self._endpoints):
            ep._on_broken(EndpointBrokenError(f"engine unusable: {self._worker_failure}"))
        for owner in list(self._conns.values()):
            owner._on_dead(err)

    @property
    def failure(self) -> str | None:
        """Why the engine became unusable (a progress worker's poll failed for good), else ``None``.

        >>> # if engine.failure: await engine.aclose()  # and start a new one
        """
        return self._worker_failure

    async def listen(self, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 128) -> Listener:
        """Accept peers on ``host:port`` (port 0 picks a free one: see ``listener.port``)."""
        loop = self._check_started()
        lst = Listener(self, loop, host, port, backlog)
        self._listeners.add(lst)
        return lst

    async def connect(self, host: str, port: int, *, timeout: float | None = None, retries: int = 0,
                      backoff: float = 0.05, max_backoff: float = 2.0) -> Endpoint:
        """Open an :class:`Endpoint` to a peer engine's listener.

        With ``retries``, a refused or failed attempt is retried after an exponential
        backoff (``backoff`` doubling up to ``max_backoff``, with jitter).  Errors that
        retrying cannot fix (authentication, protocol) are raised at once.
        """
        from ._endpoint import open_endpoint

        self._check_started()
        delay = backoff
        for attempt in range(retries + 1):
            try:
                return await open_endpoint(self, host, port,
                                           timeout if timeout is not None else self._connect_timeout)
            except (EndpointBrokenError, TimeoutError):
                if attempt == retries:
                    raise
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, max_backoff)
        raise AssertionError("unreachable")


class _Session:
    __slots__ = ("token", "nqp", "ctl", "responders", "attached", "verbs", "reverse", "channels")

    def __init__(self, token: bytes, nqp: int, ctl: socket.socket) -> None:
        self.token = token
        self.nqp = nqp
        self.ctl = ctl
        self.responders: list[TcpResponder] = []
        self.attached: set[int] = set()
        self.verbs: ServerSession | None = None  # verbs: the session's server-side QPs
        self.reverse: TcpQueuePair | None = None  # channels: we initiate writes to the client on it
        self.channels: dict[int, Channel] = {}

    def route_imm(self, imm: int) -> None:
        chan, credits, slot = unpack_imm(imm)
        ch = self.channels.get(chan)
        if ch is not None:
            ch._on_imm(credits, slot)

    def fail_channels(self, exc: BaseException, qp_index: int | None = None) -> None:
        for chan, ch in list(self.channels.items()):
            if qp_index is None or chan % self.nqp == qp_index:
                ch._fail(EndpointBrokenError(f"client connection broke: {exc}"))

    # [verbs channels] how this session writes to its client: tcp through the reverse queue
    # pair the client attached; verbs straight on the session's QP that pairs with the client
    # QP the channel's client side uses (chan % nqp), so each direction stays in order.
    def imm_qp(self, chan: int) -> Any:
        if self.verbs is not None:
            return self.verbs.qps[chan % len(self.verbs.qps)]
        return self.reverse


class Listener:
    """Accepts peers for an engine: answers handshakes, serves exposed keys, attaches queue pairs.

    Each accepted connection is handled on its own; a peer that sends garbage
    gets a protocol error and is disconnected, and the listener keeps serving.
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, host: str, port: int, backlog: int) -> None:
        self._engine = engine
        self._loop = loop
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        self._sock = socket.socket(family, type_, proto)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(addr)
            self._sock.listen(backlog)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self.host, self.port = self._sock.getsockname()[:2]
        # Same-host fast path (tcp transport): an abstract UNIX socket that peers on this
        # host and network namespace use for their data connections (see Endpoint).
        self._unix: socket.socket | None = None
        self.unix_name: str | None = None
        if engine.transport == "tcp" and engine._same_host_fast_path:
            name = f"rdmaio-{os.getpid()}-{secrets.token_hex(8)}"
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                u.bind("\0" + name)
                u.listen(backlog)
                u.setblocking(False)
                self._unix, self.unix_name = u, name
            except OSError as exc:  # no abstract sockets here: TCP only
                u.close()
                log.debug("no UNIX fast path: %s", exc)
        self._sessions: dict[bytes, _Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._accepters = [loop.create_task(self._accept_loop(self._sock))]
        if self._unix is not None:
            self._accepters.append(loop.create_task(self._accept_loop(self._unix)))

    def __repr__(self) -> str:
        return f"<Listener {self.host}:{self.port}{' closed' if self._closed else ''}>"

    async def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = await self._loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closed:
                    return
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = self._loop.create_task(self._serve(sock))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _recv(self, sock: socket.socket, codec: ControlCodec) -> dict[str, Any] | None:
        while (msg := codec.next_event()) is None:
            data = await self._loop.sock_recv(sock, 65536)
            if not data:
                return None
            codec.receive_data(data)
        return msg

    async def _serve(self, sock: socket.socket) -> None:
        codec = ControlCodec()
        handed_off = False
        try:
            try:
                first = await asyncio.wait_for(self._recv(sock, codec), self._engine._handshake_timeout)
            except asyncio.TimeoutError:
                return
            if first is None:
                return
            if first["t"] not in ("hello", "attach", "attach_reverse"):
                raise ProtocolError(f"unexpected first message {first['t']!r}")
            # nothing is served to an unauthenticated peer: the proof rides on the first reply
            proof = await self._authenticate(sock, codec, first)
            if proof is None:
                return
            if first["t"] == "hello":
                await self._serve_control(sock, codec, first, proof)
            elif first["t"] == "attach":
                handed_off = self._attach(sock, codec, first, proof)
            else:
                handed_off = self._attach_reverse(sock, codec, first, proof)
        except ProtocolError as exc:
            try:
                sock.send(codec.encode({"t": "error", "code": "protocol", "message": str(exc)}))
            except (OSError, ProtocolError):
                pass
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if not handed_off:
                sock.close()

    async def _authenticate(self, sock: socket.socket, codec: ControlCodec,
                            first: dict[str, Any]) -> dict[str, Any] | None:
        """Challenge the peer when we have a secret: ``{}`` (no secret), ``{"proof": ...}``
        (authenticated) or None (refused; the connection is to be closed)."""
        secret = self._engine._secret
        if secret is None:
            return {}
        ns = auth.new_nonce()
        await self._loop.sock_sendall(sock, codec.encode({"t": "challenge", "nonce": ns}))
        try:
            reply = await asyncio.wait_for(self._recv(sock, codec), self._engine._handshake_timeout)
        except asyncio.TimeoutError:
            return None
        if reply is None:
            return None
        ctx = auth.context(first)
        nc = reply.get("nonce")
        if (reply["t"] != "auth" or not isinstance(nc, bytes) or len(nc) != auth.NONCE_BYTES
                or not auth.verify(auth.client_mac(secret, ns, nc, ctx), reply.get("mac"))):
            log.warning("authentication failed for a %s connection", first["t"])
            try:
                sock.send(codec.encode({"t": "error", "code": "auth", "message": "authentication failed"}))
            except OSError:
                pass
            return None
        return {"proof": auth.server_proof(secret, ns, nc, ctx)}

    async def _serve_control(self, sock: socket.socket, codec: ControlCodec, hello: dict[str, Any],
                             proof: dict[str, Any]) -> None:
        engine = self._engine
        if hello["v"] != 1 or hello["transport"] != engine.transport:
            raise ProtocolError(f"peer wants protocol {hello['v']!r} on {hello['transport']!r}; "
                                f"this listener speaks 1 on {engine.transport!r}")
        nqp = hello["nqp"]
        if not isinstance(nqp, int) or not 1 <= nqp <= 64:
            raise ProtocolError("nqp must be an int in 1..64")
        if len(self._sessions) >= engine._max_sessions:
            raise ProtocolError(f"listener busy: {engine._max_sessions} sessions already")
        hb = hello.get("hb", 0)
        # a client that announced heartbeats and then stays silent this long is gone
        silence = 10.0 * hb if isinstance(hb, (int, float)) and 0 < hb <= 60 else None
        token = secrets.token_bytes(16)
        session = _Session(token, nqp, sock)
        self._sessions[token] = session
        try:
            welcome = {"t": "welcome", "v": 1, "session": token, "nqp": nqp, **proof}
            if self.unix_name is not None:
                welcome.update(unix=self.unix_name, host=host_identity())
            if engine._verbs is not None:  # create + connect this session's QPs, answer with their attributes
                from .transports._ibv import parse_qp_attrs
                from .transports.verbs import ServerSession

                session.verbs = ServerSession(engine._verbs, parse_qp_attrs(hello.get("qps"), nqp), engine)
                for i, vqp in enumerate(session.verbs.qps):  # [verbs channels] client -> server writes
                    vqp.on_imm = session.route_imm
                    vqp._on_broken = functools.partial(session.fail_channels, qp_index=i)
                welcome.update(session.verbs.welcome_fields())
            await self._loop.sock_sendall(sock, codec.encode(welcome))
            while True:
                try:
                    msg = await asyncio.wait_for(self._recv(sock, codec), silence)
                except asyncio.TimeoutError:
                    log.info("session closed: no heartbeat from the client for %.1f s", silence)
                    return
                if msg is None or msg["t"] == "bye":
                    return
                if msg["t"] == "ping":
                    await self._loop.sock_sendall(sock, codec.encode({"t": "pong"}))
                elif msg["t"] == "get_key":
                    mr = engine._exposed.get(msg["name"]) if isinstance(msg["name"], str) else None
                    if mr is None or mr.closed:
                        reply = {"t": "error", "id": msg["id"], "code": "not_found", "message": "no such region"}
                    else:
                        reply = {"t": "key", "id": msg["id"], "key": mr.remote_key().to_bytes()}
                    await self._loop.sock_sendall(sock, codec.encode(reply))
                elif msg["t"] == "channel_open":
                    reply = self._open_channel(session, msg)
                    await self._loop.sock_sendall(sock, codec.encode(reply))
                elif msg["t"] == "qp_reset" and session.verbs is not None:
                    await self._loop.sock_sendall(sock, codec.encode(session.verbs.reset(msg)))
                else:
                    raise ProtocolError(f"unexpected control message {msg['t']!r}")
        finally:
            self._end_session(session)

    def _attach(self, sock: socket.socket, codec: ControlCodec, msg: dict[str, Any], proof: dict[str, Any]) -> bool:
        token, qp = msg["session"], msg["qp"]
        session = self._sessions.get(token) if isinstance(token, bytes) else None
        if session is None:
            raise ProtocolError("attach names no live session")
        if session.verbs is not None:
            raise ProtocolError("verbs sessions have no data connections to attach")
        if not isinstance(qp, int) or not 0 <= qp < session.nqp or qp in session.attached:
            raise ProtocolError(f"bad or duplicate queue pair index {qp!r}")
        if codec.buffered():
            raise ProtocolError("data sent before the queue pair was attached")
        engine = self._engine
        if engine._socket_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, engine._socket_buffer)
        sock.send(codec.encode({"t": "attached", "qp": qp, **proof}))
        conn_id = engine._new_conn_id()
        worker = engine._workers[qp % len(engine._workers)]
        responder = TcpResponder(sock, conn_id, engine._rt, worker, self._responder_dead)
        responder.on_imm = session.route_imm
        engine._conns[conn_id] = responder
        session.attached.add(qp)
        session.responders.append(responder)
        return True

    def _attach_reverse(self, sock: socket.socket, codec: ControlCodec, msg: dict[str, Any],
                        proof: dict[str, Any]) -> bool:
        token = msg["session"]
        session = self._sessions.get(token) if isinstance(token, bytes) else None
        if session is None or session.verbs is not None:
            raise ProtocolError("attach_reverse names no live tcp session")
        if session.reverse is not None:
            raise ProtocolError("the session already has a reverse queue pair")
        if codec.buffered():
            raise ProtocolError("data sent before the reverse queue pair was attached")
        engine = self._engine
        sock.send(codec.encode({"t": "attached", "qp": -1, **proof}))
        conn_id = engine._new_conn_id()
        qp = TcpQueuePair(self._loop, sock, conn_id, [engine._workers[0]], engine._sq_depth, engine._op_timeout,
                          session.fail_channels)
        engine._conns[conn_id] = qp
        session.reverse = qp
        return True

    def _open_channel(self, session: _Session, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer a channel_open: allocate our ring, start the handler."""
        rid = msg["id"]
        handler = self._engine._channel_handlers.get(msg["name"]) if isinstance(msg["name"], str) else None
        if handler is None:
            return {"t": "error", "id": rid, "code": "no_channel", "message": f"no channel named {msg['name']!r}"}
        free = [i for i in range(MAX_CHANNELS) if i not in session.channels]
        if not free:
            return {"t": "error", "id": rid, "code": "too_many", "message": f"at most {MAX_CHANNELS} channels"}
        chan = free[0]
        qp = session.imm_qp(chan)
        if qp is None:
            return {"t": "error", "id": rid, "code": "no_reverse", "message": "attach a reverse queue pair first"}
        try:
            slots, slot_size = msg["slots"], msg["slot_size"]
            recv_ring, send_ring = make_rings(slots, slot_size)
            remote = RemoteKey.from_bytes(msg["ring"]) if isinstance(msg["ring"], bytes) else None
            if remote is None or remote.length < slots * slot_size or not remote.access & Access.WRITE \
                    or remote.transport != self._engine.transport:
                raise UsageError("the client's ring key does not cover its ring with write access")
        except (UsageError, TypeError) as exc:
            return {"t": "error", "id": rid, "code": "bad_request", "message": str(exc)}
        engine = self._engine
        need = recv_ring.nbytes + send_ring.nbytes
        if engine._channel_bytes + need > engine._channel_memory:
            return {"t": "error", "id": rid, "code": "busy",
                    "message": f"channel memory budget ({engine._channel_memory} bytes) exhausted"}
        recv_mr = engine.register(recv_ring, access=Access.WRITE)
        send_mr = engine.register(send_ring, access=Access.NONE)

        ch = bind_channel(msg["name"], chan, slots, slot_size, (recv_ring, send_ring), (recv_mr, send_mr), qp,
                          remote, session.channels,
                          close_handshake=session.verbs is not None)  # [verbs channels] see _channel.py
        engine._channel_bytes += need
        release = ch._release

        def release_budget() -> None:
            engine._channel_bytes -= need
            release()

        ch._release = release_budget

        async def run() -> None:
            try:
                await handler(ch)
            except (EndpointBrokenError, ClosedError):
                pass
            except Exception:
                log.exception("channel handler %r failed", msg["name"])
            finally:
                await ch.aclose()

        t = self._loop.create_task(run())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return {"t": "channel", "id": rid, "chan": chan, "ring": recv_mr.remote_key().to_bytes()}

    def _responder_dead(self, responder: TcpResponder, code: int) -> None:
        if code != 0:
            log.info("queue pair %d closed: %s", responder.conn_id, describe_death(code))
        self._engine._conns.pop(responder.conn_id, None)
        responder.close()

    def _end_session(self, session: _Session) -> None:
        self._sessions.pop(session.token, None)
        for ch in list(session.channels.values()):
            ch._fail(ClosedError("the client closed its endpoint"))
            ch._abort()
        if session.reverse is not None:
            self._engine._conns.pop(session.reverse.conn_id, None)
            session.reverse.close()
            session.reverse = None
        for r in session.responders:
            self._engine._conns.pop(r.conn_id, None)
            r.close()
        session.responders.clear()
        if session.verbs is not None:
            session.verbs.close()
            session.verbs = None

    async def aclose(self) -> None:
        """Stop accepting and close the sessions this listener serves. Idempotent."""
        if self._closed:
            return
        self._abort()
        tasks = [*self._accepters, *self._tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._accepters:
            t.cancel()
        for t in list(self._tasks):
            t.cancel()
        for s in list(self._sessions.values()):
            self._end_session(s)
        self._sock.close()
        if self._unix is not None:
            self._unix.close()
        self._engine._listeners.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed
