"""`netaccel doctor`: one line per kernel or host requirement, with a fix hint.

Each check really exercises the feature (creates a SOCKHASH, builds a throw-away tc
filter in a throw-away namespace) rather than reading config files.
"""

from __future__ import annotations

import os
import platform
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from node_helper import bpf_syscall, kernel


@dataclass
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""


def _root() -> str:
    if os.geteuid() != 0:
        raise RuntimeError(f"running as uid {os.geteuid()}")
    return "uid 0"


def _sockhash() -> str:
    """Create (and close) a SOCKHASH through the bpf() syscall."""
    os.close(bpf_syscall.map_create(bpf_syscall.BPF_MAP_TYPE_SOCKHASH, 8, 4, 16))
    return "bpf() syscall works, SOCKHASH map created"


def _cgroup2() -> str:
    return f"cgroup v2 root at {kernel.cgroup2_root()}"


def _bpffs() -> str:
    if kernel._is_bpffs(kernel.BPFFS):
        return f"mounted at {kernel.BPFFS}"
    raise RuntimeError(f"not mounted at {kernel.BPFFS} (netaccel mounts it when it needs it)")


def _bcc() -> str:
    bcc = kernel.import_bcc()
    return f"bcc {getattr(bcc, '__version__', '?')} importable"


def _headers() -> str:
    build = f"/lib/modules/{platform.release()}/build"
    if os.path.isdir(f"{build}/include"):
        return f"{build} -> {os.path.realpath(build)}"
    found = kernel.fallback_header_dirs()
    if found:
        return f"none for {platform.release()}; fallback {found[0].name} will be linked"
    raise RuntimeError(f"no headers for {platform.release()} and no fallback set")


def _tc() -> str:
    """ingress qdisc + u32 match-all + mirred redirect between two veths in a scratch netns."""
    from pyroute2 import NetNS, netns

    name = f"na-doctor-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="d0", kind="veth", peer={"ifname": "d1"})
            d0, d1 = ns.link_lookup(ifname="d0")[0], ns.link_lookup(ifname="d1")[0]
            ns.tc("add", "ingress", index=d0, handle="ffff:")
            ns.tc("add-filter", "u32", index=d0, parent="ffff:", prio=10, protocol=0x0003,
                  target=0x10001, keys=["0x0/0x0+0"],
                  action={"kind": "mirred", "direction": "egress", "action": "redirect",
                          "ifindex": d1})
            ns.tc("add", "clsact", index=d1)
    finally:
        netns.remove(name)
    return "ingress/clsact qdisc, u32 filter, mirred redirect"


def _binary(name: str) -> Callable[[], str]:
    def check() -> str:
        path = shutil.which(name)
        if not path:
            raise RuntimeError(f"{name} not found on PATH")
        return path
    return check


def _libvirtd() -> str:
    import libvirt  # noqa: F401 - import proves the binding is there

    path = shutil.which("libvirtd")
    if not path:
        raise RuntimeError("libvirtd not installed")
    return f"python libvirt binding and {path}"


CHECKS: list[tuple[str, bool, Callable[[], str], str]] = [
    ("root", True, _root, "run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"),
    ("bpf-sockhash", True, _sockhash, "needs CONFIG_BPF_SYSCALL and CONFIG_BPF_STREAM_PARSER"),
    ("cgroup-v2", True, _cgroup2, "mount cgroup2 (e.g. /sys/fs/cgroup/unified)"),
    ("bpffs", False, _bpffs, "mount -t bpf bpf /sys/fs/bpf"),
    ("bcc", True, _bcc, "apt-get install python3-bpfcc; use the .venv from scripts/setup.sh"),
    ("bcc-headers", True, _headers, kernel.HEADER_HINT),
    ("tc-u32-mirred", True, _tc, "needs NET_SCH_INGRESS, NET_CLS_U32, NET_ACT_MIRRED"),
    ("qperf", False, _binary("qperf"), "apt-get install qperf (benchmarks only)"),
    ("libvirt-qemu", False, _libvirtd,
     "apt-get install libvirt-daemon-driver-qemu qemu-system-x86 python3-libvirt "
     "(QEMU testbed guests only)"),
]


def run_checks() -> list[Check]:
    results = []
    for name, required, fn, fix in CHECKS:
        try:
            results.append(Check(name, True, required, fn()))
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            results.append(Check(name, False, required, f"{type(exc).__name__}: {exc}", fix))
    return results
