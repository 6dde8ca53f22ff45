"""The transport seam: what a transport provides, and the queue-pair bookkeeping all share.

A transport (:class:`Transport`, one instance per engine) makes workers,
registers memory and hands out keys for it, dials a peer's listener for an
endpoint (:meth:`Transport.dial` -> :class:`ClientLink`) and accepts a session
for a listener (:meth:`Transport.accept` -> :class:`ServerLink`).  Links own
their queue pairs; the engine, endpoints and listeners never look at which
transport they run on.  A new transport is one module with a :class:`Transport`
subclass, named in :data:`rdmaio.transports.TRANSPORTS` (and given a wire id in
:class:`~rdmaio.RemoteKey`), whose queue pair passes the suite of
``tests/rdmaio/test_queue_pairs.py``.

A *queue pair* is the initiator side of one connection to a peer: operations
are posted on it and complete later, in any order, when the transport's
worker reports their completions (:meth:`QueuePair._complete`).  What differs
per transport is how a request reaches the peer and how a completion comes
back; what does not is written here, once:

* **Slots.**  A queue pair has ``depth`` slots.  A posted operation holds one
  from :meth:`post` until its completion arrives; a caller that finds none
  free awaits :meth:`QueuePair.wait_slot`.  Each finished operation wakes one
  waiter, and a waiter cancelled right after its wake-up passes it on.
* **Pending operations.**  ``_pending`` maps an operation's key to its
  :class:`Pending` record.  The low 32 bits of a key are the operation's slot.
* **Pins.**  The local region of an operation is pinned (``mr._pin()``) from
  posting until the operation *ends* — its completion arrived, or the
  transport guarantees that nothing touches its memory any more (connection
  detached, QP destroyed).  Failing a future never unpins by itself.
* **Timeouts.**  With ``op_timeout``, an operation's future fails with
  :class:`~rdmaio.TimeoutError` when it expires; the slot and the pin stay
  until the operation ends.
* **Failing everything.**  A broken queue pair (:meth:`_die`) fails every
  pending operation and slot waiter with a copy of the error and tells its
  owner once; a closed one (:meth:`close`) ends them all with
  :class:`~rdmaio.ClosedError`.

Invariants: ``len(_free) + len({slots of _pending}) == depth`` while the queue
pair is open; a future is resolved at most once; ``broken`` and the closed
flag only ever go from unset to set (except :meth:`revive` on verbs' passive
side, after the QP went through RESET).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from .._errors import ClosedError, EndpointBrokenError, ProtocolError, TimeoutError, error_for_status
from .._keys import Access, RemoteKey
from .._progress import Router, Worker
from .._wire import Op

if TYPE_CHECKING:
    from .._region import MemoryRegion

__all__ = ["NO_KEY", "ClientLink", "LinkHooks", "ListenSide", "Peer", "Pending", "QpOptions", "QueuePair",
           "ServerLink", "SessionHooks", "Transport", "TransportOptions"]

#: the key argument of operations that touch no remote memory (ping)
NO_KEY = RemoteKey("none", 0, 0, 0, Access.NONE)

BrokenHook = Callable[[BaseException], None]
ImmHook = Callable[[int], None]


class Pending:
    """One operation in flight: its future, pinned region, kept-alive arrays and timer."""

    __slots__ = ("fut", "mr", "keep", "what", "timer")

    def __init__(self, fut: asyncio.Future[int], mr: MemoryRegion | None, keep: Any, what: str) -> None:
        self.fut = fut
        self.mr = mr
        self.keep = keep
        self.what = what
        self.timer: asyncio.TimerHandle | None = None


class QueuePair:
    """The initiator side of one queue pair; subclasses post and report completions.

    Subclasses implement :meth:`post`, :meth:`post_batch`, :meth:`_on_dead`,
    :meth:`_halt` (stop the connection after an error and fail what is in
    flight) and :meth:`_destroy` (make sure nothing touches local memory any
    more), and call :meth:`_track` / :meth:`_finish` around each operation.
    """

    __slots__ = ("_loop", "conn_id", "_depth", "_op_timeout", "_on_broken", "on_imm", "_free", "_pending",
                 "_slot_waiters", "broken", "_closed", "slot_waits")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn_id: int, depth: int, op_timeout: float | None,
                 on_broken: BrokenHook, on_imm: ImmHook | None = None) -> None:
        self._loop = loop
        self.conn_id = conn_id
        self._depth = depth
        self._op_timeout = op_timeout
        self._on_broken = on_broken
        #: receives the immediate of every WRITE_WITH_IMM that lands through this queue pair
        self.on_imm = on_imm
        self._free: list[int] = list(range(depth - 1, -1, -1))
        self._pending: dict[int, Pending] = {}
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.broken: BaseException | None = None
        self._closed = False
        #: operations that found every slot taken and waited for one (read-only statistics)
        self.slot_waits = 0

    @property
    def in_flight(self) -> int:
        """Operations posted and not yet ended."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the interface -----------------------------------------------------------------
    def post(self, op: Op, key: RemoteKey, remote: int, arg0: int, arg1: int, local: int,
             mr: MemoryRegion | None, what: str) -> asyncio.Future[int]:
        """Post one single-buffer operation (the caller made sure a slot is free).

        ``arg0`` is the length (reads, writes), the addend or expected value
        (atomics); ``arg1`` the swap value or the immediate.  ``key`` is
        :data:`NO_KEY` for a ping.  The future resolves to the completion's value.
        """
        raise NotImplementedError

    def post_batch(self, op: Op, key: RemoteKey, remote: np.ndarray, lengths: np.ndarray, local: np.ndarray,
                   mr: MemoryRegion, what: str) -> asyncio.Future[int]:
        """Post one batch request (``uint64`` arrays, kept alive until the operation ends)."""
        raise NotImplementedError

    def cork(self, more: bool) -> None:
        """Doorbell batching across calls: ``cork(True)`` before posting several operations in a row, and
        ``cork(False)`` after them (pairs nest).  While corked, a transport that sends a post at once when it
        is alone in flight (tcp) holds it until the last ``cork(False)`` or the end of the event loop's
        iteration, whichever comes first, so that the operations leave together.  The base class sends
        nothing late: a no-op."""

    def _on_dead(self, code: int) -> None:
        """The worker reports the connection dead (``code`` is transport-specific)."""
        raise NotImplementedError

    def _halt(self, exc: BaseException) -> None:
        """After ``broken`` was set: stop the connection and fail what is in flight."""
        raise NotImplementedError

    def _destroy(self) -> None:
        """On close: release the connection; afterwards nothing touches local memory."""
        raise NotImplementedError

    # -- slots -----------------------------------------------------------------------------
    async def wait_slot(self) -> None:
        """Wait until a slot is free (raises if the queue pair breaks or closes meanwhile)."""
        if not self._free:
            self.slot_waits += 1
        while not self._free:
            self._check()
            fut = self._loop.create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                # woken for a free slot but cancelled before taking it: pass the wake-up on
                if fut.done() and not fut.cancelled() and self._free:
                    self._wake_slot_waiter()
                raise
        self._check()

    def _wake_slot_waiter(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _check(self) -> None:
        if self.broken is not None:
            raise EndpointBrokenError(f"endpoint is broken: {self.broken}") from self.broken
        if self._closed:
            raise ClosedError("endpoint is closed")

    # -- pending operations ----------------------------------------------------------------
    def _track(self, key: int, p: Pending) -> asyncio.Future[int]:
        """Record a posted operation: pin its region, arm its timer."""
        if p.mr is not None:
            p.mr._pin()
        self._pending[key] = p
        if self._op_timeout is not None:
            p.timer = self._loop.call_later(self._op_timeout, self._expire, key)
        return p.fut

    def _finish(self, key: int) -> Pending | None:
        """End an operation: timer off, slot back (one waiter woken), region unpinned."""
        p = self._pending.pop(key, None)
        if p is None:
            return None
        if p.timer is not None:
            p.timer.cancel()
        self._free.append(key & 0xFFFFFFFF)
        if self.broken is None and not self._closed:
            self._wake_slot_waiter()
        if p.mr is not None:
            p.mr._unpin()
        return p

    def _complete(self, wr: int, status: int, value: int) -> None:
        """A completion (called by the router on the event loop)."""
        p = self._finish(wr)
        if p is None or p.fut.done():
            return
        if status == 0:
            p.fut.set_result(value)
        else:
            p.fut.set_exception(error_for_status(status, p.what))

    def _on_imm(self, imm: int) -> None:
        """A WRITE_WITH_IMM landed through this queue pair (called by the router)."""
        if self.on_imm is not None:
            self.on_imm(imm)

    def busy_poll(self, fut: asyncio.Future[int], budget_us: int) -> None:
        """Right after posting the operation of ``fut``: poll for completions from the event loop
        for up to ``budget_us`` µs if the transport can (verbs), so that ``fut`` may be done
        before the caller awaits it.  A no-op by default."""

    def post_polled(self, op: Op, key: RemoteKey, remote: int, arg0: int, arg1: int, local: int,
                    mr: MemoryRegion | None, what: str, budget_us: int) -> asyncio.Future[int] | None:
        """:meth:`post`, then :meth:`busy_poll` (a transport may fuse the two).  ``None``: the
        operation (a read or write, whose result is 0) is already complete -- no future was made."""
        fut = self.post(op, key, remote, arg0, arg1, local, mr, what)
        if not fut.done():
            self.busy_poll(fut, budget_us)
        return fut

    def _expire(self, key: int) -> None:
        p = self._pending.get(key)
        if p is not None and not p.fut.done():
            # the transfer may still land: the slot and the memory stay held until it does
            p.fut.set_exception(TimeoutError(f"{p.what} did not complete within {self._op_timeout} s"))

    def _fail_all(self, exc: BaseException, release: bool) -> None:
        """Fail every pending operation and slot waiter with a copy of ``exc``.

        ``release``: nothing can touch the operations' memory any more, so they
        end now (slots back, regions unpinned); otherwise they stay pending,
        memory pinned, until their completions (flushes) arrive.
        """
        for key in list(self._pending):
            p = self._finish(key) if release else self._pending[key]
            if p is not None and not p.fut.done():
                p.fut.set_exception(type(exc)(str(exc)))
        waiters = self._slot_waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_exception(type(exc)(str(exc)))

    # -- breaking and closing ----------------------------------------------------------------
    def _die(self, exc: BaseException) -> None:
        """The queue pair broke (or its endpoint did): fail what is in flight, tell the owner once."""
        if self.broken is not None or self._closed:
            return
        self.broken = exc
        self._halt(exc)
        self._on_broken(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """Release the connection, then end what is still pending (:class:`ClosedError`). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._destroy()
        self._fail_all(exc if exc is not None else ClosedError("endpoint closed with the operation in flight"),
                       release=True)


# -- what an engine gives its transport ----------------------------------------------------------

@dataclass(frozen=True)
class TransportOptions:
    """The engine options transports read when they are opened (each uses what applies to it)."""

    max_regions: int = 4096
    poll_spin_us: int = 50
    same_host_fast_path: bool = True
    #: verbs: one device name, or several (a worker group per device)
    device: str | tuple[str, ...] | None = None
    port: int | tuple[int, ...] | None = None
    gid_index: int | tuple[int, ...] | None = None


@dataclass(frozen=True)
class QpOptions:
    """Engine-wide settings for the queue pairs a transport creates (fixed once the engine started)."""

    loop: asyncio.AbstractEventLoop
    router: Router
    workers: Sequence[Worker]
    #: queue pairs per endpoint (one per worker, or one shared by all workers)
    nqp: int
    #: ``Engine(qp_per_worker=False)``: the single queue pair is polled by every worker
    shared: bool
    depth: int
    op_timeout: float | None
    socket_buffer: int
    same_host_fast_path: bool


@dataclass(frozen=True)
class LinkHooks:
    """Where an endpoint's connections report (none of these keeps the endpoint alive)."""

    #: the link broke: the endpoint fails everything in flight
    on_broken: Callable[[BaseException], None]
    #: a WRITE_WITH_IMM from the peer landed (channels)
    on_imm: Callable[[int], None]
    #: one control request to the peer, answered by its reply (verbs QP recovery)
    request: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class SessionHooks:
    """Where a listener session's connections report."""

    #: queue pair ``index`` (None: every queue pair of the session) can no longer write to the client
    on_broken: Callable[[BaseException, int | None], None]
    on_imm: Callable[[int], None]


class Peer(Protocol):
    """The peer's listener, as a dialling transport sees it (the endpoint's socket glue)."""

    async def hello(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Open the control connection with a ``hello`` carrying ``fields``; the peer's ``welcome``."""
        ...

    async def attach(self, first: dict[str, Any], unix: str | None = None) -> socket.socket:
        """Open one more connection (over the UNIX socket ``unix`` if given) whose first message is
        ``first``; the socket once the peer answered ``attached``."""
        ...


# -- the transport ---------------------------------------------------------------------------------

class ClientLink(abc.ABC):
    """A transport's side of one endpoint: its queue pairs and whatever carries them."""

    def __init__(self) -> None:
        self.qps: list[QueuePair] = []

    def key_for(self, mr: MemoryRegion) -> RemoteKey:
        """The key the peer of this link uses for ``mr`` (verbs: the rkey on the link's device)."""
        return mr.remote_key()

    async def reverse(self, peer: Peer) -> None:  # noqa: B027 - most transports need nothing
        """Make sure the peer can write to this side (channels' server-to-client messages)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection of the link (idempotent)."""


class ServerLink(abc.ABC):
    """A transport's side of one session a listener serves."""

    def welcome(self) -> dict[str, Any]:
        """Fields the transport adds to the session's ``welcome``."""
        return {}

    def key_for(self, mr: MemoryRegion) -> RemoteKey:
        """The key this session's client uses for ``mr`` (verbs: the rkey on the session's device)."""
        return mr.remote_key()

    def attach(self, sock: socket.socket, qp: int) -> None:
        """Take over ``sock``, a data connection for queue pair ``qp`` (ProtocolError if unexpected)."""
        raise ProtocolError("this session has no data connections to attach")

    def attach_reverse(self, sock: socket.socket, pull: bool = False) -> None:
        """Take over ``sock`` as the queue pair on which this side writes to the client (``pull``: the
        client asked to copy large writes' payloads from this process itself, same host)."""
        raise ProtocolError("this session has no reverse queue pair to attach")

    def reset(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer a ``qp_reset`` request (the reply message)."""
        raise ProtocolError("this session has no queue pairs to reset")

    @abc.abstractmethod
    def imm_qp(self, chan: int) -> QueuePair | None:
        """The queue pair on which channel ``chan`` writes to the client (None: not attached yet)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection of the session (idempotent)."""


@dataclass
class ListenSide:
    """What a transport adds to one listener: more sockets to accept on, fields for every welcome."""

    sockets: list[socket.socket]
    welcome: dict[str, Any]

    def close(self) -> None:
        for s in self.sockets:
            s.close()


class Transport(abc.ABC):
    """One engine's transport: workers, memory registration, dialling and accepting."""

    name: ClassVar[str]
    #: channels: the side that closes first keeps its ring until the peer's CLOSE answers (``_channel.py``)
    close_handshake: ClassVar[bool] = False
    #: requests are checked locally against the RemoteKey before posting (:meth:`check`)
    prechecks: ClassVar[bool] = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None if the transport can run here, else why not."""
        return None

    @abc.abstractmethod
    def __init__(self, options: TransportOptions) -> None:
        """Open the transport (TransportUnavailableError if it cannot run)."""

    @property
    def groups(self) -> list[str]:
        """The worker groups: one per NIC (verbs: the device names); one group by default."""
        return [self.name]

    def group_for(self, local_address: str | None) -> int | None:
        """The group whose NIC owns ``local_address`` (the kernel's source address towards a peer),
        or None if no group does."""
        return 0

    @abc.abstractmethod
    def worker(self, index: int, router: Router, mode: str, loop: asyncio.AbstractEventLoop, group: int = 0,
               cpus: frozenset[int] | None = None) -> Worker:
        """Progress context ``index`` of worker group ``group``; its completions go to ``router``;
        its thread (if any) is pinned to ``cpus``."""

    # memory (rdmaio._region.RegionBackend)
    @abc.abstractmethod
    def register(self, addr: int, length: int, access: Access) -> tuple[int, int]:
        """Make ``[addr, addr+length)`` reachable with ``access``: ``(key, index)`` of the region."""

    @abc.abstractmethod
    def key(self, mr: MemoryRegion) -> RemoteKey:
        """The capability for ``mr``."""

    def revoke(self, mr: MemoryRegion) -> None:  # noqa: B027
        """New remote requests on ``mr`` fail from now on."""

    def busy(self, mr: MemoryRegion) -> int:
        """Remote requests still executing on ``mr``."""
        return 0

    def release(self, mr: MemoryRegion) -> None:  # noqa: B027
        """Drop the registration of a region nothing uses any more."""

    def check(self, op: Op, what: str, key: RemoteKey, offset: int, length: int) -> None:
        """Raise what the target would, before posting (only when :attr:`prechecks`)."""

    def check_batch(self, op: Op, what: str, key: RemoteKey, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """:meth:`check` for a batch: one bad entry refuses it all."""

    # connections
    @abc.abstractmethod
    async def dial(self, opts: QpOptions, hooks: LinkHooks, peer: Peer) -> ClientLink:
        """Connect an endpoint's queue pairs to the peer (the control connection is ``peer.hello``)."""

    @abc.abstractmethod
    def accept(self, hello: dict[str, Any], opts: QpOptions, hooks: SessionHooks) -> ServerLink:
        """A listener's side of a new session, from the client's ``hello`` (ProtocolError if malformed)."""

    def listen(self, backlog: int) -> ListenSide:
        """Extra sockets and welcome fields for a new listener."""
        return ListenSide([], {})

    def close(self) -> None:  # noqa: B027
        """Release the transport (after every connection and worker is gone)."""
