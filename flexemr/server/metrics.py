"""Prometheus metrics and health endpoints of an embedding server.

:class:`ServerCollector` is a ``prometheus_client`` collector: it reads an
:class:`~flexemr.EmbeddingServer`'s state and :class:`~flexemr.server.server.ServerStats`
when scraped, so serving never touches Prometheus objects.  :class:`MetricsServer`
is the opt-in HTTP endpoint (``flexemr serve --metrics-port``), in a daemon
thread of its own::

    GET /metrics   the registry in the Prometheus text format (OpenMetrics when asked)
    GET /healthz   liveness: 200 "ok" while the server's event loop answers within
                   ``live_timeout`` s, else 503 (a wedged process; restart it)
    GET /readyz    readiness: 200 "ready" while the shards are loaded and served,
                   else 503 with the state ("starting", "draining", "closed")

Metric names follow the Prometheus conventions (base units, ``_total`` for
counters, ``_seconds``/``_bytes``); every one carries a ``server`` label::

    flexemr_server_info{server,transport,layout}        1
    flexemr_server_ready                                1 while ready
    flexemr_server_draining                             1 while draining
    flexemr_server_start_time_seconds                   Unix time it became ready
    flexemr_server_shards                               shard regions it serves
    flexemr_server_table_bytes                          bytes of table rows it holds
    flexemr_server_sessions                             rankers' rdmaio sessions open now
    flexemr_server_pool_channels                        pooling channels open now
    flexemr_server_pool_channels_opened_total
    flexemr_server_pool_requests_total
    flexemr_server_pool_received_bytes_total
    flexemr_server_pool_sent_bytes_total
    flexemr_server_pool_request_duration_seconds        histogram: computing one response

One-sided reads never reach the server's CPU, so lookups, rows, bytes read,
cache hits, failovers and lookup latency are the rankers' metrics
(:mod:`flexemr.client.metrics_export`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.config import ServerAddress
from ..core.errors import ConfigError
from ..core.metrics import LatencyHistogram
from ..core.versioned import region_bytes
from .server import EmbeddingServer

__all__ = ["MetricsServer", "ServerCollector", "histogram_family", "loop_responsive", "serve_metrics"]

log = logging.getLogger(__name__)

#: (ok, text) of a health check
Check = Callable[[], tuple[bool, str]]


def histogram_family(name: str, doc: str, labels: dict[str, str], hist: LatencyHistogram) -> HistogramMetricFamily:
    """A Prometheus histogram (seconds) of a :class:`~flexemr.LatencyHistogram` (log2 buckets from 1 us).

    Bucket bounds are the histogram's exclusive upper bounds, used as ``le``.
    """
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    buckets = [("+Inf" if le == float("inf") else repr(le), float(n)) for le, n in hist.cumulative_buckets()]
    fam.add_metric(list(labels.values()), buckets, sum_value=hist.total_s)
    return fam


class ServerCollector(Collector):
    """Collects one :class:`~flexemr.EmbeddingServer`'s metrics at scrape time (module docstring)."""

    def __init__(self, server: EmbeddingServer) -> None:
        if not isinstance(server, EmbeddingServer):
            raise ConfigError(f"ServerCollector takes an EmbeddingServer, got {type(server).__name__}")
        self.server = server
        plan = server.plan
        self._table_bytes = sum(region_bytes(plan.spec(sh.table), sh.num_rows) if plan.versioned
                                else sh.nbytes(plan.spec(sh.table)) for sh in server.shards)

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: registering never calls collect() early

    def collect(self) -> Iterator[Metric]:
        s = self.server
        st = s.stats
        lab = {"server": s.name}
        names, values = list(lab), list(lab.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        transport = s.engine.transport if s.state in ("ready", "draining") else "none"
        info = GaugeMetricFamily("flexemr_server_info", "Static facts about this embedding server (always 1)",
                                 labels=[*names, "transport", "layout"])
        info.add_metric([*values, transport, "versioned" if s.plan.versioned else "plain"], 1)
        yield info
        yield gauge("flexemr_server_ready", "1 while the shards are loaded and served (readiness)", float(s.ready))
        yield gauge("flexemr_server_draining", "1 while the server drains before it stops",
                    float(s.state == "draining"))
        if st.started_at is not None:
            yield gauge("flexemr_server_start_time_seconds", "Unix time the server became ready", st.started_at)
        yield gauge("flexemr_server_shards", "Shard regions this server serves", len(s.shards))
        yield gauge("flexemr_server_table_bytes", "Bytes of table rows this server holds", self._table_bytes)
        yield gauge("flexemr_server_sessions", "Rankers' rdmaio sessions open now", s.sessions)
        yield gauge("flexemr_server_pool_channels", "Pooling channels open now", st.pool_channels)
        yield counter("flexemr_server_pool_channels_opened", "Pooling channels accepted", st.pool_channels_opened)
        yield counter("flexemr_server_pool_requests", "Pooling requests answered", st.pool_requests)
        yield counter("flexemr_server_pool_received_bytes", "Bytes of pooling requests", st.pool_bytes_received)
        yield counter("flexemr_server_pool_sent_bytes", "Bytes of pooling responses", st.pool_bytes_sent)
        yield histogram_family("flexemr_server_pool_request_duration_seconds",
                               "Time to compute one pooling response (gather and partial pooling)", lab,
                               st.pool_latency)


def loop_responsive(loop: asyncio.AbstractEventLoop, timeout: float) -> tuple[bool, str]:
    """Liveness of an event loop seen from another thread: does it run a callback within ``timeout`` s?"""
    if loop.is_closed():
        return False, "event loop closed"
    done = threading.Event()
    try:
        loop.call_soon_threadsafe(done.set)
    except RuntimeError:
        return False, "event loop closed"
    if done.wait(timeout):
        return True, "ok"
    return False, f"event loop did not answer within {timeout} s"


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:  # one thread per request
        t = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True)
        t.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a broken scrape must not reach the server
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, in a daemon thread (module docstring).

    Parameters
    ----------
    registry:
        What ``/metrics`` exposes.
    host, port:
        Where to listen (``port=0``: any free port; the bound one is :attr:`port`).
    live, ready:
        Health checks returning ``(ok, text)``; missing ones always pass.

    Use as a context manager, or :meth:`start` / :meth:`close`.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0, *,
                 live: Check | None = None, ready: Check | None = None) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"metrics port must be an int in 0..65535, got {port!r}")
        self.registry = registry
        self._bind = ServerAddress(host, port)
        self._live = live
        self._ready = ready
        self._metrics_app = make_wsgi_app(registry)
        self._httpd: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._httpd is None:
            raise ConfigError("the metrics server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port`` (after :meth:`start`)."""
        return f"http://{self._bind.host}:{self.port}"

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            out: Iterable[bytes] = self._metrics_app(environ, start_response)
            return out
        checks = {"/healthz": self._live, "/livez": self._live, "/readyz": self._ready}
        if path not in checks:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: try /metrics, /healthz or /readyz\n"]
        check = checks[path]
        try:
            ok, text = (True, "ok") if check is None else check()
        except Exception as exc:  # noqa: BLE001 - a failing check is a failed probe, not a dead thread
            ok, text = False, f"health check failed: {type(exc).__name__}: {exc}"
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{text}\n".encode()]

    def start(self) -> MetricsServer:
        """Listen and serve in a daemon thread; :class:`ConfigError` if the address cannot be bound."""
        if self._httpd is not None:
            return self
        try:
            httpd = make_server(self._bind.host, self._bind.port, self._app, server_class=_ThreadingWSGIServer,
                                handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"metrics: cannot listen on {self._bind}: {exc.strerror or exc}") from exc
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="flexemr-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on %s/metrics", self.url)
        return self

    def close(self) -> None:
        """Stop serving. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(server: EmbeddingServer, host: str = "127.0.0.1", port: int = 0, *,
                  loop: asyncio.AbstractEventLoop | None = None, live_timeout: float = 5.0,
                  registry: CollectorRegistry | None = None) -> MetricsServer:
    """Start a :class:`MetricsServer` for ``server``: its :class:`ServerCollector`, liveness of ``loop``
    (default: the running loop) and readiness of ``server`` (:attr:`~flexemr.EmbeddingServer.ready`).

    ``registry`` (default: a new one) may hold other collectors too, e.g.
    ``prometheus_client``'s process collector.
    """
    loop = loop or asyncio.get_running_loop()
    reg = registry if registry is not None else CollectorRegistry()
    reg.register(ServerCollector(server))

    def ready() -> tuple[bool, str]:
        return server.ready, "ready" if server.ready else server.state

    return MetricsServer(reg, host, port, live=lambda: loop_responsive(loop, live_timeout), ready=ready).start()
