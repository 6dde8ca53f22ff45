"""Run one FlexEMR embedding server from a cluster TOML file.

    python examples/embedding_server.py --config examples/cluster.toml --server s0

The server fills its shards with seeded random values (``--seed``), registers
them with rdmaio, publishes its shard map under "flexemr/meta" and serves
one-sided reads until Ctrl-C / SIGTERM (exit code 0).  On an error (wrong
transport, port in use, bad cluster file) it prints one line saying what is
wrong and exits with code 1.  (``flexemr serve`` does the same with more
options.)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import rdmaio

import flexemr


async def serve(config_path: str, name: str, seed: int, transport: str) -> None:
    config = flexemr.ClusterConfig.from_toml(config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with flexemr.EmbeddingServer(config, name, seed=seed, transport=transport) as server:
        tables = sorted({s.table for s in server.shards})
        print(f"embedding server {name} on {server.address}: {len(server.shards)} shards of {tables}", flush=True)
        await stop.wait()
    print(f"embedding server {name} stopped", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/cluster.toml")
    p.add_argument("--server", default="s0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"])
    args = p.parse_args()

    def fail(msg: str) -> int:
        print(f"embedding_server.py: error: {msg}", file=sys.stderr)
        return 1

    try:
        rdmaio.run(serve(args.config, args.server, args.seed, args.transport))
    except rdmaio.TransportUnavailableError as exc:
        return fail(f"{exc}; run with --transport tcp (or auto) on a host without RDMA")
    except (rdmaio.RdmaioError, flexemr.FlexEMRError) as exc:
        return fail(str(exc))
    except OSError as exc:  # e.g. the port is taken
        return fail(f"cannot serve {args.server} of {args.config}: {exc} (is another server using its port? "
                    "stop it, or change the port in the cluster file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
