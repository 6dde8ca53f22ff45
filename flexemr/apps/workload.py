"""Synthetic lookup workloads calibrated to the reuse statistics of Meta's DLRM traces.

Meta's public ``dlrm_datasets`` embedding-lookup traces are very skewed: in
the 2022 traces the rows that a batch reuses more than 16 times are 11.4% of
its unique rows but 73.8% of its accesses, and rows reused more than 64 times
are 1.8% of the unique rows and 51.9% of the accesses (2021 traces: 5.2%/59.8%
and 0.8%/42.0%).  :func:`generate` produces :class:`~flexemr.core.jagged.JaggedBatch`
batches with that skew.

Model, per table (a :class:`Profile`):

* a **hot set** of ``hot_rows`` rows, scattered over the table by a seeded
  random choice; hot rank ``r`` is drawn with probability proportional to
  ``(r + shift) ** -alpha`` (Zipf-Mandelbrot);
* a **cold tail**: a fraction ``cold_fraction`` of the accesses picks a row
  uniformly from the whole table (mostly rows seen once per batch);
* bag sizes (pooling factors) are Poisson with the requested mean (or fixed).

:func:`calibrate` fits the four parameters to target statistics at a
reference batch (``batch_size * pooling_factor`` accesses per table) with a
Nelder-Mead search on the expected statistics (Poisson approximation of the
per-row counts, :func:`expected_reuse_stats`).  The fitted profiles are
:data:`PROFILE_2022` and :data:`PROFILE_2021`; the hot set is a fixed number
of rows, so bigger batches reuse more (as real traces do).

>>> from flexemr.core.spec import TableSpec
>>> specs = [TableSpec(f"t{i}", 1_000_000, 16) for i in range(4)]
>>> batch = generate(specs, batch_size=2048, pooling_factor=32, profile=PROFILE_2022, seed=0)
>>> s = reuse_stats(batch)
>>> all(abs(s[k] / TARGET_2022[k] - 1) < 0.2 for k in TARGET_2022)
True
>>> batch == generate(specs, 2048, 32, PROFILE_2022, seed=0)
True
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..core.errors import ConfigError, InputError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec

__all__ = [
    "PROFILE_2021",
    "PROFILE_2022",
    "TARGET_2021",
    "TARGET_2022",
    "Profile",
    "calibrate",
    "expected_reuse_stats",
    "generate",
    "hot_rows_of",
    "reuse_stats",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

#: Published reuse statistics of the 2022 ``dlrm_datasets`` traces (fractions).
TARGET_2022: dict[str, float] = {"unique_gt16": 0.114, "access_gt16": 0.738, "unique_gt64": 0.018, "access_gt64": 0.519}
#: Published reuse statistics of the 2021 ``dlrm_datasets`` traces (fractions).
TARGET_2021: dict[str, float] = {"unique_gt16": 0.052, "access_gt16": 0.598, "unique_gt64": 0.008, "access_gt64": 0.420}

_STAT_KEYS = ("unique_gt16", "access_gt16", "unique_gt64", "access_gt64")


@dataclass(frozen=True)
class Profile:
    """Parameters of the per-table access distribution (see the module docstring).

    ``ref_batch_size`` and ``ref_pooling_factor`` record the batch the profile
    was calibrated at; the statistics are reproduced there.
    """

    alpha: float
    shift: float
    hot_rows: int
    cold_fraction: float
    ref_batch_size: int = 2048
    ref_pooling_factor: float = 32.0

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and self.shift > 0 and self.hot_rows >= 1 and 0 <= self.cold_fraction <= 1):
            raise ConfigError(f"invalid workload profile {self!r}")

    def to_dict(self) -> dict[str, float | int]:
        """Plain-dict form."""
        return asdict(self)


#: Calibrated to :data:`TARGET_2022` (see ``docs/locality.md`` for the achieved statistics).
PROFILE_2022 = Profile(alpha=0.753638, shift=0.058131, hot_rows=2201, cold_fraction=0.046227)
#: Calibrated to :data:`TARGET_2021`.
PROFILE_2021 = Profile(alpha=0.743011, shift=0.050182, hot_rows=3945, cold_fraction=0.082283)


def _seed_for(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def hot_rows_of(spec: TableSpec, profile: Profile, layout_seed: int = 0) -> IntArray:
    """Row ids of the hot set of ``spec`` by rank (hottest first); fixed by ``layout_seed``."""
    h = min(int(profile.hot_rows), spec.num_rows)
    out: IntArray = _seed_for(layout_seed, spec.name).choice(spec.num_rows, size=h, replace=False).astype(np.int64)
    return out


def _hot_cdf(profile: Profile, h: int) -> FloatArray:
    w = (np.arange(h, dtype=np.float64) + profile.shift) ** -profile.alpha
    cdf = np.cumsum(w)
    out: FloatArray = cdf / cdf[-1]
    return out


def generate(
    specs: Sequence[TableSpec],
    batch_size: int,
    pooling_factor: float | Mapping[str, float] = 32.0,
    profile: Profile = PROFILE_2022,
    seed: int = 0,
    *,
    layout_seed: int = 0,
    pooling: Literal["poisson", "fixed"] = "poisson",
) -> JaggedBatch:
    """One batch of lookups for ``specs`` (keys in spec order).

    ``pooling_factor`` is the mean bag size (per table with a mapping); bag
    sizes are Poisson (``pooling="poisson"``, empty bags possible) or all
    equal to ``round(pooling_factor)`` (``"fixed"``).  ``seed`` drives the
    draws of this batch; ``layout_seed`` fixes which rows are hot, so batches
    with different ``seed`` and the same ``layout_seed`` share their hot rows
    (a stream).  Each table uses its own stream derived from its name, so
    the ids of a table do not depend on the other tables.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
        raise InputError(f"batch_size must be a non-negative integer, got {batch_size!r}")
    if pooling not in ("poisson", "fixed"):
        raise InputError(f"pooling must be 'poisson' or 'fixed', got {pooling!r}")
    vals: list[IntArray] = []
    lens: list[IntArray] = []
    for spec in specs:
        pf = float(pooling_factor[spec.name] if isinstance(pooling_factor, Mapping) else pooling_factor)
        if not pf >= 0:
            raise InputError(f"table {spec.name!r}: pooling factor must be >= 0, got {pf}")
        rng = _seed_for(seed, spec.name)
        lengths = (
            rng.poisson(pf, size=int(batch_size)).astype(np.int64)
            if pooling == "poisson"
            else np.full(int(batch_size), int(round(pf)), dtype=np.int64)
        )
        n = int(lengths.sum())
        hot = hot_rows_of(spec, profile, layout_seed)
        rank = np.searchsorted(_hot_cdf(profile, hot.size), rng.random(n), side="right")
        ids = hot[np.minimum(rank, hot.size - 1)]
        cold = rng.random(n) < profile.cold_fraction
        ids[cold] = rng.integers(0, spec.num_rows, size=int(cold.sum()))
        vals.append(ids)
        lens.append(lengths)
    return JaggedBatch(
        [s.name for s in specs],
        np.concatenate(vals) if vals else np.zeros(0, np.int64),
        lengths=np.concatenate(lens) if lens else np.zeros(0, np.int64),
        batch_size=int(batch_size) if specs else None,
    )


def reuse_stats(batch: JaggedBatch, thresholds: Sequence[int] = (16, 64)) -> dict[str, float]:
    """Reuse statistics of one batch, over all its (table, row) pairs.

    Returns ``accesses``, ``unique_rows`` and, for every threshold ``t``,
    ``unique_gt{t}`` (fraction of the unique rows accessed more than ``t``
    times) and ``access_gt{t}`` (their share of the accesses).

    >>> jb = JaggedBatch.from_lists({"t": [[1] * 20 + [2]], "u": [[1]]})
    >>> s = reuse_stats(jb); s["unique_rows"], s["unique_gt16"], round(s["access_gt16"], 3)
    (3.0, 0.3333333333333333, 0.909)
    """
    counts_all: list[IntArray] = []
    for ids in batch.per_table().values():
        if ids.size:
            counts_all.append(np.unique(ids, return_counts=True)[1].astype(np.int64))
    counts = np.concatenate(counts_all) if counts_all else np.zeros(0, np.int64)
    total = int(counts.sum())
    out: dict[str, float] = {"accesses": float(total), "unique_rows": float(counts.size)}
    for t in thresholds:
        m = counts > t
        out[f"unique_gt{t}"] = float(m.mean()) if counts.size else 0.0
        out[f"access_gt{t}"] = float(counts[m].sum() / total) if total else 0.0
    return out


_LGAMMA = np.array([math.lgamma(k + 1) for k in range(1025)])


def _poisson_sf(lam: FloatArray, t: int) -> FloatArray:
    """``P(X > t)`` for ``X ~ Poisson(lam)`` (vectorised, log-space pmf sum)."""
    k = np.arange(t + 1)
    loglam = np.log(np.maximum(lam, 1e-300))
    cdf = np.exp(-lam[:, None] + k[None, :] * loglam[:, None] - _LGAMMA[k][None, :]).sum(axis=1)
    out: FloatArray = np.clip(1.0 - cdf, 0.0, 1.0)
    return out


def expected_reuse_stats(
    profile: Profile,
    accesses: float | None = None,
    num_rows: int = 10_000_000,
    thresholds: Sequence[int] = (16, 64),
) -> dict[str, float]:
    """Expected :func:`reuse_stats` of one table with ``accesses`` accesses per batch.

    Poisson approximation: hot rank ``r`` is accessed ``Poisson(N (1-c) p_r)``
    times; cold accesses are assumed distinct (``num_rows >> N``), adding
    ``num_rows * (1 - exp(-N c / num_rows))`` unique rows seen about once.
    ``accesses`` defaults to the profile's reference ``batch_size * pooling_factor``.
    """
    n = float(accesses if accesses is not None else profile.ref_batch_size * profile.ref_pooling_factor)
    h = min(int(profile.hot_rows), int(num_rows))
    w = (np.arange(h, dtype=np.float64) + profile.shift) ** -profile.alpha
    lam = n * (1.0 - profile.cold_fraction) * w / w.sum()
    cold = n * profile.cold_fraction
    unique = float(np.sum(-np.expm1(-lam))) + num_rows * -math.expm1(-cold / num_rows)
    out: dict[str, float] = {"accesses": n, "unique_rows": unique}
    for t in thresholds:
        out[f"unique_gt{t}"] = float(np.sum(_poisson_sf(lam, t))) / unique if unique else 0.0
        # E[X 1{X > t}] = lam * P(X >= t) = lam * P(X > t - 1)
        out[f"access_gt{t}"] = float(np.sum(lam * _poisson_sf(lam, t - 1))) / n if n else 0.0
    return out


def _nelder_mead(f: Callable[[FloatArray], float], x0: FloatArray, step: FloatArray, iters: int) -> tuple[FloatArray, float]:
    pts = [np.asarray(x0, dtype=np.float64)] + [x0 + np.eye(x0.size)[i] * step[i] for i in range(x0.size)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centre = np.mean(pts[:-1], axis=0)
        xr = centre + (centre - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centre + 2.0 * (centre - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centre + 0.5 * (pts[-1] - centre)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0] + 0.5 * (p - pts[0]) for p in pts]
                vals = [f(p) for p in pts]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def calibrate(
    target: Mapping[str, float],
    *,
    batch_size: int = 2048,
    pooling_factor: float = 32.0,
    num_rows: int = 10_000_000,
    starts: Sequence[tuple[float, float, float, float]] | None = None,
    iters: int = 300,
) -> tuple[Profile, dict[str, float]]:
    """Fit a :class:`Profile` whose expected statistics match ``target`` at the given batch.

    ``target`` has the keys ``unique_gt16``, ``access_gt16``, ``unique_gt64``
    and ``access_gt64``.  Minimises the sum of squared log ratios of expected
    to target statistics over ``(alpha, log10 shift, log10 hot_rows, logit
    cold_fraction)`` with Nelder-Mead from each of ``starts`` (given in
    natural units: ``(alpha, shift, hot_rows, cold_fraction)``).  Deterministic.
    Returns the profile and its expected statistics.
    """
    missing = set(_STAT_KEYS) - set(target)
    if missing:
        raise InputError(f"target lacks {sorted(missing)}")
    tg = np.array([float(target[k]) for k in _STAT_KEYS])
    if (tg <= 0).any() or (tg >= 1).any():
        raise InputError("target statistics must be fractions in (0, 1)")
    n = float(batch_size) * float(pooling_factor)

    def unpack(x: FloatArray) -> Profile:
        return Profile(
            alpha=float(x[0]),
            shift=float(10.0 ** x[1]),
            hot_rows=max(int(round(10.0 ** x[2])), 1),
            cold_fraction=float(1.0 / (1.0 + math.exp(-x[3]))),
            ref_batch_size=int(batch_size),
            ref_pooling_factor=float(pooling_factor),
        )

    def loss(x: FloatArray) -> float:
        if not (0.05 < x[0] < 4.0 and -4 < x[1] < 4 and 0 <= x[2] < 7 and -12 < x[3] < 12):
            return 1e9
        s = expected_reuse_stats(unpack(x), n, num_rows)
        got = np.array([max(s[k], 1e-12) for k in _STAT_KEYS])
        return float(np.sum(np.log(got / tg) ** 2))

    starts = starts or [(0.75, 0.05, 0.04 * n, 0.05), (1.0, 1.0, 0.1 * n, 0.1)]
    best: tuple[FloatArray, float] | None = None
    for a, q, h, c in starts:
        x0 = np.array([a, math.log10(q), math.log10(h), math.log(c / (1 - c))])
        x, v = _nelder_mead(loss, x0, np.array([0.1, 0.3, 0.3, 0.5]), iters)
        if best is None or v < best[1]:
            best = (x, v)
    assert best is not None
    prof = unpack(best[0])
    return prof, expected_reuse_stats(prof, n, num_rows)
