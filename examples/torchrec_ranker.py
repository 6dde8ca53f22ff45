"""Serve a TorchRec model's embedding tables with flexemr and rank with the model.

    python examples/torchrec_ranker.py [--servers 2] [--candidates 200] [--out DIR]

Needs the torch extra (``make torch``; docs/torch.md).  What it does:

1. builds a TorchRec ``DLRM`` whose ``EmbeddingBagCollection`` has four
   tables (one read by two features) -- it stands for a trained model;
2. ``flexemr.torch.export`` writes its tables (``.npy``) and a cluster file
   to ``--out`` (a temporary directory by default);
3. starts the servers exactly as the export says, one
   ``flexemr serve --config DIR/cluster.toml --server sN`` process each;
4. ``flexemr.torch.swap_embeddings`` puts a ``RemoteEmbeddingBagCollection``
   in the model's place and the model ranks ``--candidates`` ads for a few
   users: one ``KeyedJaggedTensor`` per user, one sample per candidate;
5. checks every CTR against the untouched local model and prints each
   user's top 5 ads.

On an error (torch or torchrec missing, a server that does not start,
CTRs that differ) it prints one line and exits with code 1.
"""

from __future__ import annotations

import argparse
import copy
import logging
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = {"t_user": ["user", "friend"], "t_ad": ["ad"], "t_topic": ["topic"], "t_site": ["site"]}
ROWS = {"t_user": 5000, "t_ad": 20000, "t_topic": 300, "t_site": 1000}
DIM = 16


class ExampleError(Exception):
    """Something the example cannot go on with (printed as one line)."""


def free_base_port(count: int) -> int:
    """A port p with p, p + 1, ..., p + count - 1 free on 127.0.0.1 (the export numbers servers' ports so)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            for p in range(base, base + count):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise ExampleError(f"found no {count} adjacent free ports")


def build_model(seed: int) -> Any:
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=t, num_embeddings=n, embedding_dim=DIM, feature_names=FEATURES[t])
              for t, n in ROWS.items()]
    ebc = EmbeddingBagCollection(tables=tables)
    with torch.no_grad():  # wider than TorchRec's default init, as trained tables are: CTRs then differ visibly
        for bag in ebc.embedding_bags.values():
            bag.weight.normal_(0.0, 0.5)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[32, DIM],
                over_arch_layer_sizes=[32, 1])


def requests(users: int, candidates: int, seed: int) -> list[tuple[int, Any, Any, np.ndarray]]:
    """Per user: (user id, dense [C, 4], KJT over C samples, candidate ad ids)."""
    import torch
    from torchrec import KeyedJaggedTensor

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(users):
        user = int(rng.integers(ROWS["t_user"]))
        friends = rng.integers(0, ROWS["t_user"], int(rng.integers(0, 6)))
        ads = rng.choice(ROWS["t_ad"], candidates, replace=False)
        per_feature = {
            "user": [[user]] * candidates,
            "friend": [friends.tolist()] * candidates,                     # empty bags when no friends
            "ad": [[int(a)] for a in ads],
            "topic": [rng.integers(0, ROWS["t_topic"], int(rng.integers(1, 4))).tolist() for _ in ads],
            "site": [[int(rng.integers(ROWS["t_site"]))]] * candidates,
        }
        keys = list(per_feature)
        lengths = [len(bag) for k in keys for bag in per_feature[k]]
        values = [i for k in keys for bag in per_feature[k] for i in bag]
        kjt = KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                                lengths=torch.tensor(lengths, dtype=torch.int64))
        dense = torch.tensor(rng.random((candidates, 4)), dtype=torch.float32)
        out.append((user, dense, kjt, ads))
    return out


def start_servers(commands: list[str]) -> list[subprocess.Popen[str]]:
    procs = []
    for cmd in commands:
        argv = [sys.executable, "-m", "flexemr", *cmd.split()[1:], "--transport", "tcp"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc, cmd in zip(procs, commands):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready on" not in line:
            err = proc.stderr.read().strip().splitlines() if proc.stderr is not None and proc.poll() is not None else []
            raise ExampleError(f"`{cmd}` did not start: {err[-1] if err else line.strip() or 'no output'}")
        print(f"  {line.strip()}")
    return procs


def run(args: argparse.Namespace, out: Path) -> None:
    try:
        import flexemr.torch as ft  # first: without torch, its error names the install steps
    except ImportError as exc:
        raise ExampleError(str(exc)) from None
    import torch

    missing = ft.torchrec_missing()
    if missing:
        raise ExampleError(missing)
    # TorchRec asks torch.fx whether it is tracing, which logs a deprecation notice once: not news here
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

    model = build_model(args.seed)
    local = copy.deepcopy(model)                 # the reference: the same model, tables in this process
    exported = ft.export(model, out, servers=args.servers, port=free_base_port(args.servers))
    sizes = sum(p.stat().st_size for p in exported.files.values())
    print(f"exported {len(exported.files)} tables ({sizes / (1 << 20):.1f} MiB) and {exported.config_path}")
    print("starting the servers:")
    procs = start_servers(exported.commands)
    try:
        ft.swap_embeddings(model, exported.config_path, transport="tcp")
        remote = model.sparse_arch.embedding_bag_collection
        print(f"model.sparse_arch.embedding_bag_collection = {remote}")
        worst = 0.0
        t_rank = 0.0
        with torch.inference_mode():
            for user, dense, kjt, ads in requests(args.users, args.candidates, args.seed + 1):
                t0 = time.perf_counter()
                ctr = torch.sigmoid(model(dense, kjt)).squeeze(1).numpy()
                t_rank += time.perf_counter() - t0
                want = torch.sigmoid(local(dense, kjt)).squeeze(1).numpy()
                err = float(np.max(np.abs(ctr - want)))
                worst = max(worst, err)
                if err > 1e-5:
                    raise ExampleError(f"user {user}: CTRs differ from the local model by {err:.1e}")
                top = np.argsort(-ctr)[:5]
                print(f"user {user:>5}: top ads " + ", ".join(f"{int(ads[i])} ({ctr[i]:.3f})" for i in top))
        n = args.users * args.candidates
        print(f"ranked {n} candidates in {t_rank * 1e3:.0f} ms; every CTR matches the local model "
              f"(max abs error {worst:.1e})")
        remote.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", type=int, default=2, help="embedding servers (default 2)")
    p.add_argument("--users", type=int, default=3, help="users to rank ads for (default 3)")
    p.add_argument("--candidates", type=int, default=200, help="candidate ads per user (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the requests")
    p.add_argument("--out", help="directory for the exported tables (default: a temporary one)")
    args = p.parse_args()
    try:
        if args.servers < 1 or args.users < 1 or args.candidates < 1:
            raise ExampleError("--servers, --users and --candidates must be >= 1")
        if args.candidates > ROWS["t_ad"]:
            raise ExampleError(f"--candidates must be at most {ROWS['t_ad']} (the ads table)")
        if args.out:
            run(args, Path(args.out).resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="torchrec-ranker-") as tmp:
                run(args, Path(tmp))
    except ExampleError as exc:
        print(f"torchrec_ranker.py: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # flexemr and rdmaio errors: one line too
        print(f"torchrec_ranker.py: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
