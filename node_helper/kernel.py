"""Small shared kernel plumbing: cgroup v2 root, bpffs, netns entry, instance names, bcc.

Everything here is a thin, explicit wrapper; the datapath modules build on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import platform
import re
import signal
from collections.abc import Iterator
from importlib import resources
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
    NETACCEL_CGROUP_ROOT overrides it: in a container with its own cgroup namespace the
    cgroup2 mount at "/" is the container's cgroup, not the node's; the DaemonSet mounts the
    host's /sys/fs/cgroup elsewhere and names it here.
    """
    override = os.environ.get("NETACCEL_CGROUP_ROOT")
    if override:  # a container: the host's cgroup2 root, bind-mounted (see deploy/)
        path = Path(override)
        if not path.is_dir():
            raise KernelFeatureError(f"NETACCEL_CGROUP_ROOT={override} is not a directory: "
                                     "mount the host's cgroup v2 root there")
        return path
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


TRACEFS = Path("/sys/kernel/tracing")


def tracepoint_fields(category: str, name: str) -> dict[str, tuple[int, int]]:
    """{field: (offset, size)} of tracepoint category:name's record (its tracefs format);
    KernelFeatureError when the tracepoint does not exist."""
    tracepoint_id(category, name)  # mounts tracefs; refuses a missing tracepoint
    fields = {}
    for m in re.finditer(r"field:[^;]*?(\w+)(?:\[\d*\])?;\s*offset:(\d+);\s*size:(\d+);",
                         (TRACEFS / "events" / category / name / "format").read_text()):
        fields[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return fields


def tracepoint_id(category: str, name: str) -> int:
    """The id of tracepoint category:name (tracefs is mounted when it is not)."""
    if not any(point == TRACEFS and fstype == "tracefs" for _, point, fstype in mounts()):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"tracefs", str(TRACEFS).encode(), b"tracefs", 0, None) != 0:
            err = ctypes.get_errno()
            raise KernelFeatureError(f"cannot mount tracefs at {TRACEFS}: {os.strerror(err)} "
                                     "(needs CONFIG_TRACING and root)")
    path = TRACEFS / "events" / category / name / "id"
    try:
        return int(path.read_text())
    except OSError:
        raise KernelFeatureError(f"the kernel has no tracepoint {category}:{name} ({path}); "
                                 "it needs CONFIG_FTRACE_SYSCALLS") from None


def _is_bpffs(path: Path) -> bool:
    return any(point == path and fstype == "bpf" for _, point, fstype in mounts())


def netns_path(netns: str) -> Path:
    """Where a network namespace is: a name under NETNS_DIR ("na1-vm0", what `ip netns`
    makes) or an absolute path to an nsfs file ("/proc/<pid>/ns/net", a CRI's
    "/var/run/netns/cni-..."). ValueError for anything else (a relative path)."""
    if not netns:
        raise ValueError("empty network namespace name")
    if netns.startswith("/"):
        return Path(netns)
    if "/" in netns or netns in (".", ".."):
        raise ValueError(f"network namespace {netns!r}: give a name under {NETNS_DIR} "
                         "or an absolute path")
    return NETNS_DIR / netns


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside a network namespace (a name under
    NETNS_DIR or an absolute nsfs path, see netns_path).

    Sockets created in the body stay in that namespace after it ends. Only this
    thread moves: the network namespace is per task.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    target = netns_path(name)
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
    target = netns_path(name)
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


# --- this agent's instance: names of what it pins and attaches --------------------------

_INSTANCE_RE = re.compile(r"^[a-z][a-z0-9]{0,10}$")


def instance() -> str:
    """The agent instance's name (NETACCEL_INSTANCE, default "netaccel").

    Everything the agent leaves in the kernel is named after it: pins under
    /sys/fs/bpf/<instance>/, lock files /run/<instance>-*.lock, and BPF program names
    "<instance>_..." (found again by name after a crash). One node runs one instance; a test
    run takes its own, so two runs on one host never touch each other's programs.
    """
    name = os.environ.get("NETACCEL_INSTANCE", "netaccel")
    if not _INSTANCE_RE.match(name):
        raise ValueError(f"NETACCEL_INSTANCE={name!r}: use 1-11 lower-case letters or digits, "
                         "starting with a letter (it prefixes BPF program names)")
    return name


def pin_dir(part: str) -> Path:
    """Where datapath `part` ("bypass", "vm", ...) pins its programs and maps."""
    return BPFFS / instance() / part


def unpin(part: str) -> None:
    """Remove every pin of datapath `part`, its folder, and the instance's folder if that is
    then empty (the other datapaths may have pins there)."""
    folder = pin_dir(part)
    if folder.is_dir():
        for pin in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                pin.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def lock_file(part: str) -> Path:
    """The lock that serialises changes to datapath `part` between processes."""
    return Path("/run") / f"{instance()}-{part}.lock"


@contextlib.contextmanager
def locked(part: str) -> Iterator[None]:
    """Hold datapath `part`'s lock (flock on lock_file(part)) for the body."""
    with open(lock_file(part), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- BPF sources and bcc ---------------------------------------------------------------------

HEADER_HINT = (
    "bcc compiles eBPF at run time and needs the kernel headers of the running kernel at "
    "/lib/modules/$(uname -r)/build: install linux-headers-$(uname -r), or mount the node's "
    "/lib/modules and /usr/src into the agent's container. On a kernel without a header "
    "package (custom kernels), a set of the same major version works for these programs "
    "(they use only the stable uapi): scripts/setup.sh links Debian's linux-headers-amd64."
)
MODULES_DIR = Path("/lib/modules")


def bpf_source(name: str) -> Path:
    """Path of a shipped BPF C source (package data node_helper.bpf, in a wheel or a checkout)."""
    path = Path(str(resources.files("node_helper.bpf") / name))
    if not path.is_file():
        raise FileNotFoundError(f"BPF source {name} is not installed with node_helper ({path})")
    return path


def bcc_headers(modules: Path | None = None) -> Path:
    """The kernel header build dir bcc will use; KernelFeatureError when there is none.

    The agent never changes the host to find headers: setting them up is a deployment step
    (the image or scripts/setup.sh), and `netaccel doctor` reports what is missing.
    """
    build = (modules or MODULES_DIR) / platform.release() / "build"
    if not (build / "include").is_dir():
        raise KernelFeatureError(f"no kernel headers for {platform.release()} at {build}. "
                                 f"{HEADER_HINT}")
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


def compile_bpf(source: str, cflags: list[str] | None = None):  # noqa: ANN201 - a bcc.BPF
    """Compile a shipped BPF source with bcc (headers checked first, clear errors).

    The source's folder is on the include path, so programs share bpf/netaccel_abi.h.
    """
    bcc_headers()
    bcc = import_bcc()
    path = bpf_source(source)
    try:
        return bcc.BPF(src_file=str(path).encode(),
                       cflags=[f"-I{path.parent}", *(cflags or [])])
    except Exception as exc:
        raise KernelFeatureError(f"bcc could not compile {source}: {exc}. {HEADER_HINT}") from exc
