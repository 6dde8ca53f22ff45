"""flexemr on a local multi-node Ray cluster: deploy, rank over HTTP, kill a server actor, the CLI,
docs/ray.md as written, down.

One Ray cluster of three fake nodes on this machine (``ray.cluster_utils.Cluster``,
2 logical CPUs and a 100 MiB object store each, every address 127.0.0.1) is
started once for the module; one deployment (:func:`flexemr.ray.up`: three
servers of a replicated, versioned Criteo-shaped plan, one per node, and two
ranker replicas) serves the tests that follow it, in order, and the last takes
it down; the CLI test and the docs test deploy beside it and take theirs down.
The module takes about 1-2.5 minutes (cluster start ~20 s, each deployment ~10 s).  The tests need the ``ray`` extra: without it they skip with the
reason, and fail under CI (``CI=true``), where ``scripts/test.sh`` installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rdmaio
from flexemr import ClosedError, ClusterConfig, ConfigError, EmbeddingClient, ServerAddress, ShardingPlan
from flexemr.apps.dlrm import DLRM, ReferenceTables, criteo_specs
from flexemr.apps.trace import generate_trace
from flexemr.core.versioned import ctl_offset, region_bytes, row_data
from flexemr.ray import NAMESPACE, RankerOptions, RayCluster, down, encode_request, up
from flexemr.ray._deps import ray_missing
from flexemr.ray._http import rank_over_http

pytestmark = [
    pytest.mark.timeout(600),
    # Ray's own modules warn about their use of deprecated pydantic and asyncio APIs on import
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pydantic"),
]

# Ray's node addresses are 127.0.0.1 (local fake nodes): read when ray is imported, and by every Ray process
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[2]
SPECS = criteo_specs(scale=2e-3, dim=8)
SERVERS = ["s0", "s1", "s2"]
PLAN = ShardingPlan.row_wise(SPECS, SERVERS, replicas=2, versioned=True)
CONFIG = ClusterConfig(PLAN, {s: ServerAddress("127.0.0.1", 0) for s in SERVERS}, secret="ray-test-secret")
SEED, MODEL_SEED = 7, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:  # not ours: e.g. the proxy's 404 once the deployment is gone
            return exc.code, {"error": body.decode(errors="replace")}


def _metric(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels} in the scrape")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    reason = ray_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Ray is required in CI: {reason}")
        pytest.skip(reason)
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # every node's address is 127.0.0.1: Ray's processes read the variable (set at the top of this
    # module), this one has read it already when ray was imported before (by ray_missing)
    ray_constants.ENABLE_RAY_CLUSTER = False

    t0 = time.monotonic()
    node: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 100 << 20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**node)
        ray.init(address=cluster.address, namespace="flexemr-tests", log_to_driver=False)
        cluster.wait_for_nodes()
        print(f"\n3-node Ray cluster up in {time.monotonic() - t0:.1f} s", flush=True)
        yield cluster
    finally:
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def deployment(ray_cluster: Any) -> Iterator[RayCluster]:
    t0 = time.monotonic()
    rc = up(CONFIG, name="t", seed=SEED, ports="any", transport="tcp", http_port=_free_port(), timeout=240,
            ranker=RankerOptions(replicas=2, model_seed=MODEL_SEED, max_batch_size=4, cpus=0.25,
                                 client_options={"transport": "tcp"}))
    print(f"deployment up in {time.monotonic() - t0:.1f} s: {rc.url}", flush=True)
    try:
        yield rc
    finally:
        down("t", drain_timeout=2.0)


def test_up_places_one_server_per_node_and_publishes_them(deployment: RayCluster) -> None:
    import ray
    from ray import serve

    servers = deployment.servers()
    assert sorted(servers) == SERVERS
    assert len({r["node_id"] for r in servers.values()}) == 3  # STRICT_SPREAD: one server per fake node
    assert all(r["state"] == "ready" and r["starts"] == 1 and r["host"] == "127.0.0.1" for r in servers.values())
    cfg = deployment.config()
    assert cfg.plan == PLAN and cfg.secret == CONFIG.secret
    assert {s: (a.host, a.port) for s, a in cfg.addresses.items()} == {
        s: (r["host"], r["port"]) for s, r in servers.items()}
    # each actor runs in a process of its own, holding its shards
    pids = {deployment.status(s)["pid"] for s in SERVERS}
    assert len(pids) == 3 and os.getpid() not in pids
    # the server's metrics and health endpoints
    r = servers["s1"]
    base = f"http://{r['host']}:{r['metrics_port']}"
    assert _get(base + "/readyz") == (200, "ready\n")
    code, text = _get(base + "/metrics")
    assert code == 200 and _metric(text, "flexemr_server_ready", server="s1") == 1.0
    assert _metric(text, "flexemr_server_info", server="s1", layout="versioned", transport="tcp") == 1.0
    # the rankers: two replicas, running
    status = serve.status().applications["t"]
    assert str(status.status).endswith("RUNNING")
    dep = status.deployments["t-ranker"]
    assert sum(dep.replica_states.values()) == 2
    # a second deployment of the same name is refused
    with pytest.raises(Exception, match="already up"):
        up(CONFIG, name="t")
    assert ray.get_actor("t/registry", namespace=NAMESPACE) is not None


def test_rank_over_http_matches_the_local_model(deployment: RayCluster) -> None:
    url = deployment.url
    assert url is not None
    batches = generate_trace(SPECS, 7, 48, 4.0, seed=11)
    model, ref = DLRM(SPECS, seed=MODEL_SEED), ReferenceTables(SPECS, SEED)
    res = rank_over_http(url, batches, concurrency=3, model=model, reference=ref, check_samples=48)
    assert res.failed == 0, res.errors
    assert res.requests == 6 and res.checked_samples == 7 * 48
    assert res.max_abs_err is not None and res.max_abs_err < 1e-5
    # the list form, a bad request, a GET
    b = batches[0]
    code, out = _post(url, encode_request(b.dense[:2], generate_trace(SPECS, 1, 2, 2.0, seed=1)[0].sparse,
                                          compact=False))
    assert code == 200 and len(out["ctr"]) == 2 and all(0 < p < 1 for p in out["ctr"])
    code, out = _post(url, b'{"dense": [[1, 2]], "sparse": {}}')
    assert code == 400 and "dense[0] must be a list of 13 numbers" in out["error"]
    code, out = _post(url, b"\xff\x00 garbage")
    assert code == 400 and "not JSON" in out["error"]
    code, text = _get(url)
    info = json.loads(text)
    assert code == 200 and info["tables"] == [s.name for s in SPECS] and info["servers"] == SERVERS
    # a ranker replica's client metrics, found through the registry
    rankers = deployment.info()["rankers"]
    assert rankers, "no ranker replica registered its metrics endpoint"
    rec = next(iter(rankers.values()))
    code, text = _get(f"http://{rec['host']}:{rec['metrics_port']}/metrics")
    assert code == 200 and _metric(text, "flexemr_client_lookups_total", deployment="t") > 0
    assert _metric(text, "flexemr_client_healthy", deployment="t") == 1.0


def _read_shard(client: EmbeddingClient, region: str, server: str) -> np.ndarray:
    """The rows of a versioned shard as ``server`` holds them (one raw read of its region)."""
    shard = client._peers.region_shard[region]
    spec = PLAN.spec(shard.table)
    n = region_bytes(spec, shard.num_rows)
    buf = np.zeros(n, dtype=np.uint8)

    async def read() -> None:
        with client.engine.register(buf, access=rdmaio.Access.NONE) as mr:
            await client.endpoint(server).read(mr, 0, client.shard_key(region, server), 0, n)

    asyncio.run_coroutine_threadsafe(read(), client._loop).result(60)  # type: ignore[arg-type]
    slots = buf[: ctl_offset(spec, shard.num_rows)].reshape(shard.num_rows, -1)
    return np.array(row_data(spec, slots))


def test_a_killed_server_actor_comes_back_in_service_with_nothing_lost(deployment: RayCluster) -> None:
    url = deployment.url
    assert url is not None
    before = deployment.servers()["s1"]
    loop = rdmaio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    client = EmbeddingClient(deployment.config(), transport="tcp")
    stop = threading.Event()
    loader: threading.Thread | None = None
    try:
        run(client.connect())
        # rows every replica must keep: updated before the crash
        table = "C3"
        ids = np.arange(0, PLAN.spec(table).num_rows, 7)
        new = np.full((ids.size, PLAN.spec(table).dim), 0.25, dtype=np.float32) + ids[:, None].astype(np.float32)
        run(client.update(table, ids, new))
        # rankers keep ranking over HTTP while the server dies and comes back
        results: list[int] = []
        batches = generate_trace(SPECS, 4, 32, 3.0, seed=5)
        bodies = [encode_request(b.dense, b.sparse) for b in batches]

        def load() -> None:
            i = 0
            while not stop.is_set():
                code, _ = _post(url, bodies[i % len(bodies)])
                results.append(code)
                i += 1

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        deployment.kill("s1")
        assert deployment.wait_ready(120, starts={"s1": 2}), deployment.servers()
        after = deployment.servers()["s1"]
        restarted_in = time.monotonic() - t0
        assert (after["host"], after["port"]) == (before["host"], before["port"])  # where rankers look for it
        assert after["incarnation"] != before["incarnation"] and after["pid"] != before["pid"]
        assert after["node_id"] == before["node_id"]  # its placement-group bundle's node
        # the client reconnects, resyncs the new replica from the others and reads from it again
        assert run(client.wait_healthy(60.0))
        assert client.reliability.restarts_seen >= 1
        # some client copied the shards to the new replica: this one, or a ranker replica that
        # reconnected first (then this client found them in sync and copied nothing)
        copies = _resync_copies(deployment, client)
        assert copies >= 1, f"no client resynced the restarted server: {copies}"
        status = client.replica_status()
        for sh in PLAN.regions_on("s1"):
            assert "s1" in status[sh.region_name]
        # nothing lost: the restarted replica holds the updated rows (read from it alone)
        for sh in PLAN.shards[table]:
            if "s1" not in sh.replicas:
                continue
            rows = _read_shard(client, sh.region_name, "s1")
            mine = ids[(ids >= sh.row_start) & (ids < sh.row_end)]
            assert np.array_equal(rows[mine - sh.row_start], new[np.searchsorted(ids, mine)])
        got = run(client.lookup(table, ids))
        assert np.array_equal(got, new)
        time.sleep(1.0)
        stop.set()
        loader.join(60)
        assert not loader.is_alive()
        assert len(results) > 5 and set(results) == {200}, f"{results.count(200)} of {len(results)} answered 200"
        print(f"s1 back in service {restarted_in:.1f} s after the kill; {len(results)} HTTP requests, all 200; "
              f"{copies} shard copies ({client.reliability.resync_copies} by this client)", flush=True)
    finally:
        stop.set()  # the loader must not outlive this test, whatever failed
        if loader is not None:
            loader.join(60)
        run(client.aclose())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _resync_copies(deployment: RayCluster, client: EmbeddingClient, wait: float = 30.0) -> int:
    """Shard copies made by ``client`` and every ranker replica (scraped), once it is at least one.

    A ranker counts a copy when its resync returns, which can be just after this client saw
    the shards in sync: the scrape is retried for up to ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        total = client.reliability.resync_copies
        for rec in deployment.info()["rankers"].values():
            code, text = _get(f"http://{rec['host']}:{rec['metrics_port']}/metrics")
            assert code == 200, text
            total += int(_metric(text, "flexemr_client_resyncs_total", deployment="t"))
        if total >= 1 or time.monotonic() > deadline:
            return total
        time.sleep(0.2)


def test_a_server_that_cannot_start_fails_up_and_leaves_nothing(deployment: RayCluster) -> None:
    """Its port is taken: up() raises ConfigError saying so, and removes what it created."""
    from ray.util import placement_group_table

    plan = ShardingPlan.row_wise(criteo_specs(scale=1e-3, dim=8), ["a", "b"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ClusterConfig(plan, {"a": ServerAddress("127.0.0.1", port), "b": ServerAddress("127.0.0.1", port)})
        in_use = r"could not start: ConfigError: cannot listen on 127.0.0.1:\d+: the port is in use"
        with pytest.raises(ConfigError, match=in_use):
            up(cfg, name="bad", transport="tcp", ranker=None, timeout=120)
    with pytest.raises(ClosedError, match="no flexemr deployment 'bad'"):
        RayCluster("bad")
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values() if pg["name"] == "bad/servers")
    assert deployment.servers()["s0"]["state"] == "ready"  # the other deployment is untouched


def test_the_cli_drives_a_deployment(ray_cluster: Any, deployment: RayCluster, tmp_path: Path) -> None:
    """flexemr ray up / status / rank / down as separate drivers, beside the first deployment."""
    cfg = tmp_path / "cluster.toml"
    plan = ShardingPlan.row_wise(criteo_specs(scale=1e-3, dim=8), ["a", "b"])
    ClusterConfig(plan, {"a": ServerAddress("127.0.0.1", 0), "b": ServerAddress("127.0.0.1", 0)}).write_toml(cfg)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    flexemr = [sys.executable, "-m", "flexemr", "ray"]
    addr = ["--address", ray_cluster.address, "--name", "cli"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*flexemr, *args], capture_output=True, text=True, env=env, timeout=300)

    written = tmp_path / "real.toml"
    r = cli("up", *addr, "--config", str(cfg), "--ports", "any", "--transport", "tcp", "--model-seed", "4",
            "--seed", "2", "--ranker-cpus", "0.25", "--write-config", str(written))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "flexemr ray: cli is up: 2 servers on 2 Ray nodes" in r.stdout, r.stdout
    assert "restartable detached actor" not in r.stderr  # Ray's warning about what down() relies on
    url = next(line.split("rankers at ")[1] for line in r.stdout.splitlines() if "rankers at " in line)
    assert url.endswith("/cli") and url.startswith("http://127.0.0.1:")  # Serve's port: the first deployment's
    assert ClusterConfig.from_toml(written).plan == plan
    r = cli("status", *addr)
    assert r.returncode == 0 and "server a: ready on 127.0.0.1:" in r.stdout and "started 1x" in r.stdout, r.stdout
    r = cli("status", *addr, "--url")
    assert r.returncode == 0 and r.stdout.strip() == url, r.stdout + r.stderr[-2000:]
    r = subprocess.run([*flexemr, "rank", "--url", url, "--config", str(cfg), "--generate", "3", "--batch-size", "32",
                        "--seed", "2", "--model-seed", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and ", 0 failed, max |err|" in r.stdout, r.stdout + r.stderr[-2000:]
    r = subprocess.run([*flexemr, "rank", "--url", url, "--config", str(cfg), "--generate", "2", "--batch-size", "8",
                        "--seed", "2", "--model-seed", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "CTRs differ from the local reference" in r.stderr, r.stderr[-2000:]
    r = cli("up", *addr, "--config", str(cfg))
    assert r.returncode == 1 and "deployment 'cli' is already up" in r.stderr, r.stderr[-2000:]
    r = cli("down", *addr)
    assert r.returncode == 0 and "flexemr ray: cli is down" in r.stdout, r.stderr[-2000:]
    r = cli("down", *addr)
    assert r.returncode == 1 and "no deployment 'cli' is up" in r.stderr
    r = cli("status", *addr)
    assert r.returncode == 1 and "no flexemr deployment 'cli'" in r.stderr
    assert deployment.servers()["s0"]["state"] == "ready"  # the other deployment is untouched


def _sh_commands(page: Path) -> list[str]:
    """The commands of a page's ```sh blocks, in order (``\\`` joins lines; comments are not commands)."""
    commands: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", page.read_text(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def test_the_ray_page_runs_as_written(ray_cluster: Any, deployment: RayCluster, tmp_path: Path) -> None:
    """docs/ray.md's sh blocks, as written, in one bash shell against this module's Ray cluster."""
    commands = _sh_commands(ROOT / "docs" / "ray.md")
    assert len(commands) >= 5 and commands[-1] == "flexemr ray down", commands
    script = "set -e -o pipefail\n" + "".join(f"echo {shlex.quote('+ ' + c)}\n{c}\n" for c in commands)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT),
           "RAY_ADDRESS": ray_cluster.address, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=480)
    print(proc.stdout, flush=True)
    ran = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert proc.returncode == 0, f"{ran[-1] if ran else '?'} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert len(ran) == len(commands)
    assert "flexemr ray: flexemr is up: 3 servers on 3 Ray nodes" in proc.stdout
    assert ", 0 failed, max |err|" in proc.stdout and "flexemr ray: flexemr is down" in proc.stdout
    print(f"docs/ray.md: {len(commands)} commands ran as written", flush=True)


def test_autoscaled_rankers_get_serves_autoscaling_config() -> None:
    """--max-replicas: the Serve deployment autoscales between the bounds (checked without a cluster)."""
    reason = ray_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Ray is required in CI: {reason}")
        pytest.skip(reason)
    from flexemr.ray import ranker_deployment

    app = ranker_deployment("a", RankerOptions(replicas=None, min_replicas=1, max_replicas=3, max_batch_size=16))
    cfg = app._bound_deployment._deployment_config
    auto = cfg.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4.0)
    fixed = ranker_deployment("b", RankerOptions(replicas=3))._bound_deployment._deployment_config
    assert fixed.num_replicas == 3 and fixed.autoscaling_config is None


def test_draining_a_replicated_server_actor_fails_no_http_request(deployment: RayCluster) -> None:
    """RayCluster.drain: the server leaves for good; the rankers move its reads to the other replicas."""
    url = deployment.url
    assert url is not None
    batches = generate_trace(SPECS, 4, 32, 3.0, seed=6)
    bodies = [encode_request(b.dense, b.sparse) for b in batches]
    stop = threading.Event()
    results: list[int] = []

    def load() -> None:
        i = 0
        while not stop.is_set():
            results.append(_post(url, bodies[i % len(bodies)])[0])
            i += 1

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        time.sleep(1.0)
        before = len(results)
        took = deployment.drain("s2", timeout=5.0)
        assert 0 <= took <= 5.0 + 1.0
        assert deployment.servers()["s2"]["state"] == "closed"
        deadline = time.monotonic() + 60
        while len(results) < before + 10 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        loader.join(60)
    assert len(results) >= before + 10 and set(results) == {200}, f"{results.count(200)} of {len(results)} were 200"
    print(f"s2 drained in {took:.2f} s; {len(results)} HTTP requests, all 200", flush=True)


def test_down_removes_everything(ray_cluster: Any, deployment: RayCluster) -> None:
    import ray
    from ray import serve
    from ray.util import placement_group_table

    pg_ids = [pid for pid, pg in placement_group_table().items() if pg["name"] == "t/servers"
              and pg["state"] == "CREATED"]
    assert len(pg_ids) == 1
    pids = [r["pid"] for r in deployment.servers().values()]
    assert down("t", drain_timeout=2.0)
    assert not down("t")
    with pytest.raises(Exception, match="no flexemr deployment 't'"):
        RayCluster("t")
    for s in SERVERS:
        with pytest.raises(ValueError):
            ray.get_actor(f"t/server/{s}", namespace=NAMESPACE)
    assert "t" not in serve.status().applications
    assert placement_group_table()[pg_ids[0]]["state"] == "REMOVED"
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "a server actor's process outlived down()"
