"""Every ``flexemr`` command error is one line on stderr, names what is wrong, exits non-zero; no traceback.

Each case runs the real command line in a subprocess (what a user sees,
including anything an event loop prints at exit), several at a time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flexemr import ClusterConfig, ServerAddress, ShardingPlan, TableSpec
from flexemr.core.toml import dumps_toml

from ._procs import free_port

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

#: (name, argv, what stderr must contain, exit code).  ``{dir}``, ``{c}`` (a 2-table cluster file),
#: ``{c26}`` (Criteo-shaped, 26 tables), ``{busy}`` (a cluster whose port is taken) are filled in.
CASES: list[tuple[str, list[str], str, int]] = [
    # serve: addresses, memory, options, files
    ("serve-port-in-use", ["serve", "--config", "{busy}", "--server", "s0"], "the port is in use", 1),
    ("serve-address-not-here", ["serve", "--config", "{c}", "--server", "s0", "--host", "192.0.2.123"],
     "this host has no address 192.0.2.123", 1),
    ("serve-unresolvable", ["serve", "--config", "{c}", "--server", "s0", "--host", "no-such-host.invalid"],
     "cannot resolve host 'no-such-host.invalid'", 1),
    ("serve-too-big", ["serve", "--config", "{huge}", "--server", "s0"], "cannot allocate its shards", 1),
    ("serve-workers", ["serve", "--config", "{c}", "--server", "s0", "--workers", "0"], "--workers must be >= 1", 1),
    ("serve-port-range", ["serve", "--config", "{c}", "--server", "s0", "--port", "70000"],
     "--port must be <= 65535", 1),
    ("serve-unknown-server", ["serve", "--config", "{c}", "--server", "nope"], "unknown server 'nope'", 1),
    ("serve-missing-config", ["serve", "--config", "{dir}/missing.toml", "--server", "s0"],
     "cannot read cluster file", 1),
    ("serve-missing-npy", ["serve", "--config", "{c}", "--server", "s0", "--npy", "user={dir}/none.npy"],
     "none.npy", 1),
    ("serve-bad-dtype", ["serve", "--config", "{float8}", "--server", "s0"], "'float16', 'float32'", 1),
    ("serve-bad-secret", ["serve", "--config", "{secret5}", "--server", "s0"], "[cluster] secret must be", 1),
    # rank: inputs, options, values
    ("rank-missing-criteo", ["rank", "--config", "{c26}", "--criteo", "{dir}/missing.tsv"],
     "cannot read Criteo file", 1),
    ("rank-tsv-as-trace", ["rank", "--config", "{c26}", "--trace", "{dir}/day_0.tsv"],
     "not a trace file (an .npz archive", 1),
    ("rank-missing-trace", ["rank", "--config", "{c26}", "--trace", "{dir}/missing.npz"],
     "cannot read trace file", 1),
    ("rank-client-option", ["rank", "--config", "{c26}", "--client-option", "foo=1"],
     "EmbeddingClient has no option 'foo'", 1),
    ("rank-client-option-value", ["rank", "--config", "{c26}", "--client-option", "cache_bytes=lots"],
     "cache_bytes must be an int", 1),
    ("rank-batch-size-negative", ["rank", "--config", "{c26}", "--batch-size", "-5"], "--batch-size must be >= 1", 1),
    ("rank-batch-size-zero", ["rank", "--config", "{c26}", "--batch-size", "0"], "--batch-size must be >= 1", 1),
    ("rank-generate-zero", ["rank", "--config", "{c26}", "--generate", "0"], "--generate must be >= 1", 1),
    ("rank-seconds", ["rank", "--config", "{c26}", "--seconds", "-1"], "--seconds must be > 0", 1),
    ("rank-no-servers", ["rank", "--config", "{c26}", "--generate", "1", "--transport", "tcp"],
     "cannot connect to server", 1),
    ("rank-no-config", ["rank"], "the following arguments are required: --config", 2),
    ("rank-criteo-bad-line", ["rank", "--config", "{c26}", "--criteo", "{dir}/bad.tsv.gz"],
     "bad.tsv.gz:line 2: field I1: expected an integer, got 'x5'", 1),
    ("rank-criteo-bad-row", ["rank", "--config", "{c26}", "--criteo", "{dir}/bad.parquet"],
     "bad.parquet:row 2: field label: label must be 0 or 1, got '7'", 1),
    ("rank-criteo-parquet-columns", ["rank", "--config", "{c26}", "--criteo", "{dir}/cols.parquet"],
     "lacks Criteo columns ['I1', 'I2',", 1),
    ("rank-criteo-not-parquet", ["rank", "--config", "{c26}", "--criteo", "{dir}/day_0.parquet"],
     "cannot read Parquet file", 1),
    # gen
    ("gen-trace-batch-size", ["gen", "trace", "--batch-size", "-1", "-o", "{dir}/t.npz"],
     "--batch-size must be >= 1", 1),
    ("gen-trace-batches", ["gen", "trace", "--batches", "0", "-o", "{dir}/t.npz"], "--batches must be >= 1", 1),
    ("gen-criteo-samples", ["gen", "criteo", "--samples", "-5", "-o", "{dir}/s.tsv"], "--samples must be >= 1", 1),
    ("gen-criteo-format-name", ["gen", "criteo", "--format", "parquet", "-o", "{dir}/s.tsv"],
     "--format parquet: -o {dir}/s.tsv must end in .parquet or .pq", 1),
    ("gen-criteo-format-choice", ["gen", "criteo", "--format", "csv", "-o", "{dir}/s.csv"],
     "argument --format: invalid choice: 'csv'", 2),
    ("gen-format-not-criteo", ["gen", "cluster", "--format", "tsv", "-o", "{dir}/x.toml"],
     "--format is for gen criteo, not gen cluster", 1),
    ("gen-cluster-no-dir", ["gen", "cluster", "-o", "/nonexistent/dir/x.toml"],
     "directory /nonexistent/dir does not exist", 1),
    ("gen-cluster-duplicate", ["gen", "cluster", "--servers", "a:1,a:1", "-o", "{dir}/x.toml"],
     "--servers names a:1 twice", 1),
    ("gen-cluster-bad-server", ["gen", "cluster", "--servers", "nohostport", "-o", "{dir}/x.toml"],
     "--servers expects HOST:PORT", 1),
    ("gen-cluster-short-secret", ["gen", "cluster", "--secret", "ab", "-o", "{dir}/x.toml"],
     "--secret must have at least 4 characters", 1),
    ("gen-dim", ["gen", "cluster", "--dim", "0", "-o", "{dir}/x.toml"], "--dim must be >= 1", 1),
    # demo
    ("demo-cache-mb", ["demo", "--cache-mb", "-1"], "--cache-mb must be >= 0", 1),
    ("demo-check-samples", ["demo", "--check-samples", "-1"], "--check-samples must be >= 0", 1),
    ("demo-batches", ["demo", "--batches", "0"], "--batches must be >= 1", 1),
    ("demo-blas-threads", ["demo", "--blas-threads", "-1"], "--blas-threads must be >= 0", 1),
    ("rank-blas-threads", ["rank", "--config", "{c26}", "--generate", "64", "--blas-threads", "-2"],
     "--blas-threads must be >= 0", 1),
    ("demo-seconds", ["demo", "--seconds", "0"], "--seconds must be > 0", 1),
    ("demo-scale", ["demo", "--scale", "-1"], "--scale must be > 0", 1),
    ("demo-progress-value", ["demo", "--progress=yes"], "ignored explicit argument 'yes'", 2),
    # bench and soak
    ("bench-unknown", ["bench", "frob"], "invalid choice: 'frob'", 2),
    ("bench-tables", ["bench", "compare", "--tables", "0"], "--tables must be >= 1", 1),
    ("bench-pooling", ["bench", "locality", "--pooling", "0"], "--pooling must be > 0", 1),
    ("bench-plot-no-dir", ["bench", "compare", "--plot", "/nonexistent/dir/x.png"],
     "--plot /nonexistent/dir/x.png: directory /nonexistent/dir does not exist", 1),
    ("bench-plot-suffix", ["bench", "locality", "--plot", "{dir}/x.pdf"], "give a file name ending in .png", 1),
    ("bench-criteo-lines", ["bench", "criteo", "--lines", "0"], "--lines must be >= 1", 1),
    ("bench-criteo-file", ["bench", "criteo", "--file", "{dir}/missing.tsv"], "--file {dir}/missing.tsv: no such file",
     1),
    ("soak-seconds", ["soak", "--seconds", "-1"], "--seconds must be > 0", 1),
    # ray (checked before Ray is imported or a Ray cluster is asked)
    ("ray-unknown", ["ray", "frob"], "invalid choice: 'frob'", 2),
    ("ray-workers", ["ray", "up", "--config", "{c}", "--workers", "0"], "--workers must be >= 1", 1),
    ("ray-client-option", ["ray", "up", "--config", "{c}", "--client-option", "foo"], "expects KEY=VALUE", 1),
    ("ray-client-option-name", ["ray", "up", "--config", "{c}", "--client-option", "foo=1"],
     "EmbeddingClient has no option 'foo'", 1),
    ("ray-missing-config", ["ray", "up", "--config", "{dir}/nope.toml"], "cannot read cluster file", 1),
    ("ray-url", ["ray", "rank", "--url", "ftp://x/y", "--config", "{c}", "--generate", "1", "--batch-size", "2"],
     "--url must be http://HOST:PORT/PATH", 1),
    ("ray-drain-timeout", ["ray", "down", "--drain-timeout", "-1"], "--drain-timeout must be >= 0", 1),
    # usage
    ("unknown-command", ["frob"], "invalid choice: 'frob'", 2),
    ("bad-option", ["serve", "--config", "{c}", "--server", "s0", "--bogus"], "unrecognized arguments: --bogus", 2),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    d = tmp_path_factory.mktemp("cli")
    plan = ShardingPlan.row_wise([TableSpec("user", 1000, 8), TableSpec("item", 10, 4)], ["s0"])
    ClusterConfig(plan, {"s0": ServerAddress("127.0.0.1", free_port())}).write_toml(d / "c.toml")
    huge = ShardingPlan.row_wise([TableSpec("t", 2_000_000_000, 64)], ["s0"])
    ClusterConfig(huge, {"s0": ServerAddress("127.0.0.1", free_port())}).write_toml(d / "huge.toml")
    text = (d / "c.toml").read_text()
    (d / "float8.toml").write_text(text.replace('dtype = "float32"', 'dtype = "float8"', 1))
    (d / "secret5.toml").write_text(dumps_toml({"cluster": {"secret": 5}, **tomllib.loads(text)}))
    (d / "day_0.tsv").write_text("1\t2\t3\n")
    (d / "day_0.parquet").write_text("1\t2\t3\n")
    _criteo_files(d)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ClusterConfig(plan, {"s0": ServerAddress("127.0.0.1", taken.getsockname()[1])}).write_toml(d / "busy.toml")
        out = subprocess.run([sys.executable, "-m", "flexemr", "gen", "cluster", "--scale", "0.001",
                              "--servers", f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}", "-o",
                              str(d / "c26.toml")], capture_output=True, text=True, env=ENV, timeout=60)
        assert out.returncode == 0, out.stderr
        yield {"dir": str(d), "c": str(d / "c.toml"), "c26": str(d / "c26.toml"), "busy": str(d / "busy.toml"),
               "huge": str(d / "huge.toml"), "float8": str(d / "float8.toml"), "secret5": str(d / "secret5.toml")}


def _criteo_files(d: Path) -> None:
    """Malformed Criteo files: bad.tsv.gz (line 2), bad.parquet (row 2), cols.parquet (no I columns)."""
    import gzip

    from flexemr.apps.criteo import write_sample

    lines = write_sample(d / "good.tsv", 3, seed=1).read_text().splitlines()
    fields = lines[1].split("\t")
    fields[1] = "x5"
    lines[1] = "\t".join(fields)
    (d / "bad.tsv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(write_sample(d / "good.parquet", 3, seed=1))
    labels = table.column("label").to_pylist()
    pq.write_table(table.set_column(0, "label", pa.array([labels[0], 7, labels[2]], pa.int8())), d / "bad.parquet")
    pq.write_table(table.drop_columns([f"I{i}" for i in range(1, 14)]), d / "cols.parquet")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flexemr", *argv], capture_output=True, text=True, env=ENV,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(300)
def test_every_bad_input_gets_one_line(files: dict[str, str]) -> None:
    argvs = [[a.format(**files) for a in argv] for _, argv, _, _ in CASES]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_run, argvs))
    problems = []
    for (name, _, needle, code), argv, r in zip(CASES, argvs, results):
        needle = needle.format(**files)
        lines = r.stderr.strip().splitlines()
        cmd = argv[0] if argv[0] in ("serve", "rank", "gen", "demo", "bench", "soak", "ray") else ""
        prefix = f"flexemr {cmd}".strip() + ": error: "
        if r.returncode != code or len(lines) != 1 or needle not in lines[0] or not lines[0].startswith(prefix) \
                or "Traceback" in r.stderr:
            problems.append(f"{name}: rc={r.returncode} (want {code}), stderr={r.stderr!r}")
    assert not problems, "\n".join(problems)
    print(f"\n{len(CASES)} bad command lines, each one line on stderr")


def test_verbose_adds_the_traceback_before_or_after_the_command(files: dict[str, str]) -> None:
    for argv in (["-v", "rank", "--config", files["c26"], "--criteo", "missing.tsv"],
                 ["rank", "--config", files["c26"], "--criteo", "missing.tsv", "-v"]):
        r = _run(argv)
        assert r.returncode == 1 and "Traceback" in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("flexemr rank: error: cannot read Criteo file")


#: (library hidden, argv, the purpose named in the error line); ``{dir}``, ``{c26}`` as above
MISSING_EXTRA = [
    ("pyarrow", ["gen", "criteo", "--samples", "10", "-o", "{dir}/x.tsv"], "reading and writing Criteo files"),
    ("pyarrow", ["rank", "--config", "{c26}", "--criteo", "{dir}/good.tsv"], "reading and writing Criteo files"),
    ("pyarrow", ["bench", "criteo", "--lines", "10"], "reading and writing Criteo files"),
    ("matplotlib", ["demo", "--batches", "1"], "the report"),
    ("matplotlib", ["bench", "compare", "--plot", "{dir}/c.png"], "--plot (the figure)"),
    ("tqdm", ["gen", "criteo", "--samples", "10", "-o", "{dir}/x.tsv", "--progress"], "progress bars (--progress)"),
]


@pytest.mark.parametrize("library, argv, purpose", MISSING_EXTRA, ids=[f"{m[0]}-{m[1][0]}" for m in MISSING_EXTRA])
def test_a_missing_apps_library_is_one_line_naming_the_extra(files: dict[str, str], library: str, argv: list[str],
                                                              purpose: str) -> None:
    code = (f"import sys; sys.modules[{library!r}] = None\n"
            "from flexemr.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, *[a.format(**files) for a in argv]], capture_output=True,
                       text=True, env=ENV, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"flexemr {argv[0]}: error: {purpose} needs {library}, from the 'apps' extra: pip install 'flexemr[apps]' "
        "(make demo installs it)"], r.stderr
