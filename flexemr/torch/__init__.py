"""PyTorch and TorchRec on flexemr: serve a TorchRec model's embeddings with a drop-in module.

Needs the ``torch`` extra (``make torch``; see ``docs/torch.md``).  Importing
this package imports torch; torchrec is imported where a TorchRec type is
needed, and its absence is one :class:`DependencyError` naming the install
steps.  ``import flexemr`` alone never imports torch.

A trained model's tables go to the servers, and the model reads them back::

    import flexemr.torch as ft

    out = ft.export(model, "model-tables", servers=2)     # <table>.npy + cluster.toml
    # on each server host:  flexemr serve --config model-tables/cluster.toml --server s0  (s1, ...)
    ft.swap_embeddings(model, out.config_path)            # every EmbeddingBagCollection -> remote
    logits = model(dense, kjt)                            # as before, tables read over RDMA

Layout::

    _deps.py     torch/torchrec imports, DependencyError, INSTALL_STEPS
    _convert.py  KeyedJaggedTensor <-> JaggedBatch, pooled -> KeyedTensor, configs <-> TableSpec, weights
    _thread.py   ClientThread: an EmbeddingClient on a private event-loop thread, callable from any thread
    _module.py   RemoteEmbeddingBagCollection, swap_embeddings
    _export.py   export: tables as .npy + a cluster file that `flexemr serve` loads as it is
    demo.py      `flexemr demo --model torchrec`: TorchRec's DLRM on remote embeddings
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401 - fail here, in one line, when torch is missing
except ImportError as _exc:  # pragma: no cover - exercised where torch is not installed
    from ._deps import INSTALL_STEPS as _STEPS
    from ._deps import DependencyError as _DependencyError

    raise _DependencyError(f"flexemr.torch needs torch ({_exc}); {_STEPS}") from _exc

from ._convert import (
    embedding_bag_configs,
    embedding_names,
    jagged_from_kjt,
    keyed_tensor,
    kjt_from_jagged,
    pooling_modes,
    table_specs,
    weights,
    weights_from_kjt,
)
from ._deps import INSTALL_STEPS, DependencyError, torchrec_missing
from ._export import Export, export
from ._module import RemoteEmbeddingBagCollection, swap_embeddings
from ._thread import ClientThread

__all__ = [
    "INSTALL_STEPS",
    "ClientThread",
    "DependencyError",
    "Export",
    "RemoteEmbeddingBagCollection",
    "embedding_bag_configs",
    "embedding_names",
    "export",
    "jagged_from_kjt",
    "keyed_tensor",
    "kjt_from_jagged",
    "pooling_modes",
    "swap_embeddings",
    "table_specs",
    "torchrec_missing",
    "weights",
    "weights_from_kjt",
]
