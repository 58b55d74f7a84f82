"""The VM datapath's public operations: accelerate, restore, status (and find_devices).

All take `is_tap`, the classifier that says which bridge port is the VM's tap (default: a
real tun/tap); a test environment passes its own. Failure handling is fail-open: if anything
fails part-way through `accelerate`, everything netaccel installed on the two devices is
removed, so traffic takes the bridge again (never half-accelerated).
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError

from node_helper import bpf_syscall, kernel
from node_helper import tc_netlink as tc
from node_helper.vm import bpf, mirror
from node_helper.vm.devices import (
    Devices,
    IsTap,
    Launcher,
    Link,
    VmDatapathError,
    VmShapeError,
    all_links,
    find,
    find_devices,
    is_real_tap,
    open_netns,
    read_launcher,
    redirect_peer_possible,
)
from node_helper.vm.offload import Features, checksum_features, set_features
from node_helper.vm.plan import (
    CHECKSUM_FEATURES,
    CHECKSUM_MODES,
    DATAPATHS,
    DevicePlan,
    State,
    device_state,
    read_filters,
    remove_filters,
)
from node_helper.vm.status import is_current, status_of

__all__ = ["accelerate", "restore", "status", "find_devices"]


def _validate(datapath: str, checksum: str) -> None:
    if datapath not in DATAPATHS:
        raise ValueError(f"datapath must be one of {', '.join(DATAPATHS)}, not {datapath!r}")
    if checksum not in CHECKSUM_MODES:
        raise ValueError(f"checksum must be one of {', '.join(CHECKSUM_MODES)}, not {checksum!r}")


def _plan(ns: NetNS, dev: Link, peer: Link, datapath: str, checksum: str,
          features: Features, redirect_peer: bool) -> DevicePlan:
    filters, _ = read_filters(ns, dev.index)
    old = device_state(filters)
    qdisc = tc.ingress_qdisc_kind(ns, dev.index)
    created = old.created_qdisc if old else qdisc is None
    off: set[str] = set()
    if checksum == "off":
        off = set(old.features_off) if old else set()
        off |= {n for n, f in features[dev.name].items() if f["on"] and f["changeable"]}
    want = State(datapath, checksum, created or qdisc is None,
                 tuple(n for n in CHECKSUM_FEATURES if n in off), peer.index, redirect_peer)
    return DevicePlan(dev, peer, want, old, filters)


def _done(plan: DevicePlan, features: Features, launcher: Launcher, cookie: int | None,
          prog_id: int | None) -> bool:
    if plan.old != plan.want or not is_current(plan.filters, plan.want, launcher, cookie,
                                               plan.dev):
        return False
    if plan.want.datapath == "bpf" and plan.filters[0].prog_id != prog_id:
        return False  # a newer program is pinned
    if plan.want.checksum == "off":
        return not any(f["on"] and f["changeable"] for f in features[plan.dev.name].values())
    return True


def _restore_device(ns: NetNS, netns: str, dev: Link, state: State | None) -> dict[str, Any]:
    """Undo what `state` says netaccel did to `dev`; remove our filters in any case."""
    done: dict[str, Any] = {"device": dev.name, "removed_filters": False,
                            "removed_qdisc": False, "features_on": []}
    ours, foreign = read_filters(ns, dev.index)
    if ours:
        remove_filters(ns, dev.index)
        done["removed_filters"] = True
    if state is None:
        return done
    if state.features_off:
        set_features(netns, dev.name, state.features_off, True)
        done["features_on"] = list(state.features_off)
    if state.created_qdisc and tc.ingress_qdisc_kind(ns, dev.index) is not None:
        if foreign:  # someone else put filters on the qdisc we made: leave it to them
            done["kept_qdisc_for_prios"] = foreign
        else:
            ns.tc("del", index=dev.index, handle=0xFFFF0000, parent=0xFFFFFFF1)
            done["removed_qdisc"] = True
    return done


def _apply_device(ns: NetNS, netns: str, plan: DevicePlan, launcher: Launcher,
                  cookie: int | None, prog_fd: int | None) -> None:
    dev, want = plan.dev, plan.want
    if tc.ingress_qdisc_kind(ns, dev.index) is None:
        ns.tc("add", "clsact", index=dev.index)
    dev_id = 0
    if want.datapath == "bpf":
        assert cookie is not None and prog_fd is not None
        dev_id = bpf.device_id(cookie, dev, bpf.entries())
        bpf.configure(dev_id, bpf.config_value(want, launcher, cookie, dev))
    # Replace our filters (if any). Between the delete and the add the bridge carries the
    # traffic, which is the normal path, so the gap is harmless.
    if plan.filters:
        remove_filters(ns, dev.index)
    if want.datapath == "mirror":
        mirror.install(ns, dev, plan.peer, want, launcher)
    else:
        bpf.attach(ns, dev, prog_fd, want, dev_id)
    # Offloads last: the state saying what to turn back on is in the kernel first.
    old_off = plan.old.features_off if plan.old else ()
    set_features(netns, dev.name, tuple(n for n in old_off if n not in want.features_off), True)
    set_features(netns, dev.name, want.features_off, False)


def _apply(ns: NetNS, netns: str, devs: Devices, plans: list[DevicePlan], todo: list[DevicePlan],
           launcher: Launcher, cookie: int | None) -> None:
    datapath = plans[0].want.datapath
    try:
        with contextlib.ExitStack() as stack:
            prog_fd = None
            if datapath == "bpf":
                prog_fd = stack.enter_context(bpf_syscall.closing(
                    bpf.open_program(bpf.program())))
            for plan in todo:
                _apply_device(ns, netns, plan, launcher, cookie, prog_fd)
    except BaseException as exc:
        # Fail open: take everything of ours off both devices, then report.
        for plan in plans:
            with contextlib.suppress(Exception):
                _restore_device(ns, netns, plan.dev, plan.want.merged_for_rollback(plan.old))
        if cookie is not None:
            with contextlib.suppress(Exception):
                bpf.forget(cookie, [devs.tap, devs.veth])
        if isinstance(exc, (NetlinkError, OSError)):
            raise VmDatapathError(
                f"netns {netns}: accelerate ({datapath}) failed and was rolled back "
                f"(traffic is on the bridge): {exc}"
            ) from exc
        raise


def accelerate(netns: str, interface: str = "eth0", datapath: str = "bpf",
               checksum: str = "keep", is_tap: IsTap = is_real_tap,
               report: bool = True) -> dict[str, Any]:
    """Redirect tap <-> veth around the bridge (DHCP excepted); return the new status
    (with report=False: {}, saving the status read, a seventh of the call at 100 VMs).

    Idempotent: when the requested setup is already in place nothing is touched. Filters
    left by an earlier run (e.g. before a crash) are adopted: their in-kernel state keeps
    the original qdisc and offload facts, so `restore` still returns the exact original.
    The bridge's MAC and addresses are read now: after they change, apply again.
    """
    _validate(datapath, checksum)
    with open_netns(netns) as ns:
        devs = find(ns, netns, interface, is_tap)  # VmShapeError before any change
        launcher = read_launcher(ns, devs.bridge)
        if datapath == "bpf":
            bpf.check_limits(launcher)  # VmLimitError before any change
        features = checksum_features(netns, [devs.tap.name, devs.veth.name])
        peer_redirect = datapath == "bpf" and redirect_peer_possible(ns, devs.veth)
        plans = [_plan(ns, dev, peer, datapath, checksum, features,
                       peer_redirect and dev == devs.tap)
                 for dev, peer in ((devs.tap, devs.veth), (devs.veth, devs.tap))]
        with kernel.locked("vm"):
            uses_bpf = datapath == "bpf" or any(f.role == "bpf" for p in plans
                                                for f in p.filters)
            cookie = bpf.netns_cookie(netns) if uses_bpf else None
            prog_id = bpf.current_prog_id() if datapath == "bpf" else None
            todo = [p for p in plans if not _done(p, features, launcher, cookie, prog_id)]
            if todo:
                _apply(ns, netns, devs, plans, todo, launcher, cookie)
            if datapath != "bpf" and cookie is not None and bpf.pinned():
                bpf.forget(cookie, [devs.tap, devs.veth])  # switched away from bpf
        return status_of(ns, netns, interface, devs) if report else {}


def restore(netns: str, interface: str = "eth0", is_tap: IsTap = is_real_tap) -> None:
    """Return the tap and veth to their exact state before `accelerate` (no-op if none)."""
    with open_netns(netns) as ns, kernel.locked("vm"):
        try:
            devs = find(ns, netns, interface, is_tap)
            links = [devs.tap, devs.veth]
        except VmShapeError:
            # The shape changed (e.g. the tap is gone): clean our filters wherever they are.
            links = all_links(ns)
        for dev in links:
            filters, _ = read_filters(ns, dev.index)
            if filters:
                _restore_device(ns, netns, dev, device_state(filters))
        if bpf.pinned():
            bpf.forget(bpf.netns_cookie(netns), links)


def status(netns: str, interface: str = "eth0", is_tap: IsTap = is_real_tap) -> dict[str, Any]:
    """Devices, datapath in place, filters with counters per direction, offload state
    (see node_helper.vm.status)."""
    with open_netns(netns) as ns:
        return status_of(ns, netns, interface, find(ns, netns, interface, is_tap))
