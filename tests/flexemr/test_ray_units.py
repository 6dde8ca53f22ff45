"""flexemr.ray's parts that need no Ray processes: the request format, models, registry, server host, replica."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flexemr import ClusterConfig, ConfigError, InputError, JaggedBatch, LocalCluster, LookupIdError, TableSpec
from flexemr.apps.dlrm import DLRM, ReferenceTables, criteo_specs
from flexemr.apps.trace import generate_trace
from flexemr.core.config import ServerAddress
from flexemr.core.plan import ShardingPlan
from flexemr.ray import (
    RankerOptions,
    RankerReplica,
    Registry,
    ServerHost,
    build_model,
    encode_request,
    merge_requests,
    parse_request,
)

SPECS = [TableSpec("a", 50, 4), TableSpec("b", 20, 4)]
PLAN = ShardingPlan.row_wise(SPECS, ["s0", "s1"])


def _model() -> DLRM:
    return DLRM(SPECS, seed=1, dense_features=3, bottom=(8,), top=(8,))


def _request(**over: object) -> dict[str, object]:
    req: dict[str, object] = {"dense": [[0.5, 1.0, 2.0], [0.0, 0.1, 0.2]], "sparse": {"a": [[1, 2], []], "b": [[3], [19]]}}
    req.update(over)
    return req


# ------------------------------------------------------------------ the request format


def test_a_request_parses_in_both_forms_and_round_trips() -> None:
    model = _model()
    r = parse_request(json.dumps(_request()), model, PLAN)
    assert r.batch_size == 2 and r.dense.dtype == np.float32
    assert r.sparse["a"][0].tolist() == [1, 2] and r.sparse["a"][1].tolist() == [0, 2, 2]
    compact = _request(sparse={"a": {"values": [1, 2], "lengths": [2, 0]}, "b": {"values": [3, 19], "lengths": [1, 1]}})
    r2 = parse_request(compact, model, PLAN)
    assert all(np.array_equal(r.sparse[t][i], r2.sparse[t][i]) for t in ("a", "b") for i in (0, 1))
    jb = JaggedBatch.from_per_table(r.sparse)
    for compact_form in (True, False):
        again = parse_request(encode_request(r.dense, jb, compact=compact_form), model, PLAN)
        assert np.array_equal(again.dense, r.dense)
        assert JaggedBatch.from_per_table(again.sparse) == jb


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "exactly 'dense' and 'sparse'"),
    (json.dumps({"dense": [[1, 2, 3]]}), "exactly 'dense' and 'sparse'"),
    (json.dumps(_request(dense=[])), "non-empty list"),
    (json.dumps(_request(dense=[[1, 2], [3, 4]])), r"dense\[0\] must be a list of 3 numbers"),
    (json.dumps(_request(dense=[[1, 2, "x"], [3, 4, 5]])), r"dense\[0\] must hold numbers"),
    (json.dumps(_request(dense=[[1, 2, True], [3, 4, 5]])), r"dense\[0\] must hold numbers"),
    (json.dumps(_request(dense=[[1, 2, 1e300], [3, 4, 5]])), "finite"),
    (json.dumps(_request(dense=[[1, 2, 10**400], [3, 4, 5]])), "finite"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps(_request(sparse=[1])), "'sparse' must be an object"),
    (json.dumps(_request(sparse={"a": [[1], []]})), r"missing \['b'\]"),
    (json.dumps(_request(sparse={"a": [[1], []], "b": [[1], []], "c": [[], []]})), r"unknown \['c'\]"),
    (json.dumps(_request(sparse={"a": [[1]], "b": [[3], [4]]})), "has 1 samples, dense has 2"),
    (json.dumps(_request(sparse={"a": [[1], 2], "b": [[3], [4]]})), r"sparse\['a'\]\[1\] must be a list"),
    (json.dumps(_request(sparse={"a": [[1.5], []], "b": [[3], [4]]})), "must hold integers, got 1.5"),
    (json.dumps(_request(sparse={"a": [[True], []], "b": [[3], [4]]})), "must hold integers, got True"),
    (json.dumps(_request(sparse={"a": [[2**70], []], "b": [[3], [4]]})), "does not fit in 64 bits"),
    (json.dumps(_request(sparse={"a": {"values": [1]}, "b": [[3], [4]]})), "needs exactly 'values' and 'lengths'"),
    (json.dumps(_request(sparse={"a": {"values": [1], "lengths": [2, 0]}, "b": [[3], [4]]})), "lengths sum to 2"),
    (json.dumps(_request(sparse={"a": {"values": [], "lengths": [1, -1]}, "b": [[3], [4]]})), "must be >= 0"),
    (json.dumps(_request(sparse={"a": "x", "b": [[3], [4]]})), "list of id lists or"),
])
def test_a_bad_request_is_refused_saying_why(body: bytes | str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_request(body, _model(), PLAN)


def test_ids_out_of_range_and_oversized_requests_are_refused() -> None:
    with pytest.raises(LookupIdError, match="'b'"):
        parse_request(_request(sparse={"a": [[1], []], "b": [[20], []]}), _model(), PLAN)
    with pytest.raises(InputError, match="at most 1 samples"):
        parse_request(_request(), _model(), PLAN, max_samples=1)


def test_merge_concatenates_requests_in_order() -> None:
    model = _model()
    r1 = parse_request(_request(), model, PLAN)
    r2 = parse_request(_request(dense=[[9, 9, 9]], sparse={"a": [[7, 7, 7]], "b": [[]]}), model, PLAN)
    dense, jb, sizes = merge_requests([r1, r2])
    assert sizes == [2, 1] and dense.shape == (3, 3) and dense[2].tolist() == [9, 9, 9]
    assert jb == JaggedBatch.from_lists({"a": [[1, 2], [], [7, 7, 7]], "b": [[3], [19], []]})
    with pytest.raises(InputError):
        merge_requests([])


def test_the_torch_model_computes_the_numpy_models_ctrs() -> None:
    pytest.importorskip("torch", reason="the torch extra is not installed here (make torch); CI installs it")
    specs = criteo_specs(scale=1e-4, dim=8)
    batch = generate_trace(specs, 1, 32, 3.0, seed=4)[0]
    ref = ReferenceTables(specs, 0)
    numpy_model, torch_model = build_model("numpy", specs, 3), build_model("torch", specs, 3)
    pooled = numpy_model.stack_pooled(ref.pooled(batch.sparse, numpy_model.tables), 32)
    a, b = numpy_model.forward(batch.dense, pooled), torch_model.forward(batch.dense, pooled)
    assert b.dtype == np.float32 and b.shape == (32,)
    assert np.max(np.abs(a - b)) < 1e-5
    with pytest.raises(ConfigError, match="'numpy' or 'torch'"):
        build_model("jax", specs)


def test_ranker_options_are_checked() -> None:
    assert RankerOptions().replicas == 1
    for bad in ({"model": "jax"}, {"replicas": 0}, {"replicas": None}, {"replicas": None, "max_replicas": 2,
                                                                          "min_replicas": 3},
                {"max_batch_size": 0}, {"cpus": -1}):
        with pytest.raises(ConfigError):
            RankerOptions(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the registry


def test_the_registry_publishes_addresses_once_every_server_registered() -> None:
    cfg = ClusterConfig(PLAN, {s: ServerAddress("10.0.0.1", 7400) for s in PLAN.servers}, "sekrit")
    reg = Registry("d", cfg.to_dict(), {"x": 1})
    assert reg.config() is None and reg.previous("s0") is None
    rec = reg.register_server("s0", {"host": "127.0.0.1", "port": 7001, "state": "ready"})
    assert rec["starts"] == 1
    assert reg.config() is None
    reg.register_server("s1", {"host": "127.0.0.2", "port": 7002, "state": "ready"})
    got = ClusterConfig.from_dict(reg.config() or {})
    assert got.address("s1") == ServerAddress("127.0.0.2", 7002) and got.secret == "sekrit" and got.plan == PLAN
    assert reg.register_server("s0", {"host": "127.0.0.1", "port": 7001, "state": "ready"})["starts"] == 2
    assert reg.previous("s0")["port"] == 7001  # type: ignore[index]
    reg.set_state("s0", "draining")
    assert reg.servers()["s0"]["state"] == "draining"
    reg.register_ranker("r1", {"host": "h", "metrics_port": 1})
    assert list(reg.info()["rankers"]) == ["r1"]
    reg.unregister_ranker("r1")
    with pytest.raises(ConfigError, match="unknown server"):
        reg.previous("s9")
    with pytest.raises(ConfigError, match="without host and port"):
        reg.register_server("s0", {"host": "h"})


# ------------------------------------------------------------------ the server host


def test_a_server_host_runs_a_server_on_its_own_loop_and_drains_it() -> None:
    cfg = ClusterConfig(PLAN, {s: ServerAddress("127.0.0.1", 0) for s in PLAN.servers})
    host = ServerHost(cfg, "s0", host="127.0.0.1", port=0, transport="tcp")
    try:
        st = host.status()
        assert st["state"] == "ready" and st["port"] > 0 and st["metrics_port"] > 0 and st["shards"] == 2
        with pytest.raises(ConfigError, match="the port is in use"):
            ServerHost(cfg, "s1", host="127.0.0.1", port=st["port"], transport="tcp")
        assert 0 <= host.drain(2.0) < 2.0
        assert host.status()["state"] == "closed"
    finally:
        host.close()
        host.close()


# ------------------------------------------------------------------ a replica without Ray


async def test_a_ranker_replica_ranks_batched_requests_like_the_local_model() -> None:
    specs = criteo_specs(scale=1e-4, dim=8)
    async with LocalCluster(specs, servers=2, seed=2, transport="tcp", in_process=True) as cluster:
        replica = RankerReplica(cluster.config, RankerOptions(model_seed=5, client_options={"transport": "tcp"}))
        batches = generate_trace(specs, 3, 16, 3.0, seed=9)
        reqs = [replica.parse(encode_request(b.dense, b.sparse)) for b in batches]
        outs = await replica.rank(reqs)
        model, ref = DLRM(specs, seed=5), ReferenceTables(specs, 2)
        for b, ctr in zip(batches, outs):
            assert np.max(np.abs(ctr - model.reference_forward(b.dense, b.sparse, ref))) < 1e-5
        info = replica.info()
        assert info["connected"] and info["requests"] == 3 and info["samples"] == 48
        replica.check()
        moved = ClusterConfig(cluster.config.plan, {s: ServerAddress("127.0.0.1", 1) for s in cluster.config.plan.servers})
        replica._source = lambda: moved
        with pytest.raises(Exception, match="moved to other addresses"):
            replica.check()
        await replica.aclose()


# ------------------------------------------------------------------ Ray stays optional


def test_importing_flexemr_and_its_cli_never_imports_ray() -> None:
    code = ("import sys, flexemr, flexemr.ray, flexemr.__main__ as m; m.build_parser(); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'starlette', 'fastapi', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_without_ray_the_error_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['ray'] = None\n"
            "from flexemr.ray import DependencyError, RayCluster\n"
            "from flexemr.ray._deps import ray_missing\n"
            "print(ray_missing())\n"
            "try:\n    RayCluster('x')\nexcept DependencyError as exc:\n    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "pip install -e '.[ray]'" in out.stdout.splitlines()[0], out.stdout
    assert "refused: flexemr.ray needs ray" in out.stdout, out.stdout + out.stderr
