"""The verbs transport: RC queue pairs on an RDMA NIC (libibverbs), same interface as tcp.

Pieces (the C hot path is ``rdmaio/_native/verbs.c``, an optional cffi extension
loaded lazily — importing rdmaio never loads libibverbs):

* :func:`unavailable_reason` — why verbs cannot run here (no headers at build
  time, libibverbs missing, no ACTIVE port), or ``None``.
* :class:`VerbsContext` — one per engine: device/port/GID choice, protection
  domain, the memory-registration cache (keyed by ``(address, length, access)``,
  ref-counted), local pre-checks of remote keys, the listener's server sessions.
* :class:`VerbsWorker` — a :class:`rdmaio._progress.Worker` whose completion
  source is a completion channel + CQ instead of an epoll set.
* :class:`VerbsQueuePair` — the initiator side of one RC QP, with the interface
  the :class:`~rdmaio.Endpoint` uses on :class:`~rdmaio._tcp.TcpQueuePair`.
* :class:`ServerSession` — the target side: QPs connected to a client's; the
  NIC serves every one-sided request.  They are :class:`VerbsQueuePair` objects
  too (``passive``), because a channel server initiates WRITE_WITH_IMM on them.

WRITE_WITH_IMM: RC QPs are bidirectional, so every QP (client and server side)
keeps a pool of zero-length receive WRs posted (``rq_depth``, from ``sq_depth``)
that ``rv_worker_poll`` refills in C, below half, with one chained
``ibv_post_recv``; arrivals come back as the worker batch's ``rx_conn/rx_imm``
arrays and :meth:`VerbsQueuePair._on_imm` hands each immediate to its router
(``Endpoint._route_imm`` or ``_Session.route_imm``).

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
import importlib
import itertools
import logging
import os
import secrets
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np

from ._errors import (
    ClosedError,
    EndpointBrokenError,
    ProtocolError,
    RemoteAccessError,
    TimeoutError,
    TransportUnavailableError,
    UsageError,
    error_for_status,
)
from ._keys import Access, RemoteKey
from ._progress import Worker
from ._wire import Op, Status

if TYPE_CHECKING:
    from ._endpoint import Endpoint
    from ._engine import Engine
    from ._progress import CompletionSink
    from ._region import MemoryRegion

__all__ = [
    "ServerSession",
    "VerbsContext",
    "VerbsQueuePair",
    "VerbsWorker",
    "check_remote",
    "check_remote_batch",
    "open_verbs_endpoint",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

BUILT_WITHOUT = ("rdmaio was built without libibverbs headers "
                 "(apt-get install libibverbs-dev, then reinstall rdmaio)")

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

_NEEDS = {Op.READ: Access.READ, Op.READ_BATCH: Access.READ, Op.WRITE: Access.WRITE,
          Op.WRITE_BATCH: Access.WRITE, Op.WRITE_IMM: Access.WRITE, Op.FETCH_ADD: Access.ATOMIC,
          Op.CMP_SWAP: Access.ATOMIC}
_RV_OP = {Op.READ: 1, Op.READ_BATCH: 1, Op.WRITE: 2, Op.WRITE_BATCH: 2, Op.FETCH_ADD: 3, Op.CMP_SWAP: 4}

_ext: tuple[Any, Any] | None = None


def _load() -> tuple[Any, Any]:
    """The verbs extension's ``(ffi, lib)``, imported on first use."""
    global _ext
    if _ext is None:
        try:
            mod = importlib.import_module("rdmaio._native._rdmaio_verbs")
        except ModuleNotFoundError:
            raise TransportUnavailableError(BUILT_WITHOUT) from None
        except ImportError as exc:
            raise TransportUnavailableError(
                f"libibverbs could not be loaded ({exc}); apt-get install libibverbs1 ibverbs-providers") from None
        _ext = (mod.ffi, mod.lib)
    return _ext


def unavailable_reason() -> str | None:
    """``None`` if an RDMA device with an ACTIVE port exists, else why verbs cannot run."""
    try:
        ffi, lib = _load()
    except TransportUnavailableError as exc:
        return str(exc)
    info = ffi.new("char[1024]")
    n = lib.rv_probe(info, 1024)
    if n > 0:
        return None
    if n < 0:
        return (f"no active RDMA device (ibv_get_device_list found none: {os.strerror(-n)}; "
                "this kernel has no RDMA stack loaded — try modprobe rdma_rxe / your NIC's driver)")
    found = ffi.string(info).decode(errors="replace")
    return "no active RDMA device (ibv_get_device_list found none" + (f" ACTIVE; devices: {found})" if found else ")")


# -- local checks against a remote key -----------------------------------------------

def _refuse(status: Status, what: str) -> RemoteAccessError:
    exc = error_for_status(int(status), what)
    return type(exc)(f"{exc} (checked locally against the remote key)", int(status))


def check_remote(op: Op, what: str, key: RemoteKey, offset: int, length: int) -> None:
    """Raise what the target would: access rights, bounds, atomic alignment (before posting)."""
    need = _NEEDS.get(op)
    if need is not None and not key.access & need:
        raise _refuse(Status.ACCESS, what)
    if offset > key.length or length > key.length - offset:
        raise _refuse(Status.BOUNDS, what)
    if need is Access.ATOMIC and (key.addr + offset) % 8:
        raise _refuse(Status.ALIGN, what)


def check_remote_batch(op: Op, what: str, key: RemoteKey, offsets: np.ndarray, lengths: np.ndarray) -> None:
    """:func:`check_remote` for ``uint64`` arrays: one bad entry refuses the whole batch."""
    need = _NEEDS.get(op)
    if need is not None and not key.access & need:
        raise _refuse(Status.ACCESS, what)
    limit = np.uint64(key.length)
    if bool(np.any((offsets > limit) | (lengths > limit - np.minimum(offsets, limit)))):
        raise _refuse(Status.BOUNDS, what)


# -- engine-level context ------------------------------------------------------------

def check_device_args(device: Any, port: Any, gid_index: Any) -> None:
    """UsageError unless ``Engine(device=, port=, gid_index=)`` are None or plausible."""
    if device is not None and (not isinstance(device, str) or not device or len(device) > 63 or "\0" in device):
        raise UsageError("device must be a non-empty RDMA device name such as 'mlx5_0' or 'rxe0'")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 255):
        raise UsageError("port must be an int in 1..255")
    if gid_index is not None and (not isinstance(gid_index, int) or isinstance(gid_index, bool)
                                  or not 0 <= gid_index <= 4095):
        raise UsageError("gid_index must be an int in 0..4095")


def _as_int(v: Any, lo: int, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"bad {what} in the queue-pair attributes: {v!r}")
    return v


def _parse_qp_attrs(raw: Any, n: int) -> list[dict[str, Any]]:
    """Validate the peer's ``[{qpn, psn, gid, lid, mtu}]`` list (ProtocolError if malformed)."""
    if not isinstance(raw, list) or len(raw) != n:
        raise ProtocolError(f"expected {n} queue-pair attribute maps")
    out = []
    for a in raw:
        if not isinstance(a, dict):
            raise ProtocolError("queue-pair attributes must be maps")
        gid = a.get("gid")
        if not isinstance(gid, bytes) or len(gid) != 16:
            raise ProtocolError("queue-pair gid must be 16 bytes")
        out.append({
            "qpn": _as_int(a.get("qpn"), 1, 0xFFFFFF, "qpn"),
            "psn": _as_int(a.get("psn"), 0, 0xFFFFFF, "psn"),
            "lid": _as_int(a.get("lid", 0), 0, 0xFFFF, "lid"),
            "mtu": _as_int(a.get("mtu", 0), 0, 5, "mtu"),
            "gid": gid,
        })
    return out


class VerbsContext:
    """Device, port, GID, PD and the registration cache of one engine."""

    def __init__(self, device: str | None = None, port: int | None = None, gid_index: int | None = None) -> None:
        check_device_args(device, port, gid_index)
        reason = unavailable_reason()
        if reason is not None:
            raise TransportUnavailableError(f"transport 'verbs' unavailable: {reason}")
        ffi, lib = _load()
        self._ffi, self._lib = ffi, lib
        err = ffi.new("char[256]")
        c = lib.rv_open(device.encode() if device else ffi.NULL, port or 0,
                        -1 if gid_index is None else gid_index, err, 256)
        if c == ffi.NULL:
            raise TransportUnavailableError(
                f"transport 'verbs' unavailable: {ffi.string(err).decode(errors='replace')}")
        self.c = c
        self.device = ffi.string(c.name).decode()
        self.port = int(c.port)
        self.gid_index = int(c.gid_index)
        self.gid = bytes(ffi.buffer(c.gid, 16))
        self.lid = int(c.lid)
        self.mtu = int(c.active_mtu)
        self.max_msg = max(4096, min(int(c.max_msg_sz), 1 << 30))
        #: send-queue depth in WRs; a chunk (one doorbell) chains at most half of it
        self.sq_wrs = max(16, min(int(c.max_qp_wr), 2048))
        self.chunk_wrs = self.sq_wrs // 2
        self.rd_atomic = max(1, min(int(c.max_qp_rd_atom), int(c.max_qp_init_rd_atom), 16))
        self.cqe = max(256, min(int(c.max_cqe), 65536))
        self.atomics = int(c.atomic_cap) != 0
        self._cache: dict[tuple[int, int, int], list[Any]] = {}  # key -> [rv_mr, refs]
        self._ping = np.zeros(1, dtype=np.uint64)
        self._ping_addr = int(self._ping.ctypes.data)
        self._ping_rkey = self.register(self._ping_addr, 8, Access.READ)[1]
        self._closed = False

    def __repr__(self) -> str:
        return f"<VerbsContext {self.device} port {self.port} gid[{self.gid_index}]>"

    # memory --------------------------------------------------------------------
    def register(self, addr: int, length: int, access: Access) -> tuple[int, int]:
        """``(lkey, rkey)`` for the range; registering the same range+access again only counts a reference."""
        k = (addr, length, int(access))
        ent = self._cache.get(k)
        if ent is not None:
            ent[1] += 1
            return int(ent[0].lkey), int(ent[0].rkey)
        errp = self._ffi.new("int *")
        m = self._lib.rv_reg(self.c, addr, length, int(access), errp)
        if m == self._ffi.NULL:
            code = int(errp[0])
            hint = " (raise the locked-memory limit: ulimit -l unlimited)" if code in (12, 1, 14) else ""
            raise UsageError(f"ibv_reg_mr of {length} bytes failed: {os.strerror(code)}{hint}")
        self._cache[k] = [m, 1]
        return int(m.lkey), int(m.rkey)

    def unregister(self, addr: int, length: int, access: Access) -> None:
        """Drop one reference; the NIC registration goes with the last one."""
        k = (addr, length, int(access))
        ent = self._cache.get(k)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] <= 0:
            del self._cache[k]
            self._lib.rv_dereg(ent[0])

    def close(self) -> None:
        """Deregister everything and release the PD and device (after QPs and workers are gone)."""
        if self._closed:
            return
        self._closed = True
        for m, _ in self._cache.values():
            self._lib.rv_dereg(m)
        self._cache.clear()
        self._lib.rv_close(self.c)
        self.c = None

    # queue pairs -------------------------------------------------------------------
    def qp_attrs(self, qpn: int, psn: int) -> dict[str, Any]:
        return {"qpn": qpn, "psn": psn, "gid": self.gid, "lid": self.lid, "mtu": self.mtu}

    def connect_qp(self, q: Any, remote: dict[str, Any], my_psn: int) -> None:
        """INIT -> RTR -> RTS towards ``remote`` (path MTU: the smaller active MTU)."""
        ffi, lib = self._ffi, self._lib
        mtu = min(self.mtu, remote["mtu"]) if remote["mtu"] else self.mtu
        gid = ffi.new("uint8_t[16]", remote["gid"])
        rc = lib.rv_qp_rtr(q, remote["qpn"], remote["psn"], gid, remote["lid"], mtu)
        if rc:
            raise EndpointBrokenError(f"queue pair to RTR failed: {os.strerror(-rc)}")
        rc = lib.rv_qp_rts(q, my_psn)
        if rc:
            raise EndpointBrokenError(f"queue pair to RTS failed: {os.strerror(-rc)}")

    def rq_depth(self, sq_depth: int) -> int:
        """Receive WRs kept posted per QP: ``sq_depth`` (the peer's operations in flight per QP
        with equal settings), at least 64, at most what the device allows."""
        return max(64, min(sq_depth, int(self.c.max_qp_wr)))

    def new_qp(self, worker: VerbsWorker, conn_id: int, max_wr: int, rq_depth: int) -> Any:
        errp = self._ffi.new("int *")
        q = self._lib.rv_qp_new(self.c, worker.c, conn_id, max_wr, rq_depth, self.rd_atomic, errp)
        if q == self._ffi.NULL:
            raise EndpointBrokenError(f"ibv_create_qp failed: {os.strerror(int(errp[0]))}")
        return q

    def accept(self, hello: dict[str, Any], nqp: int, engine: Engine) -> ServerSession:
        """Listener side of the handshake: QPs connected to the client's (ProtocolError if malformed)."""
        return ServerSession(self, _parse_qp_attrs(hello.get("qps"), nqp), engine)


# -- progress ---------------------------------------------------------------------------

class VerbsWorker(Worker):
    """A worker whose completion source is a completion channel + CQ (``rv_worker``).

    Thread mode blocks in ``poll()`` on the channel fd and a wake eventfd with the GIL
    released; loop mode registers the (non-blocking) channel fd with ``add_reader``.
    Either way a round acks channel events in batches, re-arms the CQ and polls it
    once more after re-arming, so no completion is left behind without an event.
    """

    _has_rx = True  # WRITE_WITH_IMM arrivals: rx_conn / rx_imm, filled by rv_worker_poll

    def __init__(self, index: int, sink: CompletionSink, mode: str, loop: asyncio.AbstractEventLoop,
                 vctx: VerbsContext, cq_depth: int = 4096) -> None:
        self._vctx = vctx
        self._lib = vctx._lib
        super().__init__(index, sink, mode, loop, cq_depth)

    def _native_new(self, cq_depth: int) -> Any:
        c = self._lib.rv_worker_new(self._vctx.c, cq_depth, self._vctx.cqe)
        if c == self._vctx._ffi.NULL:
            raise OSError("could not create a completion channel and CQ")
        return c

    def _native_poll(self, timeout_ms: int) -> int:
        return int(self._lib.rv_worker_poll(self.c, timeout_ms))

    def _native_backlog(self) -> bool:
        return bool(self._lib.rv_worker_backlog(self.c))

    def _native_wake(self) -> None:
        self._lib.rv_worker_wake(self.c)

    def _native_free(self) -> None:
        self._lib.rv_worker_free(self.c)

    def _fd(self) -> int:
        return int(self.c.fd)


# -- initiator queue pair -------------------------------------------------------------------

class _Req:
    __slots__ = ("fut", "mr", "keep", "what", "left", "timer", "value")

    def __init__(self, fut: asyncio.Future[int], mr: MemoryRegion | None, keep: Any, what: str) -> None:
        self.fut = fut
        self.mr = mr
        self.keep = keep
        self.what = what
        self.left = 0
        self.timer: asyncio.TimerHandle | None = None
        self.value = 0


class _Chunk:
    """One doorbell's worth of a request: kind 0 contiguous r/w, 1 batch r/w, 2 atomic, 3 ping,
    4 write ending in WRITE_WITH_IMM."""

    __slots__ = ("req", "kind", "args", "nwr", "slot")

    def __init__(self, req: _Req, kind: int, args: tuple[Any, ...], nwr: int, slot: int = -1) -> None:
        self.req = req
        self.kind = kind
        self.args = args
        self.nwr = nwr
        self.slot = slot


class VerbsQueuePair:
    """One RC queue pair (owned by one worker) with TcpQueuePair's initiator interface.

    ``passive``: the listener's side of a session.  It initiates only channel writes;
    the client drives recovery (``qp_reset``), so an error completion here fails what
    is in flight and marks the QP broken until :meth:`revive` after the reset.
    """

    #: receives every WRITE_WITH_IMM immediate that lands through this QP (set by the owner)
    on_imm: Callable[[int], None] | None = None

    def __init__(self, vctx: VerbsContext, loop: asyncio.AbstractEventLoop, conn_id: int, index: int,
                 worker: VerbsWorker, depth: int, op_timeout: float | None,
                 on_broken: Callable[[BaseException], None], passive: bool = False) -> None:
        self._v = vctx
        self._lib = vctx._lib
        self._ffi = vctx._ffi
        self._loop = loop
        self.conn_id = conn_id
        self.index = index
        self._depth = depth
        self._op_timeout = op_timeout
        self._on_broken = on_broken
        self._passive = passive
        self._q = vctx.new_qp(worker, conn_id, vctx.sq_wrs, vctx.rq_depth(depth))
        self.qpn = int(self._q.qpn)
        self._scratch = np.zeros(depth, dtype=np.uint64)  # atomic results, ping target
        self._scratch_addr = int(self._scratch.ctypes.data)
        try:
            self._scratch_lkey = vctx.register(self._scratch_addr, self._scratch.nbytes, Access.NONE)[0]
        except BaseException:
            self._lib.rv_qp_free(self._q)
            raise
        self._slots = list(range(depth - 1, -1, -1))
        self._seq = itertools.count(1)
        self._conn_hi = conn_id << 32
        self._credits = vctx.sq_wrs
        self._max_msg = vctx.max_msg
        self._chunk_wrs = vctx.chunk_wrs
        self._pending: dict[int, _Chunk] = {}
        self._backlog: collections.deque[_Chunk] = collections.deque()
        self._flushed: list[_Chunk] = []
        self._nreq = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._recovering = False
        self._recovery: asyncio.Task[None] | None = None
        self._remote: dict[str, Any] | None = None
        self._ping: tuple[int, int] = (0, 0)
        #: the endpoint's control request function (set once the endpoint exists)
        self._control: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
        self.recoveries = 0
        self.broken: BaseException | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<VerbsQueuePair qpn={self.qpn} in_flight={self._nreq}>"

    # -- setup -----------------------------------------------------------------------
    def connect(self, remote: dict[str, Any], my_psn: int, ping: tuple[int, int]) -> None:
        self._remote = remote
        self._ping = ping
        self._v.connect_qp(self._q, remote, my_psn)

    @property
    def in_flight(self) -> int:
        return self._nreq

    @property
    def rq_posted(self) -> int:
        """Receive WRs currently posted (diagnostics)."""
        return int(self._lib.rv_qp_rq_posted(self._q)) if self._q is not None else 0

    def _on_imm(self, imm: int) -> None:
        """A WRITE_WITH_IMM landed through this QP (called by Engine._on_batch)."""
        if self.on_imm is not None:
            self.on_imm(imm)

    @property
    def _free(self) -> bool:
        return self._nreq < self._depth

    # -- posting ---------------------------------------------------------------------
    async def wait_slot(self) -> None:
        while self._nreq >= self._depth:
            self._check()
            fut = self._loop.create_future()
            self._slot_waiters.append(fut)
            await fut
        self._check()

    def _check(self) -> None:
        if self.broken is not None:
            raise EndpointBrokenError(f"endpoint is broken: {self.broken}") from self.broken
        if self._closed:
            raise ClosedError("endpoint is closed")

    def post(self, op: Op, key: Any, remote: int, arg0: int, arg1: int, local: int,
             mr: MemoryRegion | None, what: str) -> asyncio.Future[int]:
        """One read/write/atomic/ping; ``key`` is the :class:`RemoteKey` (checked by the endpoint)."""
        self._check()
        fut: asyncio.Future[int] = self._loop.create_future()
        req = _Req(fut, mr, None, what)
        if op is Op.WRITE_IMM:  # arg0 = length, arg1 = immediate; data chunks first, the imm last
            length = arg0
            lkey = mr._key & 0xFFFFFFFF if mr is not None else 0
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
            if length == 0:
                fut.set_result(0)
                return fut
            lkey = mr._key & 0xFFFFFFFF if mr is not None else 0
            rop = _RV_OP[op]
            span = self._max_msg * self._chunk_wrs
            chunks = []
            raddr = key.addr + remote
            for lo in range(0, length, span):
                n = min(span, length - lo)
                chunks.append(_Chunk(req, 0, (rop, raddr + lo, n, local + lo, key.rkey, lkey),
                                     -(-n // self._max_msg)))
        elif op is Op.FETCH_ADD or op is Op.CMP_SWAP:
            slot = self._slots.pop()
            chunks = [_Chunk(req, 2, (_RV_OP[op], key.addr + remote, key.rkey, arg0, arg1), 1, slot)]
        elif op is Op.NOP:
            slot = self._slots.pop()
            chunks = [_Chunk(req, 3, (), 1, slot)]
        else:
            raise UsageError(f"operation {op!r} is not a single operation")
        self._start(req, chunks)
        return fut

    def post_batch(self, op: Op, key: Any, remote: np.ndarray, lengths: np.ndarray, local: np.ndarray,
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
        req = _Req(fut, mr, (remote, lengths, local), what)
        args = (_RV_OP[op], key.addr, key.rkey, mr._key & 0xFFFFFFFF)
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
        self._nreq += 1
        req.left = len(chunks)
        if req.mr is not None:
            req.mr._pin()
        if self._op_timeout is not None:
            req.timer = self._loop.call_later(self._op_timeout, self._expire, req)
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
        self._pending[wr] = ch
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
        if ch.slot >= 0:
            if exc is None:
                req.value = int(self._scratch[ch.slot])
            if self.broken is None and not self._closed:
                self._slots.append(ch.slot)
            ch.slot = -1
        if exc is not None and not req.fut.done():
            req.fut.set_exception(exc)
        req.left -= 1
        if req.left > 0:
            return
        self._nreq -= 1
        if req.timer is not None:
            req.timer.cancel()
        if req.mr is not None:
            req.mr._unpin()
        req.keep = None
        if not req.fut.done():
            req.fut.set_result(req.value)
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(None)
                break

    def _complete(self, wr: int, status: int, value: int) -> None:
        ch = self._pending.pop(wr, None)
        if ch is None:
            return  # a flush of an unsignalled WR of a finished chunk, or a stale completion
        if status == WC_SUCCESS:
            self._credits += ch.nwr
            self._chunk_done(ch, None)
            if self._backlog:
                self._pump()
            return
        if self.broken is not None or self._closed:
            err = (type(self.broken)(str(self.broken)) if self.broken is not None
                   else ClosedError("endpoint closed"))
            self._chunk_done(ch, err)
            return
        if self._passive:  # the client resets this QP (qp_reset): fail what is in flight until then
            self._pending[wr] = ch
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
        self._pending[wr] = ch
        self._die(EndpointBrokenError(f"{ch.req.what} failed: {_WC_NAMES.get(status, f'status {status}')}"))

    def _expire(self, req: _Req) -> None:
        if not req.fut.done():
            # the transfer may still land: the memory stays pinned until it does
            req.fut.set_exception(TimeoutError(f"{req.what} did not complete within {self._op_timeout} s"))

    def _on_dead(self, code: int) -> None:
        self._die(EndpointBrokenError(f"queue pair error event {code}"))

    def revive(self) -> None:
        """Passive side, after the QP went through RESET (the NIC touches none of its buffers):
        fail whatever was still in flight and accept new work again."""
        if self._closed:
            return
        err = EndpointBrokenError("the queue pair was reset while the operation was in flight")
        pending = list(self._pending.values())
        self._pending.clear()
        self.broken = None
        for ch in pending:
            self._chunk_done(ch, err)
        self._fail_unposted(err)
        self._credits = self._v.sq_wrs
        self._slots = list(range(self._depth - 1, -1, -1))

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
            while self._pending:  # every posted chunk reports: success, error or flush
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
            peer_psn = _as_int(reply.get("psn"), 0, 0xFFFFFF, "psn")
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
    def _die(self, exc: BaseException) -> None:
        if self.broken is not None or self._closed:
            return
        self.broken = exc
        self._lib.rv_qp_error(self._q)  # outstanding WRs flush; the NIC stops touching memory
        self._fail_unposted(exc)
        for ch in self._pending.values():  # memory stays pinned until the flush (or close)
            if not ch.req.fut.done():
                ch.req.fut.set_exception(type(exc)(str(exc)))
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_exception(type(exc)(str(exc)))
        self._on_broken(exc)

    def _fail_unposted(self, exc: BaseException) -> None:
        rest = list(self._backlog) + self._flushed
        self._backlog.clear()
        self._flushed = []
        for ch in rest:
            self._chunk_done(ch, type(exc)(str(exc)))

    def close(self, exc: BaseException | None = None) -> None:
        """Destroy the QP (the NIC no longer touches any buffer), fail what is still pending."""
        if self._closed:
            return
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
        self._lib.rv_qp_free(self._q)
        self._q = None
        err = exc or ClosedError("endpoint closed with the operation in flight")
        self._fail_unposted(err)
        pending = list(self._pending.values())
        self._pending.clear()
        for ch in pending:
            self._chunk_done(ch, type(err)(str(err)))
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_exception(type(err)(str(err)))
        self._v.unregister(self._scratch_addr, self._scratch.nbytes, Access.NONE)


# -- target side -----------------------------------------------------------------------------

class ServerSession:
    """The listener's QPs for one client session.

    The NIC serves the client's one-sided requests on them without Python.  They
    are passive :class:`VerbsQueuePair` objects registered in ``engine._conns``:
    their receive queues take the client's WRITE_WITH_IMM (routed to ``on_imm``,
    set by the listener's session) and channel servers post WRITE_WITH_IMM towards
    the client on them (QP ``i`` is connected to the client's QP ``i``).
    """

    def __init__(self, vctx: VerbsContext, client_qps: list[dict[str, Any]], engine: Engine) -> None:
        self._v = vctx
        self._engine = engine
        self._client = client_qps
        self.qps: list[VerbsQueuePair] = []
        self.attrs: list[dict[str, Any]] = []
        loop = engine._loop
        assert loop is not None
        workers = engine._workers
        try:
            for i, remote in enumerate(client_qps):
                w = workers[i % len(workers)]
                assert isinstance(w, VerbsWorker)
                qp = VerbsQueuePair(vctx, loop, engine._new_conn_id(), i, w, engine._sq_depth, engine._op_timeout,
                                    lambda exc: None, passive=True)
                self.qps.append(qp)
                engine._conns[qp.conn_id] = qp
                psn = secrets.randbits(24)
                vctx.connect_qp(qp._q, remote, psn)
                self.attrs.append(vctx.qp_attrs(qp.qpn, psn))
        except BaseException:
            self.close()
            raise

    def welcome_fields(self) -> dict[str, Any]:
        return {"qps": self.attrs, "ping": [self._v._ping_addr, self._v._ping_rkey]}

    def reset(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer a client's ``qp_reset``: RESET -> INIT (fresh receives) -> RTR (its new PSN) -> RTS (ours)."""
        i = msg.get("qp")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.qps):
            raise ProtocolError(f"qp_reset names no queue pair: {i!r}")
        client_psn = _as_int(msg.get("psn"), 0, 0xFFFFFF, "psn")
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

    def close(self) -> None:
        for qp in self.qps:
            self._engine._conns.pop(qp.conn_id, None)
            qp.close()
        self.qps.clear()


# -- client handshake ---------------------------------------------------------------------------

async def open_verbs_endpoint(engine: Engine, host: str, port: int) -> Endpoint:
    """Create the QPs, exchange their attributes in hello/welcome, connect them, build the endpoint."""
    from ._endpoint import Endpoint, _dial

    loop = asyncio.get_running_loop()
    vctx = engine._verbs
    assert vctx is not None
    workers = engine._workers
    qps: list[VerbsQueuePair] = []
    ctl = None
    try:
        for i in range(engine._nqp):
            conn_id = engine._new_conn_id()
            w = workers[i % len(workers)]
            assert isinstance(w, VerbsWorker)
            qps.append(VerbsQueuePair(vctx, loop, conn_id, i, w, engine._sq_depth, engine._op_timeout,
                                      lambda exc: None))
        psns = [secrets.randbits(24) for _ in qps]
        hello = {"t": "hello", "v": 1, "transport": "verbs", "nqp": len(qps), "hb": engine._heartbeat,
                 "qps": [vctx.qp_attrs(qp.qpn, psn) for qp, psn in zip(qps, psns)]}
        ctl, codec, welcome = await _dial(loop, host, port, hello, "welcome", secret=engine._secret)
        remote = _parse_qp_attrs(welcome.get("qps"), len(qps))
        ping = welcome.get("ping")
        if not (isinstance(ping, list) and len(ping) == 2 and all(isinstance(x, int) for x in ping)):
            raise ProtocolError("welcome lacks the ping region")
        for qp, r, psn in zip(qps, remote, psns):
            qp.connect(r, psn, (ping[0] & ((1 << 64) - 1), ping[1] & 0xFFFFFFFF))
        ep = Endpoint(engine, (host, port), ctl, codec, [], qps=qps)
    except BaseException:
        for qp in qps:
            qp.close()
        if ctl is not None:
            ctl.close()
        raise
    for qp in qps:
        qp._on_broken = ep._on_broken
        qp._control = ep._request
        qp.on_imm = ep._route_imm  # the server's channel writes land through our QPs
    return ep
