"""A DLRM-style click-through-rate model in numpy, fed by disaggregated embedding tables.

Architecture (Naumov et al., "Deep Learning Recommendation Model for
Personalization and Recommendation Systems", arXiv 1906.00091; the sizes are
those of the Criteo Kaggle configuration of ``facebookresearch/dlrm``,
``--arch-mlp-bot 13-512-256-64-16 --arch-mlp-top 512-256-1``)::

    dense   [B, 13]  -- bottom MLP 13-512-256-64-d (ReLU) ----------------> x      [B, d]
    sparse  26 tables, EmbeddingBag(sum) of each sample's ids ------------> pooled [B, 26, d]
    interaction: T = [x; pooled] [B, 27, d];  Z = T @ T^T  [B, 27, 27];
                 the 351 pairwise dots above the diagonal (i < j) -------> z      [B, 351]
    top MLP on [x, z]: (d + 351)-512-256-1, ReLU, sigmoid at the end ----> ctr    [B]

Everything is float32 and batched (one ``matmul`` per layer, one batched
``matmul`` for the interaction).  Weights are a pure function of ``seed``
(DLRM's initialisation: ``W ~ N(0, sqrt(2 / (fan_in + fan_out)))``,
``b ~ N(0, sqrt(1 / fan_out))``).

The embedding tables follow Criteo Kaggle's 26 categorical features
(:data:`CRITEO_KAGGLE_CARDINALITIES`), scaled by :func:`criteo_specs` to fit
the machine.  :class:`ReferenceTables` rebuilds the rows seeded servers hold
(block by block, only the blocks asked for), so :meth:`DLRM.reference_forward`
is the pure local path the disaggregated one is checked against:

>>> specs = criteo_specs(scale=1e-4, dim=16)
>>> len(specs), specs[0].name, specs[2].num_rows
(26, 'C1', 1014)
>>> model = DLRM(specs, seed=0)
>>> batch = JaggedBatch.from_lists({s.name: [[0, 1], [2]] for s in specs})
>>> dense = np.ones((2, 13), dtype=np.float32)
>>> ctr = model.reference_forward(dense, batch, ReferenceTables(specs, seed=0))
>>> ctr.shape, ctr.dtype.name, bool(((ctr > 0) & (ctr < 1)).all())
((2,), 'float32', True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core import kernel
from ..core.errors import ConfigError, InputError
from ..core.init import BLOCK_ROWS, check_seed, init_rows
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec

__all__ = [
    "CATEGORICAL_FEATURES",
    "CRITEO_KAGGLE_CARDINALITIES",
    "DEFAULT_TABLE_BUDGET",
    "DLRM",
    "NUM_DENSE",
    "ReferenceTables",
    "auto_scale",
    "criteo_specs",
    "dense_transform",
    "head_of",
    "scaled_rows",
]

F32 = npt.NDArray[np.float32]

#: Distinct values of Criteo Kaggle's categorical features C1..C26 (Display
#: Advertising Challenge, 45.8M samples): the ``counts`` that
#: ``facebookresearch/dlrm``'s ``dlrm_data_pytorch.py`` preprocessing stores for
#: the Kaggle dataset, quoted as the embedding table sizes of DLRM's Kaggle
#: benchmark (``bench/dlrm_s_criteo_kaggle.sh``) and in many DLRM ports.
#: 33,762,577 rows in all.
CRITEO_KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
#: Table names: Criteo's column names of the categorical features.
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
#: Integer (dense) features I1..I13.
NUM_DENSE = 13
#: Total bytes of all tables :func:`criteo_specs` aims at when no scale is given.
DEFAULT_TABLE_BUDGET = 128 << 20
#: Tables smaller than this keep their real size when scaled down.
MIN_SCALED_ROWS = 64


def scaled_rows(cardinality: int, scale: float) -> int:
    """Rows of a table of ``cardinality`` values at ``scale``: ``ceil(cardinality * scale)``,
    but never below ``min(cardinality, MIN_SCALED_ROWS)`` (tiny tables keep their size).

    >>> scaled_rows(10_131_227, 0.01), scaled_rows(3, 0.01), scaled_rows(583, 0.01)
    (101313, 3, 64)
    """
    if not scale > 0:
        raise ConfigError(f"scale must be > 0, got {scale!r}")
    return max(int(math.ceil(cardinality * scale)), min(int(cardinality), MIN_SCALED_ROWS))


def auto_scale(dim: int, itemsize: int = 4, budget_bytes: int = DEFAULT_TABLE_BUDGET) -> float:
    """The largest scale (to 3 significant digits) whose Criteo tables fit in ``budget_bytes``.

    >>> auto_scale(16)
    0.0621
    """
    row_bytes = dim * itemsize
    lo, hi = 1e-7, 1e3
    for _ in range(100):  # bisection: total bytes grow monotonically with scale
        mid = math.sqrt(lo * hi)
        total = sum(scaled_rows(c, mid) for c in CRITEO_KAGGLE_CARDINALITIES) * row_bytes
        lo, hi = (mid, hi) if total <= budget_bytes else (lo, mid)
    digits = -int(math.floor(math.log10(lo))) + 2
    return math.floor(lo * 10**digits) / 10**digits


def criteo_specs(scale: float | None = None, dim: int = 16, dtype: str = "float32", *,
                 budget_bytes: int = DEFAULT_TABLE_BUDGET) -> list[TableSpec]:
    """The 26 Criteo-Kaggle-shaped tables ``C1..C26``, scaled (``None``: :func:`auto_scale` to ``budget_bytes``)."""
    spec0 = TableSpec("C1", 1, dim, dtype)  # validates dim and dtype
    if scale is None:
        scale = auto_scale(dim, spec0.itemsize, budget_bytes)
    return [TableSpec(name, scaled_rows(card, scale), dim, dtype)
            for name, card in zip(CATEGORICAL_FEATURES, CRITEO_KAGGLE_CARDINALITIES)]


def dense_transform(raw: npt.ArrayLike) -> F32:
    """DLRM's dense-feature preprocessing of Criteo integers: ``log(1 + max(x, 0))`` as float32."""
    arr = np.asarray(raw)
    out: F32 = np.log1p(np.maximum(arr, 0).astype(np.float32))
    return out


def _sigmoid(z: F32) -> F32:
    out: F32 = np.exp(-np.logaddexp(np.float32(0), -z)).astype(np.float32, copy=False)
    return out


class ReferenceTables:
    """The seeded tables of a plan rebuilt locally, one :data:`BLOCK_ROWS` block at a time on demand.

    ``rows(table, ids)`` equals ``build_model(specs, seed)[table][ids]`` but
    only generates (and keeps) the row blocks the ids touch, so checking a
    sample of a big model costs a fraction of rebuilding it.
    """

    def __init__(self, specs: Sequence[TableSpec] | Mapping[str, TableSpec], seed: int) -> None:
        spec_list = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
        self.specs: dict[str, TableSpec] = {s.name: s for s in spec_list}
        self.seed = check_seed(seed)
        self._blocks: dict[tuple[str, int], npt.NDArray[Any]] = {}

    @property
    def cached_bytes(self) -> int:
        """Bytes of the blocks generated so far."""
        return sum(int(b.nbytes) for b in self._blocks.values())

    def rows(self, table: str, ids: npt.ArrayLike) -> npt.NDArray[Any]:
        """``[len(ids), dim]`` rows of ``table`` (as seeded servers hold them)."""
        try:
            spec = self.specs[table]
        except KeyError:
            raise InputError(f"unknown table {table!r}") from None
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= spec.num_rows):
            raise InputError(f"table {table!r}: ids outside [0, {spec.num_rows})")
        out = np.empty((arr.size, spec.dim), dtype=spec.np_dtype)
        blk = arr // BLOCK_ROWS
        for b in np.unique(blk).tolist():
            block = self._blocks.get((table, b))
            if block is None:
                lo = b * BLOCK_ROWS
                block = self._blocks[(table, b)] = init_rows(spec, self.seed, lo, min(lo + BLOCK_ROWS, spec.num_rows))
            sel = blk == b
            out[sel] = block[arr[sel] - b * BLOCK_ROWS]
        return out

    def pooled(self, batch: JaggedBatch, tables: Sequence[str]) -> F32:
        """``[batch_size, len(tables), dim]`` sum-pooled rows of ``batch`` (EmbeddingBag sum), float32.

        Each distinct row is generated once; the native kernel pools them by bag.
        """
        jobs = []
        for t in tables:
            uniq, inverse = np.unique(batch.ids(t), return_inverse=True)
            jobs.append(kernel.PoolJob(self.rows(t, uniq), inverse.reshape(-1), batch.bag_offsets(t)))
        return _pool_stacked(jobs, batch.batch_size)


class DLRM:
    """The DLRM forward pass (module docstring) over the given tables.

    Parameters
    ----------
    tables:
        The embedding tables in feature order (all of one ``dim``).
    seed:
        Seed of the MLP weights.
    dense_features:
        Width of the dense input (13 for Criteo).
    bottom, top:
        Hidden layer widths of the bottom MLP (its output width is the
        embedding ``dim``) and of the top MLP (its output is one logit).
    """

    def __init__(self, tables: Sequence[TableSpec], seed: int = 0, *, dense_features: int = NUM_DENSE,
                 bottom: Sequence[int] = (512, 256, 64), top: Sequence[int] = (512, 256)) -> None:
        specs = list(tables)
        if not specs:
            raise ConfigError("a DLRM needs at least one embedding table")
        dims = {s.dim for s in specs}
        if len(dims) != 1:
            raise ConfigError(f"every table must have the same dim for the dot interaction, got {sorted(dims)}")
        if isinstance(dense_features, bool) or not isinstance(dense_features, int) or dense_features < 1:
            raise ConfigError(f"dense_features must be a positive int, got {dense_features!r}")
        self.tables: tuple[str, ...] = tuple(s.name for s in specs)
        self.specs: tuple[TableSpec, ...] = tuple(specs)
        self.dim: int = dims.pop()
        self.dense_features = dense_features
        self.seed = check_seed(seed)
        n = len(specs) + 1
        self.num_pairs = n * (n - 1) // 2
        self._iu, self._ju = np.triu_indices(n, k=1)
        rng = np.random.default_rng([self.seed, 0xD12A])
        self.bottom_layers = self._mlp(rng, [dense_features, *bottom, self.dim])
        self.top_layers = self._mlp(rng, [self.dim + self.num_pairs, *top, 1])

    @staticmethod
    def _mlp(rng: np.random.Generator, widths: Sequence[int]) -> list[tuple[F32, F32]]:
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            w = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out)).astype(np.float32)
            b = rng.normal(0.0, math.sqrt(1.0 / fan_out), fan_out).astype(np.float32)
            layers.append((w, b))
        return layers

    def __repr__(self) -> str:
        bot = "-".join(str(w.shape[0]) for w, _ in self.bottom_layers) + f"-{self.dim}"
        top = "-".join(str(w.shape[0]) for w, _ in self.top_layers) + "-1"
        return f"DLRM(tables={len(self.tables)}, dim={self.dim}, bottom={bot}, top={top}, seed={self.seed})"

    @property
    def num_parameters(self) -> int:
        """MLP weights and biases (embedding tables excluded)."""
        return sum(int(w.size + b.size) for w, b in self.bottom_layers + self.top_layers)

    @property
    def activation_bytes_per_sample(self) -> int:
        """NN memory one sample needs during :meth:`forward`: every float32 array it makes, per sample.

        Dense input, each bottom layer's output, the stacked embeddings, the
        interaction input ``t`` (``n x dim``), its Gram matrix (``n x n``), the
        pairs, the top input, each top layer's output and the result -- their
        sum, an upper bound of the peak (numpy frees some before others are
        made).  A ranker declares it to its client
        (``ClientOptions(nn_sample_bytes=...)``) so the cache gets what the NN
        leaves of the memory budget (:class:`~flexemr.core.capacity.ActivationCapacity`).

        >>> DLRM([TableSpec("a", 10, 4)], bottom=(8,), top=(8,)).activation_bytes_per_sample   # 4 * (13+12+4+8+4+1+5+9+1)
        228
        """
        n = len(self.tables) + 1
        floats = (self.dense_features + sum(int(w.shape[1]) for w, _ in self.bottom_layers)
                  + len(self.tables) * self.dim + n * self.dim + n * n + self.num_pairs
                  + self.dim + self.num_pairs + sum(int(w.shape[1]) for w, _ in self.top_layers) + 1)
        return 4 * floats

    # ------------------------------------------------------------ forward

    @staticmethod
    def _run_mlp(x: F32, layers: Sequence[tuple[F32, F32]], last_relu: bool) -> F32:
        for i, (w, b) in enumerate(layers):
            x = x @ w
            x += b
            if last_relu or i < len(layers) - 1:
                np.maximum(x, 0, out=x)
        return x

    def stack_pooled(self, pooled: Mapping[str, npt.ArrayLike] | npt.ArrayLike, batch_size: int) -> F32:
        """``pooled`` as a float32 ``[batch_size, num_tables, dim]`` array (a mapping is taken in table order)."""
        if isinstance(pooled, Mapping):
            missing = [t for t in self.tables if t not in pooled]
            if missing:
                raise InputError(f"pooled embeddings lack tables {missing[:5]}")
            arr = np.stack([np.asarray(pooled[t], dtype=np.float32) for t in self.tables], axis=1)
        else:
            arr = np.asarray(pooled, dtype=np.float32)
        want = (batch_size, len(self.tables), self.dim)
        if arr.shape != want:
            raise InputError(f"pooled embeddings must have shape {want}, got {arr.shape}")
        return arr

    def forward(self, dense: npt.ArrayLike, pooled: Mapping[str, npt.ArrayLike] | npt.ArrayLike) -> F32:
        """Click-through rates ``[B]`` (float32 in (0, 1)) for dense features ``[B, 13]`` and
        pooled embeddings (``{table: [B, dim]}`` or ``[B, num_tables, dim]``)."""
        x = np.asarray(dense, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dense_features:
            raise InputError(f"dense features must have shape [B, {self.dense_features}], got {x.shape}")
        emb = self.stack_pooled(pooled, x.shape[0])
        bot = self._run_mlp(x, self.bottom_layers, last_relu=True)             # [B, d]
        t = np.concatenate([bot[:, None, :], emb], axis=1)                      # [B, n, d]
        z = np.matmul(t, t.transpose(0, 2, 1))                                  # [B, n, n]
        inter = z[:, self._iu, self._ju]                                        # [B, n(n-1)/2]
        logit = self._run_mlp(np.concatenate([bot, inter], axis=1), self.top_layers, last_relu=False)
        return _sigmoid(logit[:, 0])

    def pool_local(self, batch: JaggedBatch, tables: ReferenceTables | Mapping[str, npt.NDArray[Any]]) -> F32:
        """Sum-pooled ``[B, num_tables, dim]`` embeddings from local tables (no network)."""
        if isinstance(tables, ReferenceTables):
            return tables.pooled(batch, self.tables)
        return _pool_stacked([kernel.PoolJob(np.asarray(tables[t]), batch.ids(t), batch.bag_offsets(t))
                              for t in self.tables], batch.batch_size)

    def reference_forward(self, dense: npt.ArrayLike, batch: JaggedBatch,
                          tables: ReferenceTables | Mapping[str, npt.NDArray[Any]]) -> F32:
        """The pure local path: pool ``batch`` from local ``tables``, then :meth:`forward`."""
        return self.forward(dense, self.pool_local(batch, tables))


def _pool_stacked(jobs: list[kernel.PoolJob], batch_size: int) -> F32:
    """Sum-pool every job (one table each, same ``dim``) with the native kernel into ``[B, len(jobs), dim]`` float32.

    Tables pooled in float32 (float32, float16, int8 rows) are written in
    place into the stacked result; float64 tables are pooled in float64 and
    then cast.
    """
    if not jobs:
        return np.zeros((batch_size, 0, 0), np.float32)
    dim = int(np.shape(jobs[0].rows)[1])
    out: F32 = np.empty((batch_size, len(jobs), dim), np.float32)
    direct = [dataclasses.replace(j, out=out[:, i, :]) for i, j in enumerate(jobs)
              if np.asarray(j.rows).dtype != np.float64]
    kernel.pool_many(direct)
    for i, j in enumerate(jobs):
        if np.asarray(j.rows).dtype == np.float64:
            out[:, i, :] = kernel.pool(j.rows, j.ids, j.offsets)
    return out


def head_of(batch: JaggedBatch, samples: int) -> JaggedBatch:
    """The first ``samples`` samples of ``batch`` (every key), as a new batch.

    >>> jb = JaggedBatch.from_lists({"a": [[1], [2, 3], []], "b": [[4], [], [5]]})
    >>> head_of(jb, 2) == JaggedBatch.from_lists({"a": [[1], [2, 3]], "b": [[4], []]})
    True
    """
    k = max(0, min(int(samples), batch.batch_size))
    per = {t: (batch.ids(t)[: batch.bag_offsets(t)[k]], batch.bag_offsets(t)[: k + 1]) for t in batch.keys}
    out = JaggedBatch.from_per_table(per)
    return out
