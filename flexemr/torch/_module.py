"""``RemoteEmbeddingBagCollection``: a TorchRec ``EmbeddingBagCollection`` whose tables live on embedding servers.

A drop-in for an ``EmbeddingBagCollection`` (EBC) in inference: same
constructor input (the EBC's ``EmbeddingBagConfig`` s), same call
(``KeyedJaggedTensor`` in, ``KeyedTensor`` out, keys and layout as TorchRec
makes them), same ``embedding_bag_configs()`` / ``is_weighted()``; the
pooled embeddings come from :meth:`flexemr.EmbeddingClient.lookup_pooled`
instead of local parameters.  :func:`swap_embeddings` puts one in place of
every EBC of a model (TorchRec's ``DLRM``, for example).

How a forward runs (``B`` samples, ``D`` = the sum of the dims of every
(table, feature) pair)::

    caller's thread                           client thread (ClientThread)
    KJT -> per pooling mode and feature slot,
           one JaggedBatch keyed by table  --->  lookup_pooled(...) for each, concurrently
                                           <---  {table: [B, dim]} float32 arrays
    written into one [B, D] float32 array -> torch.from_numpy -> KeyedTensor (-> device)

Features that share a table (``feature_names=["user", "friend"]``) are
looked up in separate, concurrent ``lookup_pooled`` calls (a JaggedBatch has
one key per table), which the client coalesces into the same reads.

Devices: outputs land on the module's device (``device=``, moved by
``module.to(...)`` like any module).  On CUDA the ``[B, D]`` result is
written into pinned host memory and copied with ``non_blocking=True``, so
the copy overlaps whatever the GPU is doing; inputs on the GPU are copied to
the host first (the lookups run on the CPU).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ..client.client import EmbeddingClient
from ..core.config import ClusterConfig
from ..core.errors import ClosedError, ConfigError, InputError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec

from ._convert import Pooling, _check_kjt, _configs, _numpy, embedding_names, pooling_modes, table_specs
from ._deps import torchrec
from ._thread import ClientThread

if TYPE_CHECKING:
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

__all__ = ["RemoteEmbeddingBagCollection", "swap_embeddings"]


@dataclass(frozen=True)
class _Slot:
    """One (table, feature) pair: where its pooled embedding goes in the output."""

    table: str
    feature: str
    lo: int
    hi: int


@dataclass(frozen=True)
class _Group:
    """One ``lookup_pooled`` call: tables of one pooling mode, each read by one of its features."""

    mode: Pooling
    slots: tuple[_Slot, ...]

    @property
    def tables(self) -> list[str]:
        return [s.table for s in self.slots]


class _Request:
    """The numpy side of one forward: one JaggedBatch (+ weights) per group."""

    __slots__ = ("batch_size", "batches", "weights")

    def __init__(self, batch_size: int, batches: list[JaggedBatch], weights: list[npt.NDArray[Any] | None]) -> None:
        self.batch_size = batch_size
        self.batches = batches
        self.weights = weights


def _span_cat(parts: list[npt.NDArray[Any]], spans: list[tuple[int, int]], whole: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``whole[lo:hi]`` of every span, concatenated (a view when the spans are adjacent and in order)."""
    if all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
        return whole[spans[0][0]:spans[-1][1]]
    return np.concatenate(parts)


class RemoteEmbeddingBagCollection(nn.Module):
    """An inference ``EmbeddingBagCollection`` served by flexemr (module docstring).

    Parameters
    ----------
    tables:
        The ``EmbeddingBagConfig`` s (``ebc.embedding_bag_configs()``).
        Every table must be in the cluster's plan with the same rows, dim and
        dtype (float32 or float16); pooling SUM or MEAN.
    client:
        Where the tables are: a :class:`~flexemr.torch.ClientThread` (shared:
        several modules may use one), or a :class:`~flexemr.ClusterConfig`,
        a cluster file path or an unconnected :class:`~flexemr.EmbeddingClient`
        (the module then starts a ClientThread of its own with
        ``client_options``).
    is_weighted:
        Pool with the KJT's per-sample weights (as ``EmbeddingBagCollection(...,
        is_weighted=True)``; SUM tables only, as in TorchRec).
    device:
        Where outputs land (default CPU); ``module.to(device)`` moves it.

    Thread safety: :meth:`forward` may be called from any number of threads
    at once (each call blocks its thread; the lookups run concurrently on the
    client thread).  :meth:`forward_async` is for coroutines.

    >>> # ebc = EmbeddingBagCollection(tables=configs)                   # a trained model's EBC
    >>> # remote = RemoteEmbeddingBagCollection(ebc.embedding_bag_configs(), "cluster.toml")
    >>> # kt = remote(kjt)                       # KeyedTensor, equal to ebc(kjt) within float tolerance
    >>> # kt = await remote.forward_async(kjt)   # from a coroutine
    >>> # remote.close()
    """

    _anchor: torch.Tensor

    def __init__(self, tables: Sequence[EmbeddingBagConfig],
                 client: ClientThread | ClusterConfig | EmbeddingClient | str | os.PathLike[str], *,
                 is_weighted: bool = False, device: torch.device | str | None = None, **client_options: Any) -> None:
        super().__init__()
        torchrec()  # the output type is TorchRec's: fail here, with the install steps, when it is missing
        configs = _configs(tables)
        if not configs:
            raise ConfigError("a RemoteEmbeddingBagCollection needs at least one EmbeddingBagConfig")
        specs = table_specs(configs)
        modes = pooling_modes(configs)
        if is_weighted and any(m != "sum" for m in modes.values()):
            mean = sorted(t for t, m in modes.items() if m != "sum")
            raise ConfigError(f"per-sample weights need SUM pooling (as TorchRec's EmbeddingBag); tables {mean} "
                              "pool with MEAN")
        if isinstance(client, ClientThread):
            if client_options:
                raise ConfigError(f"client options {sorted(client_options)} apply only when the module creates "
                                  "its own ClientThread")
            runner = client
            plan_tables = runner.config.plan.tables
        else:
            plan_tables = self._plan_of(client).tables
            runner = None
        self._check_plan(specs, plan_tables)
        own = None
        if runner is None:
            assert not isinstance(client, ClientThread)
            runner = own = ClientThread(client, **client_options)
        self._configs = configs
        self._is_weighted = bool(is_weighted)
        self._specs = specs
        self._names = embedding_names(configs)
        slots: list[list[_Slot]] = []
        lo = 0
        for cfg in configs:
            feats = list(cfg.feature_names) or [cfg.name]
            row = []
            for f in feats:
                row.append(_Slot(cfg.name, f, lo, lo + int(cfg.embedding_dim)))
                lo += int(cfg.embedding_dim)
            slots.append(row)
        self._dims = [s.hi - s.lo for row in slots for s in row]
        self._width = lo
        self._features = sorted({s.feature for row in slots for s in row})
        groups: dict[tuple[int, Pooling], list[_Slot]] = {}
        for cfg, row in zip(configs, slots):
            for j, s in enumerate(row):  # the j-th feature of every table in one call per mode
                groups.setdefault((j, modes[cfg.name]), []).append(s)
        self._groups = [_Group(mode, tuple(ss)) for (_, mode), ss in sorted(groups.items())]
        self._runner = runner
        self._release = runner._hold(self)
        if own is not None:
            own.close()  # the module's hold keeps it running; it stops with the module
        self.register_buffer("_anchor", torch.empty(0, device=torch.device(device) if device is not None else None),
                             persistent=False)

    @staticmethod
    def _plan_of(client: Any) -> Any:
        if isinstance(client, (str, os.PathLike)):
            return ClusterConfig.from_toml(client).plan
        if isinstance(client, ClusterConfig):
            return client.plan
        if isinstance(client, EmbeddingClient):
            return client.plan
        raise ConfigError("client must be a ClientThread, a ClusterConfig, a cluster file path or an unconnected "
                          f"EmbeddingClient, got {type(client).__name__}")

    @staticmethod
    def _check_plan(specs: Sequence[TableSpec], plan_tables: Any) -> None:
        for s in specs:
            served = plan_tables.get(s.name)
            if served is None:
                raise ConfigError(f"table {s.name!r} is not served by the cluster (it serves {sorted(plan_tables)})")
            if served != s:
                raise ConfigError(f"table {s.name!r}: the cluster serves {served.num_rows} x {served.dim} "
                                  f"{served.dtype}, the config says {s.num_rows} x {s.dim} {s.dtype}")

    # ------------------------------------------------------------ EBC interface

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The ``EmbeddingBagConfig`` s it was built with (as ``EmbeddingBagCollection.embedding_bag_configs()``)."""
        return self._configs

    def is_weighted(self) -> bool:
        """Whether the KJT's per-sample weights are used."""
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """Where outputs land."""
        return self._anchor.device

    @property
    def client_thread(self) -> ClientThread:
        """The :class:`ClientThread` the lookups run on (its ``client.metrics`` counts them)."""
        return self._runner

    @property
    def table_specs(self) -> list[TableSpec]:
        """The tables, as flexemr specs."""
        return list(self._specs)

    def extra_repr(self) -> str:
        tables = ", ".join(f"{s.name}[{s.num_rows}x{s.dim}]" for s in self._specs)
        servers = len(self._runner.config.plan.servers)
        return f"tables=[{tables}], weighted={self._is_weighted}, device={self.device}, servers={servers}"

    # ------------------------------------------------------------ forward

    def _prepare(self, features: KeyedJaggedTensor) -> _Request:
        kjt = _check_kjt(features)
        keys = list(kjt.keys())
        index = {k: i for i, k in enumerate(keys)}
        missing = [f for f in self._features if f not in index]
        if missing:
            raise InputError(f"the KeyedJaggedTensor lacks features {missing} (it has {keys})")
        b = int(kjt.stride()) if keys else 0
        values = _numpy(kjt.values(), "KJT values")
        lengths = _numpy(kjt.lengths(), "KJT lengths").astype(np.int64, copy=False)
        if values.ndim != 1 or lengths.shape != (len(keys) * b,):
            raise InputError(f"KJT values/lengths have shapes {values.shape}/{lengths.shape}, expected 1-D values "
                             f"and {len(keys)} keys x {b} samples lengths")
        w_all = None
        if self._is_weighted:
            w = kjt.weights_or_none()
            if w is None:
                raise InputError("this module is weighted (is_weighted=True) but the KeyedJaggedTensor has no weights")
            w_all = _numpy(w, "KJT weights")
            if w_all.shape != values.shape:
                raise InputError(f"KJT weights have shape {w_all.shape}, the values {values.shape}")
        per_key = lengths.reshape(len(keys), b).sum(axis=1) if keys else np.zeros(0, np.int64)
        starts = np.concatenate((np.zeros(1, np.int64), np.cumsum(per_key)))
        if int(starts[-1]) != values.size:
            raise InputError(f"KJT lengths sum to {int(starts[-1])} but there are {values.size} values")
        batches: list[JaggedBatch] = []
        weights: list[npt.NDArray[Any] | None] = []
        for g in self._groups:
            ks = [index[s.feature] for s in g.slots]
            vspans = [(int(starts[k]), int(starts[k + 1])) for k in ks]
            lspans = [(k * b, (k + 1) * b) for k in ks]
            vals = _span_cat([values[lo:hi] for lo, hi in vspans], vspans, values)
            lens = _span_cat([lengths[lo:hi] for lo, hi in lspans], lspans, lengths)
            batches.append(JaggedBatch(g.tables, vals, lengths=lens, batch_size=b))
            weights.append(None if w_all is None else
                           _span_cat([w_all[lo:hi] for lo, hi in vspans], vspans, w_all))
        return _Request(b, batches, weights)

    def _lookup_all(self, req: _Request) -> Any:
        groups = self._groups

        async def run(client: EmbeddingClient) -> list[dict[str, npt.NDArray[Any]]]:
            calls = [client.lookup_pooled(jb, g.mode, per_sample_weights=w)
                     for g, jb, w in zip(groups, req.batches, req.weights)]
            if len(calls) == 1:
                return [await calls[0]]
            return list(await asyncio.gather(*calls))

        return run

    def _assemble(self, req: _Request, results: list[dict[str, npt.NDArray[Any]]]) -> KeyedTensor:
        device = self.device
        pinned = None
        if device.type == "cuda":
            pinned = torch.empty((req.batch_size, self._width), dtype=torch.float32, pin_memory=True)
            out = pinned.numpy()
        else:
            out = np.empty((req.batch_size, self._width), dtype=np.float32)
        for g, res in zip(self._groups, results):
            for s in g.slots:
                out[:, s.lo:s.hi] = res[s.table]
        if pinned is not None:
            values = pinned.to(device, non_blocking=True)
        else:
            values = torch.from_numpy(out)
            if device.type != "cpu":
                values = values.to(device)
        return torchrec().KeyedTensor(keys=list(self._names), length_per_key=list(self._dims), values=values)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of ``features``: a ``KeyedTensor`` ``[B, D]`` float32 on :attr:`device`.

        Blocks the calling thread while the lookups run on the client
        thread; safe from any thread (inside a plain torch model, from a
        thread pool...).  Called from a coroutine it blocks that event loop
        for the call: use :meth:`forward_async` there.  Bad input raises
        :class:`~flexemr.InputError` (or a subclass) before any lookup;
        a closed module :class:`~flexemr.ClosedError`.
        """
        self._check_open()
        req = self._prepare(features)
        return self._assemble(req, self._runner.call(self._lookup_all(req)))

    async def forward_async(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """:meth:`forward` for coroutines: the caller's event loop keeps running while the lookups do."""
        self._check_open()
        req = self._prepare(features)
        return self._assemble(req, await self._runner.acall(self._lookup_all(req)))

    # ------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteEmbeddingBagCollection:
        """A module on the same client thread (``copy.deepcopy(model)`` of a swapped model works)."""
        self._check_open()
        twin = RemoteEmbeddingBagCollection(self._configs, self._runner, is_weighted=self._is_weighted,
                                            device=self.device)
        memo[id(self)] = twin
        return twin

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a RemoteEmbeddingBagCollection cannot be pickled (it holds a client thread and its "
                        "connections); save the local model, or its tables with flexemr.torch.export")

    # ------------------------------------------------------------ closing

    def _check_open(self) -> None:
        if not self._release.alive:
            raise ClosedError("this RemoteEmbeddingBagCollection is closed")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._release.alive

    def close(self) -> None:
        """Release the client thread (it stops, closing its client, when nothing else holds it). Idempotent."""
        self._release()

    def __enter__(self) -> RemoteEmbeddingBagCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ebc_type() -> type:
    return torchrec().EmbeddingBagCollection  # type: ignore[no-any-return]


def swap_embeddings(model: nn.Module, client: ClientThread | ClusterConfig | EmbeddingClient | str | os.PathLike[str],
                    *, device: torch.device | str | None = None, **client_options: Any) -> nn.Module:
    """Replace every ``EmbeddingBagCollection`` in ``model`` with a :class:`RemoteEmbeddingBagCollection`.

    Every replacement shares one :class:`ClientThread` (``client`` itself
    when it is one; else one created from ``client`` and
    ``client_options``, which stops when the last replacement is closed or
    collected).  Each keeps its EBC's configs and ``is_weighted``; outputs
    land on ``device`` (default: the EBC's device, CPU for ``meta``).  The
    model is changed in place and returned; a model that *is* an EBC
    cannot be changed in place, so its replacement is returned.  The local
    tables are dropped with the EBCs: serve them first
    (:func:`flexemr.torch.export`, ``LocalCluster(weights=...)``).
    A model without an EBC raises :class:`~flexemr.ConfigError`.

    >>> # model = DLRM(embedding_bag_collection=ebc, ...)     # torchrec.models.dlrm
    >>> # swap_embeddings(model, "cluster.toml")              # model(dense, kjt) now reads remote tables
    """
    ebc_type = _ebc_type()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found: list[tuple[str, Any]] = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
                                    if isinstance(m, ebc_type)]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no EmbeddingBagCollection to replace")
    runner = client if isinstance(client, ClientThread) else ClientThread(client, **client_options)
    if isinstance(client, ClientThread) and client_options:
        raise ConfigError(f"client options {sorted(client_options)} apply only when a ClientThread is created")
    try:
        made: dict[int, RemoteEmbeddingBagCollection] = {}
        for _, ebc in found:
            if id(ebc) not in made:
                dev = torch.device(device) if device is not None else ebc.device
                made[id(ebc)] = RemoteEmbeddingBagCollection(
                    ebc.embedding_bag_configs(), runner, is_weighted=ebc.is_weighted(),
                    device=torch.device("cpu") if dev.type == "meta" else dev)
        if len(found) == 1 and found[0][0] == "":
            return made[id(model)]
        for name, ebc in found:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, made[id(ebc)])
        return model
    finally:
        if runner is not client:
            runner.close()  # the replacements hold it now

