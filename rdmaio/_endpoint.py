"""Endpoints: the initiator's handle on one peer.

An endpoint owns one control connection (msgpack requests such as
:meth:`Endpoint.remote_key`) and N queue pairs, one per worker thread, each
owned by exactly one worker (``Engine(qp_per_worker=False)`` instead shares one
queue pair between all workers, for comparison).

How operations are spread over queue pairs: each call goes to the queue pair
with the fewest requests in flight (on verbs: posted work-request chunks);
ties go to the queue pair used last, so a caller that waits for each operation
keeps one warm path (same socket, same worker thread on both sides) while
concurrent callers spread over all of them.
A batch travels as one request on one queue pair (split into chunks of at most
:data:`~rdmaio._wire.MAX_BATCH` entries, each placed the same way).  A single
read or write of at least ``Engine(stripe_bytes=...)`` bytes is striped in
equal chunks over all queue pairs and completes when every chunk has.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._channel import MAX_CHANNELS, Channel, bind_channel, make_rings, unpack_imm
from . import _auth as auth
from ._errors import (
    AuthenticationError,
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
from .transports._ibv import check_remote, check_remote_batch
from .transports.base import NO_KEY
from .transports.tcp import TcpQueuePair, TcpResponder, describe_death
from ._wire import MAX_BATCH, MAX_OP_BYTES, ControlCodec, Op

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["Endpoint", "host_identity", "open_endpoint"]

_U64 = (1 << 64) - 1


async def _recv_message(loop: asyncio.AbstractEventLoop, sock: socket.socket, codec: ControlCodec) -> dict[str, Any]:
    while (msg := codec.next_event()) is None:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise EndpointBrokenError("peer closed the connection during the handshake")
        codec.receive_data(data)
    if msg["t"] == "error":
        if msg.get("code") == "auth":
            raise AuthenticationError(f"peer refused authentication: {msg.get('message')}")
        raise ProtocolError(f"peer refused: {msg.get('message')}")
    return msg


def host_identity() -> str:
    """This host and network namespace: equal on both ends means a UNIX socket reaches the peer."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return ""
    return f"{boot}/{netns}"


async def _dial(loop: asyncio.AbstractEventLoop, host: str, port: int, first: dict[str, Any],
                expect: str, bufsize: int = 0, unix: str | None = None, secret: bytes | None = None
                ) -> tuple[socket.socket, ControlCodec, dict[str, Any]]:
    """Connect, send ``first``, answer a challenge if the listener sends one (see
    :mod:`rdmaio._auth`), and return the reply of type ``expect``."""
    addr: str | tuple[Any, ...]
    if unix is not None:
        family, type_, proto, addr = socket.AF_UNIX, socket.SOCK_STREAM, 0, "\0" + unix
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if bufsize:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        await loop.sock_connect(sock, addr)
        codec = ControlCodec()
        await loop.sock_sendall(sock, codec.encode(first))
        msg = await _recv_message(loop, sock, codec)
        if msg["t"] == "challenge":
            if secret is None:
                raise AuthenticationError("the peer requires authentication: give the engine the cluster's "
                                          "secret (Engine(secret=...) or RDMAIO_SECRET)")
            ns, nc, ctx = msg["nonce"], auth.new_nonce(), auth.context(first)
            if not isinstance(ns, bytes) or len(ns) != auth.NONCE_BYTES:
                raise ProtocolError("malformed authentication challenge")
            await loop.sock_sendall(sock, codec.encode({"t": "auth", "nonce": nc,
                                                        "mac": auth.client_mac(secret, ns, nc, ctx)}))
            msg = await _recv_message(loop, sock, codec)
            if not auth.verify(auth.server_proof(secret, ns, nc, ctx), msg.get("proof")):
                raise AuthenticationError("the peer could not prove it knows the shared secret")
        elif secret is not None:
            raise AuthenticationError("the peer did not authenticate itself (does it have the shared secret?)")
        if msg["t"] != expect:
            raise ProtocolError(f"expected {expect!r} from the peer, got {msg['t']!r}")
        return sock, codec, msg
    except BaseException:
        sock.close()
        raise


async def open_endpoint(engine: Engine, host: str, port: int, timeout: float) -> Endpoint:
    """Handshake: one control connection, then one data connection per queue pair."""
    loop = asyncio.get_running_loop()
    opener = None
    if engine._verbs is not None:  # verbs: QP attributes travel in hello/welcome, no data connections
        from .transports.verbs import open_verbs_endpoint

        opener = open_verbs_endpoint(engine, host, port)
    nqp = engine._nqp
    socks: list[socket.socket] = []

    async def handshake() -> Endpoint:
        hello = {"t": "hello", "v": 1, "transport": "tcp", "nqp": nqp, "hb": engine._heartbeat}
        ctl, codec, welcome = await _dial(loop, host, port, hello, "welcome", secret=engine._secret)
        socks.append(ctl)
        session = welcome["session"]
        # same host and network namespace: data connections over the listener's UNIX socket
        unix = welcome.get("unix")
        local = (engine._same_host_fast_path and isinstance(unix, str) and bool(unix)
                 and welcome.get("host") == host_identity() != "")
        for i in range(nqp):
            s, c, _ = await _dial(loop, host, port, {"t": "attach", "session": session, "qp": i}, "attached",
                                  engine._socket_buffer, unix if local else None, engine._secret)
            if c.buffered():
                s.close()
                raise ProtocolError("peer sent data before the queue pair was attached")
            socks.append(s)
        ep = Endpoint(engine, (host, port), ctl, codec, socks[1:])
        ep._session, ep._unix = session, (unix if local else None)
        return ep

    try:
        return await asyncio.wait_for(handshake() if opener is None else opener, timeout)
    except asyncio.TimeoutError:
        for s in socks:
            s.close()
        raise TimeoutError(f"connecting to {host}:{port} took longer than {timeout} s") from None
    except RdmaioError:  # ours already say what happened (some are OSErrors too: keep them as they are)
        for s in socks:
            s.close()
        raise
    except OSError as exc:
        for s in socks:
            s.close()
        raise EndpointBrokenError(f"cannot connect to {host}:{port}: {exc}") from exc
    except BaseException:
        for s in socks:
            s.close()
        raise


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

    def __init__(self, engine: Engine, peer: tuple[str, int], ctl: socket.socket, codec: ControlCodec,
                 data_socks: list[socket.socket], qps: list[Any] | None = None) -> None:
        self._engine = engine
        loop = engine._loop
        assert loop is not None, "endpoints are built by a started engine"
        self._loop: asyncio.AbstractEventLoop = loop
        self.peer = peer
        self._ctl = ctl
        self._codec = codec
        self._qps: list[TcpQueuePair] = []
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._req_ids = itertools.count(1)
        self._closed = False
        self.broken: BaseException | None = None
        self._broken_callbacks: list[Callable[[BaseException], object]] = []
        #: verbs: remote keys are checked locally before posting (the NIC cannot tell the errors apart)
        self._verbs = engine._verbs is not None
        workers = engine._workers
        for vqp in qps or ():  # verbs queue pairs, already connected by open_verbs_endpoint
            engine._conns[vqp.conn_id] = vqp
            self._qps.append(vqp)
        try:
            for i, s in enumerate(data_socks):
                conn_id = engine._new_conn_id()
                attach = workers if not engine._qp_per_worker else [workers[i % len(workers)]]
                qp = TcpQueuePair(self._loop, s, conn_id, attach, engine._sq_depth, engine._op_timeout,
                                  self._on_broken)
                engine._conns[conn_id] = qp
                self._qps.append(qp)
        except BaseException:  # the caller closes the sockets; the queue pairs built so far go too
            for qp in self._qps:
                engine._conns.pop(qp.conn_id, None)
                qp.close()
            raise
        self._last = self._qps[0]
        # channels: tcp — the reverse queue pair on which the peer writes to us; verbs — our own
        # QPs (open_verbs_endpoint sets their on_imm to _route_imm)
        self._session: bytes | None = None
        self._unix: str | None = None
        self._reverse: TcpResponder | None = None
        self._reverse_lock = asyncio.Lock()
        self._channels: dict[int, Channel] = {}
        self._reader = self._loop.create_task(self._read_control())
        self._last_rx = self._loop.time()
        self._ctl_lock = asyncio.Lock()
        self._ping_task: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        if engine._heartbeat:
            self._pinger = self._loop.create_task(self._heartbeat(engine._heartbeat, engine._dead_peer_timeout))
        engine._endpoints.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self.broken else "open"
        return f"<Endpoint {self.peer[0]}:{self.peer[1]} qps={len(self._qps)} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def num_queue_pairs(self) -> int:
        return len(self._qps)

    # -- control ----------------------------------------------------------------
    async def _heartbeat(self, interval: float, dead_after: float) -> None:
        """Ping the peer; declare it dead after ``dead_after`` s without any message from it."""
        try:
            while self.broken is None and not self._closed:
                await asyncio.sleep(interval)
                silent = self._loop.time() - self._last_rx
                if silent > dead_after:
                    self._on_broken(EndpointBrokenError(f"no message from the peer for {silent:.1f} s "
                                                        f"(heartbeat timeout {dead_after} s)"))
                    return
                # never wait on the send here (a peer that stopped reading must not stall the
                # silence check) and never queue a second ping behind a blocked one
                if self._ping_task is None or self._ping_task.done():
                    self._ping_task = self._loop.create_task(self._send_ping())
        except asyncio.CancelledError:
            pass

    async def _send_ping(self) -> None:
        try:
            await self._send_control({"t": "ping"})
        except OSError as exc:
            self._on_broken(EndpointBrokenError(f"control connection failed: {exc}"))

    async def _send_control(self, msg: dict[str, Any]) -> None:
        """Send one control frame; frames never interleave (requests, pings and bye share the socket)."""
        async with self._ctl_lock:
            await self._loop.sock_sendall(self._ctl, self._codec.encode(msg))

    async def _read_control(self) -> None:
        try:
            while True:
                data = await self._loop.sock_recv(self._ctl, 65536)
                if not data:
                    raise EndpointBrokenError("peer closed the control connection")
                self._last_rx = self._loop.time()
                self._codec.receive_data(data)
                for msg in self._codec.next_events():
                    fut = self._requests.pop(msg.get("id", -1), None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except asyncio.CancelledError:
            raise
        except (OSError, ProtocolError, EndpointBrokenError) as exc:
            self._on_broken(exc if isinstance(exc, EndpointBrokenError) else EndpointBrokenError(str(exc)))

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
                except (OSError, asyncio.TimeoutError):
                    pass  # the connection closes below either way
        finally:
            self.abort()

    def abort(self) -> None:
        """Close now: operations still in flight fail with :class:`ClosedError`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._broken_callbacks.clear()
        self._reader.cancel()
        if self._pinger is not None:
            self._pinger.cancel()
        if self._ping_task is not None:
            self._ping_task.cancel()
        for ch in list(self._channels.values()):
            ch._abort()
        if self._reverse is not None:
            self._engine._conns.pop(self._reverse.conn_id, None)
            self._reverse.close()
        for qp in self._qps:
            self._engine._conns.pop(qp.conn_id, None)
            qp.close()
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(ClosedError("endpoint closed"))
        self._ctl.close()
        self._engine._endpoints.discard(self)

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one-sided operations ----------------------------------------------------
    def _qp(self) -> TcpQueuePair:
        """The least-loaded queue pair; ties keep the last one used."""
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

    def _key(self, key: RemoteKey) -> Any:
        if not isinstance(key, RemoteKey):
            raise UsageError(f"expected a RemoteKey, got {type(key).__name__}")
        if key.transport != self._engine.transport:
            raise UsageError(f"a {key.transport} key cannot be used on a {self._engine.transport} endpoint")
        return key

    async def _single(self, op: Op, what: str, mr: MemoryRegion, local_offset: int, key: RemoteKey,
                      remote_offset: int, length: int) -> None:
        self._check()
        rkey = self._key(key)
        if not isinstance(mr, MemoryRegion):
            raise UsageError(f"expected a MemoryRegion, got {type(mr).__name__}")
        mr._check_local(local_offset, length)
        if not 0 <= remote_offset <= _U64:
            raise UsageError("remote offset must be in 0..2**64-1")
        if self._verbs:
            check_remote(op, what, key, remote_offset, length)
        stripe = self._engine._stripe_bytes
        if stripe and length >= stripe and len(self._qps) > 1:
            n = len(self._qps)
            bounds = [length * i // n for i in range(n + 1)]
            await _wait_all([self._post_single(op, what, mr, local_offset + lo, rkey, remote_offset + lo, hi - lo)
                             for lo, hi in zip(bounds[:-1], bounds[1:])])
            return
        await self._post_single(op, what, mr, local_offset, rkey, remote_offset, length)

    async def _post_single(self, op: Op, what: str, mr: MemoryRegion, local_offset: int, rkey: RemoteKey,
                           remote_offset: int, length: int) -> int:
        if length > MAX_OP_BYTES:
            raise UsageError(f"one operation moves at most {MAX_OP_BYTES} bytes")
        qp = self._qp()
        if not qp._free:
            await qp.wait_slot()
        return await qp.post(op, rkey, remote_offset, length, 0, mr.addr + local_offset, mr, what)

    async def read(self, local_mr: MemoryRegion, local_offset: int, key: RemoteKey, remote_offset: int,
                   length: int) -> None:
        """RDMA READ: copy ``length`` bytes at ``remote_offset`` of ``key``'s region into ``local_mr``."""
        await self._single(Op.READ, "read", local_mr, local_offset, key, remote_offset, length)

    async def write(self, local_mr: MemoryRegion, local_offset: int, key: RemoteKey, remote_offset: int,
                    length: int) -> None:
        """RDMA WRITE: copy ``length`` bytes of ``local_mr`` to ``remote_offset`` of ``key``'s region."""
        await self._single(Op.WRITE, "write", local_mr, local_offset, key, remote_offset, length)

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
        if self._verbs:
            check_remote_batch(op, what, key, ro, ln)
        local = lo + np.uint64(mr.addr)
        chunks = [(start, min(start + MAX_BATCH, lo.size)) for start in range(0, lo.size, MAX_BATCH)]
        for start, end in chunks:  # every check before anything is posted
            if int(ln[start:end].sum()) > MAX_OP_BYTES:
                raise UsageError(f"one batch request moves at most {MAX_OP_BYTES} bytes "
                                 f"(entries {start}..{end - 1} move more)")
        futs: list[asyncio.Future[int]] = []
        try:
            for start, end in chunks:
                qp = self._qp()
                if not qp._free:
                    await qp.wait_slot()
                futs.append(qp.post_batch(op, rkey, ro[start:end], ln[start:end], local[start:end], mr, what))
        except BaseException:
            if futs:  # collect what was posted before failing (no orphaned futures)
                await asyncio.gather(*futs, return_exceptions=True)
            raise
        await _wait_all(futs)

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
        if self._verbs:
            check_remote(op, what, key, offset, 8)
        qp = self._qp()
        if not qp._free:
            await qp.wait_slot()
        return await qp.post(op, rkey, offset, a & _U64, b & _U64, 0, None, what)

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
        if self._verbs:  # [verbs channels] refused locally, as for write (the NIC would break the QP)
            check_remote(Op.WRITE_IMM, "write_with_imm", key, remote_offset, length)
        qp = self._qp()
        if not qp._free:
            await qp.wait_slot()
        await qp.post(Op.WRITE_IMM, rkey, remote_offset, length, imm, mr.addr + local_offset, mr, "write_with_imm")

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
        if not self._verbs:  # tcp QPs are one-directional: the server writes to us on a reverse one
            await self._ensure_reverse()  # (verbs: RC QPs are bidirectional, the server uses its side)
        engine = self._engine
        recv_mr = engine.register(recv_ring, access=Access.WRITE)
        send_mr = engine.register(send_ring, access=Access.NONE)
        try:
            reply = await self._request({"t": "channel_open", "name": name, "slots": slots, "slot_size": slot_size,
                                         "ring": recv_mr.remote_key().to_bytes()})
            if reply["t"] == "error":
                raise ChannelRefusedError(f"peer refused channel {name!r}: {reply.get('message')}")
            chan = reply["chan"]
            if not isinstance(chan, int) or not 0 <= chan < MAX_CHANNELS or chan in self._channels:
                raise ProtocolError(f"peer assigned a bad channel id {chan!r}")
            remote = RemoteKey.from_bytes(reply["ring"])
            try:  # the server's ring must take every slot we may write
                key_arg = self._key(remote)
                if self._verbs:
                    check_remote(Op.WRITE_IMM, "channel_open", remote, 0, slots * slot_size)
                elif remote.length < slots * slot_size or not remote.access & Access.WRITE:
                    raise UsageError("ring too small or not writable")
            except Exception as exc:
                raise ProtocolError(f"peer sent an unusable ring key for channel {name!r}: {exc}") from None
        except BaseException:
            recv_mr.close()
            send_mr.close()
            raise
        # one queue pair per channel: its messages stay in order (on verbs the server answers on
        # the same RC connection, from its side)
        qp = self._qps[chan % len(self._qps)]

        # [verbs channels] close handshake: see _channel.py "Closing on verbs"
        return bind_channel(name, chan, slots, slot_size, (recv_ring, send_ring), (recv_mr, send_mr), qp, key_arg,
                            self._channels, close_handshake=self._verbs)

    async def _ensure_reverse(self) -> None:
        async with self._reverse_lock:
            if self._reverse is not None:
                return
            engine = self._engine
            sock, codec, _ = await _dial(self._loop, self.peer[0], self.peer[1],
                                         {"t": "attach_reverse", "session": self._session}, "attached",
                                         engine._socket_buffer, self._unix, engine._secret)
            if codec.buffered():
                sock.close()
                raise ProtocolError("peer sent data before the reverse queue pair was attached")
            conn_id = engine._new_conn_id()
            responder = TcpResponder(sock, conn_id, engine._rt, engine._workers[0], self._reverse_dead)
            responder.on_imm = self._route_imm
            engine._conns[conn_id] = responder
            self._reverse = responder

    def _route_imm(self, imm: int) -> None:
        chan, credits, slot = unpack_imm(imm)
        ch = self._channels.get(chan)
        if ch is not None:
            ch._on_imm(credits, slot)

    def _reverse_dead(self, responder: TcpResponder, code: int) -> None:
        self._engine._conns.pop(responder.conn_id, None)
        responder.close()
        self._on_broken(EndpointBrokenError(f"reverse queue pair: {describe_death(code)}"))

    async def ping(self) -> None:
        """A round trip through one queue pair's responder (no memory touched)."""
        self._check()
        qp = self._qp()
        if not qp._free:
            await qp.wait_slot()
        await qp.post(Op.NOP, NO_KEY, 0, secrets.randbits(32), 0, 0, None, "ping")
