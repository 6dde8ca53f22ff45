"""A ranker: connect to every embedding server of a cluster file and look rows up.

    python examples/ranker.py --config examples/cluster.toml

Shows ``lookup``, ``lookup_many`` and ``lookup_jagged`` (KeyedJaggedTensor-style
input, sum-pooled per sample), checks the rows against the model rebuilt
locally from the seed, and prints the client's metrics.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import rdmaio

import flexemr


async def rank(config_path: str, seed: int, transport: str) -> None:
    config = flexemr.ClusterConfig.from_toml(config_path)
    model = flexemr.build_model(config.plan, seed)      # what the servers hold, rebuilt locally
    rng = np.random.default_rng(0)
    async with flexemr.EmbeddingClient(config, transport=transport) as client:
        table, spec = next(iter(config.plan.tables.items()))
        ids = rng.integers(0, spec.num_rows, 8)
        rows = await client.lookup(table, ids)
        print(f"lookup {table} {ids.tolist()} -> {rows.shape} {rows.dtype}")
        assert np.array_equal(rows, model[table][ids])

        many = await client.lookup_many({t: rng.integers(0, s.num_rows, 5) for t, s in config.plan.tables.items()})
        print("lookup_many ->", {t: r.shape for t, r in many.items()})

        # 4 samples, up to 3 ids per sample and table, many concurrent rankers' worth of requests
        batch = flexemr.JaggedBatch.from_lists(
            {t: [rng.integers(0, s.num_rows, rng.integers(0, 4)).tolist() for _ in range(4)]
             for t, s in config.plan.tables.items()})
        pooled = await client.lookup_jagged(batch, pooling="sum")
        print("lookup_jagged (sum pooled) ->", {t: r.shape for t, r in pooled.items()})

        await asyncio.gather(*(client.lookup(table, rng.integers(0, spec.num_rows, 16)) for _ in range(20)))
        print(client.metrics)
    print("ranker done: all rows match the local model")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/cluster.toml")
    p.add_argument("--seed", type=int, default=0, help="the servers' seed (to check rows locally)")
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"])
    args = p.parse_args()
    rdmaio.run(rank(args.config, args.seed, args.transport))


if __name__ == "__main__":
    main()
