"""The verbs transport: RC queue pairs on an RDMA NIC (libibverbs), behind the same seam as tcp.

Pieces (the C hot path is ``rdmaio/_native/verbs.c``, an optional cffi extension
loaded lazily — importing rdmaio never loads libibverbs):

* :class:`VerbsTransport` — one per engine, around the device layer of
  :mod:`rdmaio.transports._ibv`: one device context per NIC (device/port/GID
  choice, protection domain, the registration cache), a worker group per NIC
  (:class:`~rdmaio.transports._ibv.VerbsWorker` polling a completion channel +
  CQ), local pre-checks of remote keys.  Memory is registered on every NIC; a
  link (endpoint or session) lives on one NIC, that of its workers, and uses
  that NIC's keys.
* :class:`VerbsQueuePair` — the initiator side of one RC QP, on the shared
  bookkeeping of :class:`~rdmaio.transports.base.QueuePair`.
* :class:`VerbsClientLink` — an endpoint's QPs, connected through the
  attributes exchanged in ``hello``/``welcome`` (no data connections).
* :class:`VerbsServerLink` — the target side: QPs connected to a client's; the
  NIC serves every one-sided request.  They are :class:`VerbsQueuePair` objects
  too (``passive``), because a channel server initiates WRITE_WITH_IMM on them.

WRITE_WITH_IMM: RC QPs are bidirectional, so every QP (client and server side)
keeps a pool of zero-length receive WRs posted (``rq_depth``, from ``sq_depth``)
that ``rv_worker_poll`` refills in C, below half, with one chained
``ibv_post_recv``; arrivals come back as the worker batch's ``rx_conn/rx_imm``
arrays and :meth:`VerbsQueuePair._on_imm` hands each immediate to the link's
``on_imm`` hook (the endpoint's or the listener session's channel routing).

Posting: a request becomes one or a few *chunks*; a chunk is one chained WR
list posted with one ``ibv_post_send`` (one doorbell) whose last WR alone is
signalled.  Chunks wait in a backlog when the send queue lacks WR credits.

Errors: remote access rights, bounds and atomic alignment are checked locally
against the :class:`~rdmaio.RemoteKey` before posting (RC NICs, and rxe in
particular, report all of these as the same remote access error, and an RC
error moves both QPs to the error state).  What the NIC still refuses — a
forged or deregistered rkey — fails that operation with
:class:`~rdmaio.InvalidKeyError` and triggers *recovery*: wait for the flush,
reset the QP to INIT, exchange fresh PSNs with the peer over the control
connection (``qp_reset``/``qp_reset_ok``), bring both sides back to RTS and
re-post the flushed chunks (the responder stopped at the faulting request, so
they never executed).  Retry-exceeded and other fatal errors break the endpoint.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import ClosedError, EndpointBrokenError, ProtocolError, UsageError, error_for_status
from .._keys import Access, RemoteKey
from .._progress import Router, Worker
from .._wire import Op, Status
from ._ibv import (
    VerbsContext,
    VerbsWorker,
    as_int,
    check_remote,
    check_remote_batch,
    parse_qp_attrs,
    unavailable_reason,
)
from .base import (
    BrokenHook,
    ClientLink,
    ImmHook,
    LinkHooks,
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

__all__ = ["VerbsClientLink", "VerbsQueuePair", "VerbsServerLink", "VerbsTransport"]

log = logging.getLogger(__name__)

# enum ibv_wc_status (stable ABI values)
WC_SUCCESS = 0
WC_LOC_LEN_ERR = 1
WC_LOC_QP_OP_ERR = 2
WC_LOC_PROT_ERR = 4
WC_WR_FLUSH_ERR = 5
WC_REM_INV_REQ_ERR = 9
WC_REM_ACCESS_ERR = 10
WC_REM_OP_ERR = 11
_WC_NAMES = {
    0: "success", 1: "local length error", 2: "local QP operation error", 3: "local EE context error",
    4: "local protection error", 5: "work request flushed", 6: "memory window bind error",
    7: "bad response", 8: "local access error", 9: "remote invalid request", 10: "remote access error",
    11: "remote operation error", 12: "transport retry counter exceeded (peer unreachable)",
    13: "RNR retry counter exceeded", 14: "local RDD violation", 15: "remote invalid RD request",
    16: "remote aborted", 17: "invalid EE context number", 18: "invalid EE context state",
    19: "fatal error", 20: "response timeout", 21: "general error",
}
#: errors after which the QP is recovered (the peer is alive and answered)
_RECOVERABLE = {WC_REM_ACCESS_ERR: Status.INVALID_KEY, WC_REM_INV_REQ_ERR: Status.INVALID_REQUEST,
                WC_REM_OP_ERR: Status.INVALID_REQUEST, WC_LOC_PROT_ERR: Status.INVALID_REQUEST,
                WC_LOC_LEN_ERR: Status.INVALID_REQUEST, WC_LOC_QP_OP_ERR: Status.INVALID_REQUEST}

#: rv_post_spin: the WR's completion came back alone (lock released) / ibv_post_send failed (-(this + errno))
_SPIN_MINE = 0x10000
_POSTED_NOT = 0x10000

_RV_OP = {Op.READ: 1, Op.READ_BATCH: 1, Op.WRITE: 2, Op.WRITE_BATCH: 2, Op.FETCH_ADD: 3, Op.CMP_SWAP: 4}

ControlHook = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


# -- initiator queue pair -------------------------------------------------------------------

class _Req(Pending):
    """A verbs operation: a :class:`Pending` split into ``left`` chunks still on the NIC or waiting."""

    __slots__ = ("slot", "left", "value")

    def __init__(self, fut: asyncio.Future[int], mr: MemoryRegion | None, keep: Any, what: str, slot: int) -> None:
        super().__init__(fut, mr, keep, what)
        self.slot = slot
        self.left = 0
        self.value = 0


class _Chunk:
    """One doorbell's worth of a request: kind 0 contiguous r/w, 1 batch r/w, 2 atomic, 3 ping,
    4 write ending in WRITE_WITH_IMM.  ``slot`` >= 0: the result lands in that scratch word."""

    __slots__ = ("req", "kind", "args", "nwr", "slot")

    def __init__(self, req: _Req, kind: int, args: tuple[Any, ...], nwr: int, slot: int = -1) -> None:
        self.req = req
        self.kind = kind
        self.args = args
        self.nwr = nwr
        self.slot = slot


class VerbsQueuePair(QueuePair):
    """One RC queue pair (owned by one worker).

    Operations are keyed by their slot in ``_pending``; their chunks posted on
    the NIC are keyed by work-request id in ``_posted``.

    ``passive``: the listener's side of a session.  It initiates only channel writes;
    the client drives recovery (``qp_reset``), so an error completion here fails what
    is in flight and marks the QP broken until :meth:`revive` after the reset.
    """

    __slots__ = ("_v", "_lib", "_ffi", "index", "_passive", "_control", "_q", "qpn", "_scratch", "_scratch_addr",
                 "_scratch_lkey", "_seq", "_conn_hi", "_credits", "_max_msg", "_chunk_wrs", "_posted", "_backlog",
                 "_flushed", "_recovering", "_recovery", "_remote", "_ping", "recoveries", "worker", "_primary")

    def __init__(self, vctx: VerbsContext, loop: asyncio.AbstractEventLoop, conn_id: int, index: int,
                 worker: VerbsWorker, depth: int, op_timeout: float | None, on_broken: BrokenHook,
                 on_imm: ImmHook | None = None, control: ControlHook | None = None, passive: bool = False,
                 primary: bool = True) -> None:
        super().__init__(loop, conn_id, depth, op_timeout, on_broken, on_imm)
        self._v = vctx
        self._lib = vctx._lib
        self._ffi = vctx._ffi
        self.index = index
        self._passive = passive
        #: sends a control request to the peer (recovery's qp_reset)
        self._control = control
        #: the worker that polls this QP's completions (always the same one)
        self.worker = worker
        #: on the engine's first device: a region's lkey is the low half of its key
        self._primary = primary
        self._q = vctx.new_qp(worker, conn_id, vctx.sq_wrs, vctx.rq_depth(depth))
        self.qpn = int(self._q.qpn)
        self._scratch = np.zeros(depth, dtype=np.uint64)  # atomic results, ping target: one word per slot
        self._scratch_addr = int(self._scratch.ctypes.data)
        try:
            self._scratch_lkey = vctx.register(self._scratch_addr, self._scratch.nbytes, Access.NONE)[0]
        except BaseException:
            self._lib.rv_qp_free(self._q)
            raise
        self._seq = itertools.count(1)
        self._conn_hi = conn_id << 32
        self._credits = vctx.sq_wrs
        self._max_msg = vctx.max_msg
        self._chunk_wrs = vctx.chunk_wrs
        self._posted: dict[int, _Chunk] = {}
        self._backlog: collections.deque[_Chunk] = collections.deque()
        self._flushed: list[_Chunk] = []
        self._recovering = False
        self._recovery: asyncio.Task[None] | None = None
        self._remote: dict[str, Any] | None = None
        self._ping: tuple[int, int] = (0, 0)
        self.recoveries = 0

    def __repr__(self) -> str:
        return f"<VerbsQueuePair qpn={self.qpn} in_flight={len(self._pending)}>"

    # -- setup -----------------------------------------------------------------------
    def connect(self, remote: dict[str, Any], my_psn: int, ping: tuple[int, int]) -> None:
        self._remote = remote
        self._ping = ping
        self._v.connect_qp(self._q, remote, my_psn)

    def _lkey(self, mr: MemoryRegion) -> int:
        if self._primary:
            return mr._key & 0xFFFFFFFF
        return self._v.lkey(mr.addr, mr.length, mr.access)

    def busy_poll(self, fut: asyncio.Future[int], budget_us: int) -> None:
        """Busy-poll this QP's worker when the operation is alone on the QP (a depth-1 caller)."""
        if len(self._pending) == 1:
            self.worker.busy_poll(budget_us, fut)

    def post_polled(self, op: Op, key: RemoteKey, remote: int, arg0: int, arg1: int, local: int,
                    mr: MemoryRegion | None, what: str, budget_us: int) -> asyncio.Future[int] | None:
        """:meth:`post` then :meth:`busy_poll`; a lone one-WR read or write is posted and polled for in
        one native call (``rv_post_spin``), and when its completion comes back alone the operation
        never enters the pending table and no future is made: ``None`` (done)."""
        w = self.worker
        c = w.c
        if (op is Op.READ or op is Op.WRITE) and 0 < arg0 <= self._max_msg and mr is not None \
                and not self._pending and not self._backlog and not self._recovering and self._credits > 0 \
                and self.broken is None and not self._closed and not w._spin_skip and not w._queue \
                and c is not None:
            wr = self._conn_hi | (next(self._seq) & 0x7FFFFFFF)
            rop = 1 if op is Op.READ else 2
            raddr = key.addr + remote
            lkey = mr._key & 0xFFFFFFFF if self._primary else self._lkey(mr)
            rc = self._lib.rv_post_spin(self._q, c, wr, rop, raddr, arg0, local, key.rkey, lkey, self._max_msg,
                                        budget_us, c.handoffs)
            if rc == _SPIN_MINE:  # done, and nothing else came: the poll lock is already released
                w._spin_miss = 0
                if not w._rearm_pending:
                    w.rearm_later()
                if w._queue:
                    w._deliver(w._take_queued())
                return None
            # otherwise it is an operation in flight like any other, and the poll's harvest is delivered
            fut: asyncio.Future[int] = self._loop.create_future()
            slot = self._free.pop()
            req = _Req(fut, mr, None, what, slot)
            req.left = 1
            ch = _Chunk(req, 0, (rop, raddr, arg0, local, key.rkey, lkey), 1)
            self._track(slot, req)
            if rc <= -_POSTED_NOT:
                w._native_release()
                self._backlog.appendleft(ch)
                self._die(EndpointBrokenError(f"ibv_post_send failed: {os.strerror(-rc - _POSTED_NOT)}"))
                return fut
            self._posted[wr] = ch
            self._credits -= 1
            w._after_spin(rc)
            return fut
        fut = self.post(op, key, remote, arg0, arg1, local, mr, what)
        if not fut.done():
            self.busy_poll(fut, budget_us)
        return fut

    @property
    def rq_posted(self) -> int:
        """Receive WRs currently posted (diagnostics)."""
        return int(self._lib.rv_qp_rq_posted(self._q)) if self._q is not None else 0

    # -- posting ---------------------------------------------------------------------
    def post(self, op: Op, key: RemoteKey, remote: int, arg0: int, arg1: int, local: int,
             mr: MemoryRegion | None, what: str) -> asyncio.Future[int]:
        """One read/write/atomic/ping (``key`` checked by the endpoint against the request)."""
        self._check()
        fut: asyncio.Future[int] = self._loop.create_future()
        if op is Op.READ or op is Op.WRITE:
            if arg0 == 0:
                fut.set_result(0)
                return fut
        elif op is not Op.WRITE_IMM and op is not Op.FETCH_ADD and op is not Op.CMP_SWAP and op is not Op.NOP:
            raise UsageError(f"operation {op!r} is not a single operation")
        slot = self._free.pop()
        req = _Req(fut, mr, None, what, slot)
        lkey = self._lkey(mr) if mr is not None else 0
        if op is Op.WRITE_IMM:  # arg0 = length, arg1 = immediate; data chunks first, the imm last
            length = arg0
            span = self._max_msg * self._chunk_wrs
            raddr = key.addr + remote
            chunks = []
            lo = 0
            while length - lo > span:
                chunks.append(_Chunk(req, 0, (2, raddr + lo, span, local + lo, key.rkey, lkey), self._chunk_wrs))
                lo += span
            n = length - lo
            chunks.append(_Chunk(req, 4, (raddr + lo, n, local + lo, key.rkey, lkey, arg1 & 0xFFFFFFFF),
                                 max(1, -(-n // self._max_msg))))
        elif op is Op.READ or op is Op.WRITE:
            length = arg0
            rop = _RV_OP[op]
            span = self._max_msg * self._chunk_wrs
            chunks = []
            raddr = key.addr + remote
            for lo in range(0, length, span):
                n = min(span, length - lo)
                chunks.append(_Chunk(req, 0, (rop, raddr + lo, n, local + lo, key.rkey, lkey),
                                     -(-n // self._max_msg)))
        elif op is Op.NOP:
            chunks = [_Chunk(req, 3, (), 1, slot)]
        else:
            chunks = [_Chunk(req, 2, (_RV_OP[op], key.addr + remote, key.rkey, arg0, arg1), 1, slot)]
        self._start(req, chunks)
        return fut

    def post_batch(self, op: Op, key: RemoteKey, remote: np.ndarray, lengths: np.ndarray, local: np.ndarray,
                   mr: MemoryRegion, what: str) -> asyncio.Future[int]:
        """Many reads or writes of one region (``uint64`` arrays, kept alive until completion)."""
        self._check()
        fut: asyncio.Future[int] = self._loop.create_future()
        mm = np.uint64(self._max_msg)
        wrs = (lengths + (mm - np.uint64(1))) // mm
        total = int(wrs.sum())
        if total == 0:
            fut.set_result(0)
            return fut
        req = _Req(fut, mr, (remote, lengths, local), what, self._free.pop())
        args = (_RV_OP[op], key.addr, key.rkey, self._lkey(mr))
        cap = self._chunk_wrs
        chunks = []
        if total <= cap:
            chunks.append(_Chunk(req, 1, (*args, remote, lengths, local), total))
        else:
            cum = np.cumsum(wrs)
            start, base = 0, 0
            n = len(lengths)
            while start < n:
                end = int(np.searchsorted(cum, base + cap, side="right"))
                end = max(end, start + 1)  # one entry never exceeds a chunk (MAX_OP_BYTES / max_msg <= cap)
                nwr = int(cum[end - 1]) - base
                if nwr:
                    chunks.append(_Chunk(req, 1, (*args, remote[start:end], lengths[start:end], local[start:end]),
                                         nwr))
                base = int(cum[end - 1])
                start = end
        self._start(req, chunks)
        return fut

    def _start(self, req: _Req, chunks: list[_Chunk]) -> None:
        self._track(req.slot, req)
        req.left = len(chunks)
        for ch in chunks:
            if self._recovering or self._backlog or ch.nwr > self._credits:
                self._backlog.append(ch)
            elif not self._post_chunk(ch):
                return

    def _post_chunk(self, ch: _Chunk) -> bool:
        wr = self._conn_hi | (next(self._seq) & 0x7FFFFFFF)  # bit 31 marks receive WRs
        lib = self._lib
        a = ch.args
        k = ch.kind
        if k == 0:
            rc = lib.rv_post_one(self._q, wr, a[0], a[1], a[2], a[3], a[4], a[5], self._max_msg)
        elif k == 1:
            ffi = self._ffi
            rc = lib.rv_post_rw(self._q, wr, a[0], len(a[4]), a[1], ffi.from_buffer("uint64_t[]", a[4]),
                                ffi.from_buffer("uint64_t[]", a[5]), ffi.from_buffer("uint64_t[]", a[6]),
                                a[2], a[3], self._max_msg)
        elif k == 4:
            rc = lib.rv_post_write_imm(self._q, wr, a[0], a[1], a[2], a[3], a[4], a[5], self._max_msg)
        elif k == 2:
            rc = lib.rv_post_atomic(self._q, wr, a[0], a[1], a[2], a[3], a[4],
                                    self._scratch_addr + 8 * ch.slot, self._scratch_lkey)
        else:
            rc = lib.rv_post_one(self._q, wr, 1, self._ping[0], 8, self._scratch_addr + 8 * ch.slot,
                                 self._ping[1], self._scratch_lkey, self._max_msg)
        if rc < 0:
            self._backlog.appendleft(ch)
            self._die(EndpointBrokenError(f"ibv_post_send failed: {os.strerror(-rc)}"))
            return False
        self._posted[wr] = ch
        self._credits -= ch.nwr
        return True

    def _pump(self) -> None:
        bl = self._backlog
        while bl and not self._recovering and self.broken is None and not self._closed \
                and bl[0].nwr <= self._credits:
            if not self._post_chunk(bl.popleft()):
                return

    # -- completion ------------------------------------------------------------------
    def _chunk_done(self, ch: _Chunk, exc: BaseException | None) -> None:
        req = ch.req
        if exc is not None:
            if not req.fut.done():
                req.fut.set_exception(exc)
        elif ch.slot >= 0:
            req.value = int(self._scratch[ch.slot])
        req.left -= 1
        if req.left > 0:
            return
        self._finish(req.slot)
        if not req.fut.done():
            req.fut.set_result(req.value)

    def _complete(self, wr: int, status: int, value: int) -> None:
        ch = self._posted.pop(wr, None)
        if ch is None:
            return  # a flush of an unsignalled WR of a finished chunk, or a stale completion
        if status == WC_SUCCESS:
            self._credits += ch.nwr
            self._chunk_done(ch, None)
            if self._backlog:
                self._pump()
            return
        if self.broken is not None or self._closed:
            self._chunk_done(ch, type(self.broken)(str(self.broken)) if self.broken is not None
                             else ClosedError("endpoint closed"))
            return
        if self._passive:  # the client resets this QP (qp_reset): fail what is in flight until then
            self._posted[wr] = ch
            self._die(EndpointBrokenError(f"{ch.req.what} to the client failed: "
                                          f"{_WC_NAMES.get(status, f'status {status}')}"))
            return
        if status == WC_WR_FLUSH_ERR and self._recovering:
            self._flushed.append(ch)
            return
        mapped = _RECOVERABLE.get(status)
        if mapped is not None:
            exc = error_for_status(int(mapped), ch.req.what)
            self._chunk_done(ch, type(exc)(f"{exc} ({_WC_NAMES.get(status, status)} from the NIC)", int(mapped)))
            self._begin_recovery()
            return
        self._posted[wr] = ch
        self._die(EndpointBrokenError(f"{ch.req.what} failed: {_WC_NAMES.get(status, f'status {status}')}"))

    def _on_dead(self, code: int) -> None:
        self._die(EndpointBrokenError(f"queue pair error event {code}"))

    def revive(self) -> None:
        """Passive side, after the QP went through RESET (the NIC touches none of its buffers):
        fail whatever was still in flight and accept new work again."""
        if self._closed:
            return
        self._drop_chunks()
        self.broken = None
        self._fail_all(EndpointBrokenError("the queue pair was reset while the operation was in flight"),
                       release=True)
        self._credits = self._v.sq_wrs

    # -- recovery after a remote error ---------------------------------------------------
    def _begin_recovery(self) -> None:
        if self._recovering or self.broken is not None or self._closed:
            return
        self._recovering = True
        self.recoveries += 1
        self._lib.rv_qp_error(self._q)  # make sure every outstanding WR flushes (a no-op if already in ERR)
        self._recovery = self._loop.create_task(self._recover())

    async def _recover(self) -> None:
        try:
            deadline = self._loop.time() + 5.0
            while self._posted:  # every posted chunk reports: success, error or flush
                if self._loop.time() > deadline:
                    raise EndpointBrokenError("the queue pair did not flush after an error")
                await asyncio.sleep(0.001)
            if self.broken is not None or self._closed:
                return
            rc = self._lib.rv_qp_reset(self._q)
            if rc:
                raise EndpointBrokenError(f"queue pair reset failed: {os.strerror(-rc)}")
            if self._control is None or self._remote is None:
                raise EndpointBrokenError("queue pair is not connected")
            psn = secrets.randbits(24)
            reply = await self._control({"t": "qp_reset", "qp": self.index, "psn": psn})
            if reply.get("t") != "qp_reset_ok":
                raise EndpointBrokenError(f"peer could not reset its queue pair: {reply.get('message')}")
            peer_psn = as_int(reply.get("psn"), 0, 0xFFFFFF, "psn")
            if self.broken is not None or self._closed:
                return
            self._v.connect_qp(self._q, {**self._remote, "psn": peer_psn}, psn)
            self._credits = self._v.sq_wrs
            redo, self._flushed = self._flushed, []
            self._backlog.extendleft(reversed(redo))
            self._recovering = False
            self._pump()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here breaks the endpoint
            err = exc if isinstance(exc, EndpointBrokenError) else EndpointBrokenError(
                f"could not recover the queue pair after a remote error: {exc}")
            self._die(err)

    # -- death and close ------------------------------------------------------------------
    def _halt(self, exc: BaseException) -> None:
        self._lib.rv_qp_error(self._q)  # outstanding WRs flush; the NIC stops touching memory
        rest = list(self._backlog) + self._flushed  # never (re)posted: nothing touches their memory
        self._backlog.clear()
        self._flushed = []
        for ch in rest:
            self._chunk_done(ch, type(exc)(str(exc)))
        self._fail_all(exc, release=False)  # posted ones stay pinned until their flush (or close)

    def _drop_chunks(self) -> None:
        self._posted.clear()
        self._backlog.clear()
        self._flushed = []

    def _destroy(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
        self._lib.rv_qp_free(self._q)  # the NIC no longer touches any buffer
        self._q = None
        self._drop_chunks()
        self._v.unregister(self._scratch_addr, self._scratch.nbytes, Access.NONE)


# -- the transport ----------------------------------------------------------------------------

class VerbsTransport(Transport):
    """RC queue pairs on an RDMA NIC: the engine's device context, its registration cache."""

    name = "verbs"
    close_handshake = True  # see _channel.py "Closing on verbs"
    prechecks = True  # RC NICs report every refusal alike, and break both QPs on it

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unavailable_reason()

    def __init__(self, options: TransportOptions) -> None:
        # opens the devices now: TransportUnavailableError if one cannot be opened
        names = options.device if isinstance(options.device, tuple) else (options.device,)
        n = len(names)
        ports = options.port if isinstance(options.port, tuple) else (options.port,) * n
        gids = options.gid_index if isinstance(options.gid_index, tuple) else (options.gid_index,) * n
        self.vctxs: list[VerbsContext] = []
        try:
            for name, port, gid in zip(names, ports, gids):
                self.vctxs.append(VerbsContext(name, port, gid))
        except BaseException:
            self.close()
            raise
        #: the first device (the only one unless several were named)
        self.vctx = self.vctxs[0]

    @property
    def groups(self) -> list[str]:
        return [v.device for v in self.vctxs]

    def group_for(self, local_address: str | None) -> int | None:
        """The device whose GID table holds ``local_address`` (RoCE: the netdev's IP address)."""
        if len(self.vctxs) == 1:
            return 0
        for i, v in enumerate(self.vctxs):
            if local_address in v.addresses:
                return i
        return None

    def worker(self, index: int, router: Router, mode: str, loop: asyncio.AbstractEventLoop, group: int = 0,
               cpus: frozenset[int] | None = None) -> Worker:
        return VerbsWorker(index, router, mode, loop, self.vctxs[group], cpus=cpus)

    # -- memory: NIC registrations (cached) on every device; key = rkey << 32 | lkey on the first ------------
    def register(self, addr: int, length: int, access: Access) -> tuple[int, int]:
        done: list[VerbsContext] = []
        try:
            for v in self.vctxs:
                v.register(addr, length, access)
                done.append(v)
        except BaseException:
            for v in done:
                v.unregister(addr, length, access)
            raise
        lkey, rkey = self.vctx.lkey(addr, length, access), self.vctx.rkey(addr, length, access)
        return (rkey << 32) | lkey, -1

    def key(self, mr: MemoryRegion) -> RemoteKey:
        return RemoteKey("verbs", mr.addr, mr._key >> 32, mr.length, mr.access, 0)

    def key_on(self, vctx: VerbsContext, mr: MemoryRegion) -> RemoteKey:
        """``mr``'s key for peers reached through device ``vctx``."""
        if vctx is self.vctx:
            return self.key(mr)
        return RemoteKey("verbs", mr.addr, vctx.rkey(mr.addr, mr.length, mr.access), mr.length, mr.access, 0)

    def release(self, mr: MemoryRegion) -> None:
        # the NIC registration stays valid until here: a closed region in use stays reachable
        for v in self.vctxs:
            v.unregister(mr.addr, mr.length, mr.access)

    #: (op, what, key, offset, length): the module function itself -- one call less per operation
    check = staticmethod(check_remote)

    def check_batch(self, op: Op, what: str, key: RemoteKey, offsets: np.ndarray, lengths: np.ndarray) -> None:
        check_remote_batch(op, what, key, offsets, lengths)

    # -- connections ---------------------------------------------------------------------------
    def _vctx_of(self, opts: QpOptions) -> VerbsContext:
        """The device of a link: that of its workers (one group)."""
        w = opts.workers[0]
        assert isinstance(w, VerbsWorker)
        return w._vctx

    async def dial(self, opts: QpOptions, hooks: LinkHooks, peer: Peer) -> VerbsClientLink:
        """Create the QPs, exchange their attributes in hello/welcome, connect them (no data connections)."""
        vctx = self._vctx_of(opts)
        link = VerbsClientLink(self, vctx, opts, hooks)
        try:
            psns = [secrets.randbits(24) for _ in link.qps]
            welcome = await peer.hello({"qps": [vctx.qp_attrs(qp.qpn, psn) for qp, psn in zip(link.vqps, psns)]})
            remote = parse_qp_attrs(welcome.get("qps"), len(link.qps))
            ping = welcome.get("ping")
            if not (isinstance(ping, list) and len(ping) == 2 and all(isinstance(x, int) for x in ping)):
                raise ProtocolError("welcome lacks the ping region")
            for qp, r, psn in zip(link.vqps, remote, psns):
                qp.connect(r, psn, (ping[0] & ((1 << 64) - 1), ping[1] & 0xFFFFFFFF))
        except BaseException:
            link.close()
            raise
        return link

    def accept(self, hello: dict[str, Any], opts: QpOptions, hooks: SessionHooks) -> VerbsServerLink:
        """Listener side of the handshake: QPs connected to the client's (ProtocolError if malformed)."""
        return VerbsServerLink(self, self._vctx_of(opts), parse_qp_attrs(hello.get("qps"), hello["nqp"]), opts,
                               hooks)

    def close(self) -> None:
        for v in self.vctxs:
            v.close()


def _new_qp(vctx: VerbsContext, opts: QpOptions, i: int, on_broken: BrokenHook, on_imm: ImmHook,
            control: ControlHook | None, passive: bool, primary: bool) -> VerbsQueuePair:
    w = opts.workers[i % len(opts.workers)]
    assert isinstance(w, VerbsWorker) and w._vctx is vctx
    return opts.router.open(lambda cid: VerbsQueuePair(vctx, opts.loop, cid, i, w, opts.depth, opts.op_timeout,
                                                       on_broken, on_imm, control, passive, primary))


def _index_hook(hook: Callable[[BaseException, int | None], None], i: int) -> BrokenHook:
    return lambda exc: hook(exc, i)


class VerbsClientLink(ClientLink):
    """An endpoint's RC QPs (QP ``i`` on worker ``i``); the server's channel writes land through them."""

    def __init__(self, transport: VerbsTransport, vctx: VerbsContext, opts: QpOptions, hooks: LinkHooks) -> None:
        super().__init__()
        self._router = opts.router
        self._t = transport
        #: the NIC this endpoint's QPs live on
        self.vctx = vctx
        self.vqps: list[VerbsQueuePair] = []
        primary = vctx is transport.vctx
        try:
            for i in range(opts.nqp):
                self.vqps.append(_new_qp(vctx, opts, i, hooks.on_broken, hooks.on_imm, hooks.request, False,
                                         primary))
        except BaseException:
            self.close()
            raise
        self.qps = list(self.vqps)

    def key_for(self, mr: MemoryRegion) -> RemoteKey:
        return self._t.key_on(self.vctx, mr)

    def close(self) -> None:
        for qp in self.vqps:
            self._router.close(qp)


class VerbsServerLink(ServerLink):
    """The listener's QPs for one client session.

    The NIC serves the client's one-sided requests on them without Python.  They
    are passive :class:`VerbsQueuePair` objects: their receive queues take the
    client's WRITE_WITH_IMM (``hooks.on_imm``) and channel servers post
    WRITE_WITH_IMM towards the client on them (QP ``i`` is connected to the
    client's QP ``i``, so a channel's two directions share one RC connection).
    """

    def __init__(self, transport: VerbsTransport, vctx: VerbsContext, client_qps: list[dict[str, Any]],
                 opts: QpOptions, hooks: SessionHooks) -> None:
        self._t = transport
        self._v = vctx
        self._router = opts.router
        self._client = client_qps
        self.qps: list[VerbsQueuePair] = []
        self.attrs: list[dict[str, Any]] = []
        try:
            for i, remote in enumerate(client_qps):
                qp = _new_qp(vctx, opts, i, _index_hook(hooks.on_broken, i), hooks.on_imm, None, True,
                             vctx is transport.vctx)
                self.qps.append(qp)
                psn = secrets.randbits(24)
                vctx.connect_qp(qp._q, remote, psn)
                self.attrs.append(vctx.qp_attrs(qp.qpn, psn))
        except BaseException:
            self.close()
            raise

    def welcome(self) -> dict[str, Any]:
        return {"qps": self.attrs, "ping": [self._v._ping_addr, self._v._ping_rkey]}

    def key_for(self, mr: MemoryRegion) -> RemoteKey:
        return self._t.key_on(self._v, mr)

    def reset(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer a client's ``qp_reset``: RESET -> INIT (fresh receives) -> RTR (its new PSN) -> RTS (ours)."""
        i = msg.get("qp")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.qps):
            raise ProtocolError(f"qp_reset names no queue pair: {i!r}")
        client_psn = as_int(msg.get("psn"), 0, 0xFFFFFF, "psn")
        qp = self.qps[i]
        rc = self._v._lib.rv_qp_reset(qp._q)
        if rc:
            return {"t": "error", "id": msg["id"], "code": "reset", "message": os.strerror(-rc)}
        qp.revive()  # channel writes that were in flight on it failed; new ones may go
        psn = secrets.randbits(24)
        try:
            self._v.connect_qp(qp._q, {**self._client[i], "psn": client_psn}, psn)
        except EndpointBrokenError as exc:
            return {"t": "error", "id": msg["id"], "code": "reset", "message": str(exc)}
        return {"t": "qp_reset_ok", "id": msg["id"], "psn": psn}

    def imm_qp(self, chan: int) -> QueuePair | None:
        return self.qps[chan % len(self.qps)]

    def close(self) -> None:
        for qp in self.qps:
            self._router.close(qp)
        self.qps.clear()
