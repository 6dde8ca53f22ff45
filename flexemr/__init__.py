"""FlexEMR — disaggregated embedding serving on top of :mod:`rdmaio`.

Embedding tables live on embedding servers; rankers fetch rows with one-sided
RDMA reads.  Layout: the public names below are re-exported from private
modules, one responsibility each::

    _errors.py    exception hierarchy (root: FlexEMRError; builtin bases too)
    _spec.py      TableSpec: name, shape and dtype of a table
    _plan.py      Shard, ShardingPlan (range routing), ServerAddress, ClusterConfig (TOML)
    _split.py     split_lookup: ids -> deduplicated, coalesced per-shard reads (pure numpy)
    _jagged.py    JaggedBatch (KeyedJaggedTensor layout), pool_bags
    _init.py      deterministic table values: a pure function of (seed, table, rows)
    _meta.py      the "flexemr/meta" region: a length-prefixed msgpack shard map
    _metrics.py   ClientMetrics: counters and log2 latency histograms
    _server.py    EmbeddingServer: registers shards, publishes metadata, serves reads
    _client.py    EmbeddingClient: lookups, request coalescing, in-flight dedup,
                  pooled lookups, ranker cache, prefetch, remap (docs/locality.md)
    _locality.py  hierarchical pooling over the "flexemr/pool" channel, LocalityMetrics
    _cluster.py   LocalCluster: N servers on loopback (own processes) + clients
    __main__.py   the command line (``flexemr serve ...``)
    bench/        ``python -m flexemr.bench lookup`` / ``locality``

flexemr imports only rdmaio's public names.  Importing flexemr changes nothing
global: no logging configuration, no environment edits.
"""

from ._client import EmbeddingClient
from ._cluster import LocalCluster
from ._errors import (
    ClosedError,
    ConfigError,
    FlexEMRError,
    InputError,
    LookupIdError,
    MetadataError,
    TransportError,
    UnknownTableError,
)
from ._init import build_model
from ._jagged import JaggedBatch, pool_bags
from ._locality import LocalityMetrics
from ._metrics import ClientMetrics, LatencyHistogram
from ._plan import ClusterConfig, ServerAddress, Shard, ShardingPlan
from ._remap import RowRemap
from ._server import EmbeddingServer
from ._spec import TableSpec
from ._split import SplitLookup, SubRequest, split_lookup

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
