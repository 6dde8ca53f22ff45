"""The ``flexemr`` command line: the applications' command table, :func:`main` and ``flexemr serve``.

Commands live in :data:`COMMANDS`, a table of :class:`Command` entries (name ->
argument set-up + runner); adding one is one entry::

    COMMANDS["demo"] = Command("run the demo", _demo_args, _demo_main)

``flexemr/__main__.py`` (the ``flexemr`` script, ``python -m flexemr``) runs
:func:`main` on this table plus the benchmarks' commands (``bench``, ``soak``:
:data:`flexemr.bench.__main__.CLI_COMMANDS`).  :func:`main` turns every error
into one line; what the commands share otherwise is in :mod:`flexemr.apps.cli_support`.

``serve``
    ``flexemr serve --config cluster.toml --server s0 [--seed 0] [--npy TABLE=PATH ...]``
    runs one embedding server until SIGINT/SIGTERM.  When the server listens it
    prints one line to stdout::

        flexemr: server s0 ready on 127.0.0.1:7000 (2 shards, 1.0 MiB, tcp)

    or, with ``--ready-json``, one JSON object
    ``{"event": "ready", "server": "s0", "host": ..., "port": ..., "pid": ..., "metrics_port": ...}``.
    ``--exit-on-stdin-eof`` also stops it when its standard input closes (how
    :class:`flexemr.LocalCluster` makes sure no server outlives its parent).
    ``--metrics-port P`` serves Prometheus metrics and the health endpoints
    (``/metrics``, ``/healthz``, ``/readyz``: :mod:`flexemr.server.metrics`) on
    ``--metrics-host`` (default: the listening host), port ``P`` (0: any free
    port), from before the shards are loaded.  SIGTERM (or SIGINT, or stdin's
    end) *drains* the server (:meth:`~flexemr.EmbeddingServer.drain`: not ready,
    sessions ended so rankers move to replicas, in-flight work finished, at
    most ``--drain-timeout`` s), then it exits with code 0; a second signal
    during the drain closes it at once.

``health``
    ``flexemr health --port P [--host H] [--live]``: asks a server's
    ``/readyz`` (``--live``: ``/healthz``), prints the answer, exits 0 when it
    is healthy, 1 otherwise (an exec probe for Kubernetes or systemd).
    Filling the shards (seeded values, or rows copied from ``.npy`` files)
    shows a progress bar on stderr when it takes more than a second and
    stderr is a terminal (``--progress`` / ``--no-progress``:
    :mod:`flexemr.apps.progress`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import rdmaio

from ..core.config import ClusterConfig, table_files
from ..core.errors import FlexEMRError
from ..server.server import EmbeddingServer
from .cli_support import ArgumentParser, Interrupted, check_range, describe_os_error, parse_pairs
from .progress import Bars, as_callback
from .progress import add_option as add_progress_option

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

log = logging.getLogger("flexemr")


# ----------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """One subcommand: help text, argument set-up and the function that runs it (returns the exit code)."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------- serve


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="cluster TOML file")
    p.add_argument("--server", required=True, help="this server's name in the cluster file")
    p.add_argument("--host", help="listen on this host instead of the cluster file's")
    p.add_argument("--port", type=int, help="listen on this port instead of the cluster file's (0: any)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random table initialisation (default 0)")
    p.add_argument("--npy", action="append", default=[], metavar="TABLE=PATH",
                   help="serve TABLE from a .npy file (memory-mapped); repeatable")
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"], help="rdmaio transport")
    p.add_argument("--workers", type=int, default=2, help="rdmaio progress workers (default 2)")
    p.add_argument("--ready-json", action="store_true", help="announce readiness as one JSON line on stdout")
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="shut down when stdin is closed")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics and /healthz, /readyz on this port (0: any; default: off)")
    p.add_argument("--metrics-host", metavar="HOST",
                   help="listen for metrics on this host (default: the server's listening host)")
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, drain for at most this long before closing (default 10)")
    add_progress_option(p)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def run() -> None:
        try:
            while os.read(0, 65536):  # raw fd: no buffered-IO lock held at interpreter exit
                pass
        except (OSError, ValueError):
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=run, name="flexemr-stdin-watch", daemon=True).start()


async def _serve(args: argparse.Namespace) -> int:
    check_range("--workers", args.workers, 1, 64)
    if args.port is not None:
        check_range("--port", args.port, 0, 65535)
    if args.metrics_port is not None:
        check_range("--metrics-port", args.metrics_port, 0, 65535)
    check_range("--drain-timeout", args.drain_timeout, 0)
    config = ClusterConfig.from_toml(args.config)
    bar = Bars.from_args(args).bar(desc=f"filling the shards of {args.server}", unit="B", unit_scale=True)
    server = EmbeddingServer(config, args.server, host=args.host, port=args.port, seed=args.seed,
                             npy={**table_files(args.config), **parse_pairs(args.npy, "--npy", "TABLE=PATH")},  # --npy overrides the file
                             transport=args.transport,
                             engine_options={"workers": args.workers}, fill_progress=as_callback(bar))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1 and server.state == "draining":
            log.warning("second signal: closing server %s without finishing the drain", server.name)
            loop.create_task(server.aclose())

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    if args.exit_on_stdin_eof:
        _watch_stdin(loop, stop)
    metrics = None
    try:
        if args.metrics_port is not None:  # before the shards load: liveness answers, readiness says "starting"
            from prometheus_client import CollectorRegistry, ProcessCollector

            from ..server.metrics import serve_metrics

            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            host = args.metrics_host or (args.host if args.host is not None else config.address(args.server).host)
            metrics = serve_metrics(server, host, args.metrics_port, loop=loop, registry=registry)
        async with server:
            bar.close()                                    # cleared before the ready line
            addr = server.address
            if args.ready_json:
                line = json.dumps({"event": "ready", "server": server.name, "host": addr.host, "port": addr.port,
                                   "pid": os.getpid(), "transport": server.engine.transport,
                                   "metrics_port": None if metrics is None else metrics.port})
            else:
                line = (f"flexemr: server {server.name} ready on {addr} ({len(server.shards)} shards, "
                        f"{server.arena_bytes / (1 << 20):.1f} MiB, {server.engine.transport})"
                        + ("" if metrics is None else f"; metrics on {metrics.url}/metrics"))
            print(line, flush=True)
            await stop.wait()
            took = await server.drain(args.drain_timeout)
            print(f"flexemr: server {server.name} drained in {took:.2f} s; exiting", file=sys.stderr, flush=True)
    finally:
        if metrics is not None:
            metrics.close()
        bar.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _serve_main(args: argparse.Namespace) -> int:
    return rdmaio.run(_serve(args))


# ------------------------------------------------------------------ health


def _health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="the server's metrics host (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="the server's --metrics-port")
    p.add_argument("--live", action="store_true", help="check liveness (/healthz) instead of readiness (/readyz)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")


def _health_main(args: argparse.Namespace) -> int:
    check_range("--port", args.port, 1, 65535)
    check_range("--timeout", args.timeout, above=0)
    path = "/healthz" if args.live else "/readyz"
    url = f"http://{args.host}:{args.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 - http only, built above
            print(f"flexemr health: {url}: {resp.read().decode(errors='replace').strip()}")
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip()
        print(f"flexemr health: {url}: {exc.code} {body}")
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FlexEMRError(f"cannot reach {url}: {reason}") from None


# --------------------------------------- demo / rank / gen (modules imported when the parser is built)


def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import configure

    configure(p)


def _demo_main(args: argparse.Namespace) -> int:
    from .demo import main as demo

    return demo(args)


def _rank_args(p: argparse.ArgumentParser) -> None:
    from .rank import configure

    configure(p)


def _rank_main(args: argparse.Namespace) -> int:
    from .rank import main as rank

    return rank(args)


def _gen_args(p: argparse.ArgumentParser) -> None:
    from .rank import configure_gen

    configure_gen(p)


def _gen_main(args: argparse.Namespace) -> int:
    from .rank import main_gen

    return main_gen(args)


# -------------------------------------------------------------------- table

#: The applications' subcommands: name -> :class:`Command` (``flexemr/__main__.py`` adds the benchmarks').
COMMANDS: dict[str, Command] = {
    "serve": Command("run one embedding server of a cluster file", _serve_args, _serve_main),
    "health": Command("ask a running server whether it is ready (or alive)", _health_args, _health_main),
    "demo": Command("serve a DLRM end to end on local embedding servers (no configuration)", _demo_args, _demo_main),
    "rank": Command("rank requests with a DLRM against running `flexemr serve` servers", _rank_args, _rank_main),
    "gen": Command("write a Criteo-shaped cluster file, a synthetic Criteo TSV or a lookup trace", _gen_args,
                   _gen_main),
}


def build_parser(commands: Mapping[str, Command] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per entry of ``commands``."""
    parser = ArgumentParser(prog="flexemr", description="FlexEMR disaggregated embedding serving")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging, and tracebacks with errors (repeatable; also after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in commands.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        if name != "bench":  # bench hands every argument to its own parser
            p.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0,
                           help="more logging, and tracebacks with errors (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None, commands: Mapping[str, Command] = COMMANDS) -> int:
    """Run the command line made of ``commands``; returns the exit code.

    2 for usage errors (argparse), 1 for every other error -- one line on
    stderr, ``flexemr <command>: error: ...``, with a traceback only with
    ``-v`` -- and 128 + the signal number when SIGINT (130) or SIGTERM (143)
    stopped the command.
    """
    parser = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: "flexemr serve: error: unrecognized arguments: ..."
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name = args.command

    def fail(message: str) -> int:
        if verbose:
            traceback.print_exc()
        print(f"flexemr {name}: error: {message}", file=sys.stderr)
        return 1

    try:
        return commands[name].run(args)
    except Interrupted as exc:
        print(f"flexemr {name}: stopped by {exc}; what it started was shut down", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"flexemr {name}: interrupted", file=sys.stderr)
        return 130
    except (FlexEMRError, rdmaio.RdmaioError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(describe_os_error(exc))
    except MemoryError as exc:
        return fail(f"out of memory ({exc or 'allocation failed'}): make the tables or batches smaller")
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback with -v
        return fail(f"unexpected {type(exc).__name__}: {exc} (a bug; run with -v for the traceback and report it)")
