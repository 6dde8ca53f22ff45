"""FlexEMR — disaggregated embedding serving on top of :mod:`rdmaio`.

Embedding tables live on embedding servers; rankers fetch rows with one-sided
RDMA reads.

The public API is exactly the names re-exported below (``__all__``); every
other module is internal, whatever its name (modules inside the layer
folders carry no leading underscore: the folder says what they are).  The
layers, each importing only the ones above it (``tests/test_layers.py``)::

    core/        pure numpy, no I/O: errors, spec, plan, config (TOML), split,
                 jagged, pooling, poolwire (the pooling RPC's codec), versioned,
                 meta, init, remap, cache (RowCache), metrics
    client/      the ranker: EmbeddingClient (client.py, a facade) configured by
                 ClientOptions (options.py), over peers, batcher, coherence,
                 cache, pooled, prefetch, replica; leak (unclosed clients)
    server/      EmbeddingServer (server.py), the pooling service (pooling.py)
    apps/        the command line (cli.py), LocalCluster (cluster.py), demo, rank,
                 dlrm, criteo, trace, workload, report
    bench/       ``python -m flexemr.bench ...`` (may use apps)
    testing.py   test oracles (core only)
    __main__.py  the ``flexemr`` command: the apps' commands plus bench's

flexemr imports only rdmaio's public names.  Importing flexemr changes nothing
global: no logging configuration, no environment edits.
"""

from .apps.cluster import LocalCluster
from .client.client import EmbeddingClient
from .client.options import ClientOptions
from .core.config import ClusterConfig, ServerAddress
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
from .core.plan import Shard, ShardingPlan
from .core.remap import RowRemap
from .core.spec import TableSpec
from .core.split import SplitLookup, SubRequest, split_lookup
from .server.server import EmbeddingServer

__version__ = "0.1.0"

__all__ = [
    "ClientMetrics",
    "ClientOptions",
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
