"""The software ("tcp") transport: queue pairs over TCP, a NIC-like responder in C.

A queue pair is one stream connection: TCP, or a UNIX-domain socket when both
engines share a host and network namespace.  The initiator side
(:class:`TcpQueuePair`) is driven from the event-loop thread: posting packs a
request into the connection's native output queue (headers and batch entries
are packed in C; write payloads are referenced, not copied, above 2 KiB) and
flushes it with one ``sendmsg``.  When the queue pair has other requests in
flight the flush is deferred to the end of the loop iteration, so requests
posted by many tasks in one iteration leave in one system call (doorbell
batching).  Responses are read by the owning worker, which scatters read
payloads straight into the local buffers and records completions.

The target side (:class:`TcpResponder`) needs no Python per request: the
worker's native round parses requests, checks key, bounds and access against
the region table and executes them on registered memory.

Same host, one copy.  Over a UNIX socket, the channels' reverse queue pair
(the server writes messages into the client's ring) carries writes of at
least :attr:`TcpTransport.PULL_MIN_BYTES` without their payload: the client's
worker copies the bytes from the server's memory straight into the ring
(``process_vm_readv``), after the usual key, bounds and access checks.  That
is one copy instead of two (into the socket, out of it), none of them on the
server.  The client asks for it when attaching the reverse queue pair, only
after it read the listener's probe (a random token at an address the welcome
names) from the process at the other end of its data sockets
(``SO_PEERCRED``): a host where it may not read that process's memory
(another user, a ptrace policy) keeps plain writes.  Writes that the server
gave up on (its connection closed, its memory perhaps reused) do not land:
see ``rio.c``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import EndpointBrokenError, ProtocolError, UsageError
from .._keys import Access, RemoteKey
from .._native._rdmaio_native import ffi, lib
from .._progress import Router, Worker
from .._wire import Op
from .base import (
    BrokenHook,
    ClientLink,
    ImmHook,
    LinkHooks,
    ListenSide,
    Peer,
    Pending,
    QpOptions,
    QueuePair,
    ServerLink,
    SessionHooks,
    Transport,
    TransportOptions,
)

if TYPE_CHECKING:
    from .._region import MemoryRegion

__all__ = ["TcpClientLink", "TcpQueuePair", "TcpResponder", "TcpServerLink", "TcpTransport", "can_pull",
           "describe_death", "host_identity", "peer_pid"]

log = logging.getLogger(__name__)

KIND_RESPONDER = 1
KIND_INITIATOR = 2

_PROTOCOL_ERRORS = {
    1: "unknown opcode",
    2: "bad batch count",
    3: "operation too large",
    4: "response for an unknown work request",
    5: "bad payload length",
    6: "out of memory",
    7: "misuse",
}


def describe_death(code: int) -> str:
    """Human text for a native connection event code."""
    if code == 0:
        return "peer closed the connection"
    if code > 0:
        return f"connection error: {os.strerror(code)}"
    return f"protocol error from peer: {_PROTOCOL_ERRORS.get(-code, str(code))}"


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of UNIX socket ``sock`` (0 when unknown)."""
    if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return 0
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except OSError:
        return 0
    return max(pid, 0)


def can_pull(pid: int, welcome: dict[str, Any]) -> bool:
    """Whether this process may pull from process ``pid`` (the peer of its UNIX data sockets): ``pid`` is the
    process that answered the ``welcome`` (not, say, a parent it was forked from after listening, which shares
    the probe), and this process reads the welcome's probe (``[address, token]``) there."""
    probe = welcome.get("probe")
    if pid <= 0 or welcome.get("pid") != pid or not (
            isinstance(probe, list) and len(probe) == 2 and isinstance(probe[0], int) and isinstance(probe[1], bytes)
            and 0 < len(probe[1]) <= 64 and 0 < probe[0] < 2**64):
        return False
    out = ffi.new("uint8_t[]", len(probe[1]))
    return lib.rio_pull_read(pid, probe[0], out, len(probe[1])) == 0 and bytes(out) == probe[1]


class TcpQueuePair(QueuePair):
    """Initiator side of one queue pair (one stream connection, one owning worker)."""

    __slots__ = ("_sock", "_fd", "_c", "_gen", "_flush_scheduled", "_writer", "_corked")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, conn_id: int,
                 workers: list[Worker], depth: int, op_timeout: float | None,
                 on_broken: BrokenHook, on_imm: ImmHook | None = None) -> None:
        super().__init__(loop, conn_id, depth, op_timeout, on_broken, on_imm)
        self._sock = sock
        self._fd = sock.fileno()
        self._c = lib.rio_conn_new(self._fd, conn_id, KIND_INITIATOR, ffi.NULL, depth)
        if self._c == ffi.NULL:
            raise MemoryError("could not allocate a native connection")
        self._gen = 0
        self._flush_scheduled = False
        self._writer = False
        self._corked = 0
        for w in workers:
            rc = lib.rio_conn_attach(self._c, w.c)
            if rc:  # detach from the workers attached so far and free the native connection
                lib.rio_conn_close(self._c)
                self._c = None
                raise OSError(-rc, os.strerror(-rc))

    def __repr__(self) -> str:
        return f"<TcpQueuePair conn={self.conn_id} in_flight={len(self._pending)}>"

    def pull_writes(self, min_bytes: int) -> bool:
        """Post writes of at least ``min_bytes`` pulled (the peer copies the payload from this process)."""
        return self._c is not None and lib.rio_conn_pull(self._c, 0, min_bytes) == 0

    @property
    def pulled(self) -> int:
        """Writes posted pulled so far."""
        return int(self._c.ops_pulled) if self._c is not None else 0

    # -- posting ---------------------------------------------------------------
    def _refused(self, slot: int, rc: int, what: str) -> None:
        self._free.append(slot)
        if rc == -7:  # posting on a dead connection: the death event is on its way
            raise EndpointBrokenError("endpoint is broken")
        raise ProtocolError(f"could not post {what}: {_PROTOCOL_ERRORS.get(-rc, rc)}")

    def post(self, op: Op, key: RemoteKey, remote: int, arg0: int, arg1: int, local: int,
             mr: MemoryRegion | None, what: str) -> asyncio.Future[int]:
        """Post one single-buffer operation; the caller made sure a slot is free."""
        self._check()
        slot = self._free.pop()
        self._gen = gen = (self._gen + 1) & 0xFFFFFFFF
        wr = (gen << 32) | slot
        try:
            rc = lib.rio_post_single(self._c, slot, wr, op, key.rkey, remote, arg0, arg1, local)
        except BaseException:  # e.g. OverflowError from cffi: give the slot back
            self._free.append(slot)
            raise
        if rc != 0:
            self._refused(slot, rc, what)
        fut = self._track(wr, Pending(self._loop.create_future(), mr, None, what))
        self._doorbell()
        return fut

    def post_batch(self, op: Op, key: RemoteKey, remote: np.ndarray, lengths: np.ndarray, local: np.ndarray,
                   mr: MemoryRegion, what: str) -> asyncio.Future[int]:
        """Post one batch request (``uint64`` arrays, kept alive until completion)."""
        self._check()
        slot = self._free.pop()
        self._gen = gen = (self._gen + 1) & 0xFFFFFFFF
        wr = (gen << 32) | slot
        try:
            rc = lib.rio_post_batch(
                self._c, slot, wr, op, key.rkey, len(remote),
                ffi.from_buffer("uint64_t[]", remote), ffi.from_buffer("uint64_t[]", lengths),
                ffi.from_buffer("uint64_t[]", local),
            )
        except BaseException:
            self._free.append(slot)
            raise
        if rc != 0:
            self._refused(slot, rc, what)
        fut = self._track(wr, Pending(self._loop.create_future(), mr, (remote, lengths, local), what))
        self._doorbell()
        return fut

    def _doorbell(self) -> None:
        """After a post: flush now only when alone in flight (and not corked), else at the end of this loop
        iteration (or at cork(False)), so that posts made together leave in one ``sendmsg``."""
        if len(self._pending) == 1 and not self._writer and not self._corked:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def cork(self, more: bool) -> None:
        if more:
            self._corked += 1
            return
        self._corked -= 1
        if not self._corked and self._flush_scheduled:  # the posts held meanwhile leave now, together
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed or self.broken is not None:
            return
        rc = lib.rio_flush(self._c)
        if rc == 1:
            if not self._writer:
                self._loop.add_writer(self._fd, self._on_writable)
                self._writer = True
        elif rc < 0:
            self._die(EndpointBrokenError(f"send failed: {os.strerror(-rc)}"))

    def _on_writable(self) -> None:
        rc = lib.rio_flush(self._c)
        if rc != 1:
            self._loop.remove_writer(self._fd)
            self._writer = False
        if rc < 0:
            self._die(EndpointBrokenError(f"send failed: {os.strerror(-rc)}"))

    # -- death and close -------------------------------------------------------------
    def _on_dead(self, code: int) -> None:
        self._die(EndpointBrokenError(describe_death(code)))

    def _halt(self, exc: BaseException) -> None:
        # Detach from the workers first: the connection may still be alive (the endpoint broke
        # for another reason), and a late response must not land in memory (or follow scatter
        # lists) that failing the operations below unpins and releases.
        self._detach()
        self._fail_all(exc, release=True)

    def _destroy(self) -> None:
        self._detach()
        self._sock.close()

    def _detach(self) -> None:
        if self._c is not None:
            # after rio_conn_close returns no worker is inside this connection, so
            # local memory of pending operations can no longer be written
            lib.rio_conn_close(self._c)
            self._c = None
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False


class TcpResponder:
    """Target side of one queue pair; served entirely by the native worker."""

    __slots__ = ("_sock", "conn_id", "_on_dead_cb", "on_imm", "_c")

    def __init__(self, sock: socket.socket, conn_id: int, rtable: Any, worker: Worker,
                 on_dead: Callable[[TcpResponder, int], None], on_imm: ImmHook | None = None,
                 pull_pid: int = 0) -> None:
        self._sock = sock
        self.conn_id = conn_id
        self._on_dead_cb = on_dead
        #: called with the immediate of every WRITE_IMM that lands through this queue pair
        self.on_imm = on_imm
        self._c = lib.rio_conn_new(sock.fileno(), conn_id, KIND_RESPONDER, rtable, 0)
        if self._c == ffi.NULL:
            raise MemoryError("could not allocate a native connection")
        if pull_pid:  # before the worker sees it: the peer may post pulled writes at once
            lib.rio_conn_pull(self._c, pull_pid, 0)
        rc = lib.rio_conn_attach(self._c, worker.c)
        if rc:
            lib.rio_conn_close(self._c)
            raise OSError(-rc, os.strerror(-rc))

    @property
    def pulled(self) -> int:
        """Writes whose payload this responder copied from the peer's memory."""
        return int(self._c.ops_pulled) if self._c is not None else 0

    def _complete(self, wr: int, status: int, value: int) -> None:  # responders have no completions
        pass

    def _on_imm(self, imm: int) -> None:
        if self.on_imm is not None:
            self.on_imm(imm)

    def _on_dead(self, code: int) -> None:
        self._on_dead_cb(self, code)

    def close(self) -> None:
        if self._c is not None:
            lib.rio_conn_close(self._c)
            self._c = None
            self._sock.close()


def host_identity() -> str:
    """This host and network namespace: equal on both ends means a UNIX socket reaches the peer."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return ""
    return f"{boot}/{netns}"


# -- the transport -----------------------------------------------------------------------------------

class TcpTransport(Transport):
    """Stream sockets; the region table the native responders check requests against."""

    name = "tcp"
    #: same host: writes of at least this many bytes on a reverse queue pair are pulled by the client
    #: (module docstring); 0 turns pulling off.  Below it, a plain write costs less than a pull.
    PULL_MIN_BYTES = 32 << 10

    def __init__(self, options: TransportOptions) -> None:
        self._rt = lib.rio_rtable_new(options.max_regions)
        if self._rt == ffi.NULL:
            raise MemoryError("could not allocate the region table")
        self._max_regions = options.max_regions
        self._spin_us = options.poll_spin_us
        self._same_host = options.same_host_fast_path
        #: what a same-host client reads from this process to learn that it may pull (see listen)
        self._probe = ffi.new("uint8_t[]", secrets.token_bytes(16))

    def worker(self, index: int, router: Router, mode: str, loop: asyncio.AbstractEventLoop, group: int = 0,
               cpus: frozenset[int] | None = None) -> Worker:
        w = Worker(index, router, mode, loop, cpus=cpus)
        w.c.spin_us = self._spin_us
        return w

    # -- memory: the native region table --------------------------------------------------------
    def register(self, addr: int, length: int, access: Access) -> tuple[int, int]:
        if not access:  # local use only: peers never see it
            return 0, -1
        key = 0
        while key == 0:
            key = secrets.randbits(64)
        index = lib.rio_rtable_insert(self._rt, key, addr, length, int(access))
        if index < 0:
            raise UsageError(f"region table full ({self._max_regions} regions): close unused regions")
        return key, index

    def key(self, mr: MemoryRegion) -> RemoteKey:
        return RemoteKey("tcp", 0, mr._key, mr.length, mr.access, mr._index)

    def revoke(self, mr: MemoryRegion) -> None:
        if mr._index >= 0 and self._rt is not None:
            lib.rio_rtable_invalidate(self._rt, mr._index)

    def busy(self, mr: MemoryRegion) -> int:
        if mr._index < 0 or self._rt is None:
            return 0
        return int(lib.rio_rtable_busy(self._rt, mr._index))

    # -- connections ---------------------------------------------------------------------------
    async def dial(self, opts: QpOptions, hooks: LinkHooks, peer: Peer) -> TcpClientLink:
        """Control connection, then one data connection per queue pair."""
        welcome = await peer.hello({})
        # same host and network namespace: data connections over the listener's UNIX socket
        unix = welcome.get("unix")
        local = (opts.same_host_fast_path and isinstance(unix, str) and bool(unix)
                 and welcome.get("host") == host_identity() != "")
        link = TcpClientLink(self, opts, hooks, welcome["session"], unix if local else None)
        try:
            for i in range(opts.nqp):
                sock = await peer.attach({"t": "attach", "session": link.session, "qp": i}, link.unix)
                if i == 0 and local and self.PULL_MIN_BYTES:
                    pid = peer_pid(sock)
                    link.pull_pid = pid if can_pull(pid, welcome) else 0
                link.add_qp(sock, i)
        except BaseException:
            link.close()
            raise
        return link

    def accept(self, hello: dict[str, Any], opts: QpOptions, hooks: SessionHooks) -> TcpServerLink:
        return TcpServerLink(self, opts, hooks, hello["nqp"])

    def listen(self, backlog: int) -> ListenSide:
        """The same-host fast path: an abstract UNIX socket peers on this host and netns attach through."""
        if not self._same_host:
            return ListenSide([], {})
        name = f"rdmaio-{os.getpid()}-{secrets.token_hex(8)}"
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            u.bind("\0" + name)
            u.listen(backlog)
            u.setblocking(False)
        except OSError as exc:  # no abstract sockets here: TCP only
            u.close()
            log.debug("no UNIX fast path: %s", exc)
            return ListenSide([], {})
        probe = [int(ffi.cast("uintptr_t", self._probe)), bytes(ffi.buffer(self._probe))]
        return ListenSide([u], {"unix": name, "host": host_identity(), "probe": probe})

    def close(self) -> None:
        if self._rt is not None:
            lib.rio_rtable_free(self._rt)
            self._rt = None


class TcpClientLink(ClientLink):
    """An endpoint's data connections, and the reverse queue pair its peer writes to it on."""

    def __init__(self, transport: TcpTransport, opts: QpOptions, hooks: LinkHooks, session: bytes,
                 unix: str | None) -> None:
        super().__init__()
        self._t = transport
        self._opts = opts
        self._hooks = hooks
        self.session = session
        self.unix = unix
        #: the server's pid when this client may copy from its memory (same host, probed), else 0
        self.pull_pid = 0
        self._reverse: TcpResponder | None = None
        self._reverse_lock = asyncio.Lock()
        self._closed = False

    def add_qp(self, sock: socket.socket, i: int) -> None:
        o = self._opts
        workers = list(o.workers) if o.shared else [o.workers[i % len(o.workers)]]
        try:
            qp = o.router.open(lambda cid: TcpQueuePair(o.loop, sock, cid, workers, o.depth, o.op_timeout,
                                                        self._hooks.on_broken))
        except BaseException:
            sock.close()
            raise
        self.qps.append(qp)

    async def reverse(self, peer: Peer) -> None:
        """Channels: tcp queue pairs carry requests one way, so the peer writes to us on one we attach."""
        async with self._reverse_lock:
            if self._reverse is not None or self._closed:
                return
            msg: dict[str, Any] = {"t": "attach_reverse", "session": self.session}
            if self.pull_pid:
                msg["pull"] = True
            sock = await peer.attach(msg, self.unix)
            o = self._opts
            pid = self.pull_pid  # the reverse socket reaches the same listener as the probed data sockets
            try:
                self._reverse = o.router.open(lambda cid: TcpResponder(sock, cid, self._t._rt, o.workers[0],
                                                                       self._reverse_dead, self._hooks.on_imm,
                                                                       pull_pid=pid))
            except BaseException:
                sock.close()
                raise

    def _reverse_dead(self, responder: TcpResponder, code: int) -> None:
        self._opts.router.close(responder)
        self._hooks.on_broken(EndpointBrokenError(f"reverse queue pair: {describe_death(code)}"))

    def close(self) -> None:
        self._closed = True
        router = self._opts.router
        if self._reverse is not None:
            router.close(self._reverse)
        for qp in self.qps:
            router.close(qp)


class TcpServerLink(ServerLink):
    """A session's responders (one per client queue pair) and its reverse queue pair."""

    def __init__(self, transport: TcpTransport, opts: QpOptions, hooks: SessionHooks, nqp: int) -> None:
        self._t = transport
        self._opts = opts
        self._hooks = hooks
        self._nqp = nqp
        self.responders: list[TcpResponder] = []
        self.attached: set[int] = set()
        self.reverse: TcpQueuePair | None = None

    def welcome(self) -> dict[str, Any]:
        return {"pid": os.getpid()}  # the process serving this session (see can_pull)

    def attach(self, sock: socket.socket, qp: int) -> None:
        if not isinstance(qp, int) or isinstance(qp, bool) or not 0 <= qp < self._nqp or qp in self.attached:
            raise ProtocolError(f"bad or duplicate queue pair index {qp!r}")
        o = self._opts
        if o.socket_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, o.socket_buffer)
        worker = o.workers[qp % len(o.workers)]
        r = o.router.open(lambda cid: TcpResponder(sock, cid, self._t._rt, worker, self._responder_dead,
                                                   self._hooks.on_imm))
        self.attached.add(qp)
        self.responders.append(r)

    def attach_reverse(self, sock: socket.socket, pull: bool = False) -> None:
        if self.reverse is not None:
            raise ProtocolError("the session already has a reverse queue pair")
        o = self._opts
        if o.socket_buffer:  # channel messages (e.g. pooling responses) leave in large bursts too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, o.socket_buffer)
        qp = o.router.open(lambda cid: TcpQueuePair(o.loop, sock, cid, [o.workers[0]], o.depth,
                                                    o.op_timeout, self._reverse_broken))
        self.reverse = qp
        if pull and sock.family == socket.AF_UNIX and self._t.PULL_MIN_BYTES and \
                not qp.pull_writes(self._t.PULL_MIN_BYTES):
            log.debug("reverse queue pair %d: no generation word free, writes stay plain", qp.conn_id)

    def _reverse_broken(self, exc: BaseException) -> None:
        self._hooks.on_broken(exc, None)

    def _responder_dead(self, responder: TcpResponder, code: int) -> None:
        if code != 0:
            log.info("queue pair %d closed: %s", responder.conn_id, describe_death(code))
        self._opts.router.close(responder)

    def imm_qp(self, chan: int) -> QueuePair | None:
        return self.reverse

    def close(self) -> None:
        router = self._opts.router
        if self.reverse is not None:
            router.close(self.reverse)
            self.reverse = None
        for r in self.responders:
            router.close(r)
        self.responders.clear()
