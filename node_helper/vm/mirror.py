"""The "mirror" datapath: u32 filters only (this kernel has no gact/flower/matchall).

At PRIO_LAUNCHER_MAC..PRIO_DHCP6 u32 filters match the frames for the launcher with a
classid and no action: that ends classification "OK" and the frame goes on to the bridge.
At PRIO_MIRROR a match-all u32 filter with a mirred egress redirect takes everything else;
its action cookie carries the device's State. Needs no compiler or kernel headers.
"""

from __future__ import annotations

import ipaddress

from pyroute2 import NetNS
from pyroute2.netlink.rtnl.tcmsg import act_mirred

from node_helper import tc_netlink as tc
from node_helper.vm.devices import Launcher, Link
from node_helper.vm.plan import (
    ETH_P_ALL,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    PRIO_DHCP4,
    PRIO_DHCP6,
    PRIO_LAUNCHER_ARP,
    PRIO_LAUNCHER_MAC,
    PRIO_LAUNCHER_ND,
    PRIO_MIRROR,
    Filter,
    Key,
    State,
)

CLASSID_PASS = 0xFFFF4E41  # "flowid ffff:4e41": meaningless on ingress, marks our filters
Rule = tuple[int, int, tuple[Key, ...]]  # (prio, protocol, keys): all keys must match


def pass_rules(launcher: Launcher) -> list[Rule]:
    """The u32 "continue to the bridge" rules, the same for both devices.

    A key is (value, mask, offset): a 32-bit word at `offset` bytes from the network header
    (negative offsets reach the Ethernet header, which precedes it on ingress). u32 offsets
    assume no IP options / extension headers: a miss only sends the frame the accelerated
    way.
    """
    rules: list[Rule] = []
    if launcher.mac:
        mac = bytes.fromhex(launcher.mac.replace(":", ""))
        # Ethernet destination: bytes 0-3 at -14, bytes 4-5 in the high half of the word at
        # -10 (iproute2's `match ether dst`).
        rules.append((PRIO_LAUNCHER_MAC, ETH_P_ALL, (
            (int.from_bytes(mac[:4], "big"), 0xFFFFFFFF, -14),
            (int.from_bytes(mac[4:], "big") << 16, 0xFFFF0000, -10),
        )))
    for ip in launcher.ipv4:
        # ARP: protocol type (offset 2) IPv4, target protocol address at offset 24.
        rules.append((PRIO_LAUNCHER_ARP, ETH_P_ARP, (
            (ETH_P_IP, 0x0000FFFF, 0),
            (int(ipaddress.IPv4Address(ip)), 0xFFFFFFFF, 24),
        )))
    for ip in launcher.ipv6:
        # Neighbour solicitation: next header (offset 6) ICMPv6, type (offset 40) 135, target
        # address at offset 48.
        packed = ipaddress.IPv6Address(ip).packed
        rules.append((PRIO_LAUNCHER_ND, ETH_P_IPV6, (
            (0x00003A00, 0x0000FF00, 4),
            (0x87000000, 0xFF000000, 40),
            *((int.from_bytes(packed[i:i + 4], "big"), 0xFFFFFFFF, 48 + i) for i in (0, 4, 8, 12)),
        )))
    for port in (67, 68):
        # IPv4 protocol (offset 9) UDP, UDP dport at offset 22.
        rules.append((PRIO_DHCP4, ETH_P_IP, ((0x00110000, 0x00FF0000, 8),
                                             (port, 0x0000FFFF, 20))))
    # IPv6: next header (offset 6) == UDP and dport (offset 42) 546 or 547 (0x222/0xfffe).
    rules.append((PRIO_DHCP6, ETH_P_IPV6, ((0x00001100, 0x0000FF00, 4),
                                           (0x00000222, 0x0000FFFE, 40))))
    return rules


def install(ns: NetNS, dev: Link, peer: Link, state: State, launcher: Launcher) -> None:
    """Pass filters first (launcher, DHCP), then the match-all redirect with the cookie.

    A false pass match (e.g. IP options shifting the ports) only sends a frame over the
    bridge, which still forwards it: the error is on the safe side.
    """
    for prio, protocol, keys in pass_rules(launcher):
        tc.add_filter(ns, dev.index, prio, protocol, "u32", [
            ["TCA_U32_CLASSID", CLASSID_PASS],
            ["TCA_U32_SEL", {"keys": list(keys)}],
        ])
    redirect = {"direction": "egress", "action": "redirect", "ifindex": peer.index}
    tc.add_filter(ns, dev.index, PRIO_MIRROR, ETH_P_ALL, "u32", [
        ["TCA_U32_CLASSID", CLASSID_PASS],
        ["TCA_U32_SEL", {"keys": [(0, 0, 0)]}],
        ["TCA_U32_ACT", {"attrs": [["TCA_ACT_PRIO_1", {"attrs": [
            ["TCA_ACT_KIND", "mirred"],
            ["TCA_ACT_OPTIONS", act_mirred.get_parameters(redirect)],
            ["TCA_ACT_COOKIE", state.encode()],
        ]}]]}],
    ])


def in_place(filters: list[Filter], main: Filter, launcher: Launcher) -> bool:
    """Besides `main` (the redirect), exactly the pass rules of `launcher` are installed."""
    have = sorted((f.prio, f.protocol, f.keys) for f in filters if f is not main)
    return have == sorted(pass_rules(launcher))
