"""Network namespaces joined to this one by veth pairs: separate "hosts" for multi-host tests.

:class:`NetnsLab` creates ``count`` namespaces ``fx-<pid>-<i>``; namespace
``i`` gets one end of a veth pair (``fx<pid>n<i>``), the other end
(``fx<pid>h<i>``) stays in the namespace of the test.  Each pair is a /30 of
one private /24, ``10.233.<x>.0/24``, picked so that it is not in use on this
machine; it exists only inside the test and goes away with it::

    root namespace                      namespace fx-<pid>-<i>
    fx<pid>h<i>  10.233.x.(4i+1)/30 <-> fx<pid>n<i>  10.233.x.(4i+2)/30   (+ lo up)

Processes run in a namespace with ``ip netns exec`` (:meth:`NetnsLab.argv`).
Teardown (also when set-up fails half-way) kills every process still in the
lab's namespaces (by pid, from ``ip netns pids``), deletes the veth pairs,
then the namespaces.  Namespaces of earlier runs whose creator process is
gone are removed first.

Needs root, ``ip`` (iproute2) with ``netns`` support and veth.
:func:`require` skips the calling test with the exact reason when one is
missing, or fails it under CI (``CI=true``), where the capability must exist.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

__all__ = ["Netns", "NetnsError", "NetnsLab", "require", "unavailable"]

log = logging.getLogger(__name__)

_PREFIX = "fx-"
_NAME_RE = re.compile(r"^fx-(\d+)-(\d+)$")
_TIMEOUT = 20.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


@dataclass(frozen=True)
class Netns:
    """One namespace of a lab: its name, its address and the address of the test's end of the link."""

    name: str
    address: str
    peer_address: str
    host_if: str
    ns_if: str


def _ip(*args: str, check: bool = True) -> str:
    try:
        proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]


def _kill_all_in(name: str) -> None:
    """SIGKILL the processes in namespace ``name`` (ours: nothing else runs in a lab namespace)."""
    for token in _ip("netns", "pids", name, check=False).split():
        if token.isdigit() and int(token) != os.getpid():
            try:
                os.kill(int(token), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _remove(name: str, host_if: str) -> None:
    _kill_all_in(name)
    _ip("link", "del", host_if, check=False)  # removes both ends of the pair
    _ip("netns", "del", name, check=False)


def remove_stale() -> None:
    """Delete lab namespaces (and links) of processes that no longer exist."""
    for name in _namespaces():
        m = _NAME_RE.match(name)
        if m and not _alive(int(m.group(1))):
            log.info("removing stale namespace %s", name)
            _remove(name, f"fx{m.group(1)}h{m.group(2)}")


def unavailable() -> str | None:
    """``None`` when namespaces can be made here, else the reason (probes with a throw-away namespace)."""
    if os.geteuid() != 0:
        return "network namespaces need root (euid is not 0)"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"{_PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "exec", probe, "ip", "link", "set", "lo", "up")
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def require() -> None:
    """Skip the calling test when namespaces cannot be made here; under ``CI=true`` fail instead."""
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        print(f"netns: CI must be able to create network namespaces: {reason}")
        pytest.fail(f"network namespaces unavailable in CI: {reason}")
    pytest.skip(reason)


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _ip("-4", "-o", "addr", "show", check=False) + _ip("-4", "route", "show", "table", "all", check=False)
    start = os.getpid() % 250 + 1
    for k in range(250):
        net = ipaddress.IPv4Network(f"10.233.{(start + k) % 250 + 1}.0/24")
        if f"10.233.{net.network_address.packed[2]}." not in used:
            return net
    raise NetnsError("no free 10.233.x.0/24 subnet")


class NetnsLab:
    """``count`` namespaces linked to the test's namespace (module docstring); a context manager."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= 9:
            raise ValueError("count must be in 1..9")
        self.count = count
        self.namespaces: list[Netns] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self._created: list[tuple[str, str]] = []  # (namespace, host interface) to remove

    def __enter__(self) -> NetnsLab:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        remove_stale()
        pid = os.getpid()
        self.subnet = _pick_subnet()
        base = self.subnet.network_address
        for i in range(self.count):
            name, host_if, ns_if = f"{_PREFIX}{pid}-{i}", f"fx{pid}h{i}", f"fx{pid}n{i}"
            peer, addr = str(base + 4 * i + 1), str(base + 4 * i + 2)
            _ip("netns", "add", name)
            self._created.append((name, host_if))
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", name)
            _ip("addr", "add", f"{peer}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{addr}/30", "dev", ns_if)
            _ip("-n", name, "link", "set", ns_if, "up")
            self.namespaces.append(Netns(name, addr, peer, host_if, ns_if))

    def argv(self, ns: Netns, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``ns``."""
        return ["ip", "netns", "exec", ns.name, *argv]

    def run(self, ns: Netns, argv: Sequence[str]) -> str:
        """Run ``argv`` inside ``ns``; returns its stdout (raises :class:`NetnsError` on failure)."""
        proc = subprocess.run(self.argv(ns, argv), check=False, capture_output=True, text=True, timeout=_TIMEOUT)
        if proc.returncode != 0:
            raise NetnsError(f"{' '.join(argv)} in {ns.name} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete the links and the namespaces. Idempotent."""
        while self._created:
            name, host_if = self._created.pop()
            _remove(name, host_if)
        self.namespaces.clear()
