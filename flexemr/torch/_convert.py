"""Conversions between TorchRec's types and flexemr's numpy ones.

==========================================  ==========================================
TorchRec                                    flexemr
==========================================  ==========================================
``KeyedJaggedTensor`` (keys, values,        :class:`~flexemr.JaggedBatch` (+ the weights
lengths/offsets, weights)                   as a separate array)
``KeyedTensor`` (pooled ``[B, sum dims]``)  ``{key: [B, dim] array}`` (what
                                            :meth:`~flexemr.EmbeddingClient.lookup_pooled`
                                            returns)
``EmbeddingBagConfig`` list / EBC           :class:`~flexemr.TableSpec` list
EBC parameters / state dict                 ``{table: [num_rows, dim] array}``
==========================================  ==========================================

Zero-copy where the memory allows: CPU tensors become numpy views
(:meth:`torch.Tensor.numpy`) and numpy arrays become tensors with
:func:`torch.from_numpy`.  The one exception is :func:`kjt_from_jagged`:
a :class:`~flexemr.JaggedBatch`'s arrays are read-only and torch has no
read-only tensors, so its ids are copied.

>>> import torch
>>> from torchrec import KeyedJaggedTensor
>>> kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 7]),
...                         lengths=torch.tensor([2, 0, 1, 1]))
>>> jb = jagged_from_kjt(kjt)
>>> jb.keys, jb.batch_size, jb.ids("f2").tolist(), jb.bag_offsets("f1").tolist()
(('f1', 'f2'), 2, [3, 7], [0, 2, 2])
>>> kjt_from_jagged(jb).lengths().tolist()
[2, 0, 1, 1]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec

from ._deps import torchrec

if TYPE_CHECKING:  # torchrec is imported at run time only where a function needs it
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

__all__ = [
    "Pooling",
    "embedding_bag_configs",
    "embedding_names",
    "jagged_from_kjt",
    "keyed_tensor",
    "kjt_from_jagged",
    "pooling_modes",
    "table_specs",
    "weights",
    "weights_from_kjt",
]

#: flexemr's pooling modes that an EmbeddingBagCollection has (``PoolingType.SUM`` / ``MEAN``).
Pooling = Literal["sum", "mean"]

_DTYPES = {"FP32": "float32", "FP16": "float16"}
_DATA_TYPES = {v: k for k, v in _DTYPES.items()}
_POOLINGS: dict[str, Pooling] = {"SUM": "sum", "MEAN": "mean"}


# ----------------------------------------------------------------- tensors


def _numpy(t: torch.Tensor, what: str) -> npt.NDArray[Any]:
    """A CPU numpy view of ``t`` (a copy only when it is on another device)."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        raise InputError(f"{what} is bfloat16, which numpy cannot hold; convert it with .float()")
    return t.numpy()


def _tensor(a: npt.NDArray[Any]) -> torch.Tensor:
    """``a`` as a tensor: shared when ``a`` is writable, else a copy (torch has no read-only tensors)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _check_kjt(kjt: Any) -> KeyedJaggedTensor:
    kjt_type = torchrec().KeyedJaggedTensor
    if not isinstance(kjt, kjt_type):
        raise InputError(f"expected a torchrec KeyedJaggedTensor, got {type(kjt).__name__}")
    if kjt.variable_stride_per_key():
        raise InputError("KeyedJaggedTensors with a variable batch size per feature (stride_per_key_per_rank) "
                         "are not supported; give every feature the same batch size")
    if kjt.inverse_indices_or_none() is not None:
        raise InputError("KeyedJaggedTensors with inverse_indices (deduplicated variable batches) are not supported")
    return kjt  # type: ignore[no-any-return]


def jagged_from_kjt(kjt: KeyedJaggedTensor) -> JaggedBatch:
    """The :class:`~flexemr.JaggedBatch` of a ``KeyedJaggedTensor`` (same keys, values and lengths).

    The ids are shared with the KJT when they are int64 on the CPU (int32 ids
    are widened, GPU ids copied to the host).  The weights, if any, are not
    part of a JaggedBatch: :func:`weights_from_kjt` returns them.  A KJT with
    a variable batch size per feature raises :class:`~flexemr.InputError`.

    >>> import torch
    >>> from torchrec import KeyedJaggedTensor
    >>> kjt = KeyedJaggedTensor(keys=["user"], values=torch.tensor([4, 5, 6]), offsets=torch.tensor([0, 1, 3]))
    >>> jagged_from_kjt(kjt).lengths.tolist()
    [1, 2]
    """
    kjt = _check_kjt(kjt)
    keys = list(kjt.keys())
    values = _numpy(kjt.values(), "KJT values")
    lengths = _numpy(kjt.lengths(), "KJT lengths")
    batch = int(kjt.stride()) if keys else 0
    return JaggedBatch(keys, values, lengths=lengths, batch_size=batch if keys else None)


def weights_from_kjt(kjt: KeyedJaggedTensor) -> npt.NDArray[Any] | None:
    """The KJT's per-sample weights as a 1-D numpy array aligned with its values (``None``: unweighted).

    Shared with the KJT when they are on the CPU.  Pass them to
    ``client.lookup_pooled(jagged_from_kjt(kjt), per_sample_weights=...)``.
    """
    kjt = _check_kjt(kjt)
    w = kjt.weights_or_none()
    return None if w is None else _numpy(w, "KJT weights")


def kjt_from_jagged(batch: JaggedBatch, weights: npt.ArrayLike | None = None, *,
                    device: torch.device | str | None = None) -> KeyedJaggedTensor:
    """A ``KeyedJaggedTensor`` (int64 values and lengths, float32 weights) of ``batch``.

    ``weights``: one per id of ``batch.values`` (TorchRec's per-sample
    weights).  The ids are copied (a JaggedBatch's arrays are read-only);
    writable float32 weights are shared.  ``device``: where the tensors go
    (default CPU).

    >>> from flexemr import JaggedBatch
    >>> kjt = kjt_from_jagged(JaggedBatch.from_lists({"user": [[1, 2], []]}), weights=[0.5, 2.0])
    >>> kjt.keys(), kjt.stride(), kjt.weights().tolist()
    (['user'], 2, [0.5, 2.0])
    """
    if not isinstance(batch, JaggedBatch):
        raise InputError(f"expected a flexemr JaggedBatch, got {type(batch).__name__}")
    w_t = None
    if weights is not None:
        w = np.asarray(weights)
        if w.ndim != 1 or w.size != len(batch) or (w.size and w.dtype.kind not in "fiu"):
            raise InputError(f"weights must be {len(batch)} numbers (one per id), got shape {w.shape} dtype {w.dtype}")
        w_t = _tensor(w.astype(np.float32, copy=False))
    kjt = torchrec().KeyedJaggedTensor(keys=list(batch.keys), values=_tensor(batch.values),
                                       lengths=_tensor(batch.lengths), weights=w_t,
                                       stride=batch.batch_size)
    return kjt if device is None else kjt.to(torch.device(device))


def keyed_tensor(pooled: Mapping[str, npt.ArrayLike | torch.Tensor], keys: Sequence[str] | None = None, *,
                 device: torch.device | str | None = None) -> KeyedTensor:
    """A ``KeyedTensor`` (float32 ``[B, sum of dims]``) of pooled ``{key: [B, dim]}`` embeddings.

    ``keys``: which keys, in which order (default: the mapping's order).  The
    values are written into one ``[B, sum dims]`` array (one copy), which the
    tensor then shares.

    >>> import numpy as np
    >>> kt = keyed_tensor({"a": np.ones((2, 3), np.float32), "b": np.zeros((2, 1), np.float32)})
    >>> kt.keys(), kt.length_per_key(), tuple(kt.values().shape)
    (['a', 'b'], [3, 1], (2, 4))
    """
    names = list(pooled) if keys is None else list(keys)
    arrays: list[npt.NDArray[Any]] = []
    for k in names:
        if k not in pooled:
            raise InputError(f"no pooled embeddings for key {k!r}; have {list(pooled)}")
        v = pooled[k]
        a = _numpy(v, f"pooled[{k!r}]") if isinstance(v, torch.Tensor) else np.asarray(v)
        if a.ndim != 2:
            raise InputError(f"pooled[{k!r}] must be 2-D [batch, dim], got shape {a.shape}")
        arrays.append(a)
    rows = {a.shape[0] for a in arrays}
    if len(rows) > 1:
        raise InputError(f"pooled embeddings have different batch sizes {sorted(rows)}")
    dims = [int(a.shape[1]) for a in arrays]
    out = np.empty((rows.pop() if rows else 0, sum(dims)), dtype=np.float32)
    lo = 0
    for a, d in zip(arrays, dims):
        out[:, lo:lo + d] = a
        lo += d
    values = torch.from_numpy(out)
    if device is not None:
        values = values.to(torch.device(device))
    return torchrec().KeyedTensor(keys=names, length_per_key=dims, values=values)


# ----------------------------------------------------------------- configs


def _configs(ebc_or_configs: Any) -> list[EmbeddingBagConfig]:
    if isinstance(ebc_or_configs, nn.Module):
        get = getattr(ebc_or_configs, "embedding_bag_configs", None)
        if not callable(get):
            raise ConfigError(f"{type(ebc_or_configs).__name__} is not an EmbeddingBagCollection "
                              "(it has no embedding_bag_configs())")
        return list(get())
    if isinstance(ebc_or_configs, (str, bytes, Mapping)) or not isinstance(ebc_or_configs, Iterable):
        raise ConfigError("expected an EmbeddingBagCollection or a list of EmbeddingBagConfig, "
                          f"got {type(ebc_or_configs).__name__}")
    return list(ebc_or_configs)


def _enum_name(v: Any) -> str:
    return str(getattr(v, "name", v))


def _check_config(cfg: Any) -> TableSpec:
    for attr in ("name", "num_embeddings", "embedding_dim", "feature_names", "pooling", "data_type"):
        if not hasattr(cfg, attr):
            raise ConfigError(f"expected an EmbeddingBagConfig, got {type(cfg).__name__} (no {attr!r})")
    if not cfg.name:
        raise ConfigError("an EmbeddingBagConfig needs a name (the table's name on the servers)")
    dtype = _DTYPES.get(_enum_name(cfg.data_type))
    if dtype is None:
        raise ConfigError(f"table {cfg.name!r}: data_type {_enum_name(cfg.data_type)} is not supported; "
                          f"flexemr serves {sorted(_DTYPES)} tables")
    if _enum_name(cfg.pooling) not in _POOLINGS:
        raise ConfigError(f"table {cfg.name!r}: pooling {_enum_name(cfg.pooling)} is not supported "
                          f"(an EmbeddingBagCollection pools with {sorted(_POOLINGS)})")
    return TableSpec(cfg.name, cfg.num_embeddings, cfg.embedding_dim, dtype)


def table_specs(ebc: Any) -> list[TableSpec]:
    """The :class:`~flexemr.TableSpec` of every table of an ``EmbeddingBagCollection`` (or of its configs).

    Name, rows, dim and dtype (``DataType.FP32`` -> ``float32``, ``FP16`` ->
    ``float16``) in the configs' order.  Other data types, ``PoolingType.NONE``
    and duplicate table names raise :class:`~flexemr.ConfigError`.  Feature
    names and pooling are not part of a TableSpec: :func:`pooling_modes` and
    the configs' ``feature_names`` carry them.

    >>> from torchrec import EmbeddingBagConfig
    >>> table_specs([EmbeddingBagConfig(name="t_user", num_embeddings=100, embedding_dim=8,
    ...                                 feature_names=["user", "friend"])])
    [TableSpec(name='t_user', num_rows=100, dim=8, dtype='float32')]
    """
    specs = [_check_config(c) for c in _configs(ebc)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate table names in {names}")
    return specs


def pooling_modes(ebc: Any) -> dict[str, Pooling]:
    """``{table: "sum" | "mean"}``: the pooling of every table of an EBC (or of its configs)."""
    cfgs = _configs(ebc)
    for c in cfgs:
        _check_config(c)
    return {c.name: _POOLINGS[_enum_name(c.pooling)] for c in cfgs}


def embedding_names(ebc: Any) -> list[str]:
    """The keys of an EBC's output ``KeyedTensor``, as TorchRec names them.

    One per (table, feature) in config order; a feature that several tables
    read is named ``"feature@table"``, any other just ``"feature"`` (a config
    without feature names reads the feature named like its table).
    """
    cfgs = _configs(ebc)
    feats = [list(c.feature_names) or [c.name] for c in cfgs]
    uses: dict[str, int] = {}
    for fs in feats:
        for f in fs:
            uses[f] = uses.get(f, 0) + 1
    return [f"{f}@{c.name}" if uses[f] > 1 else f for c, fs in zip(cfgs, feats) for f in fs]


def embedding_bag_configs(specs: Iterable[TableSpec], features: Mapping[str, Sequence[str]] | None = None,
                          pooling: Pooling | Mapping[str, Pooling] = "sum") -> list[EmbeddingBagConfig]:
    """``EmbeddingBagConfig`` s of tables given as :class:`~flexemr.TableSpec` s (the inverse of :func:`table_specs`).

    ``features``: ``{table: [feature names]}`` (default: each table reads
    the feature named like it); ``pooling``: one mode or ``{table: mode}``
    (``"sum"`` or ``"mean"``).  float32 and float16 tables only.

    >>> from flexemr import TableSpec
    >>> specs = [TableSpec("t_user", 100, 8), TableSpec("t_ad", 50, 8, "float16")]
    >>> cfgs = embedding_bag_configs(specs, {"t_user": ["user", "friend"]}, pooling={"t_ad": "mean"})
    >>> [(c.name, c.feature_names, c.pooling.name, c.data_type.name) for c in cfgs]
    [('t_user', ['user', 'friend'], 'SUM', 'FP32'), ('t_ad', ['t_ad'], 'MEAN', 'FP16')]
    >>> table_specs(cfgs) == specs
    True
    """
    tr = torchrec()
    spec_list = list(specs)
    known = {s.name for s in spec_list}
    for what, m in (("features", features), ("pooling", pooling)):
        if isinstance(m, Mapping) and set(m) - known:
            raise ConfigError(f"{what} names tables that are not given: {sorted(set(m) - known)}")
    out = []
    for s in spec_list:
        if not isinstance(s, TableSpec):
            raise ConfigError(f"expected TableSpec, got {type(s).__name__}")
        if s.dtype not in _DATA_TYPES:
            raise ConfigError(f"table {s.name!r} is {s.dtype}; an EmbeddingBagCollection holds "
                              f"{sorted(_DATA_TYPES)} tables")
        mode = pooling.get(s.name, "sum") if isinstance(pooling, Mapping) else pooling
        if mode not in ("sum", "mean"):
            raise ConfigError(f"table {s.name!r}: pooling must be 'sum' or 'mean', got {mode!r}")
        feats = list((features or {}).get(s.name, [s.name]))
        out.append(tr.EmbeddingBagConfig(
            name=s.name, num_embeddings=s.num_rows, embedding_dim=s.dim, feature_names=feats,
            pooling=tr.PoolingType.SUM if mode == "sum" else tr.PoolingType.MEAN,
            data_type=getattr(tr.DataType, _DATA_TYPES[s.dtype])))
    return out


# ----------------------------------------------------------------- weights


def _state_dict(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, (str, os.PathLike)):
        raise ConfigError("give a module or a state dict (torch.load it first: torch.load(path, weights_only=True))")
    if not isinstance(obj, Mapping):
        raise ConfigError(f"expected an EmbeddingBagCollection, a model or a state dict, got {type(obj).__name__}")
    return obj


def weights(ebc: Any) -> dict[str, npt.NDArray[Any]]:
    """``{table: [num_rows, dim] array}`` of an ``EmbeddingBagCollection``, a model holding EBCs, or a state dict.

    Tables are the state dict's ``...embedding_bags.<table>.weight``
    entries (TorchRec's EBC layout), in order.  The arrays share memory
    with CPU parameters (no copy); GPU ones are copied to the host.
    float32 and float16 weights only; two EBCs with a table of the same
    name raise :class:`~flexemr.ConfigError`.

    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", num_embeddings=5, embedding_dim=2,
    ...                                                         feature_names=["f"])])
    >>> w = weights(ebc)
    >>> w["t"].shape, bool((w["t"] == ebc.embedding_bags["t"].weight.detach().numpy()).all())
    ((5, 2), True)
    """
    sd = _state_dict(ebc)
    out: dict[str, npt.NDArray[Any]] = {}
    where: dict[str, str] = {}
    for key, value in sd.items():
        parts = str(key).split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-3] != "embedding_bags":
            continue
        table = parts[-2]
        if table in out:
            raise ConfigError(f"table {table!r} is in two places ({where[table]} and {key}); "
                              "export the EmbeddingBagCollections one by one")
        arr = _numpy(value, str(key)) if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.ndim != 2 or arr.dtype.name not in _DATA_TYPES:
            raise ConfigError(f"{key}: expected a 2-D float32 or float16 table, got {arr.dtype} {arr.shape}")
        out[table] = arr
        where[table] = str(key)
    if not out:
        raise ConfigError("no embedding tables found (no '...embedding_bags.<table>.weight' entries)")
    return out
