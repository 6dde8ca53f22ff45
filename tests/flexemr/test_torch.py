"""flexemr.torch: conversions, RemoteEmbeddingBagCollection == TorchRec's EmbeddingBagCollection, threads, export.

Needs the torch extra (``make torch``); without it every test here is skipped
with the reason (CI installs it).
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (make torch; docs/torch.md)")
torchrec = pytest.importorskip("torchrec", reason="torchrec is not installed (make torch; docs/torch.md)")

from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType  # noqa: E402
from torchrec.types import DataType  # noqa: E402

import flexemr.torch as ft  # noqa: E402
from flexemr import (  # noqa: E402
    ClosedError,
    ClusterConfig,
    ConfigError,
    EmbeddingClient,
    InputError,
    JaggedBatch,
    LookupIdError,
    TableSpec,
)

from ._procs import free_port, stop, wait_line  # noqa: E402
from ._torch_cluster import BackgroundCluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(name: str, rows: int, dim: int, features: list[str], pooling: Any = PoolingType.SUM,
         data_type: Any = DataType.FP32) -> Any:
    return EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim, feature_names=features,
                              pooling=pooling, data_type=data_type)


def _plain_configs() -> list[Any]:
    return [
        _cfg("t_user", 1000, 8, ["user", "friend"]),                # two features share a table
        _cfg("t_item", 500, 8, ["item"], PoolingType.MEAN),
        _cfg("t_geo", 64, 4, ["geo"], data_type=DataType.FP16),
        _cfg("t_user2", 200, 4, ["user"]),                          # "user" feeds two tables: user@t_user...
    ]


def _weighted_configs() -> list[Any]:
    return [_cfg("w_tag", 300, 6, ["tag", "tag2"]), _cfg("w_cat", 40, 5, ["cat"])]


def _ebc(configs: list[Any], weighted: bool = False, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=configs, is_weighted=weighted)
    with torch.no_grad():  # spread values so that a wrong row cannot pass within tolerance
        for bag in ebc.embedding_bags.values():
            bag.weight.uniform_(-1.0, 1.0)
    return ebc


def _max_ids(configs: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in configs:
        for f in c.feature_names:
            out[f] = min(out.get(f, c.num_embeddings), c.num_embeddings)
    return out


def _random_kjt(rng: np.random.Generator, configs: list[Any], batch: int, *, weighted: bool = False,
                offsets: bool = False, int32: bool = False) -> Any:
    """Every feature of ``configs`` plus one unused key, in a random key order; ~30% empty bags."""
    limits = {**_max_ids(configs), "unused": 10_000}
    keys = list(limits)
    rng.shuffle(keys)
    lengths = rng.integers(0, 7, size=len(keys) * batch)
    lengths[rng.random(lengths.size) < 0.3] = 0
    per_key = lengths.reshape(len(keys), batch).sum(axis=1)
    values = np.concatenate([rng.integers(0, limits[k], size=int(n)) for k, n in zip(keys, per_key)])
    dt = torch.int32 if int32 else torch.int64
    kw: dict[str, Any] = {}
    if offsets:
        kw["offsets"] = torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=dt)
    else:
        kw["lengths"] = torch.tensor(lengths, dtype=dt)
    if weighted:
        kw["weights"] = torch.tensor(rng.random(values.size), dtype=torch.float32)
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=dt), **kw)


def _assert_same(got: Any, want: Any, configs: list[Any]) -> None:
    """Same keys, layout and values (float16 tables: TorchRec rounds its sums to float16, flexemr does not)."""
    assert got.keys() == want.keys()
    assert got.length_per_key() == want.length_per_key()
    assert got.values().dtype == torch.float32 and got.values().shape == want.values().shape
    g, w = got.to_dict(), want.to_dict()
    fp16 = {c.name for c in configs if c.data_type == DataType.FP16}
    names = ft.embedding_names(configs)
    tables = [c.name for c in configs for _ in c.feature_names]
    for key, table in zip(names, tables):
        tol = 4e-3 if table in fp16 else 1e-5
        np.testing.assert_allclose(g[key].numpy(), w[key].detach().numpy(), rtol=tol, atol=tol, err_msg=key)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ebcs() -> tuple[Any, Any]:
    return _ebc(_plain_configs(), seed=1), _ebc(_weighted_configs(), weighted=True, seed=2)


@pytest.fixture(scope="module")
def cluster(ebcs: tuple[Any, Any]) -> Iterator[BackgroundCluster]:
    plain, weighted = ebcs
    specs = ft.table_specs(plain) + ft.table_specs(weighted)
    c = BackgroundCluster(specs, {**ft.weights(plain), **ft.weights(weighted)}, servers=2, transport="tcp")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def client(cluster: BackgroundCluster) -> Iterator[Any]:
    with ft.ClientThread(cluster.config, transport="tcp") as ct:
        yield ct


# --------------------------------------------------------------- conversions


def test_kjt_and_jagged_batch_round_trip_zero_copy() -> None:
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([5, 6, 7, 8]), lengths=torch.tensor([2, 0, 0, 2]),
                            weights=torch.tensor([0.5, 1.0, 2.0, 4.0]))
    jb = ft.jagged_from_kjt(kjt)
    assert jb == JaggedBatch.from_lists({"a": [[5, 6], []], "b": [[], [7, 8]]})
    assert np.shares_memory(jb.values, kjt.values().numpy())           # int64 CPU ids: a view
    w = ft.weights_from_kjt(kjt)
    assert w is not None and np.shares_memory(w, kjt.weights().numpy()) and w.tolist() == [0.5, 1.0, 2.0, 4.0]
    back = ft.kjt_from_jagged(jb, weights=w)
    assert back.keys() == ["a", "b"] and back.stride() == 2
    assert back.values().tolist() == [5, 6, 7, 8] and back.lengths().tolist() == [2, 0, 0, 2]
    assert back.weights().tolist() == [0.5, 1.0, 2.0, 4.0]
    assert not np.shares_memory(back.values().numpy(), jb.values)     # read-only ids are copied
    via_offsets = KeyedJaggedTensor(keys=["a"], values=torch.tensor([1, 2, 3], dtype=torch.int32),
                                    offsets=torch.tensor([0, 3, 3], dtype=torch.int32))
    assert ft.jagged_from_kjt(via_offsets) == JaggedBatch.from_lists({"a": [[1, 2, 3], []]})
    assert ft.weights_from_kjt(via_offsets) is None
    with pytest.raises(InputError, match="KeyedJaggedTensor"):
        ft.jagged_from_kjt(jb)
    with pytest.raises(InputError, match="3 numbers"):
        ft.kjt_from_jagged(JaggedBatch.from_lists({"a": [[1, 2, 3]]}), weights=[1.0])
    vbe = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1]),
                            stride_per_key_per_rank=[[1], [2]])
    with pytest.raises(InputError, match="variable batch size"):
        ft.jagged_from_kjt(vbe)


def test_keyed_tensor_from_pooled() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    kt = ft.keyed_tensor({"a": a, "b": torch.ones(2, 2)}, keys=["b", "a"])
    assert kt.keys() == ["b", "a"] and kt.length_per_key() == [2, 3]
    assert kt.values().tolist() == [[1, 1, 0, 1, 2], [1, 1, 3, 4, 5]]
    with pytest.raises(InputError, match="different batch sizes"):
        ft.keyed_tensor({"a": a, "b": np.ones((3, 1))})
    with pytest.raises(InputError, match="no pooled embeddings for key 'c'"):
        ft.keyed_tensor({"a": a}, keys=["c"])


def test_configs_and_specs_convert_both_ways() -> None:
    cfgs = _plain_configs()
    specs = ft.table_specs(cfgs)
    assert specs == [TableSpec("t_user", 1000, 8), TableSpec("t_item", 500, 8), TableSpec("t_geo", 64, 4, "float16"),
                     TableSpec("t_user2", 200, 4)]
    assert ft.table_specs(EmbeddingBagCollection(tables=cfgs, device=torch.device("meta"))) == specs
    assert ft.pooling_modes(cfgs) == {"t_user": "sum", "t_item": "mean", "t_geo": "sum", "t_user2": "sum"}
    assert ft.embedding_names(cfgs) == ["user@t_user", "friend", "item", "geo", "user@t_user2"]
    back = ft.embedding_bag_configs(specs, {c.name: c.feature_names for c in cfgs},
                                    pooling={"t_item": "mean"})
    assert [(c.name, c.feature_names, c.pooling, c.data_type, c.num_embeddings, c.embedding_dim) for c in back] == \
        [(c.name, c.feature_names, c.pooling, c.data_type, c.num_embeddings, c.embedding_dim) for c in cfgs]
    with pytest.raises(ConfigError, match="data_type INT8 is not supported"):
        ft.table_specs([_cfg("q", 10, 4, ["q"], data_type=DataType.INT8)])
    with pytest.raises(ConfigError, match="pooling NONE"):
        ft.table_specs([_cfg("n", 10, 4, ["n"], pooling=PoolingType.NONE)])
    with pytest.raises(ConfigError, match="float64"):
        ft.embedding_bag_configs([TableSpec("d", 10, 4, "float64")])
    with pytest.raises(ConfigError, match="not an EmbeddingBagCollection"):
        ft.table_specs(torch.nn.Linear(2, 2))


def test_weights_of_an_ebc_a_model_and_a_state_dict() -> None:
    ebc = _ebc(_plain_configs())
    w = ft.weights(ebc)
    assert list(w) == ["t_user", "t_item", "t_geo", "t_user2"]
    assert w["t_geo"].dtype == np.float16 and w["t_user"].shape == (1000, 8)
    assert np.shares_memory(w["t_user"], ebc.embedding_bags["t_user"].weight.detach().numpy())
    wrapped = torch.nn.Sequential(ebc)
    assert {k: v.tolist() for k, v in ft.weights(wrapped.state_dict()).items()} == \
        {k: v.tolist() for k, v in w.items()}
    with pytest.raises(ConfigError, match="is in two places"):
        ft.weights(torch.nn.ModuleList([ebc, _ebc(_plain_configs())]))
    with pytest.raises(ConfigError, match="no embedding tables found"):
        ft.weights({"linear.weight": torch.ones(2, 2)})


# ---------------------------------------------------------- equivalence


@pytest.mark.parametrize("batch", [1, 5, 33, 128])
def test_equal_to_torchrec_over_random_kjts(batch: int, ebcs: tuple[Any, Any], client: Any) -> None:
    plain, _ = ebcs
    cfgs = plain.embedding_bag_configs()
    remote = ft.RemoteEmbeddingBagCollection(cfgs, client)
    rng = np.random.default_rng(batch)
    with torch.no_grad():
        for i in range(4):
            kjt = _random_kjt(rng, cfgs, batch, offsets=i % 2 == 1, int32=i == 2)
            _assert_same(remote(kjt), plain(kjt), cfgs)
    remote.close()


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_weighted_equal_to_torchrec(batch: int, ebcs: tuple[Any, Any], client: Any) -> None:
    _, weighted = ebcs
    cfgs = weighted.embedding_bag_configs()
    remote = ft.RemoteEmbeddingBagCollection(cfgs, client, is_weighted=True)
    assert remote.is_weighted() and remote.embedding_bag_configs() == cfgs
    rng = np.random.default_rng(100 + batch)
    with torch.no_grad():
        for _ in range(3):
            kjt = _random_kjt(rng, cfgs, batch, weighted=True)
            _assert_same(remote(kjt), weighted(kjt), cfgs)
    unweighted = ft.RemoteEmbeddingBagCollection(cfgs, client)    # ignores the weights, as TorchRec does
    kjt = _random_kjt(rng, cfgs, batch, weighted=True)
    with torch.no_grad():
        _assert_same(unweighted(kjt), _unweighted_copy(weighted)(kjt), cfgs)
    with pytest.raises(InputError, match="has no weights"):
        remote(_random_kjt(rng, cfgs, batch))
    remote.close()
    unweighted.close()


def _unweighted_copy(weighted: Any) -> Any:
    ebc = EmbeddingBagCollection(tables=weighted.embedding_bag_configs(), is_weighted=False)
    ebc.load_state_dict(weighted.state_dict())
    return ebc


def test_empty_batches_and_all_empty_bags(ebcs: tuple[Any, Any], client: Any) -> None:
    plain, _ = ebcs
    cfgs = plain.embedding_bag_configs()
    with ft.RemoteEmbeddingBagCollection(cfgs, client) as remote:
        feats = sorted({f for c in cfgs for f in c.feature_names})
        none = KeyedJaggedTensor(keys=feats, values=torch.zeros(0, dtype=torch.int64),
                                 lengths=torch.zeros(len(feats) * 3, dtype=torch.int64))
        kt = remote(none)
        assert kt.values().shape == (3, 32) and not kt.values().any()
        _assert_same(kt, plain(none), cfgs)
        zero = KeyedJaggedTensor(keys=feats, values=torch.zeros(0, dtype=torch.int64),
                                 lengths=torch.zeros(0, dtype=torch.int64))
        assert remote(zero).values().shape == (0, 32)  # (TorchRec's own EBC fails on a batch of 0)


def test_bad_input_is_refused_before_any_lookup(ebcs: tuple[Any, Any], client: Any) -> None:
    plain, _ = ebcs
    cfgs = plain.embedding_bag_configs()
    remote = ft.RemoteEmbeddingBagCollection(cfgs, client)
    with pytest.raises(InputError, match=r"lacks features \['geo'\]"):
        remote(KeyedJaggedTensor(keys=["user", "friend", "item"], values=torch.tensor([1]),
                                 lengths=torch.tensor([1, 0, 0])))
    with pytest.raises(InputError, match="KeyedJaggedTensor"):
        remote(JaggedBatch.from_lists({"user": [[1]]}))
    with pytest.raises(LookupIdError, match=r"table 't_user2': 1 id\(s\) out of range \[0, 200\)"):
        remote(KeyedJaggedTensor(keys=["user", "friend", "item", "geo"], values=torch.tensor([999]),
                                 lengths=torch.tensor([1, 0, 0, 0])))  # user reads t_user2 (200 rows) too
    remote.close()
    with pytest.raises(ClosedError, match="closed"):
        remote(KeyedJaggedTensor(keys=["user"], values=torch.tensor([1]), lengths=torch.tensor([1])))


def test_configs_that_the_cluster_does_not_serve_are_refused(cluster: BackgroundCluster, client: Any) -> None:
    with pytest.raises(ConfigError, match="'nope' is not served"):
        ft.RemoteEmbeddingBagCollection([_cfg("nope", 10, 4, ["x"])], client)
    with pytest.raises(ConfigError, match="serves 1000 x 8 float32, the config says 1000 x 16"):
        ft.RemoteEmbeddingBagCollection([_cfg("t_user", 1000, 16, ["x"])], client)
    with pytest.raises(ConfigError, match="need SUM pooling"):
        ft.RemoteEmbeddingBagCollection([_cfg("t_item", 500, 8, ["item"], PoolingType.MEAN)], client,
                                        is_weighted=True)
    with pytest.raises(ConfigError, match="apply only when"):
        ft.RemoteEmbeddingBagCollection(_weighted_configs(), client, cache_bytes=1 << 20)


# ------------------------------------------------------------- threading


def test_forward_is_safe_from_many_threads(ebcs: tuple[Any, Any], client: Any) -> None:
    plain, _ = ebcs
    cfgs = plain.embedding_bag_configs()
    remote = ft.RemoteEmbeddingBagCollection(cfgs, client)
    rng = np.random.default_rng(7)
    kjts = [_random_kjt(rng, cfgs, int(rng.integers(1, 40))) for _ in range(24)]
    with torch.no_grad():
        wants = [plain(k) for k in kjts]
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def worker(w: int) -> None:
        try:
            barrier.wait()
            for i in range(w, len(kjts), 6):
                _assert_same(remote(kjts[i]), wants[i], cfgs)
                with lock:
                    done[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert done[0] == len(kjts)
    remote.close()


async def test_forward_async_keeps_the_callers_loop_running(ebcs: tuple[Any, Any], client: Any) -> None:
    plain, _ = ebcs
    cfgs = plain.embedding_bag_configs()
    remote = ft.RemoteEmbeddingBagCollection(cfgs, client)
    kjts = [_random_kjt(np.random.default_rng(s), cfgs, 16) for s in range(8)]
    got = await asyncio.gather(*(remote.forward_async(k) for k in kjts))
    with torch.no_grad():
        for g, k in zip(got, kjts):
            _assert_same(g, plain(k), cfgs)
    # a call that takes 0.3 s on the client thread: this loop must keep ticking meanwhile
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick = asyncio.create_task(ticker())
    await client.acall(lambda c: asyncio.sleep(0.3))
    tick.cancel()
    assert ticks >= 10
    remote.close()


def test_client_thread_lifecycle(cluster: BackgroundCluster) -> None:
    ct = ft.ClientThread(cluster.config, transport="tcp")
    thread = ct._state.thread
    assert thread is not None and thread.is_alive()
    a = ft.RemoteEmbeddingBagCollection(_weighted_configs(), ct, is_weighted=True)
    b = ft.RemoteEmbeddingBagCollection(_weighted_configs(), ct, is_weighted=True)
    ct.close()                  # the modules still hold it
    assert thread.is_alive() and not ct.closed
    a.close()
    a.close()                   # idempotent
    assert thread.is_alive()
    del b                       # a module that is collected lets go as well
    thread.join(10)
    assert not thread.is_alive() and ct.closed and ct.client.connected is False
    with pytest.raises(ClosedError):
        ct.call(lambda c: asyncio.sleep(0))
    own = ft.RemoteEmbeddingBagCollection(_weighted_configs(), cluster.config, transport="tcp")  # its own thread
    own_thread = own.client_thread._state.thread
    assert own_thread is not None and own_thread.is_alive()
    own.close()
    own_thread.join(10)
    assert not own_thread.is_alive()


async def test_a_connected_client_is_refused(cluster: BackgroundCluster) -> None:
    async with EmbeddingClient(cluster.config, transport="tcp") as connected:
        with pytest.raises(ConfigError, match="already connected"):
            ft.ClientThread(connected)
    with pytest.raises(ConfigError, match="expected a ClusterConfig"):
        ft.ClientThread(42)  # type: ignore[arg-type]
    unconnected = EmbeddingClient(cluster.config, transport="tcp")
    with ft.ClientThread(unconnected) as ct:
        rows = await ct.acall(lambda c: c.lookup("w_cat", [0, 1]))
        assert rows.shape == (2, 5)
    ct._state.thread.join(10)   # type: ignore[union-attr]
    assert not unconnected.connected


def test_a_cluster_that_is_not_there_fails_the_constructor(tmp_path: Path) -> None:
    cfg = ClusterConfig.from_dict({"servers": {"s0": {"host": "127.0.0.1", "port": free_port()}},
                                   "tables": [{"name": "t", "num_rows": 4, "dim": 2}]})
    with pytest.raises(Exception, match="s0|connect|refused"):
        ft.ClientThread(cfg, transport="tcp", connect_timeout=10.0)


# ------------------------------------------------- export -> serve -> swap


def _free_pair() -> int:
    import socket

    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def _dlrm(seed: int) -> Any:
    from torchrec.models.dlrm import DLRM

    torch.manual_seed(seed)
    cfgs = [_cfg(f"t{i}", rows, 8, [f"f{i}"]) for i, rows in enumerate([300, 50, 1000])]
    ebc = EmbeddingBagCollection(tables=cfgs)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[16, 8],
                over_arch_layer_sizes=[16, 1])


async def test_export_serve_swap_round_trip_on_torchrecs_dlrm(tmp_path: Path) -> None:
    model = _dlrm(3)
    local = copy.deepcopy(model)
    out = ft.export(model, tmp_path / "tables", servers=2, port=_free_pair())
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["cluster.toml", "t0.npy", "t1.npy", "t2.npy"]
    assert out.commands == [f"flexemr serve --config {out.config_path} --server s{i}" for i in range(2)]
    np.testing.assert_array_equal(np.load(out.files["t2"]),
                                  model.sparse_arch.embedding_bag_collection.embedding_bags["t2"].weight.detach())
    procs = [subprocess.Popen([sys.executable, "-m", "flexemr", *cmd.split()[1:], "--transport", "tcp"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
             for cmd in out.commands]                      # the commands as printed, plus the transport
    try:
        for p in procs:
            await asyncio.to_thread(wait_line, p, "ready on")
        swapped = ft.swap_embeddings(model, out.config_path, transport="tcp")
        assert swapped is model
        remote = model.sparse_arch.embedding_bag_collection
        assert isinstance(remote, ft.RemoteEmbeddingBagCollection)
        assert not any(isinstance(m, EmbeddingBagCollection) for m in model.modules())
        rng = np.random.default_rng(0)
        cfgs = remote.embedding_bag_configs()
        with torch.no_grad():
            for batch in (1, 9, 50):
                kjt = _random_kjt(rng, cfgs, batch)
                dense = torch.tensor(rng.random((batch, 13)), dtype=torch.float32)
                got = await asyncio.to_thread(model, dense, kjt)   # forward from a thread without a loop
                want = local(dense, kjt)
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
        remote.close()
    finally:
        for p in procs:
            stop(p)


def test_swap_embeddings_shares_one_thread_and_refuses_models_without_ebcs(cluster: BackgroundCluster) -> None:
    ebc = _ebc(_weighted_configs(), weighted=True)
    pair = torch.nn.ModuleDict({"a": ebc, "b": torch.nn.Sequential(ebc, torch.nn.Identity())})  # one EBC, twice
    ft.swap_embeddings(pair, cluster.config, transport="tcp")
    assert isinstance(pair["a"], ft.RemoteEmbeddingBagCollection) and pair["a"] is pair["b"][0]
    assert pair["a"].is_weighted()
    bare = ft.swap_embeddings(_ebc(_weighted_configs(), weighted=True), pair["a"].client_thread)
    assert isinstance(bare, ft.RemoteEmbeddingBagCollection) and bare.client_thread is pair["a"].client_thread
    bare.close()
    pair["a"].close()
    with pytest.raises(ConfigError, match="has no EmbeddingBagCollection"):
        ft.swap_embeddings(torch.nn.Linear(2, 2), cluster.config)


def test_export_refuses_bad_arguments(tmp_path: Path) -> None:
    ebc = _ebc(_weighted_configs())
    with pytest.raises(ConfigError, match="servers must be"):
        ft.export(ebc, tmp_path, servers=0)
    with pytest.raises(ConfigError, match="plan must be"):
        ft.export(ebc, tmp_path, plan="diagonal")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="port must be"):
        ft.export(ebc, tmp_path, servers=3, port=65534)
    out = ft.export(ebc.state_dict(), tmp_path / "sd", servers=1, plan="table_wise", secret="s3cret")
    assert out.config.secret == "s3cret" and out.config.plan.servers == ("s0",)
    assert oct(out.config_path.stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------ environment


def test_import_flexemr_does_not_import_torch() -> None:
    code = "import sys, flexemr, flexemr.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (GPU path untested here)")
def test_outputs_land_on_the_gpu_through_pinned_memory(ebcs: tuple[Any, Any], client: Any) -> None:
    plain, _ = ebcs
    cfgs = plain.embedding_bag_configs()
    remote = ft.RemoteEmbeddingBagCollection(cfgs, client, device="cuda")
    kjt = _random_kjt(np.random.default_rng(1), cfgs, 32)
    kt = remote(kjt.to(torch.device("cuda")))
    assert kt.values().device.type == "cuda"
    torch.cuda.synchronize()
    with torch.no_grad():
        _assert_same(ft.keyed_tensor({k: v.cpu() for k, v in kt.to_dict().items()}, kt.keys()), plain(kjt), cfgs)
    remote.close()


def test_docstring_examples_run() -> None:
    import doctest

    import flexemr.torch._convert as conv

    res = doctest.testmod(conv, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 8 and res.failed == 0


def test_module_moves_with_to(ebcs: tuple[Any, Any], client: Any) -> None:
    cfgs = ebcs[0].embedding_bag_configs()
    remote = ft.RemoteEmbeddingBagCollection(cfgs, client)
    assert remote.device.type == "cpu" and remote.state_dict() == {}
    remote.to("meta")                        # as model.to(device) would: outputs follow
    assert remote.device.type == "meta"
    kt = remote(_random_kjt(np.random.default_rng(0), cfgs, 4))
    assert kt.values().device.type == "meta" and tuple(kt.values().shape) == (4, 32)
    remote.close()



def test_deepcopy_shares_the_client_thread_and_pickling_is_refused(ebcs: tuple[Any, Any], client: Any) -> None:
    import pickle

    plain, _ = ebcs
    cfgs = plain.embedding_bag_configs()
    model = torch.nn.Sequential(ft.RemoteEmbeddingBagCollection(cfgs, client))
    twin = copy.deepcopy(model)
    assert twin[0] is not model[0] and twin[0].client_thread is client
    kjt = _random_kjt(np.random.default_rng(3), cfgs, 8)
    with torch.no_grad():
        _assert_same(twin[0](kjt), plain(kjt), cfgs)
    model[0].close()
    assert not twin[0].closed       # each copy holds the thread on its own
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(twin)
    twin[0].close()
