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

:class:`HostsLab` is the variant for commands that name their hosts (the
docs' walkthroughs): namespaces ``fxh-<pid>-<i>`` for the given host names,
each with one veth end on a bridge ``fxh<pid>br`` in the test's namespace, all
in one unused ``10.233.<x>.0/24`` (the bridge is ``.1``, the hosts ``.2``,
``.3``, ...).  ``/etc/netns/<namespace>/hosts`` maps every host name to its
address; ``ip netns exec`` bind-mounts it over ``/etc/hosts``, so a process in
any of the namespaces reaches ``emb0`` by name::

    root namespace: bridge fxh<pid>br 10.233.x.1/24
        fxh<pid>h<i>  <->  fxh<pid>n<i> 10.233.x.(i+2)/24 in fxh-<pid>-<i>  ("emb0", ...)

Its teardown also removes the bridge and the ``/etc/netns`` entries, and it
removes those of dead earlier runs first.

Needs root, ``ip`` (iproute2) with ``netns`` support, veth (and a bridge for
:class:`HostsLab`); :func:`unavailable` says what is missing.  The tests'
``tests/flexemr/netns.py`` re-exports this module and adds ``require`` (skip,
or fail under CI).

For the benchmarks: :func:`shape_link` puts a ``tc`` token-bucket filter
(``tbf``: a rate limit; ``netem`` is not assumed to exist) on a namespace's
end of its link, i.e. on what the process in it sends to the root namespace,
and :class:`NetCluster` runs the ``flexemr serve`` processes of a cluster
file each in its own lab namespace (the ranker stays in the root namespace:
the tcp transport, never the same-host UNIX fast path).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["HostsLab", "NetCluster", "Netns", "NetnsError", "NetnsLab", "shape_link", "tc_unavailable", "unavailable"]

log = logging.getLogger(__name__)

_PREFIX = "fx-"
_NAME_RE = re.compile(r"^fx-(\d+)-(\d+)$")
_TIMEOUT = 20.0


class NetnsError(RuntimeError):  # noqa: N818 - the tests' name
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


def unavailable(bridge: bool = False) -> str | None:
    """``None`` when namespaces (and, with ``bridge``, bridges) can be made here, else the reason.

    Probes with a throw-away namespace (and bridge).
    """
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
    if bridge:
        br = f"fxp{os.getpid()}br"
        try:
            _ip("link", "add", br, "type", "bridge")
        except NetnsError as exc:
            return f"cannot create a bridge: {exc}"
        finally:
            _ip("link", "del", br, check=False)
    return None


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


# ------------------------------------------------------------------ hosts on a bridge

_H_NAME_RE = re.compile(r"^fxh-(\d+)-(\d+)$")
_H_BRIDGE_RE = re.compile(r"^fxh(\d+)br$")
_ETC_NETNS = Path("/etc/netns")
_HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")

# A one-shot TCP listener (argv: address) that prints its port and accepts one connection.
_PROBE_LISTENER = (
    "import socket, sys\n"
    "s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); s.settimeout(10)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "c, _ = s.accept(); c.sendall(b'ok'); c.close()\n"
)
_PROBE_CONNECT = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
    "assert c.recv(2) == b'ok'\n"
)


def _remove_etc(name: str) -> None:
    d = _ETC_NETNS / name
    if d.is_dir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    try:
        _ETC_NETNS.rmdir()  # only when empty: other tools' entries stay
    except OSError:
        pass


def remove_stale_hosts() -> None:
    """Delete :class:`HostsLab` namespaces, ``/etc/netns`` entries and bridges of processes that no longer exist."""
    stale: set[int] = set()
    for name in _namespaces():
        m = _H_NAME_RE.match(name)
        if m and not _alive(int(m.group(1))):
            log.info("removing stale namespace %s", name)
            _kill_all_in(name)
            _ip("link", "del", f"fxh{m.group(1)}h{m.group(2)}", check=False)
            _ip("netns", "del", name, check=False)
            stale.add(int(m.group(1)))
    if _ETC_NETNS.is_dir():
        for d in _ETC_NETNS.iterdir():
            m = _H_NAME_RE.match(d.name)
            if m and not _alive(int(m.group(1))):
                _remove_etc(d.name)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).splitlines():
        fields = line.split(":")
        m = _H_BRIDGE_RE.match(fields[1].strip()) if len(fields) > 1 else None
        if m and not _alive(int(m.group(1))):
            log.info("removing stale bridge %s", m.group(0))
            _ip("link", "del", m.group(0), check=False)


class HostsLab:
    """Named hosts (namespaces) on one bridge that reach each other by name (module docstring); a context manager.

    >>> # with HostsLab(["emb0", "ranker"]) as lab:
    >>> #     subprocess.run(lab.argv("ranker", ["getent", "hosts", "emb0"]))
    """

    def __init__(self, hosts: Sequence[str]) -> None:
        names = list(hosts)
        if not 1 <= len(names) <= 9 or len(set(names)) != len(names):
            raise ValueError(f"1 to 9 distinct host names, got {names}")
        for h in names:
            if not _HOST_RE.match(h):
                raise ValueError(f"bad host name {h!r}")
        self.names = names
        self.hosts: dict[str, Netns] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge = f"fxh{os.getpid()}br"
        self._created: list[tuple[str, str]] = []  # (namespace, host-side interface)
        self._bridge_made = False

    def __enter__(self) -> HostsLab:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        remove_stale_hosts()
        pid = os.getpid()
        self.subnet = _pick_subnet()
        base = self.subnet.network_address
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        _ip("addr", "add", f"{base + 1}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.names):
            ns, host_if, ns_if = f"fxh-{pid}-{i}", f"fxh{pid}h{i}", f"fxh{pid}n{i}"
            addr = str(base + 2 + i)
            _ip("netns", "add", ns)
            self._created.append((ns, host_if))
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", ns)
            _ip("link", "set", host_if, "master", self.bridge)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_if)
            _ip("-n", ns, "link", "set", ns_if, "up")
            self.hosts[host] = Netns(ns, addr, str(base + 1), host_if, ns_if)
        table = "".join(f"{n.address}\t{h}\n" for h, n in self.hosts.items())
        for n in self.hosts.values():
            d = _ETC_NETNS / n.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{table}")
        self._probe()

    def _probe(self) -> None:
        """The first host reaches every other one over TCP, by name (the bridge forwards, the hosts files work)."""
        first = self.names[0]
        for other in self.names[1:]:
            listener = subprocess.Popen(self.argv(other, [sys.executable, "-c", _PROBE_LISTENER, other]),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert listener.stdout is not None
                port = listener.stdout.readline().strip()
                if not port.isdigit():
                    raise NetnsError(f"probe listener on {other} failed: {listener.communicate(timeout=5)[1]}")
                proc = subprocess.run(self.argv(first, [sys.executable, "-c", _PROBE_CONNECT, other, port]),
                                      capture_output=True, text=True, timeout=_TIMEOUT)
                if proc.returncode != 0:
                    raise NetnsError(f"{first} cannot reach {other} over bridge {self.bridge}: "
                                     f"{proc.stderr.strip().splitlines()[-1:]}")
            finally:
                if listener.poll() is None:
                    listener.kill()
                listener.communicate()

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` on ``host``."""
        return ["ip", "netns", "exec", self.hosts[host].name, *argv]

    def close(self) -> None:
        """Kill what runs in the namespaces; delete the links, namespaces, ``/etc/netns`` entries, bridge. Idempotent."""
        while self._created:
            ns, host_if = self._created.pop()
            _remove(ns, host_if)
            _remove_etc(ns)
        self.hosts.clear()
        if self._bridge_made:
            _ip("link", "del", self.bridge, check=False)
            self._bridge_made = False


# ------------------------------------------------------------------ traffic shaping


def tc_unavailable() -> str | None:
    """``None`` when a ``tc`` token-bucket filter can be set on a veth in a namespace here, else why not."""
    reason = unavailable()
    if reason is not None:
        return reason
    if shutil.which("tc") is None:
        return "the 'tc' command (iproute2) is not installed"
    with NetnsLab(1) as lab:
        try:
            shape_link(lab, lab.namespaces[0], 100.0)
        except NetnsError as exc:
            return f"tc cannot shape a veth link: {exc}"
    return None


def shape_link(lab: NetnsLab, ns: Netns, rate_mbit: float, *, burst_bytes: int = 32 << 10,
               latency_ms: float = 100.0) -> None:
    """Limit what ``ns`` sends over its link to ``rate_mbit`` Mbit/s (``tc qdisc ... tbf``; replaces any
    earlier limit).  ``latency_ms``: how long a packet may wait in the filter's queue before it is dropped."""
    if not rate_mbit > 0:
        raise ValueError(f"rate_mbit must be > 0, got {rate_mbit!r}")
    lab.run(ns, ["tc", "qdisc", "replace", "dev", ns.ns_if, "root", "tbf", "rate", f"{rate_mbit:g}mbit",
                 "burst", str(int(burst_bytes)), "latency", f"{latency_ms:g}ms"])


# ------------------------------------------------------------------ servers in namespaces


class NetCluster:
    """The servers of ``config`` (a cluster file whose addresses are the lab's), each ``flexemr serve``
    in its namespace of ``lab`` (``placement``: server -> namespace); an async context manager.

    >>> # async with NetCluster(lab, config, placement, seed=3, workdir=tmp) as cluster:
    >>> #     async with EmbeddingClient(cluster.config, transport="tcp") as client: ...
    """

    def __init__(self, lab: NetnsLab, config_path: Path, placement: dict[str, Netns], *, seed: int,
                 workdir: Path, ready_timeout: float = 60.0) -> None:
        self.lab = lab
        self.config_path = config_path
        self.placement = placement
        self.seed = seed
        self.workdir = workdir
        self.ready_timeout = ready_timeout
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._logs: list[IO[bytes]] = []

    async def __aenter__(self) -> NetCluster:
        try:
            for name, ns in self.placement.items():
                log_file = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in aclose
                self._logs.append(log_file)
                argv = self.lab.argv(ns, [sys.executable, "-m", "flexemr", "serve", "--config",
                                          str(self.config_path), "--server", name, "--seed", str(self.seed),
                                          "--transport", "tcp", "--ready-json", "--exit-on-stdin-eof"])
                self.procs[name] = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)
            for name in self.placement:
                await asyncio.wait_for(self._ready(name), self.ready_timeout)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _ready(self, name: str) -> None:
        proc = self.procs[name]
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                log_text = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise NetnsError(f"server {name} exited before it was ready: {log_text}")
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    return

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every server (stdin closed, SIGTERM, SIGKILL after 5 s); idempotent."""
        for proc in self.procs.values():
            if proc.returncode is None:
                if proc.stdin is not None:
                    proc.stdin.close()
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
