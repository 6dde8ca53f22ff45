"""A FlexEMR deployment on a running Ray cluster: :func:`up`, :class:`RayCluster`, :func:`down`.

:func:`up` places the cluster file's embedding servers on the Ray cluster and
puts the HTTP rankers in front of them::

    registry actor  "<name>/registry"   the shard map and the servers' addresses (:mod:`._registry`)
    placement group "<name>/servers"    one bundle per server, STRICT_SPREAD: one server per node
    server actors   "<name>/server/s0"  an EmbeddingServer each (:class:`ServerActor`), its shards in the
                                        actor process's memory, served over rdmaio on the node's address
    Serve app       "<name>"            the rankers (:mod:`._ranker`) at http://HOST:PORT/<name>

Every actor is detached (it outlives the driver that called :func:`up`) and
lives in the Ray namespace ``"flexemr"``.  Ray restarts a server actor that
dies (``max_restarts``): the new process listens where the old one did (its
port is in the registry), rankers reconnect to it, and with a versioned plan
they resync its shards from the other replicas before reading from it again
(``docs/reliability.md``); meanwhile they read from the other replicas.

For one server per NUMA socket instead of one per node, give each node a
custom resource per socket (``ray start --resources '{"socket": 2}'``) and
``bundle={"socket": 1}`` with ``strategy="SPREAD"`` (binding the process to the
socket's cores and memory is up to the node, e.g. ``numactl`` around ``ray start``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from ..core.config import ClusterConfig, table_files
from ..core.errors import ClosedError, ConfigError
from ._deps import ray as _ray
from ._deps import serve as _serve
from ._host import ServerHost
from ._ranker import RankerOptions, ranker_deployment
from ._registry import NAMESPACE, Registry, registry_name, server_actor_name

__all__ = ["RayCluster", "ServerActor", "down", "up"]

log = logging.getLogger(__name__)

STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")
DEFAULT_RANKER = RankerOptions()


class ServerActor:
    """The Ray actor of one embedding server (a :class:`~flexemr.ray._host.ServerHost`).

    Its constructor reads the cluster file and its previous record from the
    registry, starts the server on this node's address (the previous port
    after a restart; else the file's port, or any with ``ports="any"``),
    then registers where it listens.  ``options``: ``seed``, ``npy``,
    ``transport``, ``workers``, ``ports``, ``metrics``, ``host``.
    """

    def __init__(self, deployment: str, server: str, options: Mapping[str, Any]) -> None:
        ray = _ray()
        self.deployment, self.name = deployment, server
        self._registry = ray.get_actor(registry_name(deployment), namespace=NAMESPACE)
        config = ClusterConfig.from_dict(ray.get(self._registry.cluster_file.remote()))
        prev = ray.get(self._registry.previous.remote(server))
        host = options.get("host") or ray.util.get_node_ip_address()
        if prev is not None:
            port, metrics_port = int(prev["port"]), prev.get("metrics_port") or 0
        else:
            port = config.address(server).port if options.get("ports", "file") == "file" else 0
            metrics_port = 0
        kwargs: dict[str, Any] = {"host": host, "port": port, "seed": int(options.get("seed", 0)),
                                  "npy": dict(options.get("npy") or {}),
                                  "transport": options.get("transport", "auto"),
                                  "workers": int(options.get("workers", 1)),
                                  "metrics_port": metrics_port if options.get("metrics", True) else None}
        try:
            self.host = ServerHost(config, server, **kwargs)
        except ConfigError as exc:
            if not str(exc).startswith("metrics:") or not metrics_port:
                raise
            log.warning("server %s: its previous metrics port is taken (%s); using another", server, exc)
            self.host = ServerHost(config, server, **{**kwargs, "metrics_port": 0})
        record = {**self.host.status(), "node_id": ray.get_runtime_context().get_node_id()}
        ray.get(self._registry.register_server.remote(server, record))

    def status(self) -> dict[str, Any]:
        """:meth:`ServerHost.status` (where it listens, state, sessions, pid, ...)."""
        return self.host.status()

    def drain(self, timeout: float = 10.0) -> float:
        """Drain the server (:meth:`~flexemr.EmbeddingServer.drain`) and close it; the seconds it took."""
        ray = _ray()
        ray.get(self._registry.set_state.remote(self.name, "draining"))
        took = self.host.drain(timeout)
        self.host.close()
        ray.get(self._registry.set_state.remote(self.name, "closed"))
        return took


class _DetachedInGroupFilter(logging.Filter):
    """Drops Ray's warning that a restartable detached actor in a placement group dies with the group:
    the server actors are meant to (the group is removed by :func:`down` only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "restartable detached actor with a placement group" not in record.getMessage()


def _init(address: str | None) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False,
                     logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ConfigError(f"no Ray cluster at {address or 'auto'} ({exc}); start one (ray start --head) "
                              f"or give its address") from None
    return ray


def _registry(ray: Any, name: str) -> Any | None:
    try:
        return ray.get_actor(registry_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


class RayCluster:
    """A handle on deployment ``name`` (see :func:`up`); connects to Ray (``address``) if needed.

    :class:`ClosedError` when no such deployment is up.
    """

    def __init__(self, name: str = "flexemr", *, address: str | None = None) -> None:
        self.name = name
        self._ray = _init(address)
        reg = _registry(self._ray, name)
        if reg is None:
            raise ClosedError(f"no flexemr deployment {name!r} on this Ray cluster (flexemr ray up starts one)")
        self._reg = reg

    def __repr__(self) -> str:
        return f"<RayCluster {self.name}>"

    def info(self) -> dict[str, Any]:
        """Options, servers (their last records) and rankers' metrics endpoints, from the registry."""
        info: dict[str, Any] = self._ray.get(self._reg.info.remote(), timeout=60)
        return info

    def servers(self) -> dict[str, dict[str, Any]]:
        """Every server's last record: host, port, state, incarnation, starts, pid, node_id, metrics_port."""
        out: dict[str, dict[str, Any]] = self._ray.get(self._reg.servers.remote(), timeout=60)
        return out

    def config(self) -> ClusterConfig:
        """The cluster with the servers' real addresses (what rankers connect to)."""
        d = self._ray.get(self._reg.config.remote(), timeout=60)
        if d is None:
            raise ClosedError(f"deployment {self.name!r}: not every server has registered yet")
        return ClusterConfig.from_dict(d)

    @property
    def url(self) -> str | None:
        """The rankers' HTTP endpoint (``None`` without rankers)."""
        opts = self.info()["options"]
        if not opts.get("ranker"):
            return None
        return f"http://{opts['http_host']}:{opts['http_port']}/{self.name}"

    def actor(self, server: str) -> Any:
        """The Ray actor handle of server ``server``."""
        try:
            return self._ray.get_actor(server_actor_name(self.name, server), namespace=NAMESPACE)
        except ValueError:
            raise ClosedError(f"deployment {self.name!r} has no server actor {server!r}") from None

    def status(self, server: str, timeout: float = 60.0) -> dict[str, Any]:
        """Ask server ``server``'s actor how it is (waits while Ray restarts it)."""
        out: dict[str, Any] = self._ray.get(self.actor(server).status.remote(), timeout=timeout)
        return out

    def wait_ready(self, timeout: float = 120.0, *, starts: Mapping[str, int] | None = None) -> bool:
        """Wait until every server is registered and ready (and started at least ``starts[s]`` times)."""
        deadline = time.monotonic() + timeout
        want = dict(starts or {})
        plan_servers = self.info()["plan_servers"]
        while True:
            recs = self.servers()
            if all(s in recs and recs[s].get("state") == "ready" and recs[s]["starts"] >= want.get(s, 1)
                   for s in plan_servers):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def kill(self, server: str) -> None:
        """Kill server ``server``'s actor process as a crash would; Ray restarts it (``max_restarts``)."""
        self._ray.kill(self.actor(server), no_restart=False)

    def drain(self, server: str, timeout: float = 10.0) -> float:
        """Drain server ``server`` and end its actor for good; returns the drain's seconds."""
        actor = self.actor(server)
        took: float = self._ray.get(actor.drain.remote(timeout), timeout=timeout + 60)
        self._ray.kill(actor, no_restart=True)
        return took

    def down(self, drain_timeout: float = 10.0) -> None:
        """Take the whole deployment down (:func:`down`)."""
        down(self.name, drain_timeout=drain_timeout)


def up(config: ClusterConfig | str | os.PathLike[str], *, name: str = "flexemr", address: str | None = None,
       seed: int = 0, npy: Mapping[str, str] | None = None, transport: str = "auto", workers: int = 1,
       ports: str = "file", server_cpus: float = 0.5, bundle: Mapping[str, float] | None = None,
       strategy: str = "STRICT_SPREAD", metrics: bool = True, max_restarts: int = -1,
       ranker: RankerOptions | None = DEFAULT_RANKER, http_host: str = "127.0.0.1", http_port: int = 8000,
       proxy_location: str = "HeadOnly", timeout: float = 300.0) -> RayCluster:
    """Deploy a cluster file on the running Ray cluster (module docstring); returns its :class:`RayCluster`.

    Parameters
    ----------
    config:
        A :class:`~flexemr.ClusterConfig` or a cluster TOML file (its
        ``[tables.files]`` too).  Servers listen on their node's address; the
        file's hosts are not used.
    name:
        The deployment's name (several may share a Ray cluster).
    address:
        The Ray cluster to connect to when this process is not connected yet
        (default: ``"auto"``, the one ``ray start`` started on this host).
    seed, npy, transport, workers:
        As for ``flexemr serve`` (``npy`` paths must exist on every node).
    ports:
        ``"file"``: each server listens on its port in the file; ``"any"``: on
        a free port.  A restarted server takes the port it had.
    server_cpus, bundle:
        Resources of each server's placement-group bundle (``bundle`` replaces
        the default ``{"CPU": server_cpus}``; the actor asks for exactly them).
    strategy:
        Placement-group strategy: ``"STRICT_SPREAD"`` (one server per node;
        needs as many nodes as servers), ``"SPREAD"``, ``"PACK"``, ``"STRICT_PACK"``.
    metrics:
        Serve every server's metrics and health endpoints on a free port of
        its node (in the registry: ``flexemr ray status``).
    max_restarts:
        How often Ray restarts a server actor that died (-1: always).
    ranker:
        :class:`RankerOptions` of the HTTP rankers (default options), or ``None``
        for no rankers (use :meth:`RayCluster.config` with your own clients).
    http_host, http_port, proxy_location:
        Ray Serve's HTTP proxy (cluster-wide: used when Serve is not running yet).
    timeout:
        Seconds to wait for the placement, the servers and the rankers.

    Raises
    ------
    ConfigError
        Bad options, a deployment ``name`` that is already up, a placement
        group the cluster cannot place in time, a server that cannot start.
    """
    if isinstance(config, ClusterConfig):
        cfg, files = config, {}
    else:
        cfg, files = ClusterConfig.from_toml(config), table_files(config)
    if ports not in ("file", "any"):
        raise ConfigError(f"ports must be 'file' or 'any', got {ports!r}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not name or "/" in name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name must be letters, digits, '-' and '_', got {name!r}")
    res = dict(bundle) if bundle is not None else {"CPU": float(server_cpus)}
    if not res or any(not isinstance(v, (int, float)) or v < 0 for v in res.values()):
        raise ConfigError(f"bundle must map resource names to amounts >= 0, got {res}")
    ray = _init(address)
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if _registry(ray, name) is not None:
        raise ConfigError(f"deployment {name!r} is already up on this Ray cluster (flexemr ray down --name {name})")
    servers = list(cfg.plan.servers)
    opts = {"ranker": ranker.to_dict() if ranker else None, "http_host": http_host, "http_port": http_port,
            "strategy": strategy, "bundle": res, "ports": ports, "transport": transport, "seed": seed}
    reg = ray.remote(Registry).options(name=registry_name(name), namespace=NAMESPACE, lifetime="detached",
                                       num_cpus=0, max_restarts=0).remote(name, cfg.to_dict(), opts)
    pg = None
    try:
        ray.get(reg.ping.remote(), timeout=timeout)
        pg = placement_group([dict(res) for _ in servers], strategy=strategy, name=f"{name}/servers",
                             lifetime="detached")
        ready, _ = ray.wait([pg.ready()], timeout=timeout)
        if not ready:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            raise ConfigError(f"cannot place {len(servers)} servers ({strategy}, {res} each) within {timeout:.0f} s "
                              f"on {len(nodes)} live Ray node(s): add nodes or resources, or pick another strategy")
        server_opts = {"seed": seed, "npy": {**files, **(npy or {})}, "transport": transport, "workers": workers,
                       "ports": ports, "metrics": metrics}
        actor_cls = ray.remote(ServerActor)
        quiet = _DetachedInGroupFilter()
        logging.getLogger("ray.actor").addFilter(quiet)
        extra = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}
        actors = []
        try:
            for i, s in enumerate(servers):
                actors.append(actor_cls.options(
                    name=server_actor_name(name, s), namespace=NAMESPACE, lifetime="detached",
                    max_restarts=max_restarts, max_concurrency=4, num_cpus=res.get("CPU", 0),
                    resources=extra or None, memory=res.get("memory"),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                ).remote(name, s, server_opts))
        finally:
            logging.getLogger("ray.actor").removeFilter(quiet)
        try:
            ray.get([a.status.remote() for a in actors], timeout=timeout)
        except ray.exceptions.RayActorError as exc:
            raise ConfigError(f"an embedding server could not start: {_reason(exc)}") from None
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"the embedding servers were not ready within {timeout:.0f} s") from None
        ray.get(reg.set_extra.remote("placement_group", pg), timeout=60)
        if ranker:
            serve = _serve()
            serve.start(proxy_location=proxy_location, http_options={"host": http_host, "port": http_port})
            host, port = _serve_http(http_host, http_port)
            if (host, port) != (http_host, http_port):
                log.warning("Serve already runs on this Ray cluster with HTTP on %s:%s; the rankers are there",
                            host, port)
                ray.get(reg.update_options.remote({"http_host": host, "http_port": port}), timeout=60)
            serve.run(ranker_deployment(name, ranker), name=name, route_prefix=f"/{name}")
    except BaseException:
        log.warning("flexemr ray up %s failed; removing what it created", name)
        _teardown(ray, name, reg, pg, drain_timeout=0.0)
        raise
    return RayCluster(name)


def _reason(exc: BaseException) -> str:
    """The last line of a Ray actor error (the actor's own exception, ``Type: message``) without Ray's
    traceback, colours and module paths."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    m = re.match(r"^(?:[\w]+\.)*(\w+: .*)$", lines[-1])
    return m.group(1) if m else lines[-1]


def _serve_http(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxies listen: what ``serve.start`` was asked for, unless Serve already ran
    (its HTTP options are cluster-wide and fixed by the first start)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return host, port
        cfg = client.http_config
        return str(cfg.host), int(cfg.port)
    except Exception:  # noqa: BLE001 - a private API of Ray: fall back to what was asked for
        return host, port


def _teardown(ray: Any, name: str, reg: Any, pg: Any, drain_timeout: float) -> None:
    """Best effort: the Serve app, the server actors (drained first), the placement group, the registry."""
    try:
        serve = _serve()
        if name in serve.status().applications:
            serve.delete(name)
    except Exception as exc:  # noqa: BLE001 - tearing down goes on
        log.warning("removing the Serve application %s: %s", name, exc)
    try:
        servers = list(ray.get(reg.info.remote(), timeout=30)["plan_servers"])
    except Exception:  # noqa: BLE001
        servers = []
    actors = []
    for s in servers:
        try:
            actors.append(ray.get_actor(server_actor_name(name, s), namespace=NAMESPACE))
        except ValueError:
            continue
    if drain_timeout > 0 and actors:
        refs = [a.drain.remote(drain_timeout) for a in actors]
        try:
            ray.get(refs, timeout=drain_timeout + 60)
        except Exception as exc:  # noqa: BLE001
            log.warning("draining the servers of %s: %s", name, exc)
    for a in actors:
        ray.kill(a, no_restart=True)
    if pg is None:
        try:
            pg = ray.get(reg.extra.remote("placement_group"), timeout=30)
        except Exception:  # noqa: BLE001
            pg = None
    if pg is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
    ray.kill(reg, no_restart=True)


def down(name: str = "flexemr", *, address: str | None = None, drain_timeout: float = 10.0) -> bool:
    """Take deployment ``name`` down: rankers removed, servers drained and ended, placement group
    and registry removed.  Returns False when no such deployment was up."""
    ray = _init(address)
    reg = _registry(ray, name)
    if reg is None:
        return False
    _teardown(ray, name, reg, None, drain_timeout)
    return True
