"""The ranker: serve a DLRM whose embedding tables live on embedding servers.

:class:`Ranker` turns a stream of requests (:class:`~flexemr.apps.trace.TraceBatch`:
dense features + jagged ids per table) into click-through rates::

    request --lookup (EmbeddingClient.lookup_jagged, sum-pooled)--> pooled [B, 26, d]
            --DLRM.forward--> ctr [B]

and measures it: samples/s, batch latency (request start to CTRs; exact
p50/p99 over batches), network bytes per sample, reads per sample, cache hit
rate (when the client has a cache) and, on the first ``check_samples``
samples of every batch, the largest absolute CTR difference from the pure
local reference (:meth:`DLRM.reference_forward` on tables rebuilt from the
servers' seed).  Two fetch paths:

* ``naive=True``: one rdmaio ``read`` per id (no dedup, no coalescing; 64
  reads outstanding), pooled on the ranker — the baseline;
* otherwise ``client.lookup_jagged(batch, pooling="sum")`` with whatever the
  client was configured with (coalescing always; cache, server-side pooling
  and prefetch when the build has them, see :mod:`flexemr.apps.demo`).

``prefetch=N`` pipelines the ranker itself: the lookups of the next ``N``
batches run (:class:`flexemr.client.prefetch.Prefetcher`) while the DLRM runs on
the current one in a worker thread.

``flexemr rank --config cluster.toml [--trace FILE | --criteo FILE | --generate N]``
runs it against a cluster started with ``flexemr serve`` and prints the
same table as ``flexemr demo``; ``--criteo`` takes Criteo TSV (``.tsv``,
``.txt``, compressed ``.gz`` ...) or Parquet (``.parquet``), read by
:func:`flexemr.apps.criteo.read_criteo` as it is ranked: a worker thread
reads and hashes at most :data:`READ_AHEAD` batches ahead, so memory stays
bounded whatever the file's size.  Progress bars (``--progress``,
:mod:`flexemr.apps.progress`): reading the input, ranking, and a resync's
shard copies when a replica comes back during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import queue
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..client.client import EmbeddingClient
from ..client.options import ClientOptions
from ..client.prefetch import Prefetcher
from ..core.config import ClusterConfig
from ..core.errors import ConfigError, InputError
from ..core import kernel
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from .blas import add_option as add_blas_option
from .blas import limit_threads
from .cli_support import blocking_section, check_range, parse_client_options, run_interruptible
from .criteo import criteo_format, read_criteo, write_sample
from .dlrm import DLRM, ReferenceTables, head_of
from .progress import Bars, as_callback
from .progress import add_option as add_progress_option
from .trace import TraceBatch, generate_trace, read_trace

__all__ = ["READ_AHEAD", "RankResult", "Ranker", "cache_counts", "configure", "configure_gen", "format_results", "main",
           "main_gen", "network_bytes"]

F32 = npt.NDArray[np.float32]
Progress = Callable[[int, int], None]


def network_bytes(snapshot: Mapping[str, Any]) -> int:
    """Bytes moved between ranker and servers according to a client metrics snapshot.

    Sums every integer counter with ``bytes`` in its name except cache and
    staging ones (``bytes_read`` today; counters a later client adds for
    pooling RPCs are picked up the same way).
    """
    return int(sum(v for k, v in snapshot.items()
                   if "bytes" in k and isinstance(v, int) and not isinstance(v, bool)
                   and "cache" not in k and "staging" not in k))


def cache_counts(client: EmbeddingClient) -> tuple[int, int] | None:
    """``(hits, misses)`` of the client's row cache, or ``None`` when it has none.

    Looks for ``cache_hits``/``cache_misses`` counters on ``client.metrics``
    first, then a cache object's ``stats`` with ``hits``/``misses``.
    """
    m = client.metrics
    if isinstance(getattr(m, "cache_hits", None), int) and isinstance(getattr(m, "cache_misses", None), int):
        if getattr(m, "cache_capacity", 1) == 0 or (getattr(client, "_cache", True) is None):
            return None  # counters exist, but this client runs without a cache
        return int(m.cache_hits), int(m.cache_misses)
    for owner in (getattr(client, "cache", None), getattr(client, "_cache", None)):
        stats = getattr(owner, "stats", None)
        if stats is not None and hasattr(stats, "hits") and hasattr(stats, "misses"):
            return int(stats.hits), int(stats.misses)
    return None


@dataclass
class RankResult:
    """What one ranking run measured (all per timed batch; warm-up excluded)."""

    name: str
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    bytes_per_sample: float = 0.0
    reads_per_sample: float = 0.0
    ids_per_sample: float = 0.0
    cache_hit_rate: float | None = None
    checked_samples: int = 0
    max_abs_err: float | None = None
    mean_ctr: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-able)."""
        return asdict(self)


class Ranker:
    """Serves ``model`` on ``client`` (see the module docstring).

    Parameters
    ----------
    model:
        The DLRM; its tables must be tables of the client's plan.
    client:
        A connected :class:`EmbeddingClient`.
    naive:
        Fetch with one rdmaio read per id instead of the client's lookups.
    prefetch:
        Batches whose lookups run ahead of the DLRM (0: sequential).
    reference:
        Local tables to check CTRs against (``None``: no check).
    check_samples:
        Samples per batch checked against ``reference``.
    client_prefetch:
        With ``prefetch > 0``, pipeline with the client's own
        ``client.prefetch(batches, depth=..., pooled="sum")`` stream (builds
        that have it) instead of the ranker's :class:`Prefetcher`.
    reference_ctrs:
        The reference CTRs by batch index, filled as batches are checked: rankers of the same model, batches
        and ``reference`` may share one dict, so that the local reference (pooling from ``reference`` and a
        forward pass on the event loop's thread) is computed once, not in every ranker's timed loop.
    """

    def __init__(self, model: DLRM, client: EmbeddingClient, *, naive: bool = False, prefetch: int = 0,
                 reference: ReferenceTables | None = None, check_samples: int = 32,
                 naive_concurrency: int = 64, client_prefetch: bool = False,
                 reference_ctrs: dict[int, F32] | None = None) -> None:
        for t in model.tables:
            spec = client.plan.spec(t)
            if spec.dim != model.dim:
                raise ConfigError(f"table {t!r} has dim {spec.dim}, the model expects {model.dim}")
            if naive and not client.plan.is_full_width(t):
                raise ConfigError(f"the naive path needs full-width shards; table {t!r} is split by columns")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ConfigError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.model = model
        self.client = client
        self.naive = naive
        self.prefetch = prefetch
        self.reference = reference
        self.check_samples = check_samples
        self.naive_concurrency = naive_concurrency
        self.client_prefetch = client_prefetch and prefetch > 0 and not naive
        if self.client_prefetch and not callable(getattr(client, "prefetch", None)):
            raise ConfigError("client_prefetch=True but this EmbeddingClient has no prefetch()")
        self.naive_bytes = 0
        self.naive_reads = 0
        self._ref_cache: dict[int, F32] = {} if reference_ctrs is None else reference_ctrs

    # ------------------------------------------------------------ fetching

    async def pooled(self, batch: TraceBatch) -> F32:
        """Sum-pooled ``[B, num_tables, dim]`` embeddings of ``batch`` from the servers."""
        if self.naive:
            return await self._naive_pooled(batch)
        rows = await self.client.lookup_jagged(batch.sparse, pooling="sum")
        return self.model.stack_pooled(rows, batch.batch_size)

    async def _naive_pooled(self, batch: TraceBatch) -> F32:
        client, plan = self.client, self.client.plan
        eps: list[rdmaio.Endpoint] = []
        keys: list[rdmaio.RemoteKey] = []
        remote: list[npt.NDArray[np.int64]] = []
        local: list[npt.NDArray[np.int64]] = []
        lens: list[npt.NDArray[np.int64]] = []
        spans: list[tuple[TableSpec, int, int]] = []
        pos = 0
        for t in self.model.tables:
            spec = plan.spec(t)
            ids = batch.sparse.ids(t)
            shards = plan.shards[t]
            sidx = plan.route(t, ids)
            row_start = np.array([sh.row_start for sh in shards], dtype=np.int64)
            ep_of = [client.endpoint(sh.server) for sh in shards]
            key_of = [client.shard_key(sh.region_name) for sh in shards]
            sl = sidx.tolist()
            eps += [ep_of[s] for s in sl]
            keys += [key_of[s] for s in sl]
            remote.append((ids - row_start[sidx]) * spec.row_bytes)
            local.append(pos + np.arange(ids.size, dtype=np.int64) * spec.row_bytes)
            lens.append(np.full(ids.size, spec.row_bytes, dtype=np.int64))
            spans.append((spec, pos, int(ids.size)))
            pos += -(-ids.size * spec.row_bytes // 64) * 64
        buf = np.empty(max(pos, 64), dtype=np.uint8)
        ro = np.concatenate(remote).tolist() if remote else []
        lo = np.concatenate(local).tolist() if local else []
        ln = np.concatenate(lens).tolist() if lens else []
        n = len(ro)
        with client.engine.register(buf, access=rdmaio.Access.NONE) as mr:
            async def worker(w: int) -> None:
                for i in range(w, n, self.naive_concurrency):
                    await eps[i].read(mr, lo[i], keys[i], ro[i], ln[i])

            await asyncio.gather(*(worker(w) for w in range(min(self.naive_concurrency, max(n, 1)))))
        self.naive_reads += n
        self.naive_bytes += int(sum(ln))
        outs = []
        for (spec, base, count), t in zip(spans, self.model.tables):
            rows = buf[base : base + count * spec.row_bytes].view(spec.np_dtype).reshape(count, spec.dim)
            outs.append(kernel.pool(rows, np.arange(count), batch.sparse.bag_offsets(t)).astype(np.float32, copy=False))
        return np.stack(outs, axis=1)

    # ------------------------------------------------------------- checking

    def _check(self, index: int, batch: TraceBatch, ctr: F32) -> tuple[int, float]:
        if self.reference is None or self.check_samples <= 0:
            return 0, 0.0
        k = min(self.check_samples, batch.batch_size)
        ref = self._reference_ctr(index, batch)
        return k, float(np.max(np.abs(ref - ctr[:k]))) if k else 0.0

    def _reference_ctr(self, index: int, batch: TraceBatch) -> F32:
        ref = self._ref_cache.get(index)
        if ref is None:
            assert self.reference is not None
            k = min(self.check_samples, batch.batch_size)
            ref = self._ref_cache[index] = self.model.reference_forward(
                batch.dense[:k], head_of(batch.sparse, k), self.reference)
        return ref

    def prepare_reference(self, batches: Sequence[TraceBatch]) -> None:
        """Compute the reference CTRs of ``batches`` (by index, as :meth:`run` checks them) now, out of the timed
        loop of :meth:`run` (and of every ranker sharing ``reference_ctrs``)."""
        if self.reference is None or self.check_samples <= 0:
            return
        for i, b in enumerate(batches):
            self._reference_ctr(i, b)

    # -------------------------------------------------------------- running

    async def run(self, batches: Iterable[TraceBatch], *, name: str = "ranker", warmup: int = 1,
                  seconds: float | None = None, progress: Progress | None = None) -> RankResult:
        """Rank ``batches``: the first ``warmup`` untimed (but checked), then the rest — or as many as fit in
        ``seconds`` (at least one) — timed.  Returns the measurements.

        ``batches`` may be a stream (an iterator, e.g. a file read as it is ranked): it is consumed once, and
        only the batches in flight are held.  Without a next batch after the warm-up, the warm-up batches are
        timed again."""
        it = iter(batches)
        warm = list(zip(range(warmup), it))
        first = next(it, None)
        if first is None and not warm:
            raise InputError("no batches to rank")
        timed: Iterable[tuple[int, TraceBatch]] = (warm if first is None else
                                                   enumerate(itertools.chain([first], it), start=len(warm)))
        result = RankResult(name)
        errs: list[float] = []
        checked = 0
        for i, b in warm:
            ctr = self.model.forward(b.dense, await self.pooled(b))
            k, e = self._check(i, b, ctr)
            checked += k
            errs.append(e)
        snap0 = self.client.metrics.snapshot()
        cache0 = cache_counts(self.client)
        nb0, nr0 = self.naive_bytes, self.naive_reads
        latencies: list[float] = []
        ctr_sum = 0.0
        ids = 0
        total = (len(batches) - len(warm) or len(warm)) if isinstance(batches, Sized) else 0  # 0: not known
        deadline = None if seconds is None else time.perf_counter() + seconds

        def source() -> Iterator[tuple[int, TraceBatch]]:
            for j, item in enumerate(timed):
                if j and deadline is not None and time.perf_counter() > deadline:
                    return
                yield item

        async def fetch(item: tuple[int, TraceBatch]) -> tuple[float, F32]:
            t0 = time.perf_counter()
            return t0, await self.pooled(item[1])

        started: deque[tuple[tuple[int, TraceBatch], float]] = deque()

        def sparse_source() -> Iterator[JaggedBatch]:  # for client.prefetch: remembers what started when
            for item in source():
                started.append((item, time.perf_counter()))
                yield item[1].sparse

        streams: list[Any] = []      # the prefetch stream, to see whether lookups run ahead

        async def results() -> AsyncGenerator[tuple[int, TraceBatch, float, F32], None]:
            if self.client_prefetch:
                async with self.client.prefetch(sparse_source(), depth=self.prefetch, pooled="sum") as cs:
                    streams.append(cs)
                    async for _, rows in cs:
                        (i, b), t0 = started.popleft()
                        yield i, b, t0, self.model.stack_pooled(rows, b.batch_size)
            else:
                async with Prefetcher(fetch, depth=self.prefetch).stream(source()) as rs:
                    streams.append(rs)
                    async for (i, b), (t0, pooled) in rs:
                        yield i, b, t0, pooled

        t_start = time.perf_counter()
        gen = results()
        try:
            async for i, b, t0, pooled in gen:
                if self.prefetch and (not streams or streams[0].in_flight):
                    # lookups run ahead (an adaptive stream may have turned its lookahead off): let the
                    # event loop drive them while the model runs on a worker thread
                    ctr = await asyncio.to_thread(self.model.forward, b.dense, pooled)
                else:
                    ctr = self.model.forward(b.dense, pooled)
                latencies.append(time.perf_counter() - t0)
                ctr_sum += float(ctr.sum(dtype=np.float64))
                result.samples += b.batch_size
                result.batches += 1
                ids += len(b.sparse)
                k, e = self._check(i, b, ctr)
                checked += k
                errs.append(e)
                if progress is not None:
                    progress(result.batches, total)   # total 0: a stream of unknown length
        finally:
            await gen.aclose()
        result.seconds = time.perf_counter() - t_start
        snap1 = self.client.metrics.snapshot()
        s = max(result.samples, 1)
        result.samples_per_s = result.samples / result.seconds if result.seconds > 0 else 0.0
        lat = np.asarray(latencies) * 1e3
        result.p50_ms = float(np.percentile(lat, 50))
        result.p99_ms = float(np.percentile(lat, 99))
        if self.naive:
            result.bytes_per_sample = (self.naive_bytes - nb0) / s
            result.reads_per_sample = (self.naive_reads - nr0) / s
        else:
            result.bytes_per_sample = (network_bytes(snap1) - network_bytes(snap0)) / s
            result.reads_per_sample = (int(snap1.get("reads", 0)) - int(snap0.get("reads", 0))) / s
        result.ids_per_sample = ids / s
        cache1 = cache_counts(self.client)
        if cache0 is not None and cache1 is not None:
            hits, misses = cache1[0] - cache0[0], cache1[1] - cache0[1]
            result.cache_hit_rate = hits / (hits + misses) if hits + misses else 0.0
        result.checked_samples = checked
        result.max_abs_err = max(errs) if checked else None
        result.mean_ctr = ctr_sum / s
        return result


# ------------------------------------------------------------------ report


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_results(rows: Sequence[Mapping[str, Any]], techniques: Sequence[str] = ()) -> str:
    """A text table of result dicts (:meth:`RankResult.to_dict`, plus ``"techniques"``:
    ``{technique: "on" | "off" | "n/a"}``, ``"available"`` and ``"note"`` for rows that did not run)."""
    head = ["configuration", *techniques, "batches", "samples/s", "p50 ms", "p99 ms", "KiB/sample",
            "reads/sample", "cache hit", "max |err|"]
    fixed = 1 + len(techniques)
    table: list[list[str]] = []
    for r in rows:
        cells = [str(r["name"])] + [str(r.get("techniques", {}).get(t, "-")) for t in techniques]
        if r.get("available", True) and r.get("batches"):
            hit = r.get("cache_hit_rate")
            cells += [str(r["batches"]), f"{r['samples_per_s']:,.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                      f"{r['bytes_per_sample'] / 1024:.2f}", f"{r['reads_per_sample']:.1f}",
                      "-" if hit is None else f"{100 * hit:.1f}%", _fmt(r.get("max_abs_err"), ".1e")]
        else:
            cells.append(str(r.get("note") or "n/a (not available in this build)"))
        table.append(cells)
    widths = [max([len(head[i])] + [len(c[i]) for c in table if len(c) == len(head) or i < fixed])
              for i in range(len(head))]

    def join(cells: Sequence[str]) -> str:
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))

    lines = [join(head)]
    for c in table:
        lines.append(join(c) if len(c) == len(head) else f"{join(c[:fixed])}  {c[fixed]}")
    return "\n".join(lines)


# --------------------------------------------------------------------- CLI


#: EmbeddingClient keywords that --client-option may not set (the command sets them itself).
_RESERVED_OPTIONS = frozenset({"transport", "engine", "resync_progress"})


def _validate_rank_args(args: argparse.Namespace) -> None:
    check_range("--batch-size", args.batch_size, 1)
    check_range("--generate", args.generate, 1)
    check_range("--pooling", args.pooling, above=0)
    check_range("--check-samples", args.check_samples, 0)
    check_range("--prefetch", args.prefetch, 0)
    check_range("--seconds", args.seconds, above=0)
    check_range("--blas-threads", getattr(args, "blas_threads", 0), 0)


def techniques(client: EmbeddingClient, *, naive: bool = False, prefetch: int = 0) -> str:
    """The lookup techniques a ranker runs with, in words (the name of a result row).

    >>> # techniques(client, prefetch=1) -> "flexemr (coalescing, server pooling, prefetch 1)"
    """
    if naive:
        return "naive (one read per id)"
    on = ["coalescing"]
    cache = client.cache
    if cache is not None:
        on.append(f"cache {cache.capacity * cache.slot_bytes / (1 << 20):.0f} MiB")
    if client.options.server_pooling:
        on.append("server pooling")
    if prefetch:
        on.append(f"prefetch {prefetch}")
    return f"flexemr ({', '.join(on)})"


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr rank``."""
    p.add_argument("--config", required=True, help="cluster TOML file of running `flexemr serve` servers")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help="replay a trace file (.npz, docs/trace-format.md)")
    src.add_argument("--criteo", metavar="FILE",
                     help="rank the samples of a Criteo file: TSV (.tsv, .txt; compressed .gz, .bz2, .zst) or "
                          "Parquet (.parquet); 26 tables needed")
    src.add_argument("--generate", type=int, metavar="N", help="rank N generated batches (default 10)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="samples per batch for --generate/--criteo (default 512)")
    p.add_argument("--pooling", type=float, default=8.0,
                   help="mean ids per sample and table for --generate (default 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="the servers' table seed, for the reference check (default 0)")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the DLRM weights (default 0)")
    p.add_argument("--check-samples", type=int, default=32,
                   help="samples per batch checked locally (0: none; default 32)")
    p.add_argument("--naive", action="store_true", help="one rdmaio read per id (the baseline)")
    p.add_argument("--prefetch", type=int, default=0, help="batches looked up ahead of the model (default 0)")
    p.add_argument("--client-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EmbeddingClient keyword (VALUE parsed as JSON when it can be); repeatable")
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"],
                   help="rdmaio transport: verbs when an RDMA device is up, else tcp (default auto)")
    p.add_argument("--seconds", type=float, help="stop timing after this many seconds (default: rank every batch)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_blas_option(p)
    add_progress_option(p)


#: Batches of a Criteo file read and hashed ahead of the ranker (what ``rank --criteo`` holds at most, with the
#: reader's block and the batches in flight)
READ_AHEAD = 4


def _read_ahead(items: Iterator[TraceBatch], depth: int) -> Generator[TraceBatch, None, None]:
    """``items``, produced by a worker thread at most ``depth`` ahead of the consumer (pyarrow and numpy release the
    GIL: reading overlaps ranking).  An error of ``items`` is raised here; closing this generator stops the worker
    and closes ``items``."""
    q: queue.Queue[tuple[TraceBatch | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[TraceBatch | None, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for b in items:
                if not put((b, None)):
                    return
            put((None, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((None, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="flexemr-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            b, exc = q.get()
            if exc is not None:
                raise exc
            if b is None:
                return
            yield b
    finally:
        stop.set()
        worker.join()


def _criteo_batches(path: str, specs: Sequence[TableSpec], batch_size: int,
                    bar: Any) -> Generator[TraceBatch, None, None]:
    """The samples of a Criteo file as a stream of requests, read as they are ranked (:data:`READ_AHEAD`)."""
    records = read_criteo(path, batch_size=batch_size, progress=as_callback(bar))

    def batches() -> Iterator[TraceBatch]:
        try:
            for r in records:
                yield TraceBatch(r.dense_features(), r.jagged(specs), r.labels)
        finally:
            close = getattr(records, "close", None)      # a generator: closes the file
            if close is not None:
                close()

    return _read_ahead(batches(), READ_AHEAD)


def _batches(args: argparse.Namespace, config: ClusterConfig,
             stack: contextlib.ExitStack) -> tuple[Iterable[TraceBatch], list[TableSpec]]:
    """The requests to rank (a list, or for ``--criteo`` a stream closed with ``stack``) and their tables."""
    specs = list(config.plan.tables.values())
    if args.trace:
        trace = read_trace(args.trace)
        unknown = [k for k in trace.keys if k not in config.plan.tables]
        if unknown:
            raise ConfigError(f"the trace names tables the cluster lacks: {unknown[:5]}")
        return trace.batches, [config.plan.spec(k) for k in trace.keys]
    if args.criteo:
        if len(specs) != 26:
            raise ConfigError(f"--criteo needs a cluster of 26 tables (C1..C26), this one has {len(specs)}")
        names = {s.name for s in specs}
        if names == {f"C{i}" for i in range(1, 27)}:
            specs = [config.plan.spec(f"C{i}") for i in range(1, 27)]
        parquet = criteo_format(args.criteo) == "parquet"
        bar = stack.enter_context(Bars.from_args(args).bar(desc=f"reading {os.path.basename(args.criteo)}",
                                                            unit="row" if parquet else "B", unit_scale=True))
        stream = _criteo_batches(args.criteo, specs, args.batch_size, bar)
        stack.callback(stream.close)      # registered after the bar: the reader stops before its bar closes
        return stream, specs
    n = args.generate if args.generate is not None else 10
    return generate_trace(specs, n + 1, args.batch_size, args.pooling, seed=args.seed), specs


async def _rank(args: argparse.Namespace) -> dict[str, Any]:
    config = ClusterConfig.from_toml(args.config)
    options = parse_client_options(args.client_option, _RESERVED_OPTIONS)
    with contextlib.ExitStack() as stack:
        with blocking_section():
            batches, specs = _batches(args, config, stack)
            if isinstance(batches, Sequence):
                first = batches[0] if batches else None
                warmup = 1 if len(batches) > 1 else 0
            else:                             # a stream: look at its first batch, then rank it too
                it = iter(batches)
                first = next(it, None)
                batches, warmup = itertools.chain([] if first is None else [first], it), 1
            if first is None:
                raise InputError("no samples to rank (is the input file empty?)")
            model = DLRM(specs, seed=args.model_seed, dense_features=int(first.dense.shape[1]))
            reference = ReferenceTables(specs, args.seed) if args.check_samples > 0 else None
        if options.get("adaptive") and "nn_sample_bytes" not in options:  # the cache gets what the NN leaves
            options["nn_sample_bytes"] = model.activation_bytes_per_sample
        return await _rank_batches(args, config, options, batches, warmup, model, reference)


async def _rank_batches(args: argparse.Namespace, config: ClusterConfig, options: dict[str, Any],
                        batches: Iterable[TraceBatch], warmup: int, model: DLRM,
                        reference: ReferenceTables | None) -> dict[str, Any]:
    bars = Bars.from_args(args)
    copying: dict[str, Any] = {}            # region -> the bar of its resync copy

    def resync_progress(region: str, done: int, total: int) -> None:
        bar = copying.get(region)
        if bar is None:
            bar = copying[region] = bars.bar(desc=f"resync {region}", unit="B", unit_scale=True)
        as_callback(bar)(done, total)
        if done >= total:
            copying.pop(region).close()

    try:
        client = EmbeddingClient(config, transport=args.transport, resync_progress=resync_progress, **options)
    except TypeError as exc:  # a value of the wrong kind for an option
        raise ConfigError(f"--client-option: {exc}") from None
    try:
        async with client:
            ranker = Ranker(model, client, naive=args.naive, prefetch=args.prefetch, reference=reference,
                            check_samples=args.check_samples)
            name = techniques(client, naive=args.naive, prefetch=args.prefetch)
            with bars.bar(desc="ranking", unit="batch") as bar:
                res = await ranker.run(batches, name=name, warmup=warmup, seconds=args.seconds,
                                       progress=as_callback(bar))
            transport = client.engine.transport
    finally:
        for bar in copying.values():
            bar.close()
    return {"transport": transport, "model": repr(model), "client_options": options, "result": res.to_dict()}


def main(args: argparse.Namespace) -> int:
    """Run ``flexemr rank``; exit code 0, or 1 when a checked CTR differs from the reference by > 1e-4."""
    _validate_rank_args(args)
    if getattr(args, "blas_threads", 0):
        limit_threads(args.blas_threads)
    out = run_interruptible(lambda: _rank(args))
    res = out["result"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"flexemr rank: {out['model']} on {args.config} ({out['transport']})")
        print(format_results([res]))
    err = res["max_abs_err"]
    if err is not None and err > 1e-4:
        print(f"flexemr rank: CTRs differ from the local reference by {err:.2e} "
              f"(the servers must run with the same --seed; this run used --seed {args.seed})", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------- flexemr gen


def configure_gen(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr gen {cluster,criteo,trace}``."""
    p.add_argument("what", choices=["cluster", "criteo", "trace"],
                   help="cluster: a Criteo-shaped cluster TOML; criteo: synthetic Criteo samples (TSV or Parquet); "
                        "trace: a lookup trace")
    p.add_argument("--out", "-o", required=True, help="file to write")
    p.add_argument("--servers", default="127.0.0.1:7400,127.0.0.1:7401",
                   help="cluster: comma-separated HOST:PORT of the servers (named s0, s1, ...)")
    p.add_argument("--plan", default="row_wise", choices=["row_wise", "table_wise", "column_wise"],
                   help="cluster: sharding plan")
    p.add_argument("--scale", type=float, help="cluster/trace: Criteo cardinality scale (default ~128 MiB in all)")
    p.add_argument("--dim", type=int, default=16, help="cluster/trace: embedding dimension")
    p.add_argument("--config", help="trace: take the tables from this cluster file instead of --scale/--dim")
    p.add_argument("--samples", type=int, default=10_000, help="criteo: samples to write")
    p.add_argument("--format", choices=["tsv", "parquet"],
                   help="criteo: tsv (compressed when -o ends in .gz, .bz2, .zst or .lz4) or parquet "
                        "(default: parquet when -o ends in .parquet or .pq, else tsv)")
    p.add_argument("--batches", type=int, default=10, help="trace: batches")
    p.add_argument("--batch-size", type=int, default=512, help="trace: samples per batch")
    p.add_argument("--pooling", type=float, default=8.0, help="trace: mean ids per sample and table")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated lines/batches (default 0)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret", metavar="TEXT",
                        help="cluster: shared secret written to [cluster] secret (every connection is then "
                             "authenticated; at least 4 characters)")
    secret.add_argument("--random-secret", action="store_true",
                        help="cluster: write a fresh random shared secret (32 hex digits)")
    add_progress_option(p)


def main_gen(args: argparse.Namespace) -> int:
    """Run ``flexemr gen``."""
    from .dlrm import criteo_specs
    from ..core.config import ServerAddress
    from ..core.plan import ShardingPlan
    from .trace import write_trace

    check_range("--scale", args.scale, above=0)
    check_range("--dim", args.dim, 1)
    check_range("--samples", args.samples, 1)
    check_range("--batches", args.batches, 1)
    check_range("--batch-size", args.batch_size, 1)
    check_range("--pooling", args.pooling, above=0)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"-o {args.out}: directory {out_dir} does not exist")
    fmt = getattr(args, "format", None)
    if fmt is not None and args.what != "criteo":
        raise ConfigError(f"--format is for gen criteo, not gen {args.what}")
    if fmt is not None and fmt != criteo_format(args.out):
        want = "end in .parquet or .pq" if fmt == "parquet" else "not end in .parquet or .pq"
        raise ConfigError(f"--format {fmt}: -o {args.out} must {want} (readers tell the format by the name)")
    if args.what == "cluster":
        addrs: dict[str, ServerAddress] = {}
        seen: set[tuple[str, int]] = set()
        for i, item in enumerate(a for a in args.servers.split(",") if a):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"--servers expects HOST:PORT, got {item!r}")
            addr = ServerAddress(host, int(port))
            if (addr.host, addr.port) in seen:
                raise ConfigError(f"--servers names {addr} twice: each server needs its own HOST:PORT")
            seen.add((addr.host, addr.port))
            addrs[f"s{i}"] = addr
        if not addrs:
            raise ConfigError("--servers names no server")
        specs = criteo_specs(args.scale, args.dim)
        builders: dict[str, Callable[..., ShardingPlan]] = {
            "row_wise": ShardingPlan.row_wise, "table_wise": ShardingPlan.table_wise,
            "column_wise": ShardingPlan.column_wise}
        builder = builders[args.plan]
        secret = secrets.token_hex(16) if args.random_secret else args.secret
        if secret is not None and len(secret) < 4:
            raise ConfigError("--secret must have at least 4 characters")
        ClusterConfig(builder(specs, list(addrs)), addrs, secret).write_toml(args.out)
        print(f"flexemr gen: wrote {args.out}: {len(addrs)} servers, {len(specs)} tables, "
              f"{sum(s.nbytes for s in specs) / (1 << 20):.0f} MiB"
              f"{', with a shared secret (keep the file private)' if secret else ''}")
    elif args.what == "criteo":
        fmt = criteo_format(args.out)
        with Bars.from_args(args).bar(desc=f"writing {os.path.basename(args.out)}", unit="sample",
                                      unit_scale=True) as bar:
            write_sample(args.out, args.samples, seed=args.seed, format=fmt, progress=as_callback(bar))
        print(f"flexemr gen: wrote {args.out}: {args.samples} synthetic Criteo samples ({fmt})")
    else:
        specs = (list(ClusterConfig.from_toml(args.config).plan.tables.values()) if args.config
                 else criteo_specs(args.scale, args.dim))
        bars = Bars.from_args(args)
        with bars.bar(desc="generating batches", total=args.batches, unit="batch") as bar:
            batches = generate_trace(specs, args.batches, args.batch_size, args.pooling, seed=args.seed,
                                     progress=as_callback(bar))
        with bars.ticker(f"writing {os.path.basename(args.out)}"):
            write_trace(args.out, batches, num_rows={s.name: s.num_rows for s in specs})
        print(f"flexemr gen: wrote {args.out}: {args.batches} batches x {args.batch_size} samples, "
              f"{len(specs)} tables")
    return 0
