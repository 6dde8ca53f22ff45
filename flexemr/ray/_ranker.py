"""The HTTP ranker: a Ray Serve deployment of a DLRM whose embeddings come from the servers.

:class:`RankerReplica` is one replica's work, without Ray: it builds the
model over the cluster's tables, connects an :class:`~flexemr.EmbeddingClient`
on first use (in the replica's event loop), and ranks lists of checked
requests (:mod:`flexemr.ray._request`) in one lookup and one forward pass::

    requests --merge--> dense [sum B, 13], JaggedBatch --lookup_jagged(pooling="sum")-->
             pooled [sum B, 26, d] --model.forward (worker thread)--> ctr --split--> one list per request

:func:`ranker_deployment` wraps it for Ray Serve: ``__call__`` takes the HTTP
request (``POST``: rank; ``GET``: what the replica serves), ``@serve.batch``
gathers concurrent requests into one call of :meth:`RankerReplica.rank`, and
the replicas scale (a fixed number, or Serve's autoscaling).  A replica gets
the cluster from the deployment's registry and reports its metrics endpoint
there; its health check fails when its client's engine failed or a server
moved to another address, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..client.client import EmbeddingClient
from ..client.metrics_export import ClientMetricsEndpoint, start_client_metrics
from ..core.config import ClusterConfig
from ..core.errors import ClosedError, ConfigError, FlexEMRError, InputError, LookupIdError
from ._request import MAX_SAMPLES, RankModel, RankRequest, build_model, merge_requests, parse_request

__all__ = ["RankerOptions", "RankerReplica", "ranker_deployment"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankerOptions:
    """How the HTTP rankers run (``flexemr ray up`` options of the same names).

    Parameters
    ----------
    replicas:
        Fixed number of replicas; ``None`` with ``max_replicas``: autoscaling.
    min_replicas, max_replicas:
        Autoscaling bounds (Serve scales on requests in flight per replica,
        ``target_ongoing_requests``).
    model:
        ``"numpy"`` (:class:`~flexemr.apps.dlrm.DLRM`) or ``"torch"`` (the same network in PyTorch).
    model_seed:
        Seed of the DLRM weights.
    max_batch_size, batch_wait_timeout_s:
        ``@serve.batch``: requests gathered into one lookup, and how long the
        first waits for more.
    cpus:
        Ray CPUs reserved per replica (a scheduling figure).
    max_ongoing_requests:
        Requests one replica takes at a time (Serve queues the rest).
    client_options:
        :class:`~flexemr.ClientOptions` keywords of each replica's client.
    metrics:
        Serve each replica's client metrics on a free port of its node
        (listed by ``flexemr ray status``).
    """

    replicas: int | None = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    model: str = "numpy"
    model_seed: int = 0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.002
    cpus: float = 0.5
    max_ongoing_requests: int = 32
    target_ongoing_requests: float = 4.0
    client_options: Mapping[str, Any] = field(default_factory=dict)
    metrics: bool = True

    def __post_init__(self) -> None:
        if self.model not in ("numpy", "torch"):
            raise ConfigError(f"model must be 'numpy' or 'torch', got {self.model!r}")
        if self.replicas is None and self.max_replicas is None:
            raise ConfigError("give replicas, or max_replicas for autoscaling")
        if self.replicas is not None and (not isinstance(self.replicas, int) or self.replicas < 1):
            raise ConfigError(f"replicas must be an int >= 1, got {self.replicas!r}")
        if self.max_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not self.batch_wait_timeout_s >= 0 or not self.cpus >= 0 or self.max_ongoing_requests < 1:
            raise ConfigError("batch_wait_timeout_s and cpus must be >= 0, max_ongoing_requests >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["client_options"] = dict(self.client_options)
        return d


class RankerReplica:
    """One ranker replica (module docstring).

    Parameters
    ----------
    config:
        The cluster (real addresses), or a function returning it (called on
        each health check too: a changed address fails the check).
    options:
        :class:`RankerOptions`.
    """

    def __init__(self, config: ClusterConfig | Callable[[], ClusterConfig], options: RankerOptions) -> None:
        self._source = config if callable(config) else (lambda: config)
        self.config = self._source()
        self.options = options
        specs = [self.config.plan.spec(t) for t in self.config.plan.tables]
        self.model: RankModel = build_model(options.model, specs, options.model_seed)
        self.client: EmbeddingClient | None = None
        self.metrics: ClientMetricsEndpoint | None = None
        self._connecting = asyncio.Lock()
        self.requests = 0
        self.samples = 0

    async def connected_client(self) -> EmbeddingClient:
        """The client, connected on first use (in the calling event loop)."""
        async with self._connecting:
            if self.client is None:
                client = EmbeddingClient(self.config, **dict(self.options.client_options))
                await client.connect()
                self.client = client
        return self.client

    def parse(self, body: bytes | str | Mapping[str, Any]) -> RankRequest:
        """Check one request (:func:`~flexemr.ray._request.parse_request`)."""
        return parse_request(body, self.model, self.config.plan, max_samples=MAX_SAMPLES)

    async def rank(self, requests: Sequence[RankRequest]) -> list[npt.NDArray[np.float32]]:
        """CTRs of every request, ranked together: one lookup, one forward pass."""
        client = await self.connected_client()
        dense, sparse, sizes = merge_requests(requests)
        pooled = await client.lookup_jagged(sparse, pooling="sum")
        stacked = self.model.stack_pooled(pooled, sparse.batch_size)
        ctr = await asyncio.to_thread(self.model.forward, dense, stacked)
        self.requests += len(sizes)
        self.samples += sparse.batch_size
        cuts = np.cumsum(sizes)[:-1]
        return list(np.split(ctr, cuts))

    def info(self) -> dict[str, Any]:
        """What this replica serves."""
        return {"model": repr(self.model), "tables": list(self.model.tables),
                "dense_features": self.model.dense_features, "servers": list(self.config.plan.servers),
                "connected": self.client is not None and self.client.connected,
                "healthy": self.client is not None and self.client.healthy(),
                "requests": self.requests, "samples": self.samples}

    def check(self) -> None:
        """Raise unless this replica can serve: its engine works and no server moved."""
        client = self.client
        if client is not None:
            engine = client.engine
            if engine.failure is not None:
                raise ClosedError(f"this ranker's rdmaio engine failed: {engine.failure}")
        now = self._source()
        if now.addresses != self.config.addresses:
            moved = [s for s in now.plan.servers if now.address(s) != self.config.address(s)]
            raise ClosedError(f"servers {moved} moved to other addresses: this replica must be replaced")

    def start_metrics(self, host: str, labels: Mapping[str, str]) -> int | None:
        """Serve this replica's client metrics on a free port of ``host`` (after the client connected)."""
        if not self.options.metrics or self.client is None or self.metrics is not None:
            return None
        self.metrics = start_client_metrics(self.client, 0, host, labels=labels)
        return self.metrics.port

    async def aclose(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.client is not None:
            await self.client.aclose()


def _response(status: int, payload: dict[str, Any]) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


def ranker_deployment(deployment: str, options: RankerOptions) -> Any:
    """The Ray Serve application of the rankers of deployment ``deployment`` (bound, ready for ``serve.run``)."""
    import ray
    from ray import serve

    from ._registry import NAMESPACE, registry_name

    def fetch_config() -> ClusterConfig:
        registry = ray.get_actor(registry_name(deployment), namespace=NAMESPACE)
        d: Any = ray.get(registry.config.remote(), timeout=60)
        if d is None:
            raise ClosedError(f"deployment {deployment!r}: not every server is registered")
        return ClusterConfig.from_dict(d)

    scaling: dict[str, Any]
    if options.replicas is not None:
        scaling = {"num_replicas": options.replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": options.target_ongoing_requests}}

    @serve.deployment(name=f"{deployment}-ranker", ray_actor_options={"num_cpus": options.cpus},
                      max_ongoing_requests=options.max_ongoing_requests, health_check_period_s=5,
                      **scaling)
    class FlexEMRRanker:
        def __init__(self) -> None:
            self.replica = RankerReplica(fetch_config, options)
            ctx = serve.get_replica_context()
            replica_id = getattr(ctx, "replica_id", None)
            self.key = str(getattr(replica_id, "unique_id", None) or replica_id or "replica")
            self.registered = False

        @serve.batch(max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_timeout_s)
        async def _rank(self, requests: list[RankRequest]) -> list[list[float]]:
            outs = await self.replica.rank(requests)
            return [o.tolist() for o in outs]

        async def __call__(self, request: Any) -> Any:
            if request.method == "GET":
                return _response(200, self.replica.info())
            if request.method != "POST":
                return _response(405, {"error": "POST a request to rank, GET for what this ranker serves"})
            try:
                parsed = self.replica.parse(await request.body())
            except (InputError, LookupIdError) as exc:
                return _response(400, {"error": str(exc)})
            try:
                ctr = await self._rank(parsed)
            except FlexEMRError as exc:
                log.warning("ranking failed: %s", exc)
                return _response(503, {"error": f"{type(exc).__name__}: {exc}"})
            if not self.registered:
                self._register()
            return _response(200, {"ctr": ctr})

        def _register(self) -> None:
            self.registered = True
            host = ray.util.get_node_ip_address()
            port = self.replica.start_metrics(host, {"deployment": deployment, "replica": self.key})
            if port is not None:
                registry = ray.get_actor(registry_name(deployment), namespace=NAMESPACE)
                registry.register_ranker.remote(self.key, {"host": host, "metrics_port": port})

        async def check_health(self) -> None:
            # the check asks the registry actor (a blocking ray.get): off the replica's event loop
            await asyncio.to_thread(self.replica.check)

        async def __del__(self) -> None:
            await self.replica.aclose()

    deployment_cls: Any = FlexEMRRanker  # serve.deployment made it a Deployment
    return deployment_cls.bind()
