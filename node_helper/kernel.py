"""Small shared kernel plumbing: cgroup v2 root, bpffs, netns entry, bcc headers.

Everything here is a thin, explicit wrapper; the datapath modules build on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
from collections.abc import Iterator
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000


class KernelFeatureError(RuntimeError):
    """A kernel or host requirement is missing; the message says what to do."""


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> Iterator[tuple[str, Path, str]]:
    """(root within the filesystem, mount point, filesystem type) of every mount."""
    for line in mountinfo.read_text().splitlines():
        # "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <sopts>"
        left, _, right = line.partition(" - ")
        fields = left.split()
        yield fields[3], Path(fields[4]), right.split()[0]


def cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """Return the mount point of the cgroup v2 hierarchy, read from mountinfo.

    On hybrid hosts this is /sys/fs/cgroup/unified, on unified hosts /sys/fs/cgroup.
    """
    roots = [point for root, point, fstype in mounts(mountinfo)
             if fstype == "cgroup2" and root == "/"]
    if not roots:
        raise KernelFeatureError(
            "no cgroup v2 hierarchy is mounted; mount one with "
            "`mount -t cgroup2 none /sys/fs/cgroup/unified` (or boot with systemd's unified layout)"
        )
    return min(roots, key=lambda p: len(p.parts))


def ensure_bpffs(path: Path = BPFFS) -> Path:
    """Mount bpffs at `path` unless it is already mounted there; return the path."""
    if not _is_bpffs(path):
        path.mkdir(parents=True, exist_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", str(path).encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise KernelFeatureError(
                f"cannot mount bpffs at {path}: {os.strerror(err)}; "
                "run as root, or mount it with `mount -t bpf bpf /sys/fs/bpf`"
            )
    return path


def _is_bpffs(path: Path) -> bool:
    return any(point == path and fstype == "bpf" for _, point, fstype in mounts())


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside the named network namespace.

    Sockets created in the body stay in that namespace after it ends. Only this
    thread moves: the network namespace is per task.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    target = NETNS_DIR / name
    if not target.exists():
        raise FileNotFoundError(f"network namespace {name!r} does not exist ({target})")
    with open("/proc/thread-self/ns/net", "rb") as home, open(target, "rb") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace")


def netns_argv(name: str, argv: list[str] | tuple[str, ...]) -> list[str]:
    """`argv` prefixed to run inside the named network namespace (util-linux nsenter).

    Not a preexec_fn with setns: Python code between fork and exec aborts in processes that
    have loaded grpc (its fork handlers), and without a preexec_fn subprocess can vfork.
    """
    target = NETNS_DIR / name
    if not target.exists():
        raise FileNotFoundError(f"network namespace {name!r} does not exist ({target})")
    return ["nsenter", f"--net={target}", "--", *argv]


def remove_netns(name: str) -> None:
    """Kill every process inside the named network namespace, then remove it.

    Processes still running inside would keep the namespace (and its links) alive after
    the name is gone. Quietly does nothing for a namespace that does not exist.
    """
    from pyroute2 import netns

    for pid in netns.ns_pids().get(name, []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        netns.remove(name)


# --- bcc and kernel headers ------------------------------------------------

HEADER_HINT = (
    "bcc compiles eBPF at run time and needs kernel headers. Install the ones for this "
    "kernel (linux-headers-$(uname -r)) or, on Debian, `apt-get install linux-headers-amd64` "
    "as a fallback set (run scripts/setup.sh)."
)


def fallback_header_dirs(src: Path = Path("/usr/src")) -> tuple[Path, Path] | None:
    """Newest Debian header pair (arch `-amd64` build dir, `-common` source dir), if any."""
    builds = sorted(src.glob("linux-headers-*-amd64"), key=lambda p: _version_key(p.name))
    for build in reversed(builds):
        common = build.with_name(build.name.removesuffix("-amd64") + "-common")
        if (build / "include").is_dir() and (common / "include").is_dir():
            return build, common
    return None


def _version_key(name: str) -> list[int]:
    return [int(part) for part in "".join(c if c.isdigit() else " " for c in name).split()]


def ensure_bcc_headers(modules: Path = Path("/lib/modules")) -> Path:
    """Make sure bcc finds headers for the running kernel; return the build dir it will use.

    bcc looks in /lib/modules/$(uname -r)/build (and /source). When the running kernel has
    no headers, link Debian's newest header set there: sock_ops/sk_msg/tc programs use only
    the stable uapi structures, so older headers compile programs that run on this kernel.
    """
    release_dir = modules / platform.release()
    build = release_dir / "build"
    if (build / "include").is_dir():
        return build
    found = fallback_header_dirs()
    if found is None:
        raise KernelFeatureError(f"no kernel headers for {platform.release()}. {HEADER_HINT}")
    arch_dir, common_dir = found
    release_dir.mkdir(parents=True, exist_ok=True)
    for link, target in ((build, arch_dir), (release_dir / "source", common_dir)):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return build


def import_bcc():  # noqa: ANN201 - returns the bcc module
    """Import bcc with a clear error when it is not installed for this Python."""
    try:
        import bcc
    except ImportError as exc:
        raise KernelFeatureError(
            "the bcc Python module is missing: install python3-bpfcc and run netaccel from a "
            "venv created with `/usr/bin/python3 -m venv --system-site-packages` "
            "(scripts/setup.sh does both)"
        ) from exc
    return bcc
