"""``python -m rdmaio.testing.softroce --install-deps`` / ``--clean``: what they would run, without root or apt.

``subprocess.run`` is scripted: dpkg-query answers per package, ``apt-get -s``
prints a dry run, and the real ``apt-get install`` call is recorded, not run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from rdmaio.testing import softroce

DRY_RUN = """\
NOTE: This is only a simulation!
Inst libudev1 [252.38-1~deb12u1] (252.39-1~deb12u2 Debian-Security:12/stable-security [amd64])
Inst udev (252.39-1~deb12u2 Debian-Security:12/stable-security [amd64])
Inst rdma-core (44.0-2 Debian:12.12/stable [amd64])
Conf libudev1 (252.39-1~deb12u2 Debian-Security:12/stable-security [amd64])
"""


class Apt:
    def __init__(self, installed: set[str]) -> None:
        self.installed = installed
        self.calls: list[list[str]] = []

    def __call__(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        cmd = list(cmd)
        self.calls.append(cmd)
        if cmd[0] == "dpkg-query":
            ok = cmd[-1] in self.installed
            return subprocess.CompletedProcess(cmd, 0 if ok else 1, "install ok installed" if ok else "", "")
        if cmd[:2] == ["apt-get", "-s"]:
            return subprocess.CompletedProcess(cmd, 0, DRY_RUN, "")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softroce.os, "geteuid", lambda: 0)


def test_nothing_missing_installs_nothing(monkeypatch: pytest.MonkeyPatch, root: None) -> None:
    apt = Apt(set(softroce.APT_PACKAGES))
    monkeypatch.setattr(softroce.subprocess, "run", apt)
    assert softroce.install_deps() == 0
    assert all(c[0] == "dpkg-query" for c in apt.calls)


def test_only_missing_packages_are_installed_and_forced_upgrades_are_said(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root: None) -> None:
    apt = Apt(set(softroce.APT_PACKAGES) - {"rdma-core", "perftest"})
    monkeypatch.setattr(softroce.subprocess, "run", apt)
    assert softroce.install_deps() == 0
    install = [c for c in apt.calls if c[:2] == ["apt-get", "install"]]
    assert install == [["apt-get", "install", "-y", "--no-install-recommends", "--no-upgrade", "rdma-core",
                        "perftest"]]
    err = capsys.readouterr().err
    assert "libudev1 252.38-1~deb12u1 -> 252.39-1~deb12u2" in err and "forces apt to upgrade" in err
    assert "udev (" not in err                                       # a new package is not an upgrade


def test_planned_upgrades_parses_the_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softroce.subprocess, "run", Apt(set()))
    assert softroce.planned_upgrades(["rdma-core"]) == [("libudev1", "252.38-1~deb12u1", "252.39-1~deb12u2")]


def test_clean_removes_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    (cache / "images" / "k").mkdir(parents=True)
    (cache / "images" / "k" / "vmlinux").write_bytes(bytes(3 << 20))
    assert softroce.main(["--clean", "--cache", str(cache)]) == 0
    assert not cache.exists() and "removed" in capsys.readouterr().err
    assert softroce.main(["--clean", "--cache", str(cache)]) == 0
    assert "no cache" in capsys.readouterr().err


def test_the_guest_cpu_has_no_avx2_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = softroce.KernelImage(tmp_path, "linux-image-amd64", "1", "6.1.0")

    def cpu() -> str:
        argv = softroce.qemu_command(image, tmp_path, tmp_path, memory_mb=512, smp=1)
        return argv[argv.index("-cpu") + 1]

    monkeypatch.delenv("RDMAIO_SOFTROCE_CPU", raising=False)
    assert cpu() == "max,-avx2"                       # numpy's AVX2 sort kernels meet a TCG bug
    monkeypatch.setenv("RDMAIO_SOFTROCE_CPU", "Nehalem")
    assert cpu() == "Nehalem"


def test_guestcheck_catches_a_wrong_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from rdmaio.testing import guestcheck

    assert guestcheck.check(arrays=40) == []
    real = np.sort
    monkeypatch.setattr(guestcheck.np, "sort", lambda a: real(a)[::-1] if a.size > 16 else real(a))
    problems = guestcheck.check(arrays=40)
    assert problems and all(p.startswith("np.sort wrong on") for p in problems)
    assert guestcheck.main() == 1


def test_the_runner_runs_by_path_without_rdmaio_built(tmp_path: Path) -> None:
    """scripts/system-deps.sh and make clean run softroce.py by path before rdmaio is built: the
    runner and its image half are stdlib only and must not import rdmaio (numpy, the native code)."""
    script = Path(softroce.__file__)
    probe = tmp_path / "probe.py"
    probe.write_text("import runpy, sys\nsys.argv = [sys.argv[1], '--clean', '--cache', sys.argv[2]]\n"
                     "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
                     "    assert e.code == 0, e.code\n"
                     "assert 'numpy' not in sys.modules and 'rdmaio._engine' not in sys.modules, sorted(sys.modules)\n"
                     "print('ok')\n")
    out = subprocess.run([sys.executable, "-S", str(probe), str(script), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
