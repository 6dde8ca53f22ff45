"""The ranker's HTTP JSON format, and the models a ranker replica runs.

A request ranks ``B`` Criteo-shaped samples: dense features and, per
embedding table of the model, each sample's ids (a bag, sum-pooled)::

    POST /flexemr
    {"dense":  [[0.1, 2.3, ...], ...],                 # B rows of the model's dense features (13)
     "sparse": {"C1": [[3, 17], [], [5]], ...}}        # every table: B lists of ids

A table may also be given compactly, as the concatenated ids and each
sample's count: ``"C1": {"values": [3, 17, 5], "lengths": [2, 0, 1]}``.  The
answer is ``{"ctr": [p0, p1, ...]}`` (click-through rates in (0, 1)); a bad
request gets HTTP 400 and ``{"error": "..."}`` naming what is wrong.

:func:`parse_request` checks everything a request holds before any lookup
(shapes, types, finite numbers, every table present, ids in range), so one
bad request never fails the others batched with it; :func:`merge_requests`
concatenates several into one lookup and :func:`encode_request` writes one
(for load generators and tests).

Models (:func:`build_model`): ``"numpy"`` is :class:`flexemr.apps.dlrm.DLRM`;
``"torch"`` (:class:`TorchDLRM`) runs the same network, with the same
weights, in PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..apps.dlrm import DLRM, NUM_DENSE
from ..core.errors import ConfigError, InputError
from ..core.jagged import JaggedBatch
from ..core.plan import ShardingPlan, validate_ids
from ..core.spec import TableSpec

__all__ = ["MAX_SAMPLES", "RankModel", "RankRequest", "TorchDLRM", "build_model", "encode_request", "merge_requests",
           "parse_request"]

F32 = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

#: Samples one request may hold.
MAX_SAMPLES = 65536


class RankModel(Protocol):
    """What a ranker replica needs of a model: its tables (in feature order), dims and forward pass."""

    tables: tuple[str, ...]
    dim: int
    dense_features: int

    def stack_pooled(self, pooled: Mapping[str, npt.ArrayLike] | npt.ArrayLike, batch_size: int) -> F32: ...

    def forward(self, dense: npt.ArrayLike, pooled: Mapping[str, npt.ArrayLike] | npt.ArrayLike) -> F32: ...


class TorchDLRM:
    """:class:`~flexemr.apps.dlrm.DLRM`'s forward pass in PyTorch, with the numpy model's weights.

    CTRs equal the numpy model's to float32 rounding (matmuls sum in another order).
    """

    def __init__(self, base: DLRM) -> None:
        try:
            import torch
        except ImportError as exc:
            raise ConfigError(f"model 'torch' needs PyTorch ({exc}); install the torch extra (make torch) or "
                              f"use model 'numpy'") from exc
        self._torch = torch
        self.base = base
        self.tables = base.tables
        self.dim = base.dim
        self.dense_features = base.dense_features
        self.bottom = [(torch.from_numpy(w.copy()), torch.from_numpy(b.copy())) for w, b in base.bottom_layers]
        self.top = [(torch.from_numpy(w.copy()), torch.from_numpy(b.copy())) for w, b in base.top_layers]
        n = len(base.tables) + 1
        iu, ju = np.triu_indices(n, k=1)
        self._iu, self._ju = torch.from_numpy(iu), torch.from_numpy(ju)

    def __repr__(self) -> str:
        return f"Torch{self.base!r}"

    def stack_pooled(self, pooled: Mapping[str, npt.ArrayLike] | npt.ArrayLike, batch_size: int) -> F32:
        return self.base.stack_pooled(pooled, batch_size)

    def _mlp(self, x: Any, layers: list[tuple[Any, Any]], last_relu: bool) -> Any:
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            if last_relu or i < len(layers) - 1:
                x = self._torch.relu(x)
        return x

    def forward(self, dense: npt.ArrayLike, pooled: Mapping[str, npt.ArrayLike] | npt.ArrayLike) -> F32:
        torch = self._torch
        x = np.asarray(dense, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dense_features:
            raise InputError(f"dense features must have shape [B, {self.dense_features}], got {x.shape}")
        emb = self.stack_pooled(pooled, x.shape[0])
        with torch.no_grad():
            bot = self._mlp(torch.from_numpy(x), self.bottom, last_relu=True)
            t = torch.cat([bot[:, None, :], torch.from_numpy(emb)], dim=1)
            z = torch.bmm(t, t.transpose(1, 2))
            inter = z[:, self._iu, self._ju]
            logit = self._mlp(torch.cat([bot, inter], dim=1), self.top, last_relu=False)
            out: F32 = torch.sigmoid(logit[:, 0]).numpy().astype(np.float32, copy=False)
        return out


def build_model(kind: str, specs: Sequence[TableSpec], seed: int = 0, *,
                dense_features: int = NUM_DENSE) -> RankModel:
    """The DLRM over ``specs`` (every table of equal dim) with weights from ``seed``: ``"numpy"`` or ``"torch"``."""
    if kind not in ("numpy", "torch"):
        raise ConfigError(f"model must be 'numpy' or 'torch', got {kind!r}")
    base = DLRM(list(specs), seed=seed, dense_features=dense_features)
    return base if kind == "numpy" else TorchDLRM(base)


@dataclass(frozen=True)
class RankRequest:
    """One checked request: ``dense [B, D]`` float32 and, per model table, ``(ids, bag offsets)``."""

    dense: F32
    sparse: dict[str, tuple[IntArray, IntArray]]

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])


def _int_list(value: object, what: str) -> IntArray:
    if not isinstance(value, list):
        raise InputError(f"{what} must be a list of integers, got {type(value).__name__}")
    if not value:
        return np.zeros(0, dtype=np.int64)
    if not all(type(v) is int for v in value):  # noqa: E721 - bool and float are not ids
        bad = next(v for v in value if type(v) is not int)  # noqa: E721
        raise InputError(f"{what} must hold integers, got {bad!r}")
    try:
        return np.asarray(value, dtype=np.int64)
    except OverflowError:
        raise InputError(f"{what}: an integer does not fit in 64 bits") from None


def _table(spec: TableSpec, raw: object, batch: int) -> tuple[IntArray, IntArray]:
    name = spec.name
    if isinstance(raw, list):
        if len(raw) != batch:
            raise InputError(f"sparse[{name!r}] has {len(raw)} samples, dense has {batch}")
        for i, bag in enumerate(raw):
            if not isinstance(bag, list):
                raise InputError(f"sparse[{name!r}][{i}] must be a list of ids, got {type(bag).__name__}")
        lengths = np.fromiter((len(bag) for bag in raw), dtype=np.int64, count=batch)
        ids = _int_list([v for bag in raw for v in bag], f"sparse[{name!r}]")
    elif isinstance(raw, dict):
        if set(raw) != {"values", "lengths"}:
            raise InputError(f"sparse[{name!r}] as an object needs exactly 'values' and 'lengths', got {sorted(raw)}")
        ids = _int_list(raw["values"], f"sparse[{name!r}].values")
        lengths = _int_list(raw["lengths"], f"sparse[{name!r}].lengths")
        if lengths.size != batch:
            raise InputError(f"sparse[{name!r}].lengths has {lengths.size} samples, dense has {batch}")
        if lengths.size and int(lengths.min()) < 0:
            raise InputError(f"sparse[{name!r}].lengths must be >= 0")
        if int(lengths.sum()) != ids.size:
            raise InputError(f"sparse[{name!r}]: lengths sum to {int(lengths.sum())}, values has {ids.size}")
    else:
        raise InputError(f"sparse[{name!r}] must be a list of id lists or {{values, lengths}}, "
                         f"got {type(raw).__name__}")
    ids = validate_ids(spec, ids)  # LookupIdError (an InputError's sibling) names the table and ids
    offsets = np.zeros(batch + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ids, offsets


def parse_request(body: bytes | str | Mapping[str, Any], model: RankModel, plan: ShardingPlan, *,
                  max_samples: int = MAX_SAMPLES) -> RankRequest:
    """Check a request (JSON text or the decoded object) against ``model`` and ``plan``.

    Raises :class:`~flexemr.InputError` (or :class:`~flexemr.LookupIdError`)
    saying what is wrong; nothing is looked up before it returns.
    """
    if isinstance(body, (bytes, str)):
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"the request is not JSON: {exc}") from None
        except RecursionError:
            raise InputError("the request is not JSON this ranker reads: nested too deeply") from None
    else:
        obj = body
    if not isinstance(obj, Mapping) or set(obj) != {"dense", "sparse"}:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise InputError(f"a request is an object with exactly 'dense' and 'sparse', got {keys}")
    raw_dense, sparse = obj["dense"], obj["sparse"]
    if not isinstance(raw_dense, list) or not raw_dense:
        raise InputError("'dense' must be a non-empty list of samples (lists of numbers)")
    if len(raw_dense) > max_samples:
        raise InputError(f"a request holds at most {max_samples} samples, got {len(raw_dense)}")
    width = model.dense_features
    for i, row in enumerate(raw_dense):
        if not isinstance(row, list) or len(row) != width:
            raise InputError(f"dense[{i}] must be a list of {width} numbers, got "
                             f"{len(row) if isinstance(row, list) else type(row).__name__}")
        if not all(type(v) in (int, float) for v in row):
            raise InputError(f"dense[{i}] must hold numbers, got {next(v for v in row if type(v) not in (int, float))!r}")
    try:
        wide = np.asarray(raw_dense, dtype=np.float64)
    except OverflowError:
        raise InputError("dense features must be finite float32 numbers") from None
    if not (np.isfinite(wide).all() and np.abs(wide).max() <= np.finfo(np.float32).max):
        raise InputError("dense features must be finite float32 numbers")
    dense = wide.astype(np.float32)
    if not isinstance(sparse, Mapping):
        raise InputError(f"'sparse' must be an object {{table: ids}}, got {type(sparse).__name__}")
    missing = [t for t in model.tables if t not in sparse]
    unknown = [t for t in sparse if t not in model.tables]
    if missing or unknown:
        raise InputError(f"'sparse' must name every table of the model: missing {missing[:5]}, unknown {unknown[:5]}")
    batch = dense.shape[0]
    per = {t: _table(plan.spec(t), sparse[t], batch) for t in model.tables}
    return RankRequest(dense, per)


def merge_requests(requests: Sequence[RankRequest]) -> tuple[F32, JaggedBatch, list[int]]:
    """Concatenate requests into one batch: ``(dense, sparse, samples per request)``."""
    if not requests:
        raise InputError("no requests to merge")
    sizes = [r.batch_size for r in requests]
    dense = requests[0].dense if len(requests) == 1 else np.concatenate([r.dense for r in requests])
    per: dict[str, tuple[IntArray, IntArray]] = {}
    for t in requests[0].sparse:
        if len(requests) == 1:
            per[t] = requests[0].sparse[t]
            continue
        ids = np.concatenate([r.sparse[t][0] for r in requests])
        lens = np.concatenate([np.diff(r.sparse[t][1]) for r in requests])
        offs = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        per[t] = (ids, offs)
    return dense, JaggedBatch.from_per_table(per), sizes


def encode_request(dense: npt.ArrayLike, sparse: JaggedBatch, *, compact: bool = True) -> bytes:
    """A request's JSON body: ``dense [B, D]`` and every key of ``sparse`` (compact: values + lengths)."""
    d = np.asarray(dense, dtype=np.float32)
    if d.ndim != 2 or d.shape[0] != sparse.batch_size:
        raise InputError(f"dense must be [batch_size={sparse.batch_size}, D], got {d.shape}")
    tables: dict[str, Any] = {}
    for t in sparse.keys:
        ids, offs = sparse.ids(t), sparse.bag_offsets(t)
        if compact:
            tables[t] = {"values": ids.tolist(), "lengths": np.diff(offs).tolist()}
        else:
            tables[t] = [ids[a:b].tolist() for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]
    return json.dumps({"dense": d.tolist(), "sparse": tables}, separators=(",", ":")).encode()
