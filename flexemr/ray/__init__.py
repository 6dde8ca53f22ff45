"""flexemr on Ray: embedding servers as Ray actors, HTTP rankers on Ray Serve (the ``ray`` extra).

Layout (implementation in private modules; this list is the public API)::

    _cluster.py   up(), down(), RayCluster, ServerActor: the deployment on a running Ray cluster
    _registry.py  Registry: the shard map and the servers' addresses, published to rankers
    _host.py      ServerHost: an EmbeddingServer on an event loop thread of its own
    _ranker.py    RankerOptions, RankerReplica, ranker_deployment(): the Ray Serve rankers
    _request.py   the rankers' JSON format (parse_request, encode_request) and models (DLRM, TorchDLRM)
    _cli.py       ``flexemr ray up | down | status | rank``
    _bench.py     Ray Serve rankers vs ``flexemr rank`` on a local multi-node Ray cluster
    _deps.py      Ray, imported on first use (DependencyError says how to install it)

Importing this package does not import Ray; the functions that need it do.
``docs/deployment.md`` (section "Ray") walks through a deployment.
"""

from ._cluster import RayCluster, ServerActor, down, up
from ._deps import RAY_VERSION, DependencyError
from ._host import ServerHost
from ._ranker import RankerOptions, RankerReplica, ranker_deployment
from ._registry import NAMESPACE, Registry
from ._request import RankRequest, TorchDLRM, build_model, encode_request, merge_requests, parse_request

__all__ = [
    "NAMESPACE",
    "RAY_VERSION",
    "DependencyError",
    "RankRequest",
    "RankerOptions",
    "RankerReplica",
    "RayCluster",
    "Registry",
    "ServerActor",
    "ServerHost",
    "TorchDLRM",
    "build_model",
    "down",
    "encode_request",
    "merge_requests",
    "parse_request",
    "ranker_deployment",
    "up",
]
