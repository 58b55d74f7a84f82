"""What of ours is installed on this node, found in the kernel alone (no state file).

    netns_candidates()   every network namespace reachable from here, once each: the names
                         under /var/run/netns, then /proc/<pid>/ns/net of every process
    vm_installed()       the namespaces holding VM datapath filters of this instance
    netns_id(path)       (st_dev, st_ino) of an nsfs file: one namespace, however reached

Which filters are "this instance's": a cls_bpf filter whose program is named
`<instance>_vm`; the mirror datapath's u32/mirred filters carry no instance mark, so only the
default instance ("netaccel", the one a node runs) claims them. A test run with its own
NETACCEL_INSTANCE therefore never touches another run's VMs (bpf), nor any mirror VM.
Used by `netaccel node cleanup`, `netaccel node status` and the agent's adoption sweep.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from node_helper import bpf_syscall, kernel
from node_helper.vm import bpf
from node_helper.vm.devices import Link, VmShapeError, all_links, open_netns
from node_helper.vm.plan import Filter, device_state, read_filters

PROC = Path("/proc")
DEFAULT_INSTANCE = "netaccel"


def netns_id(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def netns_candidates() -> list[str]:
    """One path (or /var/run/netns name) per reachable namespace, names first."""
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    named = sorted(kernel.NETNS_DIR.iterdir()) if kernel.NETNS_DIR.is_dir() else []
    procs = sorted((p for p in PROC.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for path, label in [(p, p.name) for p in named] + [(p / "ns" / "net", None) for p in procs]:
        try:
            ident = netns_id(path)
        except OSError:  # gone, or not ours to look at (another user namespace)
            continue
        if ident not in seen:
            seen.add(ident)
            out.append(label or str(path))
    return out


def _prog_name(prog_id: int | None) -> str | None:
    if prog_id is None:
        return None
    with contextlib.suppress(OSError), bpf_syscall.closing(bpf_syscall.prog_fd_by_id(prog_id)) \
            as fd:
        return bpf_syscall.prog_info(fd)[1]
    return None


def owned(filters: list[Filter]) -> bool:
    """Are these filters (ours by priority) this instance's? See the module docstring."""
    if not filters:
        return False
    bpf_filters = [f for f in filters if f.role == "bpf"]
    if bpf_filters:
        return all(_prog_name(f.prog_id) == bpf.prog_name() for f in bpf_filters)
    return kernel.instance() == DEFAULT_INSTANCE


@dataclass
class InstalledVm:
    """A launcher namespace with this instance's filters on some of its devices."""

    netns: str
    ident: tuple[int, int]
    devices: dict[str, dict[str, object]] = field(default_factory=dict)  # name -> state

    def as_dict(self) -> dict[str, object]:
        return {"netns": self.netns, "devices": self.devices}


def scan_netns(netns: str) -> InstalledVm | None:
    """This instance's VM datapath in one namespace, None when there is none (or it is gone)."""
    try:
        ident = netns_id(kernel.netns_path(netns))
        with open_netns(netns) as ns:
            found = InstalledVm(netns, ident)
            for link in all_links(ns):
                filters, _ = read_filters(ns, link.index)
                if filters and owned(filters):
                    state = device_state(filters)
                    found.devices[link.name] = {
                        "index": link.index, "kind": link.kind,
                        "datapath": state.datapath if state else None,
                        "state": state.as_dict() if state else None}
    except (OSError, VmShapeError, ValueError):
        return None
    return found if found.devices else None


def vm_installed() -> list[InstalledVm]:
    return [vm for ns in netns_candidates() if (vm := scan_netns(ns)) is not None]


def device_links(vm: InstalledVm) -> list[Link]:
    return [Link(name, int(d["index"]), str(d["kind"])) for name, d in vm.devices.items()]
