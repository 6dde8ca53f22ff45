"""``flexemr demo --model torchrec``: TorchRec's DLRM end to end on remote embeddings, checked against itself.

What :func:`run_dlrm` does with the demo's tables and requests:

1. builds TorchRec's ``DLRM`` (:class:`torchrec.models.dlrm.DLRM`) over one
   ``EmbeddingBagCollection`` with a table per spec (sum pooling, feature
   name = table name), its weights seeded by ``seed``; the MLP sizes are
   those of the numpy demo (bottom 13-512-256-64-d, top 512-256-1);
2. starts ``servers`` embedding servers holding the EBC's weights
   (``LocalCluster(weights=flexemr.torch.weights(ebc))``);
3. makes a second model sharing the dense parts, whose EBC
   :func:`~flexemr.torch.swap_embeddings` replaced with a remote one;
4. ranks the requests (dense features + ``KeyedJaggedTensor``) with both,
   from a worker thread as a torch server would: ``torchrec local`` (the
   original model, the reference) and ``torchrec remote``; CTRs are
   ``sigmoid(logits)``, and the first ``check_samples`` of every batch of
   the remote run are compared with the local run's.

Rows have the numpy demo's fields (samples/s, p50/p99 ms, bytes and reads
per sample, batches, max abs error), so its table and figure show them.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from .cluster import LocalCluster

from ..torch._convert import embedding_bag_configs, kjt_from_jagged, weights
from ..torch._deps import torchrec
from ..torch._module import RemoteEmbeddingBagCollection, swap_embeddings

__all__ = ["LOCAL", "REMOTE", "build_dlrm", "run_dlrm"]

torchrec()  # the demo is TorchRec's model: without torchrec, importing it is a DependencyError naming the steps

#: Row names.
LOCAL = "torchrec local"
REMOTE = "torchrec remote"

Progress = Callable[[int, int], None]


def build_dlrm(specs: Sequence[TableSpec], seed: int, *, dense_features: int = 13,
               bottom: Sequence[int] = (512, 256, 64), top: Sequence[int] = (512, 256)) -> Any:
    """TorchRec's ``DLRM`` over ``specs`` (one dim; one feature per table, named like it), seeded by ``seed``."""
    tr = torchrec()
    from torchrec.models.dlrm import DLRM

    dims = {s.dim for s in specs}
    if len(dims) != 1:
        raise ValueError(f"DLRM's dot interaction needs one dim for every table, got {sorted(dims)}")
    torch.manual_seed(seed)
    ebc = tr.EmbeddingBagCollection(tables=embedding_bag_configs(specs), device=torch.device("cpu"))
    return DLRM(embedding_bag_collection=ebc, dense_in_features=dense_features,
                dense_arch_layer_sizes=[*bottom, dims.pop()], over_arch_layer_sizes=[*top, 1])


def _row(name: str, lat: list[float], samples: int, seconds: float, ids: int, ctr_sum: float) -> dict[str, Any]:
    ms = np.asarray(lat) * 1e3
    return {"name": name, "batches": len(lat), "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "bytes_per_sample": 0.0, "reads_per_sample": 0.0, "ids_per_sample": ids / max(samples, 1),
            "cache_hit_rate": None, "checked_samples": 0, "max_abs_err": None, "mean_ctr": ctr_sum / max(samples, 1)}


class _Run:
    """Ranks the requests with a model, timed, in the calling thread; stops early when ``stop`` is set."""

    def __init__(self, requests: list[tuple[torch.Tensor, Any, int, int]], seconds: float, stop: threading.Event,
                 progress: Progress | None) -> None:
        self.requests = requests
        self.seconds = seconds
        self.stop = stop
        self.progress = progress

    def local_ctrs(self, model: Any, lo: int, hi: int) -> list[npt.NDArray[Any]]:
        """CTRs of requests ``lo:hi`` (untimed)."""
        with torch.inference_mode():
            return [torch.sigmoid(model(d, k)).squeeze(1).numpy() for d, k, _, _ in self.requests[lo:hi]]

    def __call__(self, name: str, model: Any, warmup: int = 1) -> tuple[dict[str, Any], list[npt.NDArray[Any]]]:
        ctrs: list[npt.NDArray[Any]] = []
        lat: list[float] = []
        samples = ids = 0
        ctr_sum = 0.0
        total = len(self.requests) - warmup
        with torch.inference_mode():
            for dense, kjt, _, _ in self.requests[:warmup]:
                ctrs.append(torch.sigmoid(model(dense, kjt)).squeeze(1).numpy())
            t_start = time.perf_counter()
            deadline = t_start + self.seconds
            for i, (dense, kjt, b, n) in enumerate(self.requests[warmup:]):
                if self.stop.is_set() or (i and time.perf_counter() > deadline):
                    break
                t0 = time.perf_counter()
                ctr = torch.sigmoid(model(dense, kjt)).squeeze(1).numpy()
                lat.append(time.perf_counter() - t0)
                ctrs.append(ctr)
                samples += b
                ids += n
                ctr_sum += float(ctr.sum(dtype=np.float64))
                if self.progress is not None:
                    self.progress(len(lat), total)
            seconds = time.perf_counter() - t_start
        return _row(name, lat, samples, seconds, ids, ctr_sum), ctrs


async def run_dlrm(specs: Sequence[TableSpec], requests: Sequence[tuple[npt.ArrayLike, JaggedBatch]], *,
                   servers: int = 2, transport: str = "auto", seed: int = 0, seconds: float = 6.0,
                   check_samples: int = 32, say: Callable[[str], None] = print,
                   progress: Callable[[str], Progress | None] | None = None) -> dict[str, Any]:
    """Run the torchrec demo (module docstring); returns ``{"rows", "transport", "pids", "model", "startup_s"}``.

    ``requests``: ``(dense [B, 13] float32, sparse ids keyed by table)``, the
    first one a warm-up.  ``progress(row name)`` may return a callback
    ``(done, total)`` per row.  Cancelling the coroutine stops the ranking
    at the next batch and shuts the servers down.
    """
    # TorchRec asks torch.fx whether it is tracing (building KJTs and EBCs), which logs a deprecation notice
    # once: not the demo's news
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    async def in_thread(fn: Callable[[], Any]) -> Any:
        fut = loop.run_in_executor(None, fn)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()  # the worker sees it at the next batch; wait for it before the servers go
            await asyncio.gather(fut, return_exceptions=True)
            raise

    t_begin = time.perf_counter()
    model = await in_thread(lambda: build_dlrm(specs, seed))
    ebc = model.sparse_arch.embedding_bag_collection
    params = sum(p.numel() for n, p in model.named_parameters() if "embedding_bags" not in n)
    reqs = [(torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)), kjt_from_jagged(jb), jb.batch_size, len(jb))
            for d, jb in requests]
    async with LocalCluster(specs, servers=servers, seed=seed, transport=transport, weights=weights(ebc)) as cluster:
        startup_s = time.perf_counter() - t_begin
        pids = dict(cluster.pids)
        remote_model = copy.deepcopy(model, memo={id(ebc): ebc})   # shares the EBC, which the swap replaces
        swap_embeddings(remote_model, cluster.config, transport=transport)
        remote = remote_model.sparse_arch.embedding_bag_collection
        assert isinstance(remote, RemoteEmbeddingBagCollection)
        try:
            used = await remote.client_thread.acall(_transport)
            say(f"{servers} embedding servers ready (pids {' '.join(map(str, pids.values()))}) holding the EBC's "
                f"weights, {used} transport, started in {startup_s:.1f} s")
            run = _Run(reqs, seconds, stop, None)
            rows = []
            reference: list[npt.NDArray[Any]] = []
            for name, m in ((LOCAL, model), (REMOTE, remote_model)):
                run.progress = progress(name) if progress is not None else None
                if name == REMOTE:
                    await remote.client_thread.acall(_reset)
                row, ctrs = await in_thread(functools.partial(run, name, m))
                if name == LOCAL:
                    reference = ctrs
                else:
                    snap = await remote.client_thread.acall(_snapshot)
                    s = max(row["samples"], 1)
                    row["bytes_per_sample"] = snap["network_bytes"] / s
                    row["reads_per_sample"] = snap["reads"] / s
                    if check_samples > 0:
                        if len(ctrs) > len(reference):  # the remote run got further: rank the rest locally
                            reference += await in_thread(functools.partial(run.local_ctrs, model, len(reference),
                                                                           len(ctrs)))
                        errs = [float(np.max(np.abs(a[:check_samples] - b[:check_samples]), initial=0.0))
                                for a, b in zip(ctrs, reference)]
                        row["checked_samples"] = sum(min(check_samples, r[2]) for r in reqs[:len(ctrs)])
                        row["max_abs_err"] = max(errs) if errs else None
                rows.append(row)
                say(f"{name}: {row['samples_per_s']:,.0f} samples/s over {row['batches']} batches")
        finally:
            remote.close()
    return {"rows": rows, "transport": used, "pids": pids, "startup_s": startup_s,
            "model": {"repr": f"torchrec.models.dlrm.DLRM(tables={len(specs)}, dim={specs[0].dim}, bottom=13-512-256-"
                              f"64-{specs[0].dim}, top=512-256-1)", "parameters": int(params),
                      "torch": torch.__version__, "torchrec": getattr(torchrec(), "__version__", "?")}}


async def _transport(client: Any) -> str:
    return str(client.engine.transport)


async def _reset(client: Any) -> None:
    client.metrics.reset()


async def _snapshot(client: Any) -> dict[str, int]:
    m = client.metrics
    return {"network_bytes": int(m.network_bytes), "reads": int(m.reads)}
