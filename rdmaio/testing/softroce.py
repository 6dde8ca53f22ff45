"""Run a command inside a throw-away qemu VM that has a Soft-RoCE (``rdma_rxe``) device.

Usage::

    python -m rdmaio.testing.softroce --install-deps      # apt-get the host packages (root/sudo)
    python -m rdmaio.testing.softroce --prepare           # build the cached kernel + initramfs
    python -m rdmaio.testing.softroce -- ibv_devinfo -d rxe0

The guest runs Debian's stock ``linux-image-amd64`` kernel under qemu TCG and sees
the *host's* root filesystem read-only (with a throw-away tmpfs overlay on top), so
every binary, Python interpreter, virtualenv and checkout on the host exists in the
guest at the same path; nothing is copied.  The guest userspace is therefore the
host's installed packages (rdma-core, perftest, pyverbs, ...).

Preparation (once, cached under ``--cache``; default ``$RDMAIO_SOFTROCE_CACHE`` or
``~/.cache/rdmaio/softroce``):

1. ``apt-cache depends linux-image-amd64`` names the current kernel image package;
   it is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``.
2. ``depmod`` indexes the unpacked modules; ``modprobe --show-depends`` gives the
   load order of the few modules needed before the root filesystem exists
   (virtio PCI + net, 9p over virtio, overlayfs).
3. A tiny initramfs (newc cpio, gzip, written by this module) holds a static
   busybox, those ``.ko`` files and an ``/init`` script.
4. Everything is built in a temporary directory and renamed into place; a stamp
   file records the package, its version and a hash of the init script, so a new
   kernel upload or a change of this module triggers a rebuild.

Boot sequence of each run:

1. qemu boots the kernel with ``console=ttyS0 quiet loglevel=0``; four virtio-9p
   shares are attached: the host root (read-only), the kernel modules tree
   (read-only), a per-run job directory (read-write) and, unless
   ``--no-write-cwd``, the caller's working directory (read-write).
2. ``/init`` (busybox) loads the modules, mounts the host root over 9p, puts a
   tmpfs overlay on top, mounts proc/sys/devtmpfs/devpts/shm/run inside it (/tmp
   stays the host's, seen through the overlay),
   mounts the job share at ``/run/rdmaio-softroce`` and ``switch_root``\\ s into
   the overlay, executing the job's ``stage2.sh`` with the host's ``/bin/sh``.
3. ``stage2.sh`` mounts the modules tree at ``/lib/modules`` and the writable cwd
   share at the caller's cwd, brings up ``lo`` and ``eth0`` (10.0.2.15/24),
   ``modprobe rdma_rxe``, ``rdma link add rxe0 type rxe netdev eth0``, waits for
   the port to become ACTIVE, raises the memlock limit and runs the command with
   the caller's environment (plus ``RDMAIO_IN_SOFTROCE_VM=1``) in the caller's cwd.
4. The command's stdout and stderr go to the serial console, delimited by marker
   lines carrying a per-run nonce; the host strips the boot noise outside the
   markers and streams the rest to its stdout.  The end marker (and a file in the
   job share) carries the exit status; the guest then powers off via sysrq.

Exit status: the command's status; 124 when ``--timeout`` expired; 125 when the
VM or the guest setup failed; 130 on Ctrl-C.  qemu is killed when this process
exits or dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import logging
import os
import platform
import re
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

if not __package__:  # run by path (scripts/system-deps.sh, make clean) before rdmaio is built:
    import types       # reach the sibling module without running rdmaio/__init__ (numpy, native code)

    _here = os.path.dirname(os.path.abspath(__file__))
    for _name, _path in (("rdmaio", os.path.dirname(_here)), ("rdmaio.testing", _here)):
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [_path]
        sys.modules.setdefault(_name, _pkg)
    __package__ = "rdmaio.testing"

from ._softroce_image import (  # noqa: F401 - re-exported: softroce.NAME keeps working
    APT_PACKAGES,
    CACHE_FORMAT,
    DEFAULT_KERNEL_META_PACKAGE,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_VM_FAILURE,
    GUEST_DEVICE,
    GUEST_GID_INDEX,
    GUEST_IP,
    GUEST_JOB_DIR,
    INITRAMFS_MODULES,
    KernelImage,
    QEMU_BINARY,
    SoftRoceError,
    cached_images,
    default_cache_dir,
    prepare,
    resolve_kernel_package,
    _ENV_DENYLIST,
    _ENV_NAME_RE,
    _NewcArchive,
    _P9_OPTS,
    _image_in_use,
    _require_tools,
)

logger = logging.getLogger(__name__)

#: The guest's CPU model (qemu ``-cpu``); ``$RDMAIO_SOFTROCE_CPU`` overrides it.  Everything TCG
#: emulates except AVX2: with it, numpy's AVX2 sort kernels returned wrong results in the guest
#: (qemu 7.2's TCG; ``python -m rdmaio.testing.guestcheck`` checks this at every VM job).
DEFAULT_GUEST_CPU = "max,-avx2"


def guest_cpu() -> str:
    """The qemu CPU model the guest runs on: ``$RDMAIO_SOFTROCE_CPU`` or :data:`DEFAULT_GUEST_CPU`."""
    return os.environ.get("RDMAIO_SOFTROCE_CPU") or DEFAULT_GUEST_CPU

# --------------------------------------------------------------------------- running


@dataclass
class RunResult:
    exit_code: int
    boot_seconds: float  # until the command started
    total_seconds: float
    boot_log: bytes


def _qemu_path_arg(path: Path) -> str:
    return str(path).replace(",", ",,")


def guest_environment(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the command sees in the guest: the caller's, minus terminal/session vars."""
    src = os.environ if base is None else base
    env = {k: v for k, v in src.items() if k not in _ENV_DENYLIST and _ENV_NAME_RE.match(k) and "\0" not in v}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
    env.setdefault("HOME", "/root")
    env.update(
        {
            "RDMAIO_IN_SOFTROCE_VM": "1",
            "RDMAIO_SOFTROCE_DEVICE": GUEST_DEVICE,
            "RDMAIO_SOFTROCE_GID_INDEX": str(GUEST_GID_INDEX),
            "RDMAIO_SOFTROCE_IP": GUEST_IP,
        }
    )
    if extra:
        env.update(extra)
    return env


def _stage2_script(
    cmd: Sequence[str], cwd: Path, env: Mapping[str, str], nonce: str, write_cwd: bool
) -> str:
    q = shlex.quote
    env_args = " ".join(q(f"{k}={v}") for k, v in sorted(env.items()))
    ro = "" if write_cwd else ",ro"
    cwd_mount = (
        f"mkdir -p {q(str(cwd))} && mount -t 9p -o {_P9_OPTS},cache=loose{ro} cwd {q(str(cwd))} "
        f"|| die {q(f'cannot mount the cwd share at {cwd}')}"
    )
    return f"""#!/bin/sh
# rdmaio softroce stage 2 (runs as PID 1 with the host's /bin/sh inside the overlay root)
JOB={GUEST_JOB_DIR}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
poweroff_now() {{ sync; echo o > /proc/sysrq-trigger; sleep 60; }}
die() {{
    echo "rdmaio-softroce guest setup failed: $*"
    echo "$*" > $JOB/setup-error
    echo 125 > $JOB/rc
    poweroff_now
}}
stty -opost 2>/dev/null
echo 1 > /proc/sys/kernel/printk  # from here on only emergencies reach the console
mkdir -p /lib/modules
mount -t 9p -o {_P9_OPTS},ro,cache=loose kmods /lib/modules || die 'cannot mount the kernel modules share'
{cwd_mount}
ip link set lo up || die 'ip link set lo up failed (is iproute2 installed?)'
modprobe rdma_rxe || die 'modprobe rdma_rxe failed'
NET=
for d in /sys/class/net/*; do
    n=${{d##*/}}
    [ "$n" = lo ] && continue
    NET=$n; break
done
[ -n "$NET" ] || die 'no network interface (virtio-net) found'
ip link set "$NET" up || die "ip link set $NET up failed"
ip addr add {GUEST_IP}/24 dev "$NET" || die "ip addr add failed"
rdma link add {GUEST_DEVICE} type rxe netdev "$NET" || die 'rdma link add {GUEST_DEVICE} failed'
P=/sys/class/infiniband/{GUEST_DEVICE}/ports/1
ZERO=0000:0000:0000:0000:0000:0000:0000:0000
port_ready() {{
    grep -q ACTIVE $P/state 2>/dev/null || return 1
    gid=$(cat $P/gids/{GUEST_GID_INDEX} 2>/dev/null)
    [ -n "$gid" ] && [ "$gid" != "$ZERO" ]
}}
i=0
until port_ready; do
    i=$((i+1))
    [ $i -gt 200 ] && die "{GUEST_DEVICE} port 1 did not become ACTIVE with GID index {GUEST_GID_INDEX}"
    sleep 0.05
done
ulimit -l unlimited || die 'cannot raise the memlock limit'
cd {q(str(cwd))} || die {q(f'cannot cd to {cwd}')}
printf '\\n@@rdmaio-softroce:begin:{nonce}@@\\n'
env -i {env_args} {shlex.join(cmd)} </dev/null
rc=$?
sync
printf '\\n@@rdmaio-softroce:end:{nonce}:%d@@\\n' "$rc"
echo "$rc" > $JOB/rc
poweroff_now
"""


def _pdeathsig_preexec(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # parent died before prctl took effect
        os._exit(1)


def qemu_command(
    image: KernelImage,
    job_dir: Path,
    cwd: Path,
    *,
    memory_mb: int,
    smp: int,
    write_cwd: bool = True,
    verbose: bool = False,
    cpu: str | None = None,
) -> list[str]:
    """The qemu argv: TCG, serial console on stdio, user-mode net, four virtio-9p shares."""
    shares = [
        ("hostroot", Path("/"), True),
        ("kmods", image.modules_dir, True),
        ("job", job_dir, False),
        ("cwd", cwd, not write_cwd),
    ]
    cmd = [
        QEMU_BINARY,
        "-nodefaults", "-no-user-config",
        "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", cpu or guest_cpu(),
        "-smp", str(smp), "-m", str(memory_mb),
        "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.boot_kernel), "-initrd", str(image.initramfs),
        "-append", f"console=ttyS0 {'loglevel=6' if verbose else 'quiet loglevel=0'} panic=-1 mitigations=off",
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
    ]
    for i, (tag, path, ro) in enumerate(shares):
        opts = f"local,id=fs{i},path={_qemu_path_arg(path)},security_model=none,multidevs=remap"
        if ro:
            opts += ",readonly=on"
        cmd += ["-fsdev", opts, "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"]
    return cmd


class _ConsoleDemux:
    """Splits the serial console stream into boot noise and the command's output."""

    def __init__(self, nonce: str, out: BinaryIO, boot_sink: BinaryIO | None) -> None:
        self.begin = f"\n@@rdmaio-softroce:begin:{nonce}@@\n".encode()
        self.end_prefix = f"\n@@rdmaio-softroce:end:{nonce}:".encode()
        self.out = out
        self.boot_sink = boot_sink
        self.state = "boot"
        self.buf = b""
        self.boot_log = bytearray()
        self.exit_code: int | None = None
        self.started_at: float | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.state == "boot":
                i = self.buf.find(self.begin)
                if i < 0:
                    keep = len(self.begin) - 1
                    flush, self.buf = self.buf[:-keep] if len(self.buf) > keep else b"", self.buf[-keep:]
                    self._boot(flush)
                    return
                self._boot(self.buf[:i])
                self.buf = self.buf[i + len(self.begin):]
                self.state = "body"
                self.started_at = time.monotonic()
            elif self.state == "body":
                i = self.buf.find(self.end_prefix)
                if i < 0:
                    keep = len(self.end_prefix) - 1
                    if len(self.buf) > keep:
                        self._out(self.buf[:-keep])
                        self.buf = self.buf[-keep:]
                    return
                self._out(self.buf[:i])
                self.buf = self.buf[i + len(self.end_prefix):]
                self.state = "tail"
            elif self.state == "tail":
                m = re.match(rb"(\d+)@@", self.buf)
                if m:
                    self.exit_code = int(m.group(1))
                    self.state = "done"
                    self.buf = self.buf[m.end():]
                elif len(self.buf) > 16:
                    self.state = "done"
                else:
                    return
            else:
                self._boot(self.buf)
                self.buf = b""
                return

    def _boot(self, data: bytes) -> None:
        if data:
            self.boot_log += data
            if self.boot_sink is not None:
                self.boot_sink.write(data)
                self.boot_sink.flush()

    def _out(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.out.flush()

    def close(self) -> None:
        if self.state == "body":  # VM died mid-command: deliver what we have
            self._out(self.buf)
        else:
            self._boot(self.buf)
        self.buf = b""


def run_in_vm(
    cmd: Sequence[str],
    *,
    image: KernelImage,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    write_cwd: bool = True,
    memory_mb: int = 2048,
    smp: int = 2,
    timeout: float | None = None,
    stdout: BinaryIO | None = None,
    verbose: bool = False,
) -> RunResult:
    """Boot the VM, run ``cmd`` in it and return its exit status (see module docstring)."""
    if not cmd:
        raise ValueError("empty command")
    _require_tools([QEMU_BINARY], "boot the Soft-RoCE VM")
    # the guest runs the host's userspace, so these must exist on the host
    _require_tools(["ip", "rdma", "modprobe", "mount"], "set up rxe0 in the guest")
    cwd = Path(os.path.realpath(cwd or os.getcwd()))
    if cwd == Path("/"):
        raise SoftRoceError("refusing to run with cwd=/ (it would be shared over the guest's root); cd elsewhere")
    out = stdout if stdout is not None else sys.stdout.buffer
    guest_env = dict(env) if env is not None else guest_environment()
    nonce = secrets.token_hex(8)
    t0 = time.monotonic()
    job_dir = Path(tempfile.mkdtemp(prefix="rdmaio-softroce-job-"))
    demux = _ConsoleDemux(nonce, out, sys.stderr.buffer if verbose else None)
    with _image_in_use(image):
        proc: subprocess.Popen[bytes] | None = None
        try:
            (job_dir / "stage2.sh").write_text(_stage2_script(cmd, cwd, guest_env, nonce, write_cwd))
            qcmd = qemu_command(
                image, job_dir, cwd, memory_mb=memory_mb, smp=smp, write_cwd=write_cwd, verbose=verbose
            )
            logger.debug("qemu: %s", shlex.join(qcmd))
            qemu_err = open(job_dir / "qemu-stderr.log", "wb")  # noqa: SIM115 - closed in finally
            try:
                proc = subprocess.Popen(
                    qcmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=qemu_err,
                    start_new_session=True,
                    preexec_fn=functools.partial(_pdeathsig_preexec, os.getpid()),
                )
            finally:
                qemu_err.close()
            assert proc.stdout is not None
            deadline = None if timeout is None else t0 + timeout
            timed_out = False
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                fd = proc.stdout.fileno()
                while True:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if wait == 0.0:
                        timed_out = True
                        break
                    if not sel.select(wait):
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    demux.feed(chunk)
                    if demux.state == "done":
                        break
            demux.close()
            if timed_out:
                _kill(proc)
                print(
                    f"softroce: timed out after {timeout:g} s; killed qemu "
                    f"({'command was running' if demux.started_at else 'guest had not started the command'})",
                    file=sys.stderr,
                )
                code = EXIT_TIMEOUT
            else:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    logger.debug("guest did not power off in time; killing qemu")
                    _kill(proc)
                code = _exit_code(demux, job_dir, proc.returncode)
            if code == EXIT_VM_FAILURE and demux.exit_code is None:
                _report_failure(demux, job_dir, verbose)
            boot_s = (demux.started_at or time.monotonic()) - t0
            return RunResult(code, boot_s, time.monotonic() - t0, bytes(demux.boot_log))
        finally:
            if proc is not None and proc.poll() is None:
                _kill(proc)
            shutil.rmtree(job_dir, ignore_errors=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _exit_code(demux: _ConsoleDemux, job_dir: Path, qemu_rc: int | None) -> int:
    if demux.exit_code is not None:
        return demux.exit_code
    with contextlib.suppress(OSError, ValueError):
        return int((job_dir / "rc").read_text().strip())
    logger.debug("qemu exited %s without reporting an exit status", qemu_rc)
    return EXIT_VM_FAILURE


def _report_failure(demux: _ConsoleDemux, job_dir: Path, verbose: bool) -> None:
    reason = ""
    with contextlib.suppress(OSError):
        reason = (job_dir / "setup-error").read_text().strip()
    qerr = b""
    with contextlib.suppress(OSError):
        qerr = (job_dir / "qemu-stderr.log").read_bytes()
    print(f"softroce: the VM did not run the command{': ' + reason if reason else ''}", file=sys.stderr)
    if qerr.strip():
        print("softroce: qemu stderr:\n" + qerr.decode(errors="replace").strip()[-3000:], file=sys.stderr)
    if not verbose and demux.boot_log.strip():
        tail = bytes(demux.boot_log).decode(errors="replace").replace("\r", "").strip()[-3000:]
        print("softroce: end of the boot log (use -v for all of it):\n" + tail, file=sys.stderr)


# --------------------------------------------------------------------------- CLI


def missing_packages(packages: Sequence[str] = APT_PACKAGES) -> list[str]:
    """The packages of ``packages`` that dpkg does not have installed."""
    missing = []
    for pkg in packages:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0 or not proc.stdout.endswith(" installed"):
            missing.append(pkg)
    return missing


def planned_upgrades(packages: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(package, installed version, new version)`` of what apt would *upgrade* to install ``packages``
    (a dry run: ``apt-get -s``).  Dependencies pinned to a newer version force these."""
    proc = subprocess.run(["apt-get", "-s", "install", "--no-install-recommends", "--no-upgrade", *packages],
                          capture_output=True, text=True, check=False, env=dict(os.environ, LC_ALL="C"))
    out = []
    for m in re.finditer(r"^Inst (\S+) \[([^\]]+)\] \((\S+)", proc.stdout, re.M):
        out.append((m.group(1), m.group(2), m.group(3)))
    return out


def install_deps() -> int:
    """apt-get install the host packages that are missing, upgrading nothing that is not forced; returns
    apt-get's exit status (0 when nothing is missing).

    Packages already installed are left at their version (``--no-upgrade``).  What apt
    must still upgrade -- a new dependency that requires a newer version of an installed
    library -- is printed before it happens (README: why).
    """
    missing = missing_packages()
    if not missing:
        print(f"softroce: host packages present ({' '.join(APT_PACKAGES)})", file=sys.stderr)
        return 0
    upgrades = planned_upgrades(missing)
    if upgrades:
        print("softroce: installing " + " ".join(missing) + " forces apt to upgrade, because a new dependency "
              "needs their newer version (e.g. udev, which rdma-core needs, must equal libudev1's version): "
              + ", ".join(f"{p} {a} -> {b}" for p, a, b in upgrades), file=sys.stderr)
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "--no-upgrade", *missing]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            print("softroce: --install-deps needs root (or sudo): " + shlex.join(cmd), file=sys.stderr)
            return 1
        cmd = ["sudo", "--preserve-env=DEBIAN_FRONTEND", *cmd]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("softroce: " + shlex.join(cmd), file=sys.stderr)
    return subprocess.run(cmd, env=env, check=False).returncode


def clean_cache(cache: Path) -> int:
    """Remove the cache directory (prepared kernels, initramfs, downloads); returns the bytes freed."""
    if not cache.exists():
        return 0
    freed = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(cache)
    return freed


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME_RE.match(key):
            raise SoftRoceError(f"--env expects NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rdmaio.testing.softroce",
        description="Run a command inside a qemu VM with a Soft-RoCE device (rxe0 on 10.0.2.15, GID index 1).",
        epilog="Exit status: the command's; 124 on timeout; 125 if the VM/guest setup failed; 130 on Ctrl-C.",
    )
    add = p.add_argument
    add("--install-deps", action="store_true",
        help="apt-get install the host packages that are missing (upgrading nothing it need not), then continue")
    add("--clean", action="store_true", help="remove the cache (prepared kernel images, ~0.5 GB) and exit")
    add("--prepare", action="store_true", help="build/refresh the cached kernel + initramfs, then continue")
    add("--force-prepare", action="store_true", help="rebuild the cache even if it is up to date")
    add("--cache", type=Path, default=None,
        help="cache directory (default: $RDMAIO_SOFTROCE_CACHE or ~/.cache/rdmaio/softroce)")
    add("--kernel-package", default=DEFAULT_KERNEL_META_PACKAGE,
        help="apt (meta)package of the guest kernel (default: %(default)s)")
    add("--memory", type=int, default=2048, metavar="MB", help="guest memory (default: %(default)s)")
    add("--smp", type=int, default=min(2, os.cpu_count() or 1), metavar="N", help="guest CPUs (default: %(default)s)")
    add("--timeout", type=float, default=None, metavar="SECONDS", help="kill the VM after this long (exit 124)")
    add("--env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment for the command (repeatable)")
    add("--no-write-cwd", dest="write_cwd", action="store_false",
        help="share the cwd read-only (writes there fail with EROFS)")
    add("-v", "--verbose", action="store_true", help="show the boot log and debug messages on stderr")
    add("-q", "--quiet", action="store_true", help="only print errors")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] to run in the guest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="softroce: %(message)s", stream=sys.stderr)
    if args.clean:
        cache = args.cache or default_cache_dir()
        freed = clean_cache(cache)
        print(f"softroce: removed {cache} ({freed / (1 << 20):.0f} MiB)" if freed else
              f"softroce: no cache at {cache}", file=sys.stderr)
        return 0
    if not (cmd or args.install_deps or args.prepare or args.force_prepare):
        build_parser().print_usage(sys.stderr)
        print("softroce: nothing to do: give -- COMMAND, --prepare or --install-deps", file=sys.stderr)
        return 2
    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"softroce: only x86_64 hosts are supported (this is {platform.machine()})", file=sys.stderr)
        return EXIT_VM_FAILURE
    try:
        if args.install_deps:
            rc = install_deps()
            if rc != 0:
                return rc
            if not (cmd or args.prepare or args.force_prepare):
                return 0
        image: KernelImage | None = None
        if args.prepare or args.force_prepare or cmd:
            image = prepare(args.cache, meta_package=args.kernel_package, force=args.force_prepare)
            if not cmd:
                print(f"softroce: ready: {image.root} (kernel {image.kernel_version})", file=sys.stderr)
                return 0
        assert image is not None
        env = guest_environment(_parse_env(args.env))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGHUP, _raise_interrupt)
        result = run_in_vm(
            cmd,
            image=image,
            env=env,
            write_cwd=args.write_cwd,
            memory_mb=args.memory,
            smp=args.smp,
            timeout=args.timeout,
            verbose=args.verbose,
        )
        logger.debug(
            "exit %d; boot %.1f s, total %.1f s", result.exit_code, result.boot_seconds, result.total_seconds
        )
        return result.exit_code
    except SoftRoceError as exc:
        print(f"softroce: error: {exc}", file=sys.stderr)
        return EXIT_VM_FAILURE
    except KeyboardInterrupt:
        print("softroce: interrupted; qemu killed", file=sys.stderr)
        return EXIT_INTERRUPTED


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
