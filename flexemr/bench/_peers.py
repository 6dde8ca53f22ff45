"""Peer systems that ``python -m flexemr.bench compare`` measures next to flexemr.

Both peers answer the same pooled lookups (``sum`` pooling of every bag of a
:class:`~flexemr.core.jagged.JaggedBatch`) as flexemr does, on the same batches,
and are checked against the local numpy reference before they are timed:

``redis``
    A ``redis-server`` that this module starts on a free loopback port
    (``--save '' --appendonly no``: no persistence) and always stops again.
    Every row that the workload touches is loaded beforehand (``MSET`` in a
    pipeline), key ``"<table>:<row>"`` (e.g. ``t03:1234``), value the row's
    raw bytes.  A lookup sends, per batch, one ``MGET`` of the unique ids of
    each table (all tables' ``MGET`` s in one pipelined round trip), then
    decodes the values with :func:`numpy.frombuffer` and pools on the ranker
    — a common production design for remote embeddings.  Needs the
    ``redis-server`` binary (Debian package ``redis-server``;
    ``scripts/system-deps.sh`` installs it) and the ``redis`` Python client
    (the ``bench`` extra).
``torchrec``
    TorchRec's inference ``EmbeddingBagCollection``
    (:mod:`torchrec.quant.embedding_modules`, FP32 weights), i.e. FBGEMM's
    fused table-batched embedding kernel (``IntNBitTableBatchedEmbeddingBagsCodegen``)
    on the local CPU, fed a ``KeyedJaggedTensor`` built from the same batch.
    (The training-side ``FusedEmbeddingBagCollection`` has no CPU kernels in
    fbgemm-gpu-cpu.)  CPU-only install that works (a plain ``pip install
    torchrec`` pulls a 2.7 GB CUDA build)::

        pip install torch==2.13.0            # the CPU wheel
        pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0
        pip install tensordict torchmetrics==1.0.3 pyre-extensions

Every function is synchronous, cleans up what it started (the Redis server
included, on every path) and returns a :class:`PathResult`; when a peer
cannot run here the result carries ``skipped`` (the reason) instead of
raising.  Wrong rows are a bug and raise :class:`AssertionError`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.jagged import JaggedBatch
from ..core.pooling import pool

__all__ = [
    "REDIS",
    "CpuClock",
    "TORCHREC",
    "TORCHREC_NOT_INSTALLED",
    "TorchRecPeer",
    "PathResult",
    "bench_redis",
    "check_pooled",
    "settle",
    "process_cpu_s",
    "redis_missing",
    "skipped",
    "torchrec_missing",
]

log = logging.getLogger(__name__)

REDIS = "redis"
TORCHREC = "torchrec"

REDIS_SERVER_NOT_INSTALLED = "redis-server not installed (apt-get install redis-server, or scripts/system-deps.sh)"
REDIS_CLIENT_NOT_INSTALLED = "redis Python client not installed (pip install '.[bench]')"
TORCHREC_NOT_INSTALLED = "torchrec not installed (see docs/performance.md for the CPU install recipe)"

Model = dict[str, npt.NDArray[Any]]
Pooled = dict[str, npt.NDArray[Any]]

_REDIS_START_TIMEOUT = 10.0
_REDIS_STOP_TIMEOUT = 5.0
_MSET_CHUNK = 4096


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) that process ``pid`` has used, from the OS's accounting.

    The sum of its threads' ``/proc/<pid>/task/<tid>/schedstat`` run times
    (nanoseconds), else ``/proc/<pid>/stat``'s ``utime + stime`` (clock ticks:
    coarser, but it includes threads that have exited).  0.0 where ``/proc``
    is not there.
    """
    total, found = 0, False
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
                found = True
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        pass
    if found:
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuClock:
    """CPU seconds of this process (the ranker) and of ``servers`` (pids), summed over timed intervals.

    ``with clock:`` around each timed part; ``ranker_s`` and ``server_s``
    then hold the CPU time used inside those parts only (this process: every
    thread, :func:`time.process_time`; servers: :func:`process_cpu_s`).
    """

    def __init__(self, servers: Sequence[int] = ()) -> None:
        self.servers = list(servers)
        self.ranker_s = 0.0
        self.server_s = 0.0
        self._start = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        return time.process_time(), sum(process_cpu_s(p) for p in self.servers)

    def __enter__(self) -> CpuClock:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        r, s = self._now()
        self.ranker_s += r - self._start[0]
        self.server_s += s - self._start[1]


@dataclass
class PathResult:
    """One measured path of the comparison (or the reason it was skipped).

    Rates are per second of wall time over the timed batches; bytes are
    payload moved over the network per sample (0 for local paths); CPU
    seconds per sample of the ranker (this process, every thread) and of the
    servers (their processes; 0 for local paths), from the OS's accounting
    over the timed batches only.
    """

    name: str
    samples_per_s: float | None = None
    rows_per_s: float | None = None
    bytes_per_sample: float | None = None
    batch_ms: float | None = None
    verified: bool = False
    skipped: str | None = None
    note: str = ""
    ranker_cpu_s_per_sample: float | None = None
    server_cpu_s_per_sample: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"path": self.name, "samples_per_s": self.samples_per_s, "rows_per_s": self.rows_per_s,
                "bytes_per_sample": self.bytes_per_sample, "batch_ms": self.batch_ms, "verified": self.verified,
                "skipped": self.skipped, "note": self.note, "ranker_cpu_s_per_sample": self.ranker_cpu_s_per_sample,
                "server_cpu_s_per_sample": self.server_cpu_s_per_sample}


def settle() -> None:
    """Collect garbage, then freeze every object alive (:func:`gc.freeze`), before a path's timed batches.

    The set-up (the model, torch and torchrec: ~300k Python objects) makes a
    full collection cost ~0.1-0.2 s here; frozen objects are not traversed
    again, so such a collection does not land in whichever path happens to
    trigger it (every path gets the same treatment).
    """
    gc.collect()
    gc.freeze()


def skipped(name: str, reason: str) -> PathResult:
    """A :class:`PathResult` that was not measured, for ``reason``."""
    return PathResult(name, skipped=reason)


def measured(name: str, timed: Sequence[JaggedBatch], seconds: float, bytes_per_sample: float, note: str,
             *, verified: bool = True, cpu: CpuClock | None = None) -> PathResult:
    """A :class:`PathResult` for ``timed`` batches answered in ``seconds`` (using ``cpu``'s CPU time)."""
    samples = sum(jb.batch_size for jb in timed)
    ids = sum(len(jb) for jb in timed)
    return PathResult(name, samples / seconds, ids / seconds, bytes_per_sample, seconds / len(timed) * 1e3,
                      verified, None, note, None if cpu is None else cpu.ranker_s / samples,
                      None if cpu is None else cpu.server_s / samples)


def check_pooled(name: str, got: Pooled, want: Pooled, tol: float = 1e-4) -> None:
    """Raise :class:`AssertionError` unless ``got`` matches the local reference ``want`` table by table."""
    for table, ref in want.items():
        arr = np.asarray(got.get(table))
        if arr.shape != ref.shape or not np.allclose(arr, ref, rtol=tol, atol=tol):
            raise AssertionError(f"{name}: pooled rows of table {table} differ from the local reference")


def _touched(batches: Sequence[JaggedBatch]) -> dict[str, npt.NDArray[np.int64]]:
    """Per table, the sorted unique ids that any of ``batches`` looks up."""
    keys = batches[0].keys
    return {t: np.unique(np.concatenate([jb.ids(t) for jb in batches])) for t in keys}


# --------------------------------------------------------------------------- #
# Redis


def redis_missing() -> str | None:
    """``None`` when the Redis peer can run here, else why not (nothing is started)."""
    if shutil.which("redis-server") is None:
        return REDIS_SERVER_NOT_INSTALLED
    if importlib.util.find_spec("redis") is None:
        return REDIS_CLIENT_NOT_INSTALLED
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, limit: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_REDIS_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("redis-server (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@contextlib.contextmanager
def redis_server(attempts: int = 3) -> Iterator[tuple[Any, int]]:
    """Start a private ``redis-server`` on a free loopback port; yields ``(client, pid)``.

    The server is stopped (and its temporary directory removed) when the
    block exits, however it exits.  Raises :class:`RuntimeError` when no
    server could be started.
    """
    import redis

    with tempfile.TemporaryDirectory(prefix="flexemr-redis-") as tmp:
        logfile = Path(tmp) / "redis.log"
        error = "not started"
        for _ in range(attempts):  # the port could be taken between _free_port() and bind
            port = _free_port()
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--protected-mode", "yes", "--daemonize", "no", "--dir", tmp, "--logfile", str(logfile)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            client: Any = None
            try:
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60.0)
                deadline = time.monotonic() + _REDIS_START_TIMEOUT
                while True:
                    if proc.poll() is not None:
                        error = f"redis-server exited with code {proc.returncode}: {_log_tail(logfile)}"
                        break
                    try:
                        client.ping()
                    except redis.ConnectionError as exc:
                        if time.monotonic() > deadline:
                            error = f"redis-server did not answer within {_REDIS_START_TIMEOUT:.0f} s: {exc}"
                            break
                        time.sleep(0.02)
                        continue
                    yield client, proc.pid
                    return
            finally:
                if client is not None:
                    client.close()
                _stop(proc)
        raise RuntimeError(error)


def _resp_bulk(n: int) -> int:
    """Bytes of one RESP bulk string of ``n`` bytes: ``$<n>\\r\\n<data>\\r\\n``."""
    return len(f"${n}\r\n") + n + 2


def _mget_bytes(keys: Sequence[bytes], row_bytes: int) -> int:
    """Request plus reply bytes of one ``MGET`` of ``keys`` (all present), in RESP."""
    request = len(f"*{len(keys) + 1}\r\n") + _resp_bulk(4) + sum(_resp_bulk(len(k)) for k in keys)
    reply = len(f"*{len(keys)}\r\n") + len(keys) * _resp_bulk(row_bytes)
    return request + reply


def _keys(table: str, ids: npt.NDArray[np.int64]) -> list[bytes]:
    prefix = f"{table}:"
    return [(prefix + str(r)).encode() for r in ids.tolist()]


def _redis_lookup(client: Any, model: Model, jb: JaggedBatch) -> tuple[Pooled, int]:
    """One pooled lookup through Redis: pooled rows per table and RESP bytes moved."""
    pipe = client.pipeline(transaction=False)
    plans: list[tuple[str, npt.NDArray[np.int64]]] = []
    nbytes = 0
    for t in jb.keys:
        uniq, inverse = np.unique(jb.ids(t), return_inverse=True)
        keys = _keys(t, uniq)
        if keys:
            pipe.mget(keys)
            nbytes += _mget_bytes(keys, model[t].shape[1] * model[t].itemsize)
        plans.append((t, inverse))
    replies = iter(pipe.execute())
    out: Pooled = {}
    for t, inverse in plans:
        table = model[t]
        if inverse.size:
            values = next(replies)
            if any(v is None for v in values):
                raise AssertionError(f"redis: keys of table {t} are missing")
            rows = np.frombuffer(b"".join(values), dtype=table.dtype).reshape(-1, table.shape[1])
            out[t] = pool(rows[inverse], jb.bag_offsets(t), "sum")
        else:
            out[t] = pool(np.zeros((0, table.shape[1]), table.dtype), jb.bag_offsets(t), "sum")
    return out, nbytes


def bench_redis(model: Model, warm: Sequence[JaggedBatch], timed: Sequence[JaggedBatch], ref: Pooled) -> PathResult:
    """Pooled lookups through a private Redis server (module docstring); ``ref``: local result of ``timed[0]``."""
    missing = redis_missing()
    if missing:
        return skipped(REDIS, missing)
    import redis

    try:
        with redis_server() as (client, pid):
            t0 = time.perf_counter()
            loaded = 0
            for t, ids in _touched([*warm, *timed]).items():
                rows = np.ascontiguousarray(model[t][ids])
                pipe = client.pipeline(transaction=False)
                for lo in range(0, ids.size, _MSET_CHUNK):
                    chunk = ids[lo:lo + _MSET_CHUNK]
                    pipe.mset(dict(zip(_keys(t, chunk), (r.tobytes() for r in rows[lo:lo + _MSET_CHUNK]))))
                pipe.execute()
                loaded += int(ids.size)
            load_s = time.perf_counter() - t0
            first, _ = _redis_lookup(client, model, timed[0])
            check_pooled(REDIS, first, ref)
            for jb in warm:
                _redis_lookup(client, model, jb)
            nbytes = 0
            settle()
            with CpuClock([pid]) as cpu:
                t0 = time.perf_counter()
                for jb in timed:
                    nbytes += _redis_lookup(client, model, jb)[1]
                dt = time.perf_counter() - t0
            version = client.info("server").get("redis_version", "?")
    except (RuntimeError, OSError, redis.RedisError) as exc:
        return skipped(REDIS, f"redis failed: {exc}")
    parser = "hiredis" if getattr(redis.utils, "HIREDIS_AVAILABLE", False) else "python parser"
    samples = sum(jb.batch_size for jb in timed)
    note = (f"redis {version}, {loaded:,} rows loaded in {load_s:.1f} s; pipelined MGET/table of unique ids, "
            f"pooled in numpy; redis-py {redis.__version__} ({parser})")
    return measured(REDIS, timed, dt, nbytes / samples, note, cpu=cpu)


# --------------------------------------------------------------------------- #
# TorchRec


def torchrec_missing() -> str | None:
    """``None`` when torchrec (with torch and fbgemm_gpu) can be found, else why not (nothing is imported)."""
    for mod in ("torch", "fbgemm_gpu", "torchrec"):
        try:
            if importlib.util.find_spec(mod) is None:
                return TORCHREC_NOT_INSTALLED if mod == "torchrec" else f"{TORCHREC_NOT_INSTALLED}: no {mod}"
        except (ImportError, ValueError) as exc:
            return f"{TORCHREC_NOT_INSTALLED}: {exc}"
    return None


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Raise logger ``name`` to ERROR for the block (restored afterwards)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torchrec_module(model: Model) -> tuple[Any, str]:
    """TorchRec's inference EmbeddingBagCollection (FP32, sum pooling) holding ``model``; returns (module, kernel)."""
    import torch
    import torch.ao.quantization as quant
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

    configs = [EmbeddingBagConfig(name=t, embedding_dim=int(a.shape[1]), num_embeddings=int(a.shape[0]),
                                  feature_names=[t], pooling=PoolingType.SUM) for t, a in model.items()]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    with torch.no_grad():
        for t, a in model.items():
            ebc.embedding_bags[t].weight.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
    fp32 = quant.PlaceholderObserver.with_args(dtype=torch.float)
    ebc.qconfig = quant.QConfig(activation=fp32, weight=fp32)  # type: ignore[no-untyped-call]
    qebc = QuantEmbeddingBagCollection.from_float(ebc)
    del ebc
    kernels = sorted({type(m).__name__ for m in getattr(qebc, "_emb_modules", [])})
    return qebc, f"{type(qebc).__name__} ({', '.join(kernels) or 'FBGEMM TBE'})"


class TorchRecPeer:
    """TorchRec's pooled lookups on the local CPU, built, checked against the reference and warmed up
    (:meth:`start`); :meth:`batch` times one timed batch, so that a caller can take turns with other paths."""

    def __init__(self, torch: Any, kjt_cls: Any, module: Any, kernel: str, timed: Sequence[JaggedBatch]) -> None:
        self.torch, self.kjt_cls, self.module, self.kernel, self.timed = torch, kjt_cls, module, kernel, timed

    @classmethod
    def start(cls, model: Model, warm: Sequence[JaggedBatch], timed: Sequence[JaggedBatch],
              ref: Pooled) -> TorchRecPeer | PathResult:
        """The peer, checked on ``timed[0]`` and run on ``warm``; or the skipped result saying why not."""
        missing = torchrec_missing()
        if missing:
            return skipped(TORCHREC, missing)
        if any(a.dtype != np.float32 for a in model.values()):
            return skipped(TORCHREC, "the comparison builds FP32 TorchRec tables; the model is not float32")
        try:
            import torch
            from torchrec import KeyedJaggedTensor

            module, kernel = _torchrec_module(model)
        except Exception as exc:  # a broken install is an environment problem, not a bench failure
            return skipped(TORCHREC, f"torchrec unusable: {type(exc).__name__}: {exc}")
        peer = cls(torch, KeyedJaggedTensor, module, kernel, timed)
        # torchrec's forward asks torch.fx whether it is tracing, which logs a deprecation notice once
        with _quiet_logger("torch.fx._symbolic_trace"):
            check_pooled(TORCHREC, peer.run(timed[0]), ref)
            for jb in warm:
                peer.run(jb)
        return peer

    def run(self, jb: JaggedBatch) -> Pooled:
        """One batch's pooled embeddings (the KeyedJaggedTensor built from ``jb`` inside)."""
        torch = self.torch
        with torch.inference_mode():
            kjt = self.kjt_cls(keys=list(jb.keys), values=torch.from_numpy(jb.values.copy()),
                               lengths=torch.from_numpy(jb.lengths.copy()))
            return {t: v.numpy() for t, v in self.module(kjt).to_dict().items()}

    def batch(self, i: int) -> float:
        """Seconds taken by timed batch ``i``."""
        t0 = time.perf_counter()
        self.run(self.timed[i])
        return time.perf_counter() - t0

    def result(self, seconds: float, cpu: CpuClock) -> PathResult:
        """The path's result for the timed batches, answered in ``seconds`` in all (``cpu``: their CPU time)."""
        import torchrec

        note = (f"torchrec {torchrec.__version__}, {self.kernel} on CPU, {self.torch.get_num_threads()} threads, "
                "FP32, in turns with flexemr")
        return measured(TORCHREC, self.timed, seconds, 0.0, note, cpu=cpu)
