"""FlexEMR — disaggregated embedding serving on top of :mod:`rdmaio`.

Embedding tables live on embedding servers; rankers fetch rows with one-sided
RDMA reads.  Layout: the public names below are re-exported from private
modules, one responsibility each::

    core/         the pure layer (numpy, no I/O): errors, spec, plan, config (TOML), split,
                  jagged, pooling, poolwire, versioned, meta, init, remap, cache, metrics
    _server.py    EmbeddingServer: registers shards, publishes metadata, serves reads
    _client.py    EmbeddingClient: lookups, request coalescing, in-flight dedup,
                  pooled lookups, ranker cache, prefetch, remap (docs/locality.md)
    _locality.py  the pooling RPC's service (servers) and channel (rankers)
    _cluster.py   LocalCluster: N servers on loopback (own processes) + clients
    __main__.py   the command line (``flexemr serve ...``)
    bench/        ``python -m flexemr.bench lookup`` / ``locality``

flexemr imports only rdmaio's public names.  Importing flexemr changes nothing
global: no logging configuration, no environment edits.
"""

from ._client import EmbeddingClient
from ._cluster import LocalCluster
from .core.errors import (
    ClosedError,
    ConfigError,
    FlexEMRError,
    InputError,
    LookupIdError,
    MetadataError,
    TransportError,
    UnknownTableError,
)
from .core.init import build_model
from .core.jagged import JaggedBatch, pool_bags
from .core.metrics import ClientMetrics, LatencyHistogram, LocalityMetrics
from .core.config import ClusterConfig, ServerAddress
from .core.plan import Shard, ShardingPlan
from .core.remap import RowRemap
from ._server import EmbeddingServer
from .core.spec import TableSpec
from .core.split import SplitLookup, SubRequest, split_lookup

__version__ = "0.1.0"

__all__ = [
    "ClientMetrics",
    "ClosedError",
    "ClusterConfig",
    "ConfigError",
    "EmbeddingClient",
    "EmbeddingServer",
    "FlexEMRError",
    "InputError",
    "JaggedBatch",
    "LatencyHistogram",
    "LocalCluster",
    "LocalityMetrics",
    "LookupIdError",
    "MetadataError",
    "RowRemap",
    "ServerAddress",
    "Shard",
    "ShardingPlan",
    "SplitLookup",
    "SubRequest",
    "TableSpec",
    "TransportError",
    "UnknownTableError",
    "build_model",
    "pool_bags",
    "split_lookup",
]
