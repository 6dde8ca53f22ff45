"""Tests for the Soft-RoCE VM runner (rdmaio.testing.softroce).

The VM tests boot qemu once (module-scoped fixture) with a guest script that runs
all in-guest checks and exits 7; the output is parsed per test.  They are skipped,
with the reason, when qemu or the prepared kernel cache is missing.  The other
tests exercise the host-side pieces (console demultiplexing, cpio writer,
perftest parsing, error reporting) and need nothing.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rdmaio.testing import _perftest, softroce

REPO_ROOT = Path(softroce.__file__).resolve().parents[2]
PREP_HINT = "python -m rdmaio.testing.softroce --prepare"
DEPS_HINT = "python -m rdmaio.testing.softroce --install-deps"


def _vm_skip_reason() -> str | None:
    if platform.machine() != "x86_64":
        return f"Soft-RoCE VM needs an x86_64 host (this is {platform.machine()})"
    if shutil.which(softroce.QEMU_BINARY) is None:
        return f"{softroce.QEMU_BINARY} not installed; run {DEPS_HINT}"
    for tool in ("ip", "rdma", "modprobe", "ibv_devinfo", "ib_read_lat"):
        if shutil.which(tool) is None:
            return f"{tool} not installed on the host (the guest uses the host's userspace); run {DEPS_HINT}"
    if not Path("/usr/lib/python3/dist-packages/pyverbs").is_dir():
        return f"python3-pyverbs not installed in /usr/lib/python3/dist-packages; run {DEPS_HINT}"
    cache = softroce.default_cache_dir()
    if not softroce.cached_images(cache):
        return f"no prepared Soft-RoCE kernel image in {cache}; run {PREP_HINT}"
    return None


# --------------------------------------------------------------------------- the VM run

GUEST_SCRIPT = r"""
echo "CHECK env_flag=${RDMAIO_IN_SOFTROCE_VM:-unset}"
echo "CHECK pwd=$(pwd)"
echo "CHECK marker_var=${SOFTROCE_TEST_MARKER:-unset}"
echo "CHECK memlock=$(ulimit -l)"
echo "=== ibv_devinfo"
ibv_devinfo -d rxe0
echo "CHECK devinfo_rc=$?"
echo "=== pyverbs"
"$PY" -m rdmaio.testing._pyverbs_smoke
echo "CHECK smoke_rc=$?"
echo "=== perftest"
"$PY" "$TESTING_DIR/_perftest.py" ib_read_lat 64 200
echo "CHECK lat_rc=$?"
echo "=== write"
echo from-guest > guest-wrote.txt
echo "CHECK write_rc=$?"
printf 'no trailing newline'
exit 7
"""


@dataclass
class VmRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cwd: Path

    def check(self, name: str) -> str:
        m = re.search(rf"^CHECK {re.escape(name)}=(.*)$", self.stdout, re.M)
        assert m is not None, f"guest did not report {name}; stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        return m.group(1)

    def section(self, name: str) -> str:
        m = re.search(rf"^=== {re.escape(name)}\n(.*?)(?=^=== |\Z)", self.stdout, re.M | re.S)
        assert m is not None, f"no section {name} in guest output:\n{self.stdout}"
        return "".join(line for line in m.group(1).splitlines(True) if not line.startswith("CHECK "))


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> VmRun:
    reason = _vm_skip_reason()
    if reason:
        pytest.skip(reason)
    cwd = tmp_path_factory.mktemp("softroce-cwd")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["SOFTROCE_TEST_MARKER"] = "passed-through"
    cmd = [
        sys.executable, "-m", "rdmaio.testing.softroce", "--timeout", "400",
        "--env", f"PY={sys.executable}",
        "--env", f"TESTING_DIR={Path(softroce.__file__).resolve().parent}",
        "--", "sh", "-c", GUEST_SCRIPT,
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    return VmRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, cwd)




@pytest.mark.slow
@pytest.mark.timeout(600)
def test_exit_code_propagates(vm_run: VmRun) -> None:
    assert vm_run.returncode == 7, f"stdout:\n{vm_run.stdout}\nstderr:\n{vm_run.stderr}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rxe0_port_active(vm_run: VmRun) -> None:
    assert vm_run.check("devinfo_rc") == "0"
    devinfo = vm_run.section("ibv_devinfo")
    assert "hca_id:\trxe0" in devinfo
    assert re.search(r"state:\s+PORT_ACTIVE", devinfo), devinfo
    assert "link_layer:\t\tEthernet" in devinfo


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pyverbs_rdma_read_write(vm_run: VmRun) -> None:
    assert vm_run.section("pyverbs").strip() == "OK", vm_run.stdout
    assert vm_run.check("smoke_rc") == "0"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_perftest_helper_in_guest(vm_run: VmRun) -> None:
    assert vm_run.check("lat_rc") == "0", vm_run.stdout
    result = json.loads(vm_run.section("perftest").strip().splitlines()[-1])
    assert result["tool"] == "ib_read_lat"
    assert result["size"] == 64
    assert 0 < result["t_avg_usec"] < 100_000, result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_guest_environment_and_cwd(vm_run: VmRun) -> None:
    assert vm_run.check("env_flag") == "1"
    assert vm_run.check("pwd") == str(vm_run.cwd.resolve())
    assert vm_run.check("marker_var") == "passed-through"
    assert vm_run.check("memlock") == "unlimited"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_guest_writes_to_cwd_reach_host(vm_run: VmRun) -> None:
    assert vm_run.check("write_rc") == "0"
    assert (vm_run.cwd / "guest-wrote.txt").read_text() == "from-guest\n"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_output_is_clean(vm_run: VmRun) -> None:
    # Boot noise and markers are stripped; the command's last partial line is kept as is.
    assert vm_run.stdout.startswith("CHECK env_flag=1\n"), vm_run.stdout[:500]
    assert vm_run.stdout.endswith("no trailing newline"), vm_run.stdout[-200:]
    assert "@@rdmaio-softroce" not in vm_run.stdout
    assert "\r" not in vm_run.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_timeout_kills_vm(tmp_path: Path) -> None:
    reason = _vm_skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rdmaio.testing.softroce", "--timeout", "2", "--", "sleep", "300"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == softroce.EXIT_TIMEOUT, proc.stderr
    assert "timed out after 2 s" in proc.stderr
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------------------- host-side pieces


def test_missing_tools_are_named(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path / "empty-bin"), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "rdmaio.testing.softroce", "--cache", str(tmp_path / "cache"), "--", "true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == softroce.EXIT_VM_FAILURE
    assert "apt-cache not found" in proc.stderr
    assert "--install-deps" in proc.stderr


def test_nothing_to_do_is_usage_error() -> None:
    assert softroce.main([]) == 2


def _demux(chunks: list[bytes], nonce: str = "abc") -> tuple[softroce._ConsoleDemux, bytes]:
    out = io.BytesIO()
    d = softroce._ConsoleDemux(nonce, out, None)
    for c in chunks:
        d.feed(c)
    d.close()
    return d, out.getvalue()


def test_console_demux_strips_boot_noise_and_markers() -> None:
    stream = (
        b"[ 0.1] kernel noise\r\nmore noise\n@@rdmaio-softroce:begin:abc@@\n"
        b"line one\nline two\n@@rdmaio-softroce:end:abc:3@@\nsysrq: Power Off\n"
    )
    d, out = _demux([stream])
    assert out == b"line one\nline two"  # newline before the end marker belongs to the marker
    assert d.exit_code == 3
    assert b"kernel noise" in d.boot_log and b"Power Off" in d.boot_log


def test_console_demux_handles_markers_split_across_reads() -> None:
    stream = b"noise\n@@rdmaio-softroce:begin:abc@@\npayload @@not-a-marker\n@@rdmaio-softroce:end:abc:42@@\n"
    d, out = _demux([stream[i : i + 3] for i in range(0, len(stream), 3)])
    assert out == b"payload @@not-a-marker"
    assert d.exit_code == 42


def test_console_demux_ignores_other_nonces() -> None:
    stream = b"\n@@rdmaio-softroce:begin:abc@@\nx\n@@rdmaio-softroce:end:zzz:1@@\ny\n@@rdmaio-softroce:end:abc:0@@\n"
    d, out = _demux([stream])
    assert out == b"x\n@@rdmaio-softroce:end:zzz:1@@\ny"
    assert d.exit_code == 0


def test_console_demux_without_end_marker_reports_no_status() -> None:
    d, out = _demux([b"\n@@rdmaio-softroce:begin:abc@@\npartial output"])
    assert out == b"partial output"
    assert d.exit_code is None


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (rmaj, rmin))


def test_newc_archive_roundtrip() -> None:
    arc = softroce._NewcArchive()
    arc.directory("bin")
    arc.file("bin/hello", b"hi there", 0o755)
    arc.symlink("bin/sh", "hello")
    arc.chardev("dev/console", 5, 1)
    entries = _parse_newc(arc.finish())
    assert entries["bin/hello"] == (0o100755, b"hi there", (0, 0))
    assert entries["bin/sh"][0] == 0o120777 and entries["bin/sh"][1] == b"hello"
    assert entries["dev/console"][0] == 0o020600 and entries["dev/console"][2] == (5, 1)
    assert entries["bin"][0] == 0o040755


def test_cached_initramfs_contents() -> None:
    images = softroce.cached_images(softroce.default_cache_dir())
    if not images:
        pytest.skip(f"no prepared Soft-RoCE kernel image; run {PREP_HINT}")
    entries = _parse_newc(gzip.decompress(images[0].initramfs.read_bytes()))
    init = entries["init"][1].decode()
    for mod in ("virtio_pci.ko", "virtio_net.ko", "9pnet_virtio.ko", "9p.ko", "overlay.ko"):
        assert f"modules/{mod}" in entries
        assert mod in init
    # dependencies are loaded before their users
    assert init.index("virtio.ko") < init.index("virtio_pci.ko") < init.index("9pnet_virtio.ko")
    assert "switch_root" in init


def test_guest_environment_filters_terminal_vars() -> None:
    env = softroce.guest_environment({"EXTRA": "1"}, base={"TERM": "xterm", "PATH": "/x", "BAD-NAME": "v", "HOME": "/h"})
    assert env["PATH"] == "/x" and env["HOME"] == "/h" and env["EXTRA"] == "1"
    assert env["RDMAIO_IN_SOFTROCE_VM"] == "1"
    assert "TERM" not in env and "BAD-NAME" not in env


def test_perftest_parses_latency_table() -> None:
    header = (
        " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]"
        "   99% percentile[usec]   99.9% percentile[usec] "
    )
    row = " 64      200          31.32          436.51       32.34                44.53        26.16           185.23    436.51  "
    sample = f"{'-' * 80}\n{header}\n{row}\n{'-' * 80}\n"
    r = _perftest.parse_result_table(sample)
    assert r["t_avg[usec]"] == 44.53
    assert r["p99[usec]"] == 185.23 and r["p99.9[usec]"] == 436.51
    assert r["#bytes"] == 64


def test_perftest_parses_bandwidth_table() -> None:
    sample = """
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      1000             33.58              29.57              0.000473
"""
    r = _perftest.parse_result_table(sample)
    assert r["bw_avg[MB/sec]"] == 29.57 and r["bw_peak[MB/sec]"] == 33.58


def test_perftest_rejects_output_without_table() -> None:
    with pytest.raises(_perftest.PerftestError):
        _perftest.parse_result_table("Couldn't connect to 10.0.2.15:18515\n")
