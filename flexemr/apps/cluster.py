"""A whole embedding cluster on loopback, for tests, demos and benchmarks.

:class:`LocalCluster` starts ``servers`` embedding servers — by default each in
its own process (``python -m flexemr serve ... --ready-json
--exit-on-stdin-eof``), so the ranker in this process is really disaggregated
from the tables — and hands out connected clients::

    async with LocalCluster([TableSpec("user", 10_000, 64)], servers=2, seed=7) as cluster:
        client = await cluster.client()
        rows = await client.lookup("user", np.array([1, 5, 1]))
        assert (rows == cluster.model()["user"][[1, 5, 1]]).all()

With ``remap=RowRemap`` (frequency-aware placement, :mod:`flexemr.core.remap`)
every remapped table is written once, reordered by
``remap.apply_to_table``, to a ``.npy`` file in the cluster's temporary
directory and served from it (``--npy``); clients get ``remap=`` by default,
so lookups still use logical ids and :meth:`LocalCluster.model` stays the
logical model.

With ``weights={table: array}`` (a trained model's tables) those tables are
written to ``.npy`` files the same way and served from them instead of the
seeded values; :meth:`LocalCluster.model` returns them::

    async with LocalCluster(specs, servers=2, weights={"user": trained}) as cluster:
        assert (cluster.model()["user"] == trained).all()

Servers bind port 0 and report the port they got on stdout; the cluster then
writes the final cluster file (``cluster.config_path``).  Every process is
stopped on exit — also when start-up fails or the task is cancelled: the
cluster closes the server's stdin (the server exits on EOF), sends SIGTERM,
and SIGKILLs whatever is still alive after ``stop_timeout`` seconds.  Should
this process die, the servers notice EOF on stdin and exit by themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rdmaio.testing

from ..client.client import EmbeddingClient
from ..core.config import ClusterConfig, ServerAddress
from ..core.errors import ClosedError, ConfigError, FlexEMRError
from ..core.init import check_seed, init_table
from ..core.plan import ShardingPlan
from ..core.remap import RowRemap
from ..core.spec import TableSpec
from ..server.server import EmbeddingServer

__all__ = ["LocalCluster"]

log = logging.getLogger(__name__)

PlanKind = Literal["row_wise", "table_wise", "column_wise"]


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:].strip()


async def _stopped(pid: int, timeout: float) -> None:
    """Wait (at most ``timeout`` s) until every thread of ``pid`` is stopped (:func:`rdmaio.testing.threads_stopped`)."""
    deadline = time.monotonic() + timeout
    while not rdmaio.testing.threads_stopped(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


class LocalCluster:
    """``servers`` embedding servers on loopback plus clients for them (an async context manager).

    Parameters
    ----------
    specs:
        The tables.
    servers:
        Number of servers (named ``s0``, ``s1``, ...); ignored when ``plan`` is a
        :class:`ShardingPlan` (its servers are used).
    seed:
        Seed of every server's table initialisation; :meth:`model` rebuilds the
        same values locally.
    plan:
        ``"row_wise"`` (default), ``"table_wise"``, ``"column_wise"`` or an
        explicit :class:`ShardingPlan` over ``specs``.
    in_process:
        Run the servers in this process and event loop (fast start, for tests).
    transport:
        rdmaio transport of servers and clients (``"auto"``, ``"tcp"``, ``"verbs"``).
    server_workers:
        rdmaio workers per server.
    client_options:
        Default keyword arguments of :meth:`client`.
    remap:
        A :class:`~flexemr.core.remap.RowRemap`: servers store the remapped
        tables (physical order), clients translate ids (module docstring).
    replicas, versioned:
        With a plan kind: every shard on ``replicas`` servers, and updatable
        (versioned) rows (``docs/reliability.md``).
    weights:
        ``{table: [num_rows, dim] array}`` of the table's dtype: servers hold
        these values instead of seeded ones (written to ``.npy`` files in the
        cluster's temporary directory at :meth:`start`).  Tables not named
        here are seeded.  A wrong table, shape or dtype raises
        :class:`ConfigError`.

    metrics:
        Serve every server's Prometheus metrics and health endpoints on a free
        port (``flexemr serve --metrics-port 0``); :meth:`metrics_url` says where.

    Notes
    -----
    Failure injection (tests, soak): :meth:`kill` (SIGKILL by default, or
    SIGSTOP to hang a server), :meth:`resume` (SIGCONT) and :meth:`restart`
    (a fresh server process on the same port).  :meth:`drain` stops a server
    the way an operator does (SIGTERM: :meth:`EmbeddingServer.drain`).
    """

    def __init__(
        self,
        specs: Iterable[TableSpec] | Mapping[str, TableSpec],
        servers: int = 2,
        seed: int = 0,
        *,
        plan: ShardingPlan | PlanKind = "row_wise",
        in_process: bool = False,
        transport: str = "auto",
        host: str = "127.0.0.1",
        server_workers: int = 2,
        client_options: Mapping[str, Any] | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 5.0,
        remap: RowRemap | None = None,
        replicas: int = 1,
        versioned: bool = False,
        weights: Mapping[str, npt.ArrayLike] | None = None,
        metrics: bool = False,
    ) -> None:
        spec_list = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
        if isinstance(plan, ShardingPlan):
            if {s.name: s for s in spec_list} != dict(plan.tables):
                raise ConfigError("the plan's tables differ from specs")
            if replicas != 1 or versioned:
                raise ConfigError("replicas/versioned go into the ShardingPlan when one is given")
            self.plan = plan
        else:
            if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
                raise ConfigError(f"servers must be a positive int, got {servers!r}")
            names = [f"s{i}" for i in range(servers)]
            builders: dict[str, Callable[..., ShardingPlan]] = {
                "row_wise": ShardingPlan.row_wise, "table_wise": ShardingPlan.table_wise,
                "column_wise": ShardingPlan.column_wise}
            if plan not in builders:
                raise ConfigError(f"plan must be a ShardingPlan or one of {sorted(builders)}, got {plan!r}")
            extra: dict[str, Any] = {"replicas": replicas}
            if versioned:
                if plan == "column_wise":
                    raise ConfigError("column_wise plans cannot be versioned")
                extra["versioned"] = True
            self.plan = builders[plan](spec_list, names, **extra)
        if remap is not None:
            if not isinstance(remap, RowRemap):
                raise ConfigError(f"remap must be a RowRemap, got {type(remap).__name__}")
            remap.gather_arrays(self.plan)  # ConfigError unless it fits the plan
        self.remap = remap
        self.weights = self._check_weights(weights)
        self._npy: dict[str, Path] = {}
        self.seed = check_seed(seed)
        self.in_process = in_process
        self.transport = transport
        self.host = host
        self.server_workers = server_workers
        self.client_options = dict(client_options or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.metrics = bool(metrics)
        self._metrics_ports: dict[str, int] = {}
        self._metrics_servers: dict[str, Any] = {}
        self._config: ClusterConfig | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._servers: dict[str, EmbeddingServer] = {}
        self._clients: list[EmbeddingClient] = []
        self._model: dict[str, npt.NDArray[Any]] | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        mode = "in-process" if self.in_process else "subprocess"
        return f"<LocalCluster servers={list(self.plan.servers)} {mode}{' closed' if self._closed else ''}>"

    # ------------------------------------------------------------- accessors

    @property
    def config(self) -> ClusterConfig:
        """The running cluster (real ports)."""
        if self._config is None:
            raise ClosedError("cluster is not started")
        return self._config

    @property
    def config_path(self) -> Path:
        """A TOML cluster file describing the running cluster."""
        if self._tmp is None or self._config is None:
            raise ClosedError("cluster is not started")
        return Path(self._tmp.name) / "cluster.toml"

    @property
    def pids(self) -> dict[str, int]:
        """Server name -> process id (subprocess mode)."""
        return {name: p.pid for name, p in self._procs.items()}

    def metrics_url(self, name: str) -> str:
        """``http://host:port`` of server ``name``'s metrics and health endpoints (``metrics=True``)."""
        if name not in self._metrics_ports:
            raise ConfigError(f"server {name!r} serves no metrics (LocalCluster(metrics=True) starts them)")
        return f"http://{self.host}:{self._metrics_ports[name]}"

    def server(self, name: str) -> EmbeddingServer:
        """An in-process server object (``in_process=True`` only)."""
        try:
            return self._servers[name]
        except KeyError:
            raise ConfigError(f"no in-process server {name!r}") from None

    def _check_weights(self, weights: Mapping[str, npt.ArrayLike] | None) -> dict[str, npt.NDArray[Any]]:
        if weights is None:
            return {}
        if not isinstance(weights, Mapping):
            raise ConfigError(f"weights must be a mapping {{table: array}}, got {type(weights).__name__}")
        out: dict[str, npt.NDArray[Any]] = {}
        for table, values in weights.items():
            if table not in self.plan.tables:
                raise ConfigError(f"weights for table {table!r}, which is not in the plan "
                                  f"(tables: {sorted(self.plan.tables)})")
            spec = self.plan.spec(table)
            arr = np.asarray(values)
            if arr.shape != (spec.num_rows, spec.dim):
                raise ConfigError(f"weights of table {table!r} have shape {arr.shape}, "
                                  f"the table is {(spec.num_rows, spec.dim)}")
            if arr.dtype != spec.np_dtype:
                raise ConfigError(f"weights of table {table!r} are {arr.dtype}, the table is {spec.dtype} "
                                  f"(convert them with .astype({spec.dtype!r}) or change the TableSpec)")
            out[table] = arr
        return out

    def model(self) -> dict[str, npt.NDArray[Any]]:
        """Every table as a local array: the given ``weights``, the rest regenerated from the seed."""
        if self._model is None:
            self._model = {name: self.weights[name] if name in self.weights else init_table(spec, self.seed)
                           for name, spec in self.plan.tables.items()}
        return self._model

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> LocalCluster:
        """Start every server and wait until all listen. Idempotent."""
        if self._closed:
            raise ClosedError("cluster is closed")
        if self._started:
            return self
        self._tmp = tempfile.TemporaryDirectory(prefix="flexemr-cluster-")
        try:
            if self.remap is not None or self.weights:
                await asyncio.get_running_loop().run_in_executor(None, self._write_npy)
            if self.in_process:
                addrs = await self._start_in_process()
            else:
                addrs = await asyncio.wait_for(self._start_processes(), self.startup_timeout)
            self._config = ClusterConfig(self.plan, addrs)
            self._config.write_toml(self.config_path)
        except BaseException:
            await self.aclose()
            raise
        self._started = True
        return self

    def _write_npy(self) -> None:
        """One ``.npy`` per remapped or given table, rows in physical order (runs in a worker thread)."""
        assert self._tmp is not None
        remapped = set(self.remap.tables) if self.remap is not None else set()
        for t in sorted(remapped | set(self.weights)):
            values = self.weights[t] if t in self.weights else init_table(self.plan.spec(t), self.seed)
            if self.remap is not None and t in remapped:
                values = self.remap.apply_to_table(t, values)
            path = Path(self._tmp.name) / f"table-{len(self._npy)}.npy"
            np.save(path, np.ascontiguousarray(values))
            self._npy[t] = path

    async def _start_in_process(self) -> dict[str, ServerAddress]:
        for name in self.plan.servers:
            server = EmbeddingServer(self.plan, name, host=self.host, port=0, seed=self.seed, npy=self._npy,
                                     transport=self.transport, engine_options={"workers": self.server_workers})
            self._servers[name] = server
            await self._serve_metrics(name, server)
            await server.start()
        return {name: s.address for name, s in self._servers.items()}

    async def _serve_metrics(self, name: str, server: EmbeddingServer) -> None:
        if not self.metrics:
            return
        from ..server.metrics import serve_metrics

        old = self._metrics_servers.pop(name, None)
        if old is not None:
            old.close()
        ms = serve_metrics(server, self.host, self._metrics_ports.get(name, 0))
        self._metrics_servers[name] = ms
        self._metrics_ports[name] = ms.port

    async def _start_processes(self) -> dict[str, ServerAddress]:
        assert self._tmp is not None
        tmp = Path(self._tmp.name)
        boot = ClusterConfig(self.plan, {s: ServerAddress(self.host, 0) for s in self.plan.servers})
        boot_path = tmp / "boot.toml"
        boot.write_toml(boot_path)
        for name in self.plan.servers:
            await self._spawn(name, boot_path)
        found = await asyncio.gather(*(self._await_ready(name, tmp) for name in self.plan.servers))
        return dict(found)

    async def _spawn(self, name: str, config_path: Path) -> None:
        assert self._tmp is not None
        with open(Path(self._tmp.name) / f"{name}.log", "ab") as errlog:
            self._procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "flexemr", "serve", "--config", str(config_path), "--server", name,
                "--seed", str(self.seed), "--transport", self.transport, "--workers", str(self.server_workers),
                "--ready-json", "--exit-on-stdin-eof",
                *(("--metrics-port", str(self._metrics_ports.get(name, 0))) if self.metrics else ()),
                *(arg for t, path in self._npy.items() for arg in ("--npy", f"{t}={path}")),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=errlog,
            )

    # ------------------------------------------------------ failure injection

    def _check_running(self, name: str) -> None:
        if not self._started or self._closed:
            raise ClosedError("cluster is not running")
        if name not in self.plan.servers:
            raise ConfigError(f"unknown server {name!r}; known {list(self.plan.servers)}")

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to server ``name`` (subprocess mode); SIGKILL/SIGTERM: wait until it is gone,
        SIGSTOP: until every thread of it is stopped (at most 5 s).

        In-process mode the server is closed abruptly instead (any ``sig``
        but SIGSTOP, which needs a process).
        """
        self._check_running(name)
        if self.in_process:
            if sig == signal.SIGSTOP:
                raise ConfigError("SIGSTOP needs subprocess servers (in_process=False)")
            await self._servers[name].aclose()
            return
        proc = self._procs[name]
        if proc.returncode is not None:
            return
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        if sig in (signal.SIGKILL, signal.SIGTERM):
            await proc.wait()
        elif sig == signal.SIGSTOP:
            await _stopped(proc.pid, 5.0)

    async def drain(self, name: str, timeout: float = 10.0) -> int | None:
        """Drain server ``name`` as an operator would (module docstring of :mod:`flexemr.server.server`).

        Subprocess mode: SIGTERM, then wait until the process exits; returns its
        exit code (0 after a clean drain).  In-process: :meth:`EmbeddingServer.drain`
        with ``timeout``; returns ``None``.
        """
        self._check_running(name)
        if self.in_process:
            await self._servers[name].drain(timeout)
            return None
        proc = self._procs[name]
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        return await proc.wait()

    async def resume(self, name: str) -> None:
        """SIGCONT a server stopped with ``kill(name, signal.SIGSTOP)``."""
        self._check_running(name)
        proc = self._procs.get(name)
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGCONT)

    def alive(self, name: str) -> bool:
        """Whether server ``name`` runs (a stopped process counts as alive)."""
        if self.in_process:
            return name in self._servers and not self._servers[name].closed
        proc = self._procs.get(name)
        return proc is not None and proc.returncode is None

    async def restart(self, name: str) -> None:
        """Start server ``name`` again on its port (killing it first if it still runs): fresh memory."""
        self._check_running(name)
        addr = self.config.address(name)
        if self.in_process:
            old = self._servers[name]
            await old.aclose()
            server = EmbeddingServer(self.plan, name, host=addr.host, port=addr.port, seed=self.seed, npy=self._npy,
                                     transport=self.transport, engine_options={"workers": self.server_workers})
            self._servers[name] = server
            await self._serve_metrics(name, server)
            await server.start()
            return
        old_proc = self._procs.get(name)
        if old_proc is not None and old_proc.returncode is None:
            await self.kill(name)
        if old_proc is not None:
            await self._stop_process(name, old_proc)
        await self._spawn(name, self.config_path)
        assert self._tmp is not None
        await asyncio.wait_for(self._await_ready(name, Path(self._tmp.name)), self.startup_timeout)

    async def _await_ready(self, name: str, tmp: Path) -> tuple[str, ServerAddress]:
        proc = self._procs[name]
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                code = await proc.wait()
                raise FlexEMRError(f"server {name} exited with code {code} during start-up: "
                                   f"{_tail(tmp / f'{name}.log')}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("event") == "ready":
                if msg.get("metrics_port") is not None:
                    self._metrics_ports[name] = int(msg["metrics_port"])
                log.info("server %s (pid %d) ready on %s:%s", name, proc.pid, msg["host"], msg["port"])
                return name, ServerAddress(str(msg["host"]), int(msg["port"]))

    async def client(self, **options: Any) -> EmbeddingClient:
        """A new connected :class:`EmbeddingClient` (closed with the cluster).

        ``options`` override ``client_options`` (e.g. ``coalesce_window_us``).
        """
        if not self._started or self._closed:
            raise ClosedError("cluster is not running")
        opts = {"transport": self.transport, "remap": self.remap, **self.client_options, **options}
        client = EmbeddingClient(self.config, **opts)
        self._clients.append(client)
        await client.connect()
        return client

    async def _stop_process(self, name: str, proc: asyncio.subprocess.Process) -> None:
        try:
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGCONT)  # a SIGSTOPped server must run to exit on SIGTERM
                except ProcessLookupError:
                    pass
                if proc.stdin is not None:
                    proc.stdin.close()
                try:
                    proc.terminate()
                except ProcessLookupError:
                    pass
                try:
                    await asyncio.wait_for(proc.wait(), self.stop_timeout)
                except asyncio.TimeoutError:
                    log.warning("server %s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                    proc.kill()
                    await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.read()
        finally:
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass

    async def aclose(self) -> None:
        """Close clients, stop every server (processes included), remove temp files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for c in self._clients:
                await c.aclose()
            for s in self._servers.values():
                await s.aclose()
            for ms in self._metrics_servers.values():
                ms.close()
            await asyncio.gather(*(self._stop_process(n, p) for n, p in self._procs.items()),
                                 return_exceptions=True)
        finally:
            for proc in self._procs.values():  # cancelled half-way: no process may survive
                if proc.returncode is None:
                    try:
                        proc.kill()
                    except ProcessLookupError:
                        pass
            if self._tmp is not None:
                self._tmp.cleanup()

    async def __aenter__(self) -> LocalCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
