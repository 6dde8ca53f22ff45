"""A ranker: connect to every embedding server of a cluster file and look rows up.

    python examples/ranker.py --config examples/cluster.toml

Shows ``lookup``, ``lookup_many``, ``lookup_jagged`` (KeyedJaggedTensor-style
input, sum-pooled per sample) and concurrent lookups that share batches.
Every result it prints is checked against the model rebuilt locally from the
seed (the servers' ``--seed``), then the client's metrics are printed.  On an
error (no server running, wrong transport, rows that differ) it prints one
line saying what is wrong and exits with code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np
import numpy.typing as npt
import rdmaio

import flexemr
from flexemr.core.pooling import pool


class Mismatch(Exception):
    """A lookup returned something other than the local model's rows."""


def check(what: str, got: npt.NDArray[np.generic], want: npt.NDArray[np.generic], exact: bool = True) -> None:
    same = np.array_equal(got, want) if exact else (got.shape == want.shape and np.allclose(got, want, atol=1e-5))
    if not same:
        raise Mismatch(f"{what} differs from the local model")


async def rank(config_path: str, seed: int, transport: str) -> int:
    config = flexemr.ClusterConfig.from_toml(config_path)
    model = flexemr.build_model(config.plan, seed)      # what the servers hold, rebuilt locally
    rng = np.random.default_rng(0)
    checks = 0
    async with flexemr.EmbeddingClient(config, transport=transport) as client:
        table, spec = next(iter(config.plan.tables.items()))
        ids = rng.integers(0, spec.num_rows, 8)
        rows = await client.lookup(table, ids)
        check(f"lookup({table!r})", rows, model[table][ids])
        checks += 1
        print(f"lookup {table} {ids.tolist()} -> {rows.shape} {rows.dtype}: matches")

        requests = {t: rng.integers(0, s.num_rows, 5) for t, s in config.plan.tables.items()}
        many = await client.lookup_many(requests)
        for t, t_ids in requests.items():
            check(f"lookup_many table {t!r}", many[t], model[t][t_ids])
            checks += 1
        print("lookup_many ->", {t: r.shape for t, r in many.items()}, "matches")

        # 4 samples, 0 to 3 ids per sample and table; pooled on the ranker or, where the cost
        # model says so, partly on the servers (sums in another order: compared with a tolerance)
        batch = flexemr.JaggedBatch.from_lists(
            {t: [rng.integers(0, s.num_rows, rng.integers(0, 4)).tolist() for _ in range(4)]
             for t, s in config.plan.tables.items()})
        pooled = await client.lookup_jagged(batch, pooling="sum")
        for t in batch.keys:
            want = pool(model[t][batch.ids(t)], batch.bag_offsets(t), "sum")
            check(f"lookup_jagged(pooling='sum') table {t!r}", pooled[t], want, exact=False)
            checks += 1
        print("lookup_jagged (sum pooled) ->", {t: r.shape for t, r in pooled.items()}, "matches")

        # 20 concurrent rankers' worth of requests: they share coalesced batches
        many_ids = [rng.integers(0, spec.num_rows, 16) for _ in range(20)]
        outs = await asyncio.gather(*(client.lookup(table, i) for i in many_ids))
        for k, (i, out) in enumerate(zip(many_ids, outs)):
            check(f"concurrent lookup #{k} of {table!r}", out, model[table][i])
            checks += 1
        print(f"{len(outs)} concurrent lookups of {table} -> {client.metrics.batches} batches so far: all match")
        print(client.metrics)
    print(f"ranker done: all {checks} results above match the local model")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/cluster.toml")
    p.add_argument("--seed", type=int, default=0, help="the servers' seed (to check rows locally)")
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"])
    args = p.parse_args()

    def fail(msg: str) -> int:
        print(f"ranker.py: error: {msg}", file=sys.stderr)
        return 1

    try:
        return rdmaio.run(rank(args.config, args.seed, args.transport))
    except rdmaio.TransportUnavailableError as exc:
        return fail(f"{exc}; run with --transport tcp (or auto) on a host without RDMA")
    except flexemr.TransportError as exc:
        return fail(f"{exc}; start the embedding servers first: "
                    f"python examples/embedding_server.py --config {args.config} --server NAME")
    except Mismatch as exc:
        return fail(f"{exc}: start the servers with the seed the ranker uses (--seed {args.seed})")
    except (rdmaio.RdmaioError, flexemr.FlexEMRError) as exc:
        return fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
