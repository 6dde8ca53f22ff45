"""The Soft-RoCE VM runner's constants and its cached kernel image (see :mod:`rdmaio.testing.softroce`).

Preparing the image (kernel package, modules, initramfs, the cache and its lock) is here;
booting and running a command is in :mod:`rdmaio.testing.softroce`, which re-exports
the names below.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("rdmaio.testing.softroce")

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
