"""Peer baselines that ``python -m rdmaio.bench`` prints next to rdmaio's numbers.

Three peers move the same number of bytes per operation as the rdmaio
benchmark, so the figures can be compared side by side:

``uvloop-streams``
    A plain asyncio request/response baseline on uvloop: a server process
    (:mod:`rdmaio.bench._stream_worker`) replies to an 8-byte size header with
    that many bytes; the client keeps ``depth`` connections busy, one request
    in flight on each.
``mooncake-te-tcp``
    Mooncake Transfer Engine (PyPI ``mooncake-transfer-engine-non-cuda``, the
    ``bench`` extra) over its ``tcp`` protocol: a target process
    (:mod:`rdmaio.bench._mooncake_worker`) registers a buffer and the client
    reads from it with one-sided reads.
``memcpy``
    Local ``numpy.copyto``: the upper limit for moving bytes at all.

Every function is synchronous, runs its own event loop or threads, cleans up
all the processes it started, and returns a :class:`PeerResult`.  When a peer
is unavailable the result has ``skipped`` set instead of raising.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar, cast

import numpy as np

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

STREAMS = "uvloop-streams"
MOONCAKE = "mooncake-te-tcp"
MEMCPY = "memcpy"

MOONCAKE_NOT_INSTALLED = (
    "mooncake-transfer-engine-non-cuda not installed (pip install '.[bench]')"
)

_HERE = Path(__file__).resolve().parent
_STREAM_WORKER = _HERE / "_stream_worker.py"
_MOONCAKE_WORKER = _HERE / "_mooncake_worker.py"

_HOST = "127.0.0.1"
_HEADER_BYTES = 8
_PATTERN_MODULUS = 251  # must match PATTERN_MODULUS in both worker modules
_MEMCPY_BLOCK = 1 << 20
_WORKER_START_TIMEOUT = 20.0
_WORKER_STOP_TIMEOUT = 5.0

_mooncake_quiet: bool | None = None  # decided on the first bench_mooncake call


@dataclass
class PeerResult:
    """One peer measurement (or the reason it was not measured)."""

    name: str
    """Peer name: ``"uvloop-streams"``, ``"mooncake-te-tcp"`` or ``"memcpy"``."""
    size: int
    """Bytes per operation."""
    depth: int
    """Operations in flight."""
    ops_per_s: float | None
    """Completed operations per second, ``None`` when skipped."""
    gb_per_s: float | None
    """Payload throughput in GB/s (10**9 bytes), ``None`` when skipped."""
    skipped: str | None
    """Why the peer was not measured, or ``None`` when it was."""
    verified: bool = False
    """Whether the moved bytes were checked against the expected pattern."""
    detail: str = ""
    """How the operations were issued (free text for the report)."""


def pattern(nbytes: int) -> np.ndarray:
    """Return the uint8 pattern both workers serve: ``i % 251`` at offset ``i``."""
    return (np.arange(nbytes, dtype=np.uint64) % _PATTERN_MODULUS).astype(np.uint8)


def _skipped(name: str, size: int, depth: int, reason: str) -> PeerResult:
    return PeerResult(name, size, depth, None, None, reason)


def _measured(
    name: str, size: int, depth: int, ops: int, seconds: float, *, verified: bool, detail: str
) -> PeerResult:
    rate = ops / seconds if seconds > 0 else 0.0
    return PeerResult(name, size, depth, rate, rate * size / 1e9, None, verified, detail)


def _warmup_for(duration: float) -> float:
    """Warm-up time used before each measured window."""
    return min(0.2, max(0.05, duration / 4))


# --------------------------------------------------------------------------- #
# availability


def _uvloop_missing() -> str | None:
    if importlib.util.find_spec("uvloop") is None:
        return "uvloop not installed"
    return None


def _mooncake_missing() -> str | None:
    try:
        spec = importlib.util.find_spec("mooncake.engine")
    except (ImportError, ValueError):
        spec = None
    return MOONCAKE_NOT_INSTALLED if spec is None else None


def available_peers() -> dict[str, str | None]:
    """Map each peer name to ``None`` if it can run here, else the reason it can't.

    Only checks that the needed packages can be found; nothing is started.
    """
    return {STREAMS: _uvloop_missing(), MOONCAKE: _mooncake_missing(), MEMCPY: None}


# --------------------------------------------------------------------------- #
# worker processes


class _Worker:
    """A helper process that prints one line on stdout and runs until stdin EOF.

    Used as a context manager: on exit its stdin is closed (the workers exit on
    EOF) and it is killed if it has not exited within a few seconds, so no
    process outlives the benchmark, even on errors.  If this process dies, the
    pipe closes too and the worker exits by itself.
    """

    def __init__(self, script: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self._cmd = [sys.executable, str(script), *args]
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> _Worker:
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        if self._env:
            env.update(self._env)
        self._proc = subprocess.Popen(
            self._cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            bufsize=0,
        )
        logger.debug("started worker pid %d: %s", self._proc.pid, self._cmd)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The worker's process id, if started."""
        return None if self._proc is None else self._proc.pid

    def readline(self, timeout: float = _WORKER_START_TIMEOUT) -> str:
        """Return the worker's first stdout line, waiting at most ``timeout`` seconds."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"worker did not start within {timeout:.0f}s{self._stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                rc = self._proc.wait(timeout=_WORKER_STOP_TIMEOUT)
                raise RuntimeError(f"worker exited with code {rc} before starting{self._stderr_tail()}")
            data += chunk
        return data.split(b"\n", 1)[0].decode().strip()

    def _stderr_tail(self, nbytes: int = 2000) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0, os.SEEK_END)
            end = self._stderr.tell()
            self._stderr.seek(max(0, end - nbytes))
            tail = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; stderr: {tail}" if tail else ""

    def close(self) -> None:
        """Stop the worker (EOF on stdin, then kill) and release its pipes."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
                try:
                    proc.wait(timeout=_WORKER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    logger.warning("worker pid %d did not exit on EOF; killing it", proc.pid)
                    proc.kill()
                    proc.wait(timeout=_WORKER_STOP_TIMEOUT)
            finally:
                if proc.poll() is None:  # only on an interrupted wait above
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


# --------------------------------------------------------------------------- #
# event loop plumbing


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_private_loop(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``factory()`` to completion on a fresh uvloop loop, then close it.

    ``asyncio.Runner`` with a ``loop_factory`` neither installs the loop as the
    thread's current loop nor touches the event-loop policy, so a caller can
    run its own loop afterwards.  If the calling thread already runs a loop,
    the private loop runs in a short-lived helper thread instead.
    """

    async def main() -> _T:
        return await factory()

    def run() -> _T:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            return runner.run(main())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rdmaio-peer") as pool:
        return pool.submit(run).result()


# --------------------------------------------------------------------------- #
# memcpy


def bench_memcpy(size: int, duration: float = 0.5) -> PeerResult:
    """Measure local ``numpy.copyto`` of ``size``-byte operations.

    Method: for ``size`` below 1 MiB, one timed copy moves a block of
    ``k = 1 MiB // size`` operations laid end to end (``k * size`` contiguous
    bytes), and counts as ``k`` operations; from 1 MiB up, each copy is one
    operation.  This measures the memory system rather than Python's per-call
    overhead, which is the point of the limit line: it is what any transport
    would need to beat, in bytes per second, to be faster than a memcpy.
    Source and destination stay the same (cache-warm for small blocks).  The
    destination is compared with the source after the run.
    """
    if size <= 0:
        raise ValueError("size must be positive")
    per_copy = max(1, _MEMCPY_BLOCK // size)
    src = pattern(per_copy * size)
    dst = np.empty_like(src)
    for _ in range(3):
        np.copyto(dst, src)
    copies = 0
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        np.copyto(dst, src)
        copies += 1
        now = time.perf_counter()
    verified = bool(np.array_equal(dst, src))
    if not verified:
        raise RuntimeError("memcpy destination differs from source")
    return _measured(
        MEMCPY,
        size,
        1,
        copies * per_copy,
        now - start,
        verified=True,
        detail=f"np.copyto of {per_copy} x {size} B per call",
    )


# --------------------------------------------------------------------------- #
# uvloop streams


class _ReplyProtocol(asyncio.BufferedProtocol):
    """Client side of one streams connection: one request in flight at a time.

    The reply is received straight into a preallocated buffer
    (``BufferedProtocol``), so the client neither allocates nor copies per
    operation.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer = bytearray(size)
        self._view = memoryview(self.buffer)
        self._header = size.to_bytes(_HEADER_BYTES, "little")
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._error: BaseException | None = None
        self._overflow = bytearray(64 * 1024)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._filled < self.size:
            return self._view[self._filled :]
        return memoryview(self._overflow)  # unsolicited bytes: flagged in buffer_updated

    def buffer_updated(self, nbytes: int) -> None:
        if self._filled >= self.size:
            self._fail(RuntimeError("server sent more bytes than requested"))
            return
        self._filled += nbytes
        if self._filled == self.size and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def request(self) -> None:
        """Send one request and wait until the whole reply is in ``buffer``."""
        if self._error is not None:
            raise self._error
        assert self._transport is not None
        self._filled = 0
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(self._header)
        await self._waiter

    def close(self) -> None:
        """Close the transport."""
        if self._transport is not None:
            self._transport.close()


async def _streams_client(port: int, size: int, depth: int, duration: float) -> tuple[int, float]:
    """Drive ``depth`` connections; return (ops completed in window, window seconds)."""
    loop = asyncio.get_running_loop()
    protocols: list[_ReplyProtocol] = []
    try:
        for _ in range(depth):
            _, proto = await loop.create_connection(lambda: _ReplyProtocol(size), _HOST, port)
            protocols.append(proto)

        # Verify the first reply on every connection.
        expected = pattern(size)
        for proto in protocols:
            await proto.request()
            if not np.array_equal(np.frombuffer(proto.buffer, dtype=np.uint8), expected):
                raise RuntimeError(f"streams reply of {size} B does not match the server pattern")

        counting = False
        stop = False
        count = 0

        async def pipeline(proto: _ReplyProtocol) -> None:
            nonlocal count
            while not stop:
                await proto.request()
                if counting:
                    count += 1

        tasks = [asyncio.ensure_future(pipeline(p)) for p in protocols]
        try:
            await asyncio.sleep(_warmup_for(duration))
            counting = True
            start = time.perf_counter()
            await asyncio.sleep(duration)
            counting = False
            elapsed = time.perf_counter() - start
            stop = True
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        # And the last reply on the first connection.
        if not np.array_equal(np.frombuffer(protocols[0].buffer, dtype=np.uint8), expected):
            raise RuntimeError(f"streams reply of {size} B does not match the server pattern")
        return count, elapsed
    finally:
        for proto in protocols:
            proto.close()
        await asyncio.sleep(0)  # let the transports finish closing


def bench_uvloop_streams(size: int, depth: int, duration: float = 1.0) -> PeerResult:
    """Measure a plain uvloop request/response baseline moving ``size`` bytes per op.

    The server (:mod:`rdmaio.bench._stream_worker`) runs in a separate
    process.  The client, in this process on a private uvloop loop, opens
    ``depth`` TCP connections and keeps one request in flight on each: it
    sends an 8-byte size header and receives ``size`` bytes directly into a
    preallocated buffer.  After a short warm-up, operations completed in a
    ``duration``-second window are counted.  The first reply on every
    connection and the last one on the first connection are compared with
    the server's pattern; a mismatch raises ``RuntimeError``.
    """
    if size <= 0 or depth <= 0:
        raise ValueError("size and depth must be positive")
    missing = _uvloop_missing()
    if missing is not None:
        return _skipped(STREAMS, size, depth, missing)
    with _Worker(_STREAM_WORKER, ["--host", _HOST, "--port", "0", "--max-size", str(size)]) as worker:
        port = int(worker.readline())
        ops, elapsed = _run_private_loop(lambda: _streams_client(port, size, depth, duration))
    return _measured(
        STREAMS,
        size,
        depth,
        ops,
        elapsed,
        verified=True,
        detail=f"{depth} connection(s), 1 request in flight each, BufferedProtocol client",
    )


# --------------------------------------------------------------------------- #
# Mooncake Transfer Engine


@contextlib.contextmanager
def _quiet_stderr(enabled: bool) -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (glog writes there).

    Used only around Mooncake's engine set-up and tear-down, which log
    unconditional warnings that are noise in a benchmark report.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def bench_mooncake(size: int, depth: int, duration: float = 1.0) -> PeerResult:
    """Measure Mooncake Transfer Engine one-sided reads over its TCP transport.

    The target (:mod:`rdmaio.bench._mooncake_worker`) runs in a separate
    process; it registers ``size * depth`` bytes filled with the shared
    pattern and prints its session id (``host:rpc_port``) and buffer address.
    This process starts its own ``TransferEngine`` (``P2PHANDSHAKE`` metadata,
    ``tcp`` protocol), registers a local ``size * depth`` buffer and reads:

    * ``depth == 1``: ``transfer_sync_read(session, local, remote, size)``
      per operation;
    * ``depth > 1``: ``batch_transfer_sync_read`` with ``depth`` reads of
      ``size`` bytes (distinct slots) per call, i.e. ``depth`` operations in
      flight per batch, batches back to back.

    After the first call the whole local buffer is compared with the pattern.
    Mooncake's glog output is limited with ``MC_LOG_LEVEL=ERROR`` (unless the
    caller set ``MC_LOG_LEVEL``, in which case its logs are left alone).

    Never raises for environment problems: returns ``skipped`` with a reason
    containing "not installed" when the package is missing, or the error when
    the engine fails to start or transfer.
    """
    if size <= 0 or depth <= 0:
        raise ValueError("size and depth must be positive")
    missing = _mooncake_missing()
    if missing is not None:
        return _skipped(MOONCAKE, size, depth, missing)
    try:
        return _bench_mooncake(size, depth, duration)
    except Exception as exc:  # noqa: BLE001 - a peer failing must not kill the benchmark
        logger.warning("mooncake peer failed: %s", exc)
        return _skipped(MOONCAKE, size, depth, f"mooncake run failed: {exc}")


def _bench_mooncake(size: int, depth: int, duration: float) -> PeerResult:
    global _mooncake_quiet
    if _mooncake_quiet is None:
        # Mooncake reads MC_LOG_LEVEL when an engine initialises.  Only quieten
        # it (and its set-up warnings on fd 2) if the caller did not choose.
        _mooncake_quiet = "MC_LOG_LEVEL" not in os.environ
        if _mooncake_quiet:
            os.environ["MC_LOG_LEVEL"] = "ERROR"
    quiet = _mooncake_quiet
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        return _skipped(MOONCAKE, size, depth, f"{MOONCAKE_NOT_INSTALLED}: {exc}")

    total = size * depth
    with _Worker(_MOONCAKE_WORKER, ["--host", _HOST, "--size", str(total)]) as worker:
        line = worker.readline()
        if line.startswith("ERROR"):
            raise RuntimeError(f"worker: {line}")
        session, remote_text = line.split()
        remote = int(remote_text)

        local = np.zeros(total, dtype=np.uint8)
        local_addr = int(local.ctypes.data)
        with _quiet_stderr(quiet):
            engine = TransferEngine()
            rc = engine.initialize(_HOST, "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise RuntimeError(f"TransferEngine.initialize returned {rc}")
        registered = False
        try:
            rc = engine.register_memory(local_addr, total)
            if rc != 0:
                raise RuntimeError(f"TransferEngine.register_memory returned {rc}")
            registered = True

            if depth == 1:

                def one_call() -> int:
                    return engine.transfer_sync_read(session, local_addr, remote, size)

                detail = "transfer_sync_read, 1 op per call"
            else:
                locals_ = [local_addr + i * size for i in range(depth)]
                remotes = [remote + i * size for i in range(depth)]
                lengths = [size] * depth

                def one_call() -> int:
                    return engine.batch_transfer_sync_read(session, locals_, remotes, lengths)

                detail = f"batch_transfer_sync_read, {depth} ops per call"

            rc = one_call()
            if rc != 0:
                raise RuntimeError(f"first read returned {rc}")
            if not np.array_equal(local, pattern(total)):
                raise RuntimeError("bytes read from the Mooncake target do not match its pattern")

            warm_end = time.perf_counter() + _warmup_for(duration)
            while time.perf_counter() < warm_end:
                if one_call() != 0:
                    raise RuntimeError("read failed during warm-up")
            calls = 0
            start = time.perf_counter()
            end = start + duration
            now = start
            while now < end:
                rc = one_call()
                if rc != 0:
                    raise RuntimeError(f"read returned {rc}")
                calls += 1
                now = time.perf_counter()
        finally:
            with _quiet_stderr(quiet):
                if registered:
                    engine.unregister_memory(local_addr)
                del engine
    return _measured(
        MOONCAKE, size, depth, calls * depth, now - start, verified=True, detail=detail
    )
