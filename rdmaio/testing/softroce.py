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
import fcntl
import functools
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import platform
import re
import secrets
import selectors
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

#: Debian packages the host needs; the guest uses the host's userspace, so these
#: are also what the guest can run.  iproute2 provides ``ip`` and ``rdma``.
APT_PACKAGES: tuple[str, ...] = (
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "iproute2",
    "rdma-core",
    "ibverbs-providers",
    "ibverbs-utils",
    "perftest",
    "python3-pyverbs",
    "libibverbs-dev",
)

DEFAULT_KERNEL_META_PACKAGE = "linux-image-amd64"
#: The guest's CPU model (qemu ``-cpu``); ``$RDMAIO_SOFTROCE_CPU`` overrides it.  Everything TCG
#: emulates except AVX2: with it, numpy's AVX2 sort kernels returned wrong results in the guest
#: (qemu 7.2's TCG; ``python -m rdmaio.testing.guestcheck`` checks this at every VM job).
DEFAULT_GUEST_CPU = "max,-avx2"


def guest_cpu() -> str:
    """The qemu CPU model the guest runs on: ``$RDMAIO_SOFTROCE_CPU`` or :data:`DEFAULT_GUEST_CPU`."""
    return os.environ.get("RDMAIO_SOFTROCE_CPU") or DEFAULT_GUEST_CPU
QEMU_BINARY = "qemu-system-x86_64"
#: Modules loaded from the initramfs, before the host root is reachable.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay")
#: Bump when the cache layout changes incompatibly.
CACHE_FORMAT = 2

GUEST_IP = "10.0.2.15"
GUEST_DEVICE = "rxe0"
GUEST_GID_INDEX = 1
GUEST_JOB_DIR = "/run/rdmaio-softroce"

EXIT_TIMEOUT = 124
EXIT_VM_FAILURE = 125
EXIT_INTERRUPTED = 130

_ENV_DENYLIST = frozenset(
    {
        "TERM", "TERMCAP", "COLORTERM", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY",
        "SHLVL", "PWD", "OLDPWD", "_", "COLUMNS", "LINES", "TMUX", "TMUX_PANE", "STY",
        "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "DBUS_SESSION_BUS_ADDRESS",
        "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
        "GPG_AGENT_INFO", "MAIL", "RDMAIO_SOFTROCE_CACHE",
    }
)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_P9_OPTS = "trans=virtio,version=9p2000.L,msize=262144"

# The initramfs /init (busybox sh).  @MODULES@ is replaced by the .ko names in load order.
_INIT_TEMPLATE = r"""#!/bin/busybox sh
# rdmaio softroce stage 1: load modules, build an overlay over the host root, switch_root.
export PATH=/bin
fail() {
    echo "rdmaio-softroce init: $*"
    echo o > /proc/sysrq-trigger
    sleep 30
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do
    insmod /modules/$m || fail "insmod $m failed"
done
mount -t 9p -o @P9@,ro,cache=loose hostroot /lower || fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"
R=/newroot
mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sysfs $R/sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
# /tmp is NOT replaced by an empty tmpfs: checkouts and virtualenvs often live
# there, and the overlay already makes it writable (writes stay in the guest)
mount -t tmpfs -o mode=0755 tmpfs $R/run || fail "mount /run"
mkdir -p $R@JOB@
mount -t 9p -o @P9@ job $R@JOB@ || fail "cannot mount the job share"
[ -f $R@JOB@/stage2.sh ] || fail "stage2.sh missing from the job share"
umount /proc /sys /dev 2>/dev/null
exec switch_root $R /bin/sh @JOB@/stage2.sh
"""


class SoftRoceError(RuntimeError):
    """A precondition for preparing or booting the VM is not met; the message says what to do."""


# --------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    env = os.environ.get("RDMAIO_SOFTROCE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rdmaio" / "softroce"


def _install_hint() -> str:
    return "run: python -m rdmaio.testing.softroce --install-deps"


def _require_tools(tools: Sequence[str], purpose: str) -> None:
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    missing = [t for t in tools if shutil.which(t, path=search) is None]
    if missing:
        raise SoftRoceError(
            f"{', '.join(missing)} not found (needed to {purpose}); {_install_hint()} "
            f"(apt packages: {' '.join(APT_PACKAGES)})"
        )


def _run(cmd: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    logger.debug("running %s", shlex.join(cmd))
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise SoftRoceError(f"{cmd[0]} not found ({what}); {_install_hint()}") from exc
    if proc.returncode != 0:
        raise SoftRoceError(
            f"{what} failed: `{shlex.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _elf_is_static(path: Path) -> bool:
    """True if the ELF file has no PT_INTERP program header (i.e. it is statically linked)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64 only
            return False
        endian = "<" if head[5] == 1 else ">"
        phoff = struct.unpack_from(endian + "Q", head, 0x20)[0]
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (p_type,) = struct.unpack(endian + "I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return False
    return True


def _find_static_busybox() -> Path:
    candidates = [Path("/bin/busybox"), Path("/usr/bin/busybox")]
    which = shutil.which("busybox")
    if which:
        candidates.insert(0, Path(which))
    for c in candidates:
        if c.is_file() and _elf_is_static(c.resolve()):
            return c.resolve()
    raise SoftRoceError(
        "a statically linked busybox is needed for the initramfs but none was found "
        f"(install the busybox-static package; {_install_hint()})"
    )


# --------------------------------------------------------------------------- cpio


class _NewcArchive:
    """Minimal writer for the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1 if not stat.S_ISDIR(mode) else 2, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._buf.write(header + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class KernelImage:
    """A prepared, cached kernel: vmlinuz, initramfs and the matching modules tree."""

    root: Path
    package: str
    package_version: str
    kernel_version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def vmlinux_pvh(self) -> Path:
        """Uncompressed kernel with a PVH entry note, if it could be extracted (boots ~3 s faster)."""
        return self.root / "vmlinux"

    @property
    def boot_kernel(self) -> Path:
        return self.vmlinux_pvh if self.vmlinux_pvh.is_file() else self.vmlinuz

    @property
    def initramfs(self) -> Path:
        return self.root / "initramfs.img"

    @property
    def modules_dir(self) -> Path:
        """Directory mounted at /lib/modules in the guest (contains ``<kernel_version>/``)."""
        return self.root / "modules"

    def is_complete(self) -> bool:
        return (
            self.vmlinuz.is_file()
            and self.initramfs.is_file()
            and (self.modules_dir / self.kernel_version / "modules.dep").is_file()
        )


def _init_script(module_files: Sequence[str]) -> str:
    return (
        _INIT_TEMPLATE.replace("@MODULES@", " ".join(module_files))
        .replace("@P9@", _P9_OPTS)
        .replace("@JOB@", GUEST_JOB_DIR)
    )


def _recipe_hash() -> str:
    """Changes whenever the initramfs recipe changes, so caches from older code are rebuilt."""
    h = hashlib.sha256()
    h.update(str(CACHE_FORMAT).encode())
    h.update(_INIT_TEMPLATE.encode())
    h.update(" ".join(INITRAMFS_MODULES).encode())
    h.update(_P9_OPTS.encode())
    return h.hexdigest()[:12]


def resolve_kernel_package(meta_package: str = DEFAULT_KERNEL_META_PACKAGE) -> tuple[str, str]:
    """Return (image package, version) that ``meta_package`` currently depends on, via apt-cache."""
    _require_tools(["apt-cache"], "find the Debian kernel package")
    out = _run(["apt-cache", "depends", meta_package], what=f"apt-cache depends {meta_package}")
    package = None
    for line in out.splitlines():
        line = line.strip().lstrip("|")
        if line.startswith("Depends:"):
            target = line.split(":", 1)[1].strip()
            if target.startswith("linux-image-") and not target.startswith("<"):
                package = target
                break
    if meta_package.startswith("linux-image-") and package is None and "Depends:" not in out:
        package = meta_package  # a concrete image package was given
    if package is None:
        raise SoftRoceError(
            f"could not find the kernel image package behind {meta_package} "
            f"(apt-cache depends printed: {out.strip()[:300]!r}); is this a Debian/Ubuntu host "
            "with apt sources configured? try: apt-get update"
        )
    show = _run(["apt-cache", "show", "--no-all-versions", package], what=f"apt-cache show {package}")
    m = re.search(r"^Version:\s*(\S+)", show, re.M)
    if not m:
        raise SoftRoceError(f"apt-cache show {package} gave no Version (try: apt-get update)")
    return package, m.group(1)


def _apt_lists_signature() -> str:
    """Cheap fingerprint of apt's package lists; changes after every ``apt-get update``."""
    lists = Path("/var/lib/apt/lists")
    parts: list[str] = []
    with contextlib.suppress(OSError):
        for p in sorted(lists.iterdir()):
            if p.is_file():
                st = p.stat()
                parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _resolve_cached(cache: Path, meta_package: str, *, refresh: bool = False) -> tuple[str, str]:
    """resolve_kernel_package(), memoised in the cache until apt's lists change (apt-cache is ~1 s)."""
    memo = cache / "resolved.json"
    sig = _apt_lists_signature()
    if not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(memo.read_text())
            entry = data[meta_package]
            if entry["lists"] == sig:
                return str(entry["package"]), str(entry["version"])
    package, version = resolve_kernel_package(meta_package)
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(memo.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[meta_package] = {"lists": sig, "package": package, "version": version}
        tmp = memo.with_name(f".resolved.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, memo)
    return package, version


def _image_dir_name(package: str, version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{package}_{version}")
    return f"{safe}_{_recipe_hash()}"


def _load_image(path: Path) -> KernelImage | None:
    try:
        stamp = json.loads((path / "stamp.json").read_text())
        img = KernelImage(
            root=path,
            package=str(stamp["package"]),
            package_version=str(stamp["package_version"]),
            kernel_version=str(stamp["kernel_version"]),
        )
        if stamp.get("recipe") != _recipe_hash() or not img.is_complete():
            return None
        return img
    except (OSError, ValueError, KeyError):
        return None


def cached_images(cache: Path) -> list[KernelImage]:
    """Complete images in the cache, newest first."""
    images_dir = cache / "images"
    found = []
    if images_dir.is_dir():
        for p in images_dir.iterdir():
            img = _load_image(p)
            if img is not None:
                found.append(img)
    found.sort(key=lambda i: (i.root / "stamp.json").stat().st_mtime, reverse=True)
    return found


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _elf_has_pvh_note(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF has the Xen PHYS32_ENTRY note qemu needs for PVH boot."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", elf, phoff + i * phentsize)
        p_filesz = struct.unpack_from("<Q", elf, phoff + i * phentsize + 32)[0]
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _extract_pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """Decompress the ELF kernel inside an xz/gzip bzImage if it supports PVH boot, else None.

    qemu can enter such a kernel directly (no firmware decompression under TCG).
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = gzip.decompress(payload)
        else:
            return None
    except (lzma.LZMAError, OSError, EOFError):
        return None
    return elf if _elf_has_pvh_note(elf) else None


def _module_load_order(base: Path, kver: str, modules: Sequence[str]) -> list[Path]:
    order: list[Path] = []
    for mod in modules:
        out = _run(
            ["modprobe", "-d", str(base), "-S", kver, "--show-depends", mod],
            what=f"resolve dependencies of kernel module {mod}",
        )
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in order:
                    order.append(p)
            # "builtin NAME" lines need nothing
    return order


def _read_module(path: Path) -> bytes:
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise SoftRoceError(f"{path.name} is zstd-compressed; install the zstd package")
        return subprocess.run(["zstd", "-dc", str(path)], stdout=subprocess.PIPE, check=True).stdout
    raise SoftRoceError(f"unknown kernel module format: {path}")


def _build_initramfs(module_paths: Sequence[Path], busybox: Path) -> bytes:
    arc = _NewcArchive()
    for d in ("bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules"):
        arc.directory(d)
    arc.chardev("dev/console", 5, 1)
    arc.chardev("dev/null", 1, 3, 0o666)
    arc.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run(
        [str(busybox), "--list"], stdout=subprocess.PIPE, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            arc.symlink(f"bin/{applet}", "busybox")
    names: list[str] = []
    for p in module_paths:
        plain = re.sub(r"\.ko(\.(xz|gz|zst))?$", ".ko", p.name)
        arc.file(f"modules/{plain}", _read_module(p))
        names.append(plain)
    arc.file("init", _init_script(names).encode(), 0o755)
    return gzip.compress(arc.finish(), compresslevel=6)


def _build_image(cache: Path, package: str, version: str) -> KernelImage:
    _require_tools(["apt-get", "dpkg-deb", "depmod", "modprobe"], "prepare the kernel")
    busybox = _find_static_busybox()
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    (cache / "images").mkdir(parents=True, exist_ok=True)
    final = cache / "images" / _image_dir_name(package, version)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=cache / "tmp"))
    try:
        dl = tmp / "download"
        dl.mkdir()
        logger.info("downloading %s %s ...", package, version)
        try:
            _run(["apt-get", "download", f"{package}={version}"], cwd=dl, what=f"apt-get download {package}")
        except SoftRoceError as exc:
            raise SoftRoceError(
                f"could not download the kernel package {package} {version}: {exc}. "
                "The mirror drops old kernels: run `apt-get update` and retry."
            ) from exc
        debs = sorted(dl.glob("*.deb"))
        if not debs:
            raise SoftRoceError(f"apt-get download {package} produced no .deb")
        extract = tmp / "extract"
        logger.info("unpacking %s ...", debs[0].name)
        _run(["dpkg-deb", "-x", str(debs[0]), str(extract)], what="dpkg-deb -x")
        mod_roots = [extract / "lib" / "modules", extract / "usr" / "lib" / "modules"]
        kdirs = [d for r in mod_roots if r.is_dir() for d in r.iterdir() if d.is_dir()]
        if len(kdirs) != 1:
            raise SoftRoceError(f"expected one kernel modules directory in {package}, found {kdirs}")
        kver = kdirs[0].name
        kernel_candidates = (extract / "boot" / f"vmlinuz-{kver}", extract / "usr" / "lib" / "linux" / f"vmlinuz-{kver}")
        vmlinuz = next((p for p in kernel_candidates if p.is_file()), None)
        if vmlinuz is None:
            raise SoftRoceError(f"no vmlinuz-{kver} in {package}")
        stage = tmp / "stage"
        (stage / "lib" / "modules").mkdir(parents=True)
        kdirs[0].rename(stage / "lib" / "modules" / kver)
        _run(["depmod", "-b", str(stage), kver], what="depmod")
        load = _module_load_order(stage, kver, INITRAMFS_MODULES)
        logger.info("building initramfs (%d modules) ...", len(load))
        image = tmp / "image"
        image.mkdir()
        (image / "initramfs.img").write_bytes(_build_initramfs(load, busybox))
        shutil.copyfile(vmlinuz, image / "vmlinuz")
        pvh = _extract_pvh_vmlinux(vmlinuz.read_bytes())
        if pvh is not None:
            (image / "vmlinux").write_bytes(pvh)
        else:
            logger.info("kernel has no PVH entry; booting the compressed image (slower under TCG)")
        (stage / "lib" / "modules").rename(image / "modules")
        stamp = {
            "format": CACHE_FORMAT,
            "recipe": _recipe_hash(),
            "package": package,
            "package_version": version,
            "kernel_version": kver,
            "initramfs_modules": [p.name for p in load],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (image / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        image.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    img = _load_image(final)
    assert img is not None, "freshly built image failed validation"
    return img


def prepare(
    cache: Path | None = None,
    *,
    meta_package: str = DEFAULT_KERNEL_META_PACKAGE,
    force: bool = False,
    offline_ok: bool = True,
) -> KernelImage:
    """Return a complete cached image for the current kernel package, building it if needed.

    If apt cannot tell the current version (no apt lists, not Debian) and ``offline_ok``,
    the newest complete cached image is used instead.
    """
    cache = (cache or default_cache_dir()).expanduser().resolve()
    try:
        package, version = _resolve_cached(cache, meta_package, refresh=force)
    except SoftRoceError as exc:
        existing = cached_images(cache)
        if offline_ok and existing and not force:
            logger.debug("cannot check for a newer kernel (%s); using cached %s", exc, existing[0].root)
            return existing[0]
        raise
    with _locked(cache):
        img = _load_image(cache / "images" / _image_dir_name(package, version))
        if img is not None and not force:
            return img
        # leftovers of builds that were killed (we hold the lock, so nobody else is building)
        shutil.rmtree(cache / "tmp", ignore_errors=True)
        logger.info("preparing Soft-RoCE VM image for %s %s in %s (one-time)", package, version, cache)
        t0 = time.monotonic()
        img = _build_image(cache, package, version)
        logger.info("prepared %s in %.1f s", img.root, time.monotonic() - t0)
        _remove_stale_images(cache, keep=img.root)
        return img


def _remove_stale_images(cache: Path, keep: Path) -> None:
    """Delete images other than ``keep`` unless a VM is using one (see ``_image_in_use``)."""
    with open(cache / "inuse.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.debug("VMs are running from %s; keeping old images for now", cache)
            return
        try:
            for other in (cache / "images").iterdir():
                if other != keep:
                    logger.info("removing stale image %s", other.name)
                    shutil.rmtree(other, ignore_errors=True)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _image_in_use(image: KernelImage) -> Iterator[None]:
    """Shared lock held while a VM runs, so a concurrent prepare does not delete its modules."""
    lock = image.root.parent.parent / "inuse.lock"
    try:
        fh = open(lock, "a+b")  # noqa: SIM115 - closed below
    except OSError:
        yield  # read-only cache: nobody can delete it either
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_SH)
        yield
    finally:
        fh.close()


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
