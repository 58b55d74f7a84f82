"""`status`: devices, datapath in place, filters with counters per direction, offload state.

"bridge_passed" counts what the pass rules let through to the bridge (DHCP and frames for
the launcher); the mirror's u32 filters only count with CONFIG_CLS_U32_PERF. "launcher" is
the bridge's MAC and addresses now; "launcher_current" says whether the installed rules pass
exactly those (False: apply again).
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyroute2 import NetNS

from node_helper import tc_netlink as tc
from node_helper.vm import bpf, mirror
from node_helper.vm.devices import Devices, Launcher, Link, read_launcher
from node_helper.vm.offload import checksum_features
from node_helper.vm.plan import PASS_ROLES, Filter, State, device_state, read_filters

Counts = dict[str, int | None]


def _filter_row(dev: Link, direction: str, flt: Filter) -> dict[str, Any]:
    return {
        "device": dev.name, "direction": direction, "role": flt.role, "kind": flt.kind,
        "prio": flt.prio, "protocol": f"0x{flt.protocol:04x}", "packets": flt.packets,
        "bytes": flt.bytes, "redirect_to": flt.target, "prog_id": flt.prog_id,
        "cookie": flt.cookie.hex() if flt.cookie else None,
        "keys": [[f"0x{v:08x}", f"0x{m:08x}", o] for v, m, o in flt.keys],
    }


def _add(into: Counts, packets: int | None, nbytes: int | None) -> None:
    if packets is not None:
        into["packets"] = (into["packets"] or 0) + packets
    if nbytes is not None:
        into["bytes"] = (into["bytes"] or 0) + nbytes


def _count_mirror(filters: list[Filter], direction: str, out: dict[str, Counts]) -> None:
    for flt in filters:
        if flt.role == "mirror":
            out[direction] = {"packets": flt.packets, "bytes": flt.bytes}
        elif flt.role in PASS_ROLES.values():
            _add(out["bridge_passed"], flt.packets, None)


def _count_bpf(filters: list[Filter], direction: str, out: dict[str, Counts]) -> None:
    flt = next((f for f in filters if f.role == "bpf" and f.classid), None)
    if flt is None:
        return
    with contextlib.suppress(OSError):
        counts = bpf.counters_of(flt.classid)
        if counts:
            out[direction] = {"packets": counts["redirected_packets"],
                              "bytes": counts["redirected_bytes"]}
            _add(out["bridge_passed"], counts["bridge_packets"], counts["bridge_bytes"])


def is_current(filters: list[Filter], state: State, launcher: Launcher,
               cookie: int | None, dev: Link) -> bool:
    """Do the installed filters (and config) pass exactly `launcher` to the bridge?"""
    main = [f for f in filters if f.role in ("mirror", "bpf")]
    if len(main) != 1 or main[0].role != state.datapath or main[0].state != state \
            or main[0].target != state.peer:
        return False
    if state.datapath == "mirror":
        return mirror.in_place(filters, main[0], launcher)
    if len(filters) != 1 or cookie is None or not main[0].classid:
        return False
    try:
        want = bpf.config_value(state, launcher, cookie, dev)
    except ValueError:  # more addresses now than the program holds
        return False
    return bpf.config_of(main[0].classid) == want


def status_of(ns: NetNS, netns: str, interface: str, devs: Devices) -> dict[str, Any]:
    sides = ((devs.tap, "tap_to_veth"), (devs.veth, "veth_to_tap"))
    launcher = read_launcher(ns, devs.bridge)
    directions: dict[str, Counts] = {d: {"packets": None, "bytes": None}
                                     for d in ("tap_to_veth", "veth_to_tap", "bridge_passed")}
    rows: list[dict[str, Any]] = []
    states: dict[str, dict[str, Any] | None] = {}
    foreign_prios: dict[str, list[int]] = {}
    datapaths: set[str] = set()
    current = True
    cookie: int | None = None
    for dev, direction in sides:
        filters, foreign = read_filters(ns, dev.index)
        state = device_state(filters)
        states[dev.name] = state.as_dict() if state else None
        if foreign:
            foreign_prios[dev.name] = foreign
        rows += [_filter_row(dev, direction, f) for f in filters]
        if any(f.role == "bpf" for f in filters) and cookie is None:
            cookie = bpf.netns_cookie(netns)
        _count_mirror(filters, direction, directions)
        _count_bpf(filters, direction, directions)
        if state is not None:
            datapaths.add(state.datapath)
            current = current and is_current(filters, state, launcher, cookie, dev)
    datapath = None if not datapaths else datapaths.pop() if len(datapaths) == 1 else "mixed"
    features = checksum_features(netns, [devs.tap.name, devs.veth.name])
    return {
        "netns": netns,
        "interface": interface,
        "devices": devs.as_dict(),
        "datapath": datapath,
        "directions": directions,
        "filters": rows,
        "launcher": launcher.as_dict(),
        "launcher_current": current if datapath else None,
        "qdiscs": {d.name: tc.ingress_qdisc_kind(ns, d.index) for d in (devs.tap, devs.veth)},
        "state": states,
        "foreign_prios": foreign_prios,
        "offload": {name: {f: v["on"] for f, v in feats.items()}
                    for name, feats in features.items()},
    }
