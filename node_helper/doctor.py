"""`netaccel doctor`: one line per kernel or host requirement of the agent, with a fix hint.

Each check really exercises the feature (creates a SOCKHASH, compiles a tc program and
attaches it in a throw-away namespace) rather than reading config files. Only what the
agent needs on a node is checked; the lab's tools (qperf, libvirt) are not the agent's.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from node_helper import bpf_syscall, kernel

PASS_PROGRAM = """
#include <uapi/linux/pkt_cls.h>
int doctor_pass(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


@dataclass
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""


@contextlib.contextmanager
def _scratch_veth() -> Iterator[tuple[object, int, int]]:
    """(NetNS, index of d0, index of d1): a veth pair in a throw-away namespace."""
    from pyroute2 import NetNS, netns

    name = f"na-doctor-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="d0", kind="veth", peer={"ifname": "d1"})
            yield ns, ns.link_lookup(ifname="d0")[0], ns.link_lookup(ifname="d1")[0]
    finally:
        netns.remove(name)


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
    build = kernel.bcc_headers()
    return f"{build} -> {os.path.realpath(build)}"


def _cls_bpf() -> str:
    """Compile a tc program with bcc and attach it (cls_bpf, direct action) to a veth."""
    kernel.bcc_headers()
    bcc = kernel.import_bcc()
    prog = bcc.BPF(text=PASS_PROGRAM)
    try:
        fd = prog.load_func(b"doctor_pass", bcc.BPF.SCHED_CLS).fd
        with _scratch_veth() as (ns, d0, _):
            ns.tc("add", "clsact", index=d0)
            ns.tc("add-filter", "bpf", index=d0, handle=1, fd=fd, name="doctor",
                  parent="ffff:fff2", direct_action=True, protocol=0x0003)
    finally:
        prog.cleanup()
    return "bcc compiled a tc program; cls_bpf direct-action filter attached on clsact"


def _tc_mirred() -> str:
    """ingress qdisc + u32 match-all + mirred redirect between two veths."""
    with _scratch_veth() as (ns, d0, d1):
        ns.tc("add", "ingress", index=d0, handle="ffff:")
        ns.tc("add-filter", "u32", index=d0, parent="ffff:", prio=10, protocol=0x0003,
              target=0x10001, keys=["0x0/0x0+0"],
              action={"kind": "mirred", "direction": "egress", "action": "redirect",
                      "ifindex": d1})
    return "ingress qdisc, u32 filter, mirred redirect"


def _ethtool() -> str:
    """Read a veth's offload features over ethtool netlink (the VM datapath's checksum knob)."""
    from pyroute2.ethtool import Ethtool

    et = Ethtool()
    try:
        features = et.get_features("lo").features
    finally:
        et.close()
    if "rx-checksum" not in features:
        raise RuntimeError("ethtool netlink answered without an rx-checksum feature")
    return f"ethtool netlink: {len(features)} features readable"


CHECKS: list[tuple[str, bool, Callable[[], str], str]] = [
    ("root", True, _root, "run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"),
    ("bpf-sockhash", True, _sockhash, "needs CONFIG_BPF_SYSCALL and CONFIG_BPF_STREAM_PARSER"),
    ("cgroup-v2", True, _cgroup2, "mount cgroup2 (e.g. /sys/fs/cgroup/unified)"),
    ("bpffs", False, _bpffs, "mount -t bpf bpf /sys/fs/bpf"),
    ("bcc", True, _bcc, "apt-get install python3-bpfcc; use the .venv from scripts/setup.sh"),
    ("bcc-headers", True, _headers, kernel.HEADER_HINT),
    ("tc-cls-bpf", True, _cls_bpf,
     "needs NET_CLS_BPF and NET_SCH_INGRESS (clsact), and bcc with headers (above); "
     "without them use `netaccel vm accelerate --datapath mirror`"),
    ("tc-u32-mirred", True, _tc_mirred, "needs NET_SCH_INGRESS, NET_CLS_U32, NET_ACT_MIRRED"),
    ("ethtool-netlink", True, _ethtool, "needs CONFIG_ETHTOOL_NETLINK (Linux >= 5.6)"),
]


def run_checks() -> list[Check]:
    results = []
    for name, required, fn, fix in CHECKS:
        try:
            results.append(Check(name, True, required, fn()))
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            results.append(Check(name, False, required, f"{type(exc).__name__}: {exc}", fix))
    return results
