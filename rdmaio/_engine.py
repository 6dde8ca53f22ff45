"""The engine: the public face of an engine's state (:mod:`rdmaio._core`).

An :class:`Engine` is bound to one running event loop.  It owns

* its transport (:mod:`rdmaio.transports`) and the region table (what remote
  peers may touch),
* ``workers`` progress contexts (:mod:`rdmaio._progress`), each with its own
  completion source, driven by a thread or by the loop,
* the listeners and endpoints it created; closing the engine closes them, joins
  the threads and releases every native object: nothing outlives it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from . import _auth as auth
from ._channel import ChannelHandler
from ._core import Config, Core, creation_site, warn_unclosed
from ._credits import Credits
from ._endpoint import Endpoint, open_endpoint
from ._errors import EndpointBrokenError, TimeoutError, UsageError
from ._keys import Access
from ._listener import Listener
from ._region import MemoryRegion
from .transports.base import TransportOptions

__all__ = ["Engine"]

TransportName = Literal["tcp", "verbs", "auto"]
ProgressMode = Literal["thread", "loop"]
QpChoice = Literal["home", "least_loaded"]


def _cpu_sets(worker_cpus: Any, progress: str) -> tuple[frozenset[int], ...] | None:
    """``Engine(worker_cpus=...)`` validated: one CPU set per worker, each allowed for this process."""
    if worker_cpus is None:
        return None
    if progress != "thread":
        raise UsageError("worker_cpus pins worker threads: it needs progress='thread'")
    if isinstance(worker_cpus, (str, bytes)) or not isinstance(worker_cpus, Iterable):
        raise UsageError("worker_cpus must be a sequence with one CPU (or set of CPUs) per worker")
    allowed = os.sched_getaffinity(0)
    out = []
    for entry in worker_cpus:
        cpus = [entry] if isinstance(entry, int) else list(entry) if isinstance(entry, Iterable) else [entry]
        if not cpus or not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
            raise UsageError(f"worker_cpus entries are CPU numbers or non-empty sets of them, not {entry!r}")
        bad = sorted(set(cpus) - allowed)
        if bad:
            raise UsageError(f"worker_cpus names CPUs this process may not run on: {bad} "
                             f"(allowed: {sorted(allowed)})")
        out.append(frozenset(cpus))
    return tuple(out)


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
        ``device`` may list several NICs (``["mlx5_0", "mlx5_1"]``): each gets its own
        group of ``workers`` workers, memory is registered on all of them, and every
        endpoint (and every session a listener serves) lives on the NIC that reaches
        the peer — the one whose GID table holds the kernel's source address towards
        it (``connect(device=...)`` overrides; the first NIC when none matches).
        ``port``/``gid_index`` are then one value for all or a list with one per device.
    worker_cpus:
        Pins each worker's thread to a CPU (an int) or a set of CPUs, one entry per
        worker (``workers`` x devices, group by group); ``progress="thread"`` only.
        Pick CPUs near the NIC (its NUMA node) and away from the event loop's.
    busy_poll_us:
        verbs, low-latency completions (0, the default: off).  Right after an operation
        is posted on a queue pair that has nothing else in flight (a depth-1 caller),
        the event loop polls that queue pair's completion queue itself, GIL released,
        for up to ``busy_poll_us`` µs.  When the completion arrives in time the awaiting
        task resumes without waking the worker thread or the loop: no thread hand-off.
        Cost: the loop's CPU spins for up to the budget per operation (the worker
        thread still wakes for the completion event), and concurrent callers' single
        operations are busy-polled one after the other.  Adaptive: a worker whose poll
        found nothing skips the next 1, 2, 4 ... 64 requests for one.  See
        ``docs/verbs.md#low-latency-completions``; per endpoint: :attr:`Endpoint.busy_poll_us`.
        The tcp transport ignores it (its worker threads have ``poll_spin_us``).
    qp_choice:
        Which queue pair of an endpoint carries an operation.  ``"home"`` (default):
        always the endpoint's home queue pair, owned by the worker the endpoint was
        placed on when it was created (the least-loaded one then) — a stable
        peer-to-worker mapping.  ``"least_loaded"``: per operation, the queue pair with
        the fewest operations in flight (ties keep the last one used).  Per endpoint:
        :attr:`Endpoint.qp_choice`, which also takes a fixed queue-pair index.
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
        sleeps: under such a steady stream it keeps its core busy.  A worker
        whose next request keeps coming much later (four waits in a row longer
        than 8 x ``poll_spin_us`` after busy rounds) stops spinning until a wait
        is short again.  Use 0 where CPU time matters more than depth-1 latency.
    """

    def __init__(self, transport: TransportName = "auto", workers: int = 2, progress: ProgressMode = "thread", *,
                 qp_per_worker: bool = True, sq_depth: int = 1024, max_regions: int = 4096,
                 op_timeout: float | None = None, connect_timeout: float = 10.0,
                 handshake_timeout: float = 5.0, stripe_bytes: int = 0,
                 socket_buffer: int = 4 << 20, same_host_fast_path: bool = True, poll_spin_us: int = 50,
                 secret: bytes | str | None = None, heartbeat: float = 1.0, dead_peer_timeout: float = 5.0,
                 max_sessions: int = 1024, channel_memory: int = 1 << 30,
                 device: str | Sequence[str] | None = None, port: int | Sequence[int] | None = None,
                 gid_index: int | Sequence[int] | None = None,
                 worker_cpus: Sequence[int | Iterable[int]] | None = None, busy_poll_us: int = 0,
                 qp_choice: QpChoice = "home") -> None:
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise UsageError("workers must be an int in 1..64")
        if progress not in ("thread", "loop"):
            raise UsageError(f"progress must be 'thread' or 'loop', not {progress!r}")
        if not 1 <= sq_depth <= 65536:
            raise UsageError("sq_depth must be in 1..65536")
        if not qp_per_worker and workers > 8:
            raise UsageError("a shared queue pair can be polled by at most 8 workers")
        if heartbeat < 0 or (heartbeat and dead_peer_timeout <= heartbeat):
            raise UsageError("heartbeat must be >= 0 and dead_peer_timeout larger than it")
        if max_sessions < 1:
            raise UsageError("max_sessions must be >= 1")
        if channel_memory < 0:
            raise UsageError("channel_memory must be >= 0")
        if not isinstance(max_regions, int) or not 1 <= max_regions <= 1 << 24:
            raise UsageError("max_regions must be an int in 1..16777216")
        if not 0 <= poll_spin_us <= 10_000:
            raise UsageError("poll_spin_us must be in 0..10000")
        if not isinstance(busy_poll_us, int) or isinstance(busy_poll_us, bool) or not 0 <= busy_poll_us <= 10_000:
            raise UsageError("busy_poll_us must be an int in 0..10000")
        if qp_choice not in ("home", "least_loaded"):
            raise UsageError(f"qp_choice must be 'home' or 'least_loaded', not {qp_choice!r}")
        cpus = _cpu_sets(worker_cpus, progress)
        devs: Any = tuple(device) if isinstance(device, (list, tuple)) else device
        ports: Any = tuple(port) if isinstance(port, (list, tuple)) else port
        gids: Any = tuple(gid_index) if isinstance(gid_index, (list, tuple)) else gid_index
        config = Config(workers=workers, progress=progress, qp_per_worker=qp_per_worker, sq_depth=sq_depth,
                        op_timeout=op_timeout, connect_timeout=connect_timeout, handshake_timeout=handshake_timeout,
                        stripe_bytes=stripe_bytes, socket_buffer=socket_buffer,
                        same_host_fast_path=same_host_fast_path, secret=auth.resolve_secret(secret),
                        heartbeat=float(heartbeat), dead_peer_timeout=float(dead_peer_timeout),
                        max_sessions=max_sessions, channel_memory=channel_memory, worker_cpus=cpus,
                        busy_poll_us=busy_poll_us, qp_choice=qp_choice)
        # opens the transport (verbs: the device) last, once every argument is known to be good
        self._core = Core(config, transport, TransportOptions(
            max_regions=max_regions, poll_spin_us=poll_spin_us, same_host_fast_path=same_host_fast_path,
            device=devs, port=ports, gid_index=gids))
        #: the transport in use ("tcp" or "verbs", also when "auto" chose it)
        self.transport = self._core.transport.name
        self.progress = progress
        self.num_workers = workers
        # never closed: its threads and native memory are released when it is collected, with a warning
        self._site = creation_site()
        self._finalizer = weakref.finalize(self, warn_unclosed, repr(self), self._site, None, self._core.abort)
        self._finalizer.atexit = False

    def __repr__(self) -> str:
        return (f"<Engine transport={self.transport} workers={self.num_workers} progress={self.progress}"
                f"{' closed' if self._core.closed else ''}>")

    @property
    def devices(self) -> list[str]:
        """The NICs of this engine, one worker group each (verbs: device names; tcp: ``["tcp"]``)."""
        return list(self._core.transport.groups)

    def info(self) -> dict[str, Any]:
        """How the engine is laid out, once started: its devices, and per worker its group and
        device, pinned CPUs, the links (endpoints and served sessions) homed on it and, on
        verbs, whether it got a thread domain (else why not, e.g. ``"engine PD (ibv_alloc_td:
        Operation not supported)"`` on rxe), its completion vector, whether its CQ is
        single-threaded, and its busy-poll counts.

        >>> # for w in engine.info()["workers"]: print(w["index"], w["device"], w.get("domain"))
        """
        return self._core.info()

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> Engine:
        """Bind to the running loop and start the workers (``async with`` does this)."""
        core = self._core
        core.check_open()
        if core.loop is not None:
            return self
        loop = asyncio.get_running_loop()
        try:
            core.start(loop)
        except BaseException:
            self.abort()
            raise
        # from now on a finalizer hands the release to the loop (the workers post to it)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, warn_unclosed, repr(self), self._site, loop, core.abort)
        self._finalizer.atexit = False
        return self

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._core.closed

    async def aclose(self) -> None:
        """Close listeners and endpoints (letting in-flight operations drain briefly), then abort. Idempotent."""
        if self._core.closed:
            return
        try:
            for ep in list(self._core.endpoints):
                await ep.aclose()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close everything now; pending operations fail with :class:`ClosedError`. Idempotent."""
        self._finalizer.detach()
        self._core.abort()

    @property
    def failure(self) -> str | None:
        """Why the engine became unusable (a progress worker's poll failed for good), else ``None``.

        When a worker fails, every connection fails with its errno (operations raise
        :class:`EndpointBrokenError`), the listeners stop accepting and ``connect``/``listen``
        raise: peers see this engine go away instead of one that answers its control
        connection but never completes an operation.  Close the engine and start another.

        >>> # if engine.failure: await engine.aclose()  # and start a new one
        """
        return self._core.failure

    # -- memory -----------------------------------------------------------------
    def register(self, buf: Any, access: Access = Access.READ | Access.WRITE) -> MemoryRegion:
        """Register a writable, C-contiguous buffer; ``access`` is what peers may do to it.

        Registering ``Access.NONE`` gives a region usable only as the local side of
        operations.  The engine keeps a reference to the buffer until the region is
        closed and every operation on it has completed.
        """
        self._core.check_open()
        return self._core.regions.register(buf, access)

    def expose(self, name: str, mr: MemoryRegion) -> None:
        """Serve ``mr``'s key to peers that ask for ``name`` (:meth:`Endpoint.remote_key`)."""
        self._core.check_open()
        self._core.regions.expose(name, mr)

    def unexpose(self, name: str) -> None:
        """Stop serving the key of region ``name`` to peers (a no-op for unknown names).

        Peers that already hold the key keep access until the region is
        closed: keys are capabilities.
        """
        self._core.regions.unexpose(name)

    def serve_channel(self, name: str, handler: ChannelHandler) -> None:
        """Run ``await handler(channel)`` for every channel a peer opens as ``name``.

        The channel is closed when the handler returns.  See :class:`Channel`.
        """
        self._core.check_open()
        if not isinstance(name, str) or not name:
            raise UsageError("channel names are non-empty strings")
        if not callable(handler):
            raise UsageError("the channel handler must be an async callable")
        self._core.channel_handlers[name] = handler

    def unserve_channel(self, name: str) -> None:
        """Refuse new channels named ``name`` from now on (a no-op for unknown names).

        Channels already open keep running until their handler returns or
        either side closes them.

        >>> # engine.serve_channel("echo", echo); ...; engine.unserve_channel("echo")
        """
        self._core.channel_handlers.pop(name, None)

    # -- connections ------------------------------------------------------------
    async def listen(self, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 128) -> Listener:
        """Accept peers on ``host:port`` (port 0 picks a free one: see ``listener.port``)."""
        return Listener(self._core, host, port, backlog)

    async def connect(self, host: str, port: int, *, timeout: float | None = None, retries: int = 0,
                      backoff: float = 0.05, max_backoff: float = 2.0, device: str | None = None,
                      credits: Credits | None = None) -> Endpoint:
        """Open an :class:`Endpoint` to a peer engine's listener.

        With ``retries``, a refused or failed attempt is retried after an exponential
        backoff (``backoff`` doubling up to ``max_backoff``, with jitter).  Errors that
        retrying cannot fix (authentication, protocol) are raised at once.  ``device``
        places the endpoint on that NIC of a multi-device engine instead of the one
        that reaches ``host``.

        ``credits``: a :class:`Credits` window every one-sided operation of the
        endpoint takes from before it is posted (a read or write: its bytes; a batch
        request: the bytes of all its entries, one operation; an atomic: 8 bytes) and
        gives back when it has ended.  Endpoints to the same peer with separate windows
        are separate classes of traffic: each has its own queue pairs and sockets, and
        one class can never take the other's credits.  Several endpoints may share one
        window.  Channel messages are flow-controlled by the channel's own credits.
        """
        if credits is not None and not isinstance(credits, Credits):
            raise UsageError(f"credits must be an rdmaio.Credits or None, got {type(credits).__name__}")
        core = self._core
        core.check_started()
        delay = backoff
        for attempt in range(retries + 1):
            try:
                return await open_endpoint(core, host, port,
                                           timeout if timeout is not None else core.config.connect_timeout,
                                           device, credits)
            except (EndpointBrokenError, TimeoutError):
                if attempt == retries:
                    raise
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, max_backoff)
        raise AssertionError("unreachable")
