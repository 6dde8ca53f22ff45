"""The verbs device layer: the optional libibverbs extension, one device context per NIC
(device/port/GID choice, protection domain, registration cache), the workers (completion
channel + CQ, a thread domain where the device has them, busy polling), and the local
checks of remote keys.  Used by :mod:`rdmaio.transports.verbs`.

Importing this module loads nothing: the ``_rdmaio_verbs`` extension is imported on
first use (:func:`unavailable_reason`, :class:`VerbsContext`).
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import os
from typing import Any

import numpy as np

from .._errors import (
    EndpointBrokenError,
    ProtocolError,
    RemoteAccessError,
    TransportUnavailableError,
    UsageError,
    error_for_status,
)
from .._keys import Access, RemoteKey
from .._progress import CompletionSink, Worker
from .._wire import Op, Status

__all__ = [
    "VerbsContext",
    "VerbsWorker",
    "check_device_args",
    "check_remote",
    "check_remote_batch",
    "parse_qp_attrs",
    "unavailable_reason",
]

BUILT_WITHOUT = ("rdmaio was built without libibverbs headers "
                 "(apt-get install libibverbs-dev, then reinstall rdmaio)")

_NEEDS = {Op.READ: Access.READ, Op.READ_BATCH: Access.READ, Op.WRITE: Access.WRITE,
          Op.WRITE_BATCH: Access.WRITE, Op.WRITE_IMM: Access.WRITE, Op.FETCH_ADD: Access.ATOMIC,
          Op.CMP_SWAP: Access.ATOMIC}

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


#: the access bit each operation needs, as plain ints (IntFlag's ``&`` runs Python code)
_NEED_BITS = {int(op): int(a) for op, a in _NEEDS.items()}
_ATOMIC = int(Access.ATOMIC)


def check_remote(op: Op, what: str, key: RemoteKey, offset: int, length: int) -> None:
    """Raise what the target would: access rights, bounds, atomic alignment (before posting)."""
    need = _NEED_BITS.get(op, 0)
    if need and not int(key.access) & need:
        raise _refuse(Status.ACCESS, what)
    if offset > key.length or length > key.length - offset:
        raise _refuse(Status.BOUNDS, what)
    if need == _ATOMIC and (key.addr + offset) % 8:
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

def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_device_args(device: Any, port: Any, gid_index: Any) -> None:
    """UsageError unless ``Engine(device=, port=, gid_index=)`` are None or plausible.

    ``device`` may name several devices (a tuple of distinct names); ``port`` and
    ``gid_index`` are then one value for all of them or a tuple with one per device.
    """
    names = device if isinstance(device, tuple) else (device,)
    if not names or (isinstance(device, tuple) and len(set(names)) != len(names)):
        raise UsageError("device must name one RDMA device or several distinct ones")
    for d in names:
        if d is not None and (not isinstance(d, str) or not d or len(d) > 63 or "\0" in d):
            raise UsageError("device must be a non-empty RDMA device name such as 'mlx5_0' or 'rxe0' "
                             "(or a list of such names)")
    if isinstance(device, tuple) and None in names:
        raise UsageError("a list of devices must name every device")
    for what, v, hi in (("port", port, 255), ("gid_index", gid_index, 4095)):
        lo = 1 if what == "port" else 0
        if isinstance(v, tuple):
            if not isinstance(device, tuple) or len(v) != len(names):
                raise UsageError(f"a list of {what} values needs a list of devices of the same length")
            if not all(_is_int(x, lo, hi) for x in v):
                raise UsageError(f"every {what} must be an int in {lo}..{hi}")
        elif v is not None and not _is_int(v, lo, hi):
            raise UsageError(f"{what} must be an int in {lo}..{hi}")


def as_int(v: Any, lo: int, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"bad {what} in the queue-pair attributes: {v!r}")
    return v


def parse_qp_attrs(raw: Any, n: int) -> list[dict[str, Any]]:
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
            "qpn": as_int(a.get("qpn"), 1, 0xFFFFFF, "qpn"),
            "psn": as_int(a.get("psn"), 0, 0xFFFFFF, "psn"),
            "lid": as_int(a.get("lid", 0), 0, 0xFFFF, "lid"),
            "mtu": as_int(a.get("mtu", 0), 0, 5, "mtu"),
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
        self.comp_vectors = int(c.num_comp_vectors)
        self.addresses = self._gid_addresses()
        self._cache: dict[tuple[int, int, int], list[Any]] = {}  # key -> [rv_mr, refs]
        self._ping = np.zeros(1, dtype=np.uint64)
        self._ping_addr = int(self._ping.ctypes.data)
        self._ping_rkey = self.register(self._ping_addr, 8, Access.READ)[1]
        self._closed = False

    def __repr__(self) -> str:
        return f"<VerbsContext {self.device} port {self.port} gid[{self.gid_index}]>"

    def _gid_addresses(self) -> frozenset[str]:
        """The IP addresses in the port's GID table (RoCE: IPv4-mapped and IPv6 GIDs): how the
        engine tells which device reaches a peer (the kernel's source address for it)."""
        ffi, lib = self._ffi, self._lib
        out: set[str] = set()
        buf = ffi.new("uint8_t[16]")
        for i in range(min(int(self.c.gid_tbl_len), 256)):
            if lib.rv_gid(self.c, i, buf) != 0:
                continue
            raw = bytes(ffi.buffer(buf, 16))
            if not any(raw) or raw[:2] == b"\xfe\x80":  # empty, or link-local (not an address peers use)
                continue
            a = ipaddress.IPv6Address(raw)
            out.add(str(a.ipv4_mapped) if a.ipv4_mapped is not None else str(a))
        return frozenset(out)

    def lkey(self, addr: int, length: int, access: Access) -> int:
        """The local key of a range registered here (KeyError if it is not)."""
        return int(self._cache[(addr, length, int(access))][0].lkey)

    def rkey(self, addr: int, length: int, access: Access) -> int:
        """The remote key of a range registered here (KeyError if it is not)."""
        return int(self._cache[(addr, length, int(access))][0].rkey)

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


# -- progress ---------------------------------------------------------------------------

#: rv_worker_new flag: try a thread domain + parent domain
WORKER_TD = 1
_DOMAIN_CALLS = {1: "ibv_alloc_td", 2: "ibv_alloc_parent_domain", 3: "ibv_create_cq_ex in the parent domain"}
#: busy polls a worker skips, at most, after polls that found nothing (doubling per miss)
MAX_SPIN_SKIP = 64


class VerbsWorker(Worker):
    """A worker whose completion source is a completion channel + CQ (``rv_worker``).

    Thread mode blocks in ``poll()`` on the channel fd and a wake eventfd with the GIL
    released; loop mode registers the (non-blocking) channel fd with ``add_reader``.
    Either way a round acks channel events in batches, re-arms the CQ and polls it
    once more after re-arming, so no completion is left behind without an event.

    Each worker asks for its own thread domain and parent domain (its QPs and CQ are
    then used by one thread at a time, and the provider may drop their locks and give
    it a doorbell of its own); where the device has none (``rxe``: EOPNOTSUPP) its
    QPs use the engine's PD and :attr:`domain` says why.  Its CQ uses completion
    vector ``index % comp_vectors`` and is single-threaded where the provider allows.
    """

    _has_rx = True  # WRITE_WITH_IMM arrivals: rx_conn / rx_imm, filled by rv_worker_poll

    def __init__(self, index: int, sink: CompletionSink, mode: str, loop: asyncio.AbstractEventLoop,
                 vctx: VerbsContext, cq_depth: int = 4096, cpus: frozenset[int] | None = None,
                 thread_domain: bool = True) -> None:
        self._vctx = vctx
        self._lib = vctx._lib
        self._want_td = thread_domain
        self._spin_skip = 0  # busy polls still to skip after misses
        self._spin_miss = 0
        self._rearm_pending = False  # a hit left the CQ un-armed: _rearm is scheduled on the loop
        super().__init__(index, sink, mode, loop, cq_depth, cpus)

    @property
    def device(self) -> str:
        return self._vctx.device

    @property
    def domain(self) -> str:
        """``"thread domain"`` when the worker has one, else why not (``"engine PD: ibv_alloc_td: ..."``)."""
        c = self.c
        if c is None:
            return "freed"
        if c.domain:
            return "thread domain"
        if not self._want_td:
            return "engine PD (thread domains not asked for)"
        call = _DOMAIN_CALLS.get(int(c.domain_call), "?")
        return f"engine PD ({call}: {os.strerror(int(c.domain_errno))})"

    def info(self) -> dict[str, Any]:
        c = self.c
        return {"thread_domain": bool(c.domain), "domain": self.domain, "single_threaded_cq": bool(c.cq_single),
                "comp_vector": int(c.comp_vector), "busy_polls": int(c.spins), "busy_poll_hits": int(c.spin_hits),
                "busy_poll_us": int(c.spin_ns) / 1000.0}

    def _native_new(self, cq_depth: int) -> Any:
        vc = self._vctx
        c = self._lib.rv_worker_new(vc.c, cq_depth, vc.cqe, self.index % max(1, vc.comp_vectors),
                                    WORKER_TD if self._want_td else 0)
        if c == vc._ffi.NULL:
            raise OSError("could not create a completion channel and CQ")
        return c

    def _native_poll(self, timeout_ms: int) -> int:
        return int(self._lib.rv_worker_poll(self.c, timeout_ms))

    def _native_release(self) -> None:
        self._lib.rv_worker_release(self.c)

    def busy_poll(self, budget_us: int, fut: asyncio.Future[Any] | None = None) -> bool:
        """Poll the CQ from the event loop, GIL released, until completions arrive (delivered at
        once, after any the worker thread queued before them) or ``budget_us`` µs have passed.

        Adaptive: after a second poll in a row that found nothing the worker skips the next 1,
        then 2, 4 ... up to :data:`MAX_SPIN_SKIP` requests for one (after each further miss),
        until one finds completions again.
        """
        c = self.c
        if c is None or self._stopping:
            return False
        if self._spin_skip:
            self._spin_skip -= 1
            return False
        sink = self._sink
        seen = c.handoffs
        if self._queue:  # completions the thread already took: perhaps the one awaited
            for b in self._take_queued():
                sink._on_batch(b)
            if fut is not None and fut.done():
                return True
        return self._after_spin(self._lib.rv_worker_spin(c, budget_us, seen))

    def rearm_later(self) -> None:
        """After a busy poll that took its completions: the CQ was left un-armed (the next depth-1
        poll needs no event); arm it once the loop gets back to its other work."""
        if not self._rearm_pending:
            self._rearm_pending = True
            self._loop.call_soon(self._rearm)

    def _rearm(self) -> None:
        self._rearm_pending = False
        c = self.c
        if c is None or self._stopping:
            return
        n = self._lib.rv_worker_rearm(c)
        try:
            mine = self._collect() if n > 0 else None
            earlier = self._take_queued() if self._queue else []
        finally:
            self._lib.rv_worker_release(c)
        self._deliver(earlier)
        if mine is not None:
            self._sink._on_batch(mine)
        elif n < 0:
            self.stop()
            self._sink._on_worker_failed(self.index, -n)

    def _deliver(self, batches: list[Any]) -> None:
        for b in batches:
            self._sink._on_batch(b)

    def _after_spin(self, n: int) -> bool:
        """After ``rv_worker_spin`` returned ``n`` (the poll lock held): copy out what it found,
        release, deliver what the thread queued before it, then its own; back off after a miss."""
        try:
            mine = self._collect() if n > 0 else None
            earlier = self._take_queued() if self._queue else []
        finally:
            self._lib.rv_worker_release(self.c)
        self._deliver(earlier)
        if mine is not None:
            self.rearm_later()
            self._sink._on_batch(mine)
            self._spin_miss = 0
        elif n == 0:  # the budget went by with nothing: back off from the second miss in a row on
            # (one late completion -- the host preempted the NIC's work -- costs that operation alone;
            # backing off at once sent the next 1, 2, 4 ... through the thread, ~10x slower each)
            self._spin_miss = min(self._spin_miss + 1, 8)
            if self._spin_miss > 1:
                self._spin_skip = min(1 << (self._spin_miss - 2), MAX_SPIN_SKIP)
        elif n < -1:
            self.stop()
            self._sink._on_worker_failed(self.index, -n)
        return mine is not None or bool(earlier)

    def _native_backlog(self) -> bool:
        return bool(self._lib.rv_worker_backlog(self.c))

    def _native_wake(self) -> None:
        self._lib.rv_worker_wake(self.c)

    def _native_free(self) -> None:
        self._lib.rv_worker_free(self.c)

    def _fd(self) -> int:
        return int(self.c.fd)
