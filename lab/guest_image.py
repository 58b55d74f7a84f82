"""A tiny test guest: Debian's cloud kernel plus a busybox initramfs.

The kernel comes from the Debian package that `linux-image-cloud-amd64` points at. It is
fetched with `apt-get download` (never installed on the host), unpacked with `dpkg-deb -x`
and cached under /var/cache/netaccel/guest/<package>_<version>/ together with the few
modules the guest needs (the virtio-net chain is `=m` in that kernel's config).

The initramfs is written by this module as a newc cpio archive (pure Python, so it can hold
/dev/console without mknod and comes out the same every time) and cached under a name that
hashes everything that goes into it: change the init script and the next use rebuilds it.

The guest's /init prints machine-readable lines to the serial console (ttyS0):

    NETACCEL-BOOT kernel=<release>
    NETACCEL-LINK mac=<mac> mtu=<mtu>
    NETACCEL-FEATURES <virtio feature bits of eth0, bit 0 first>
    NETACCEL-CSUM host=<VIRTIO_NET_F_CSUM> guest=<VIRTIO_NET_F_GUEST_CSUM>
    NETACCEL-LEASE ip=<ip> mask=<prefix> router=<ip> lease=<s> server=<ip>   (DHCP bound)
    NETACCEL-RENEW ip=<ip> lease=<s> server=<ip>                             (DHCP renewed)
    NETACCEL-READY ip=<ip>
    NETACCEL-ERROR <what>

Kernel command line switches read by /init:
    netaccel.ip=CIDR          static address, no DHCP (netaccel.gw=IP adds a default route)
    netaccel.renew=SECONDS    force one DHCP renewal that long after the lease (default 3;
                              0: none)
    netaccel.udp_target=IP:PORT  send the datagram "netaccel-guest <ip>" there once a second
    netaccel.qperf=1          run a qperf server (when qperf was put into the image)
Always running once the address is up: a UDP and a TCP echo service on port 7 (socat).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path("/var/cache/netaccel/guest")
META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# Modules to load, roots of the dependency walk; dependencies are read from each .ko.
ROOT_MODULES = ("virtio_pci", "virtio_net")
KEEP_MODULES = re.compile(r"virtio|failover|vhost|vsock|9p|tun|veth|bridge|stp|llc")
# Host programs copied into the guest with their shared libraries. socat is required (UDP
# sender and echo service); the others are taken when present on the host.
REQUIRED_BINARIES = ("socat",)
OPTIONAL_BINARIES = ("qperf",)
DEFAULT_CMDLINE = "console=ttyS0 quiet loglevel=3"


class GuestImageError(RuntimeError):
    """The guest kernel or initramfs could not be prepared (the message says what to do)."""


@dataclass(frozen=True)
class GuestImage:
    """What a direct kernel boot needs."""

    kernel: Path
    initramfs: Path


# --- the guest's scripts ---------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# netaccel test guest: /init of a busybox initramfs. Output goes to the serial console.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /etc /var/run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
exec </dev/console >/dev/console 2>&1
say() { echo "$*"; }
say "NETACCEL-BOOT kernel=$(uname -r)"

STATIC_IP= GW= RENEW=3 UDP_TARGET= QPERF=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        netaccel.ip=*) STATIC_IP=${arg#netaccel.ip=} ;;
        netaccel.gw=*) GW=${arg#netaccel.gw=} ;;
        netaccel.renew=*) RENEW=${arg#netaccel.renew=} ;;
        netaccel.udp_target=*) UDP_TARGET=${arg#netaccel.udp_target=} ;;
        netaccel.qperf=*) QPERF=${arg#netaccel.qperf=} ;;
    esac
done

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || say "NETACCEL-ERROR insmod $m"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -e /sys/class/net/eth0 ]; then
    say "NETACCEL-ERROR no eth0 (virtio-net did not probe)"
    while true; do sleep 3600; done
fi
ip link set lo up
ip link set eth0 up
say "NETACCEL-LINK mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu)"
features=$(cat /sys/class/net/eth0/device/features)
say "NETACCEL-FEATURES $features"
say "NETACCEL-CSUM host=$(echo "$features" | cut -c1) guest=$(echo "$features" | cut -c2)"

if [ -n "$STATIC_IP" ]; then
    ip addr add "$STATIC_IP" dev eth0
    [ -n "$GW" ] && ip route add default via "$GW"
    echo "${STATIC_IP%/*}" > /run/netaccel-ip
else
    udhcpc -f -i eth0 -s /etc/udhcpc.script -p /run/udhcpc.pid -t 30 -T 1 -A 1 \
        -x hostname:netaccel-guest >/run/udhcpc.log 2>&1 &
    i=0
    while [ ! -s /run/netaccel-ip ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    [ -s /run/netaccel-ip ] || say "NETACCEL-ERROR no DHCP lease in 60 s"
fi
IP=$(cat /run/netaccel-ip 2>/dev/null)
say "NETACCEL-READY ip=$IP"

socat -T 2 UDP4-RECVFROM:7,fork PIPE 2>/dev/null &
socat TCP4-LISTEN:7,fork,reuseaddr PIPE 2>/dev/null &
if [ -n "$QPERF" ] && command -v qperf >/dev/null; then qperf >/dev/null 2>&1 & fi
if [ -n "$UDP_TARGET" ]; then
    (while true; do
        echo "netaccel-guest $(cat /run/netaccel-ip 2>/dev/null)" \
            | socat -u - "UDP4-SENDTO:$UDP_TARGET" 2>/dev/null
        sleep 1
    done) &
fi
if [ -z "$STATIC_IP" ] && [ "$RENEW" != 0 ] && [ -n "$IP" ]; then
    sleep "$RENEW"
    kill -USR1 "$(cat /run/udhcpc.pid)"
fi
while true; do sleep 3600; done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script: configure eth0 and report on the serial console.
[ -n "$mask" ] || mask=$(ipcalc -p "$ip" "$subnet" | cut -d= -f2)
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr replace "$ip/$mask" dev "$interface"
        if [ -n "$router" ]; then
            ip route replace default via "${router%% *}" dev "$interface"
        fi
        echo "$ip" > /run/netaccel-ip
        if [ "$1" = bound ]; then
            echo "NETACCEL-LEASE ip=$ip mask=$mask router=${router%% *} lease=$lease" \
                "server=$serverid" > /dev/console
        else
            echo "NETACCEL-RENEW ip=$ip lease=$lease server=$serverid" > /dev/console
        fi
        ;;
    leasefail|nak)
        echo "NETACCEL-DHCP $1 $message" > /dev/console
        ;;
esac
exit 0
"""


# --- public entry point ----------------------------------------------------


_built: dict[Path, GuestImage] = {}


def build_guest_image(cache_dir: Path = CACHE_DIR) -> GuestImage:
    """Return the cached guest kernel and initramfs, fetching/building what is missing.

    Checked once per process (about 0.7 s: it reads and hashes the image's inputs)."""
    known = _built.get(cache_dir)
    if known and known.kernel.exists() and known.initramfs.exists():
        return known
    _built[cache_dir] = image = _build_guest_image(cache_dir)
    return image


def _build_guest_image(cache_dir: Path) -> GuestImage:
    kernel_dir = ensure_guest_kernel(cache_dir)
    modules = _module_load_order(kernel_dir / "modules", ROOT_MODULES)
    binaries = _guest_binaries()
    init = INIT_SCRIPT.replace("@MODULES@", " ".join(modules))
    entries = _initramfs_entries(init, kernel_dir / "modules", modules, binaries)
    digest = _entries_digest(entries)
    target = cache_dir / f"initramfs-{digest[:16]}.cpio.gz"
    if not target.exists():
        with _locked(cache_dir):
            if not target.exists():
                data = gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0)
                _atomic_write(target, data)
    return GuestImage(kernel=kernel_dir / "vmlinuz", initramfs=target)


# --- the kernel --------------------------------------------------------------


def ensure_guest_kernel(cache_dir: Path = CACHE_DIR) -> Path:
    """Fetch (once) the cloud kernel package; return its cache dir (vmlinuz, modules/)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    package = _resolve_kernel_package()
    if package is None:
        cached = sorted(p for p in cache_dir.glob("linux-image-*") if (p / "ready").exists())
        if cached:
            return cached[-1]
        raise GuestImageError(
            f"apt knows no {META_PACKAGE} even after 'apt-get update': the guest kernel comes "
            "from Debian's main archive; check /etc/apt/sources.list(.d) and the network"
        )
    name, version = package
    kernel_dir = cache_dir / f"{name}_{version}"
    if (kernel_dir / "ready").exists():
        return kernel_dir
    with _locked(cache_dir):
        if not (kernel_dir / "ready").exists():
            _fetch_kernel(name, version, kernel_dir)
    return kernel_dir


def _apt_depends(package: str) -> str | None:
    proc = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    match = re.search(r"Depends:\s*(linux-image-\S+)", proc.stdout)
    return match.group(1) if match else None


def _apt_candidate(package: str) -> str | None:
    proc = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True)
    match = re.search(r"Candidate:\s*(\S+)", proc.stdout)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def _resolve_kernel_package() -> tuple[str, str] | None:
    """(concrete package name, version) of the cloud kernel, or None if apt has none."""
    for attempt in range(2):
        name = _apt_depends(META_PACKAGE)
        version = _apt_candidate(name) if name else None
        if name and version:
            return name, version
        if attempt == 0:
            # A fresh machine (or a container image) may have no package lists yet.
            subprocess.run(
                ["apt-get", "update", "-qq"],
                capture_output=True,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
    return None


def _fetch_kernel(name: str, version: str, kernel_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="netaccel-kernel-") as tmp:
        work = Path(tmp)
        proc = subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{name}={version}"],
            cwd=work,
            capture_output=True,
            text=True,
        )
        debs = list(work.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise GuestImageError(
                f"'apt-get download {name}={version}' failed: {proc.stderr.strip()[-500:]}"
            )
        extracted = work / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extracted)], check=True)
        vmlinuz = next((extracted / "boot").glob("vmlinuz-*"), None)
        module_roots = list((extracted / "lib/modules").glob("*/kernel"))
        if vmlinuz is None or not module_roots:
            raise GuestImageError(f"{debs[0].name} has no /boot/vmlinuz-* or /lib/modules")
        staging = kernel_dir.with_name(kernel_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz, staging / "vmlinuz")
        release = module_roots[0].parent.name
        (staging / "release").write_text(release + "\n")
        config = extracted / "boot" / f"config-{release}"
        if config.exists():
            shutil.copy2(config, staging / "config")
        # Keep the virtio family (a later change of ROOT_MODULES should not need a new
        # download) but not the other ~1000 modules.
        for ko in module_roots[0].rglob("*.ko"):
            if KEEP_MODULES.search(ko.name):
                shutil.copy2(ko, staging / "modules" / ko.name)
        builtin = module_roots[0].parent / "modules.builtin"
        if builtin.exists():
            shutil.copy2(builtin, staging / "modules.builtin")
        (staging / "ready").write_text(f"{name} {version}\n")
        shutil.rmtree(kernel_dir, ignore_errors=True)
        staging.rename(kernel_dir)


def _module_depends(ko: Path) -> list[str]:
    match = re.search(rb"depends=([^\x00]*)\x00", ko.read_bytes())
    if not match or not match.group(1):
        return []
    return [d.replace("-", "_") for d in match.group(1).decode().split(",") if d]


def _module_load_order(module_dir: Path, roots: Iterable[str]) -> list[str]:
    """Module names (without .ko) in an order where dependencies come first.

    Names that have no .ko are taken to be built in (the walk stops there)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in visiting:
            return
        ko = module_dir / f"{name}.ko"
        if not ko.exists():
            return
        visiting.add(name)
        for dep in _module_depends(ko):
            visit(dep)
        order.append(name)

    for root in roots:
        if not (module_dir / f"{root}.ko").exists():
            builtin = (module_dir.parent / "modules.builtin").read_text(errors="replace")
            if f"/{root}.ko" not in builtin:
                raise GuestImageError(f"guest kernel has neither {root}.ko nor a built-in {root}")
        visit(root)
    return order


# --- the initramfs ---------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    mode: int  # including the file type bits
    data: bytes = b""  # file content or symlink target
    rdev: tuple[int, int] = (0, 0)


def _guest_binaries() -> list[Path]:
    found: list[Path] = []
    for name in REQUIRED_BINARIES + OPTIONAL_BINARIES:
        path = shutil.which(name)
        if path is None:
            if name in REQUIRED_BINARIES:
                raise GuestImageError(
                    f"{name} is needed inside the test guest: install it (scripts/setup.sh)"
                )
            continue
        found.append(Path(path))
    return found


def _shared_libraries(binary: Path) -> list[Path]:
    """The loader and libraries `binary` needs, as `ldd` resolves them on this host."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if proc.returncode != 0:
        return []  # static
    libs = []
    for line in proc.stdout.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _initramfs_entries(
    init: str, module_dir: Path, modules: list[str], binaries: list[Path]
) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}

    def add_dirs(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), _Entry(stat.S_IFDIR | 0o755))

    def add(path: str, entry: _Entry) -> None:
        add_dirs(path)
        entries[path.strip("/")] = entry

    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "bin", "sbin", "usr/bin", "var"):
        add(d, _Entry(stat.S_IFDIR | 0o755))
    add("dev/console", _Entry(stat.S_IFCHR | 0o600, rdev=(5, 1)))
    add("dev/null", _Entry(stat.S_IFCHR | 0o666, rdev=(1, 3)))
    add("bin/busybox", _Entry(stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
    add("bin/sh", _Entry(stat.S_IFLNK | 0o777, b"busybox"))
    add("init", _Entry(stat.S_IFREG | 0o755, init.encode()))
    add("etc/udhcpc.script", _Entry(stat.S_IFREG | 0o755, UDHCPC_SCRIPT.encode()))
    for name in modules:
        add(f"lib/modules/{name}.ko", _Entry(stat.S_IFREG | 0o644, (module_dir / f"{name}.ko")
                                             .read_bytes()))
    for binary in binaries:
        add(f"usr/bin/{binary.name}", _Entry(stat.S_IFREG | 0o755, binary.read_bytes()))
        for lib in _shared_libraries(binary):
            add(str(lib), _Entry(stat.S_IFREG | 0o755, lib.resolve().read_bytes()))
    return entries


def _entries_digest(entries: dict[str, _Entry]) -> str:
    h = hashlib.sha256()
    for path in sorted(entries):
        e = entries[path]
        h.update(f"{path}\0{e.mode:o}\0{e.rdev}\0{len(e.data)}\0".encode())
        h.update(e.data)
    return h.hexdigest()


def _cpio_newc(entries: dict[str, _Entry]) -> bytes:
    """A newc ("070701") cpio archive of `entries`, parents before children."""
    out = io.BytesIO()

    def record(ino: int, name: str, e: _Entry) -> None:
        name_b = name.encode() + b"\0"
        fields = (
            ino, e.mode, 0, 0, 2 if stat.S_ISDIR(e.mode) else 1, 0, len(e.data),
            0, 0, e.rdev[0], e.rdev[1], len(name_b), 0,
        )
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(name_b)
        out.write(b"\0" * (-(110 + len(name_b)) % 4))
        out.write(e.data)
        out.write(b"\0" * (-len(e.data) % 4))

    for ino, name in enumerate(sorted(entries), start=1):
        record(ino, name, entries[name])
    record(0, "TRAILER!!!", _Entry(0))
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


# --- small helpers -----------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
