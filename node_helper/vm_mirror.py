"""VM datapath: move a KubeVirt VM's frames straight between its tap and the pod veth.

In KubeVirt's bridge binding the launcher pod's netns holds a bridge `k6t-<name>` with two
ports: the VM's tap (QEMU's virtio-net backend) and the renamed pod veth `<name>-nic`. This
module installs tc ingress handling on both ports that redirects every frame to the other
port's egress (bpf, tap -> veth: into the veth peer's ingress, see below), skipping the
bridge, except what is meant for the launcher itself, which continues to the bridge (and so
to the launcher's stack on it):
- DHCP (UDP dport 67/68) and DHCPv6 (UDP dport 546/547): virt-launcher's DHCP server
  listens on the bridge;
- frames whose Ethernet destination is the bridge's MAC (ARP replies to the launcher,
  unicast DHCP renewals to the server, anything else addressed to the launcher);
- ARP whose target protocol address is one of the bridge's IPv4 addresses (a guest renewing
  its lease by unicast first ARPs for the server's address), and ICMPv6 neighbour
  solicitations whose target is one of the bridge's IPv6 addresses.
These rules are narrow on purpose: ordinary guest <-> pod traffic never enters the bridge,
so the bridge learns neither the guest's nor the pod's MAC from it. A frame that does enter
the bridge is handled as without netaccel (delivered locally, flooded or forwarded).

The same rules are installed on both ports (symmetry: a pod-side peer talking to one of the
launcher's addresses, e.g. the DHCP server's 10.x address in the testbed, reaches it as it
would through the bridge). The bridge's MAC and addresses are read when `accelerate` runs and
written into the filters/program: addresses added (or a MAC changed) later need a re-apply.
`accelerate` is idempotent and compares the installed rules with the bridge's current MAC and
address set, so a re-apply updates them exactly when they differ.

Two datapaths, same rule ("bpf" is the default: measured fastest on UDP, see docs/results/;
"mirror" needs no compiler or kernel headers):
- "mirror": u32 filters only (this kernel has no gact/flower/matchall). At priorities
  PRIO_LAUNCHER_MAC..PRIO_DHCP6 u32 filters match the frames above with a classid and no
  action: that ends classification "OK" and the frame goes on to the bridge. At PRIO_MIRROR
  a match-all u32 filter with a mirred egress redirect takes everything else. The MAC rule
  reads the Ethernet header through negative u32 offsets (relative to the network header,
  like iproute2's `match ether dst`); the ARP/ND rules are one filter per address.
- "bpf": one cls_bpf program in direct-action mode (bpf/tc_redirect.c, compiled with bcc)
  at PRIO_BPF that returns TC_ACT_OK for the same frames and redirects the rest. The bridge's
  MAC and addresses are compiled in (-D macros); a digest of them is part of the filter's
  name so a re-apply can tell whether they are still current. veth -> tap is bpf_redirect()
  to the tap's egress. tap -> veth is bpf_redirect_peer() (kernel >= 5.10, tc ingress only):
  the frame enters the ingress of the veth's peer on the node directly, skipping veth_xmit
  and the softirq hop through the backlog queue (Cilium's "host routing"); the veth's tx
  counters do not see it, the peer's rx counters do. That needs the pod device to be a veth
  whose peer is in another netns (the kernel drops a peer redirect otherwise), which
  `accelerate` checks on the device (redirect_peer_possible: kind veth and
  IFLA_LINK_NETNSID set); if not, tap -> veth falls back to bpf_redirect() to the veth's
  egress. The choice is a flag in the tap's state (status: state.<tap>.redirect_peer), so
  a re-apply after the device changed, or over filters of an older netaccel, rebuilds it.
  Measured on the testbed (netns guest -> pod, qperf, 2 runs x 3 alternating rounds against
  bpf_redirect to the egress): udp_bw 16 KiB +9 % (290 -> 316 MB/s, rounds 287-301 vs
  314-323), udp_lat 16 KiB -3 %; at 64 B / 1 KiB and for tcp_bw the difference stayed within
  the round-to-round noise (no regression).

Optionally (checksum="off") rx/tx checksum offload is turned off on both ports. The default
is "keep": measured on the testbed (docs/results/bench-vm.*), turning it off bought UDP
nothing measurable and cost TCP at >= 4 KiB 19-34 % throughput (no TSO/GSO without it).

Where the restore state lives (in the kernel, no file): every device carries its own
16-byte record (`_State`) saying which datapath is in place, whether netaccel created the
clsact qdisc, and which checksum features netaccel turned off (so restore turns back on
exactly those). For "mirror" the record is the tc action cookie of the mirred action; for
"bpf" it is the cls_bpf filter's name ("netaccel:<hex>[:<launcher digest>]"); cls_bpf in
direct-action mode runs no actions, so it has no cookie. Our filters are also recognisable
by their reserved priorities (PRIO_LAUNCHER_MAC..PRIO_BPF, 0x4e3e.. around "NA" = 0x4e41) on
the ingress hook.

Testbed convention: a veth bridge port whose IFLA_IFALIAS is TAP_STANDIN_ALIAS stands in for
QEMU's tap (the testbed's netns guests); a real tun/tap port (kind "tun") is the real thing.

Failure handling is fail-open: if anything fails part-way through `accelerate`, everything
netaccel installed on the two devices is removed, so traffic takes the bridge again (for a
re-apply this means the namespace ends up un-accelerated, never half-accelerated).
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from socket import AF_INET, AF_INET6, ntohs
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import act_mirred

from node_helper import bpf_syscall
from node_helper import tc_netlink as tc
from node_helper.kernel import NETNS_DIR, compile_bpf, import_bcc, in_netns

# The alias lab.testbed puts on its veth stand-in for QEMU's tap (kept equal there;
# the datapath does not import the testbed).
TAP_STANDIN_ALIAS = "netaccel-testbed-tap"

DATAPATHS = ("mirror", "bpf")
CHECKSUM_MODES = ("off", "keep")

# tc layout: filters on the ingress hook (tc.INGRESS_HOOK) of a clsact (or ingress) qdisc.
PRIO_LAUNCHER_MAC = 0x4E3E  # u32, protocol all: Ethernet dst == bridge MAC -> classid only
PRIO_LAUNCHER_ARP = 0x4E3F  # u32, protocol arp: target IP == a bridge IPv4 address (1/addr)
PRIO_LAUNCHER_ND = 0x4E40  # u32, protocol ipv6: NS for a bridge IPv6 address (1/addr)
PRIO_DHCP4 = 0x4E41  # u32, protocol ip: UDP dport 67 and 68 -> classid, no action
PRIO_DHCP6 = 0x4E42  # u32, protocol ipv6: UDP dport 546/547 -> classid, no action
PRIO_MIRROR = 0x4E43  # u32 match-all, protocol all, mirred egress redirect (+ cookie)
PRIO_BPF = 0x4E44  # cls_bpf direct-action, protocol all (name carries the state)
OUR_PRIOS = (PRIO_LAUNCHER_MAC, PRIO_LAUNCHER_ARP, PRIO_LAUNCHER_ND, PRIO_DHCP4, PRIO_DHCP6,
             PRIO_MIRROR, PRIO_BPF)
CLASSID_PASS = 0xFFFF4E41  # "flowid ffff:4e41": meaningless on ingress, marks our filters
ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD
# Every prio of ours with its protocol (a tc prio holds one protocol), in delete order.
_PRIO_PROTOCOLS = ((PRIO_MIRROR, ETH_P_ALL), (PRIO_BPF, ETH_P_ALL), (PRIO_DHCP6, ETH_P_IPV6),
                   (PRIO_DHCP4, ETH_P_IP), (PRIO_LAUNCHER_ND, ETH_P_IPV6),
                   (PRIO_LAUNCHER_ARP, ETH_P_ARP), (PRIO_LAUNCHER_MAC, ETH_P_ALL))
_PASS_ROLES = {PRIO_LAUNCHER_MAC: "launcher_mac", PRIO_LAUNCHER_ARP: "launcher_arp",
               PRIO_LAUNCHER_ND: "launcher_nd", PRIO_DHCP4: "dhcp4", PRIO_DHCP6: "dhcp6"}

# Checksum offload features turned off with checksum="off" (ethtool names). Disabling the
# tx checksums also makes the kernel drop TSO/GSO-dependent features; those come back by
# themselves when the checksums are turned on again (their "wanted" bits are untouched).
CHECKSUM_FEATURES = (
    "rx-checksum",
    "tx-checksum-ipv4",
    "tx-checksum-ip-generic",
    "tx-checksum-ipv6",
    "tx-checksum-fcoe-crc",
    "tx-checksum-sctp",
)

BPF_SOURCE = "tc_redirect.c"
BPF_NAME_PREFIX = "netaccel:"
# Counter slots of bpf/tc_redirect.c's `counters` map.
COUNTER_SLOTS = ("tap_to_veth", "veth_to_tap", "tap_to_bridge", "veth_to_bridge")

_MULTUS_HASHED = re.compile(r"^pod([0-9a-f]{11})$")


class VmShapeError(ValueError):
    """The namespace is not in KubeVirt's bridge binding shape; the message says what was found."""


class VmDatapathError(RuntimeError):
    """A datapath operation failed (after rolling back); the message says why."""


# --- devices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One network device in the launcher netns."""

    name: str
    index: int
    kind: str


@dataclass(frozen=True)
class Devices:
    """The bridge binding's devices for one pod interface."""

    bridge: Link
    tap: Link
    veth: Link

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {"bridge": asdict(self.bridge), "tap": asdict(self.tap), "veth": asdict(self.veth)}


def bridge_name(interface: str) -> str:
    """KubeVirt's bridge name for a pod interface: eth0 -> k6t-eth0, pod<hash> -> k6t-<hash>."""
    if not interface or len(interface) > 15 or "/" in interface or interface.strip() != interface:
        raise VmShapeError(f"{interface!r} is not a valid interface name")
    m = _MULTUS_HASHED.match(interface)
    name = f"k6t-{m.group(1) if m else interface}"
    if len(name) > 15:
        raise VmShapeError(f"interface {interface!r} gives bridge name {name!r}, too long")
    return name


def _kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info else None) or "device"


def _describe(links: list[Any]) -> str:
    return ", ".join(f"{lk.get_attr('IFLA_IFNAME')} ({_kind(lk)})" for lk in links) or "nothing"


def _find(ns: NetNS, netns: str, interface: str) -> Devices:
    wanted = bridge_name(interface)
    links = [lk for lk in ns.get_links() if lk.get_attr("IFLA_IFNAME") != "lo"]
    by_name = {lk.get_attr("IFLA_IFNAME"): lk for lk in links}
    bridge = by_name.get(wanted)
    if bridge is None or _kind(bridge) != "bridge":
        what = "no link" if bridge is None else f"a {_kind(bridge)} link"
        hint = ""
        pod_if = by_name.get(interface)
        if pod_if is not None and _kind(pod_if) == "veth":
            hint = f" ({interface} is a plain veth: masquerade/passt binding or a plain pod?)"
        raise VmShapeError(
            f"netns {netns}: expected bridge {wanted} for interface {interface} (KubeVirt "
            f"bridge binding), found {what} by that name{hint}; links: {_describe(links)}"
        )
    br_index = bridge["index"]
    ports = [lk for lk in links if lk.get_attr("IFLA_MASTER") == br_index]
    taps, veths, other = [], [], []
    for port in ports:
        kind = _kind(port)
        if kind == "tun" or (kind == "veth" and port.get_attr("IFLA_IFALIAS") == TAP_STANDIN_ALIAS):
            taps.append(port)
        elif kind == "veth":
            veths.append(port)
        else:
            other.append(port)
    if len(taps) != 1 or len(veths) != 1 or other:
        raise VmShapeError(
            f"netns {netns}: bridge {wanted} must have exactly one tap (kind tun, or the testbed's "
            f"veth stand-in aliased {TAP_STANDIN_ALIAS!r}) and one veth as ports; found "
            f"{len(taps)} tap(s), {len(veths)} veth(s), ports: {_describe(ports)}"
        )

    def link(lk: Any) -> Link:
        return Link(lk.get_attr("IFLA_IFNAME"), lk["index"], _kind(lk))

    return Devices(bridge=link(bridge), tap=link(taps[0]), veth=link(veths[0]))


def find_devices(netns: str, interface: str = "eth0") -> Devices:
    """Find the bridge, tap and veth of `interface` in `netns` (by kind, not by name)."""
    with _netns(netns) as ns:
        return _find(ns, netns, interface)


@dataclass(frozen=True)
class Launcher:
    """What is meant for the launcher itself: the bridge's own MAC and addresses."""

    mac: str | None  # "aa:bb:cc:dd:ee:ff", None if the bridge has none (all zero)
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]

    def digest(self) -> str:
        """A short digest of the set, stored with the bpf filter to detect a changed set."""
        text = "|".join([self.mac or "-", ",".join(self.ipv4), ",".join(self.ipv6)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "ipv4": list(self.ipv4), "ipv6": list(self.ipv6)}


def _launcher(ns: NetNS, bridge: Link) -> Launcher:
    """Read the bridge's MAC and addresses now (later changes need a re-apply)."""
    mac = None
    for lk in ns.get_links(bridge.index):
        addr = (lk.get_attr("IFLA_ADDRESS") or "").lower()
        if addr and addr.replace(":", "").strip("0"):
            mac = addr
    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    for msg in ns.get_addr(index=bridge.index):
        if msg["index"] != bridge.index:
            continue
        if msg["family"] == AF_INET:
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                v4.add(ipaddress.IPv4Address(addr))
        elif msg["family"] == AF_INET6:
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                v6.add(ipaddress.IPv6Address(addr.split("%")[0]))
    return Launcher(mac, tuple(str(a) for a in sorted(v4)), tuple(str(a) for a in sorted(v6)))


# --- the pass rules (u32 keys) ---------------------------------------------------------------
# A key is (value, mask, offset): a 32-bit word at `offset` bytes from the network header
# (negative offsets reach the Ethernet header, which precedes it on ingress), compared under
# `mask`. A rule is (prio, protocol, keys); all keys must match. u32 offsets assume no IP
# options / extension headers: a miss only sends the frame the accelerated way.

_Key = tuple[int, int, int]
_Rule = tuple[int, int, tuple[_Key, ...]]


def _pass_rules(launcher: Launcher) -> list[_Rule]:
    """The u32 "continue to the bridge" rules of the mirror datapath, for both devices."""
    rules: list[_Rule] = []
    if launcher.mac:
        mac = bytes.fromhex(launcher.mac.replace(":", ""))
        # Ethernet destination: bytes 0-3 at -14, bytes 4-5 in the high half of the word at
        # -10 (iproute2's `match ether dst`).
        rules.append((PRIO_LAUNCHER_MAC, ETH_P_ALL, (
            (int.from_bytes(mac[:4], "big"), 0xFFFFFFFF, -14),
            (int.from_bytes(mac[4:], "big") << 16, 0xFFFF0000, -10),
        )))
    for ip in launcher.ipv4:
        # ARP: protocol type (offset 2) IPv4, target protocol address at offset 24. Requests
        # and (broadcast) replies alike; unicast replies to the launcher match the MAC rule.
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


# --- in-kernel state -----------------------------------------------------------------------

_STATE_FMT = ">4sBBBBII"  # magic, version, datapath, flags, reserved, features off, peer
_STATE_MAGIC = b"NAcc"
_STATE_VERSION = 1
_FLAG_CREATED_QDISC = 1
_FLAG_CHECKSUM_OFF = 2
_FLAG_REDIRECT_PEER = 4  # bpf, tap side: bpf_redirect_peer into the veth's peer


@dataclass(frozen=True)
class _State:
    """What netaccel did to one device; stored in the kernel with the device's filter."""

    datapath: str
    checksum: str
    created_qdisc: bool
    features_off: tuple[str, ...]  # checksum features that were on and netaccel turned off
    peer: int  # ifindex frames are redirected to
    redirect_peer: bool = False  # to `peer`'s peer's ingress (bpf_redirect_peer), not egress

    def encode(self) -> bytes:
        flags = (_FLAG_CREATED_QDISC if self.created_qdisc else 0) | (
            _FLAG_CHECKSUM_OFF if self.checksum == "off" else 0
        ) | (_FLAG_REDIRECT_PEER if self.redirect_peer else 0)
        bits = sum(1 << CHECKSUM_FEATURES.index(f) for f in self.features_off)
        return struct.pack(
            _STATE_FMT, _STATE_MAGIC, _STATE_VERSION, DATAPATHS.index(self.datapath) + 1,
            flags, 0, bits, self.peer,
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> _State | None:
        if not raw or len(raw) != struct.calcsize(_STATE_FMT):
            return None
        magic, version, dp, flags, _, bits, peer = struct.unpack(_STATE_FMT, raw)
        if magic != _STATE_MAGIC or version != _STATE_VERSION or not 1 <= dp <= len(DATAPATHS):
            return None
        return cls(
            datapath=DATAPATHS[dp - 1],
            checksum="off" if flags & _FLAG_CHECKSUM_OFF else "keep",
            created_qdisc=bool(flags & _FLAG_CREATED_QDISC),
            features_off=tuple(f for i, f in enumerate(CHECKSUM_FEATURES) if bits >> i & 1),
            peer=peer,
            redirect_peer=bool(flags & _FLAG_REDIRECT_PEER),
        )


@dataclass
class _Filter:
    """One of our filters as read back from the kernel."""

    prio: int
    protocol: int
    kind: str
    role: str  # launcher_mac, launcher_arp, launcher_nd, dhcp4, dhcp6, mirror, bpf, unknown
    packets: int | None = None
    bytes: int | None = None
    target: int | None = None  # mirred target ifindex
    prog_id: int | None = None
    state: _State | None = None
    cookie: bytes | None = None
    keys: tuple[_Key, ...] = ()  # u32 pass filters: their (value, mask, offset) keys
    digest: str | None = None  # bpf: Launcher.digest() the program was compiled with


def _read_filters(ns: NetNS, index: int) -> tuple[list[_Filter], list[int]]:
    """Our filters (reserved prios) on the ingress hook, and the prios of anyone else's."""
    ours: list[_Filter] = []
    foreign: set[int] = set()
    for msg in tc.dump_filters(ns, index):
        prio, protocol = msg["info"] >> 16, ntohs(msg["info"] & 0xFFFF)
        if prio not in OUR_PRIOS:
            foreign.add(prio)
            continue
        opts = msg.get_attr("TCA_OPTIONS")
        kind = msg.get_attr("TCA_KIND")
        if not opts or (kind == "u32" and opts.get_attr("TCA_U32_SEL") is None):
            continue  # the prio's head or u32's hash table, not a rule
        flt = _Filter(prio, protocol, kind, "unknown")
        if kind == "u32" and prio in _PASS_ROLES:
            flt.role = _PASS_ROLES[prio]
            flt.keys = tuple((k["key_val"], k["key_mask"], k["key_off"])
                             for k in opts.get_attr("TCA_U32_SEL")["keys"])
            pcnt = opts.get_attr("TCA_U32_PCNT")  # only with CONFIG_CLS_U32_PERF
            if pcnt is not None:
                flt.packets = pcnt["rhit"]
        elif kind == "u32" and prio == PRIO_MIRROR:
            flt.role = "mirror"
            acts = opts.get_attr("TCA_U32_ACT")
            act = acts.get_attr("TCA_ACT_PRIO_1") if acts else None
            if act is not None and act.get_attr("TCA_ACT_KIND") == "mirred":
                parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
                flt.target = parms["ifindex"]
                basic = act.get_attr("TCA_ACT_STATS").get_attr("TCA_STATS_BASIC")
                flt.packets, flt.bytes = basic["packets"], basic["bytes"]
                flt.cookie = act.get_attr("TCA_ACT_COOKIE")
                flt.state = _State.decode(flt.cookie)
        elif kind == "bpf" and prio == PRIO_BPF:
            flt.role = "bpf"
            flt.prog_id = opts.get_attr("TCA_BPF_ID")
            name = opts.get_attr("TCA_BPF_NAME") or ""
            if name.startswith(BPF_NAME_PREFIX):
                state_hex, _, digest = name[len(BPF_NAME_PREFIX):].partition(":")
                flt.digest = digest or None
                with contextlib.suppress(ValueError):
                    flt.cookie = bytes.fromhex(state_hex)
                    flt.state = _State.decode(flt.cookie)
            if flt.state is not None:
                flt.target = flt.state.peer
        ours.append(flt)
    return ours, sorted(foreign)


@contextlib.contextmanager
def _netns(netns: str) -> Iterator[NetNS]:
    """A pyroute2 NetNS of an existing namespace whose filter messages decode with tc.TcMsg."""
    if not netns or "/" in netns or not (NETNS_DIR / netns).exists():
        raise VmShapeError(f"network namespace {netns!r} does not exist ({NETNS_DIR})")
    try:
        ns = NetNS(netns, flags=0)  # never create it (pyroute2's default is O_CREAT)
    except (OSError, NetlinkError) as exc:
        raise VmShapeError(f"cannot open network namespace {netns!r}: {exc}") from exc
    try:
        tc.use_tc_parser(ns)
        yield ns
    finally:
        ns.close()


# --- filters per datapath ------------------------------------------------------------------


def _install_mirror(ns: NetNS, dev: Link, peer: Link, state: _State,
                    launcher: Launcher) -> None:
    """Pass filters first (launcher, DHCP), then the match-all redirect with the cookie.

    A pass filter has a classid and no action: a match ends classification "OK" and the
    frame continues to the bridge. A false match (e.g. IP options shifting the ports) only
    sends a frame over the bridge, which still forwards it: the error is on the safe side.
    """
    for prio, protocol, keys in _pass_rules(launcher):
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


def _install_bpf(ns: NetNS, dev: Link, fd: int, state: _State, launcher: Launcher) -> None:
    tc.add_filter(ns, dev.index, PRIO_BPF, ETH_P_ALL, "bpf", [
        ["TCA_BPF_FD", fd],
        ["TCA_BPF_NAME", f"{BPF_NAME_PREFIX}{state.encode().hex()}:{launcher.digest()}"],
        ["TCA_BPF_FLAGS", 1],  # TCA_BPF_FLAG_ACT_DIRECT
    ])


def _remove_filters(ns: NetNS, index: int) -> None:
    # The redirect first, so no frame is redirected that a pass filter should have kept.
    for prio, proto in _PRIO_PROTOCOLS:
        tc.delete_prio(ns, index, prio, proto)


def redirect_peer_possible(ns: NetNS, dev: Link) -> bool:
    """Can tc ingress bpf_redirect_peer() through `dev` (into its peer's ingress)?

    Only for a veth whose peer is in another netns (the link then reports
    IFLA_LINK_NETNSID): the kernel drops a peer redirect to a device without a peer or to a
    peer in the redirecting netns. Decided from the device when `accelerate` runs.
    """
    if dev.kind != "veth":
        return False
    links = ns.get_links(dev.index)
    return bool(links) and links[0].get_attr("IFLA_LINK_NETNSID") is not None


def _bpf_cflags(devs: Devices, launcher: Launcher, redirect_peer: bool = False) -> list[str]:
    """The -D macros bpf/tc_redirect.c expects (see its header comment)."""
    mac = bytes.fromhex(launcher.mac.replace(":", "")) if launcher.mac else b""
    v4 = [f"(a)==0x{int(ipaddress.IPv4Address(ip)):08x}U" for ip in launcher.ipv4]
    v6 = []
    for ip in launcher.ipv6:
        packed = ipaddress.IPv6Address(ip).packed
        words = [int.from_bytes(packed[i:i + 4], "big") for i in (0, 4, 8, 12)]
        same = "&&".join(f"({w})==0x{x:08x}U" for w, x in zip("abcd", words, strict=True))
        v6.append(f"({same})")
    return [
        f"-DTAP_IFINDEX={devs.tap.index}", f"-DVETH_IFINDEX={devs.veth.index}",
        f"-DREDIRECT_PEER={1 if redirect_peer else 0}",
        f"-DBRIDGE_HAS_MAC={1 if mac else 0}",
        f"-DBRIDGE_MAC_HI=0x{int.from_bytes(mac[:4] or bytes(4), 'big'):08x}U",
        f"-DBRIDGE_MAC_LO=0x{int.from_bytes(mac[4:] or bytes(2), 'big'):04x}U",
        "-DIS_BRIDGE_IP4(a)=(" + "||".join(["0", *v4]) + ")",
        "-DIS_BRIDGE_IP6(a,b,c,d)=(" + "||".join(["0", *v6]) + ")",
        "-w",
    ]


@contextlib.contextmanager
def _bpf_programs(devs: Devices, launcher: Launcher,
                  redirect_peer: bool = False) -> Iterator[dict[str, int]]:
    """Compile bpf/tc_redirect.c for these devices; yield {"tap": fd, "veth": fd}.

    The fds are only needed until the filters hold the programs; the BPF object is then
    closed and the programs live on as long as the filters do.
    """
    prog = compile_bpf(BPF_SOURCE, _bpf_cflags(devs, launcher, redirect_peer))
    bcc = import_bcc()
    try:
        yield {
            "tap": prog.load_func(b"tap_to_veth", bcc.BPF.SCHED_CLS).fd,
            "veth": prog.load_func(b"veth_to_tap", bcc.BPF.SCHED_CLS).fd,
        }
    finally:
        prog.cleanup()


# --- checksum offload ------------------------------------------------------------------------


def _ethtool() -> Any:
    from pyroute2.ethtool import Ethtool

    return Ethtool()


def _checksum_features(netns: str, ifnames: list[str]) -> dict[str, dict[str, dict[str, bool]]]:
    """{ifname: {feature: {"on": bool, "changeable": bool}}} for CHECKSUM_FEATURES."""
    out: dict[str, dict[str, dict[str, bool]]] = {}
    with in_netns(netns):
        et = _ethtool()
        try:
            for ifname in ifnames:
                feats = et.get_features(ifname).features
                out[ifname] = {
                    name: {"on": bool(f.enable), "changeable": bool(f.available)}
                    for name in CHECKSUM_FEATURES if (f := feats.get(name)) is not None
                }
        finally:
            et.close()
    return out


def _set_features(netns: str, ifname: str, names: tuple[str, ...], on: bool) -> None:
    if not names:
        return
    with in_netns(netns):
        et = _ethtool()
        try:
            feats = et.get_features(ifname)
            for name in names:
                feats.features[name].enable = on
            et.set_features(ifname, feats)
        finally:
            et.close()


# --- reading bpf counters after a restart (bpf syscall) -------------------------------------

def _bpf_counters(prog_id: int) -> dict[str, dict[str, int]]:
    """Sum the per-CPU `counters` map of the program with id `prog_id`."""
    with bpf_syscall.closing(bpf_syscall.prog_fd_by_id(prog_id)) as prog_fd:
        map_ids = bpf_syscall.prog_map_ids(prog_fd)
    ncpu = bpf_syscall.possible_cpus()
    for map_id in map_ids:
        with bpf_syscall.closing(bpf_syscall.map_fd_by_id(map_id)) as map_fd:
            map_type, _, value_size, entries = bpf_syscall.map_info(map_fd)
            if (map_type != bpf_syscall.BPF_MAP_TYPE_PERCPU_ARRAY or value_size != 16
                    or entries != len(COUNTER_SLOTS)):
                continue
            out = {}
            for slot, name in enumerate(COUNTER_SLOTS):
                value = bpf_syscall.map_lookup(map_fd, struct.pack("=I", slot), 16 * ncpu) or b""
                pairs = struct.unpack_from(f"={2 * ncpu}Q", value)
                out[name] = {"packets": sum(pairs[0::2]), "bytes": sum(pairs[1::2])}
            return out
    return {}


# --- the API ---------------------------------------------------------------------------------


def _validate(datapath: str, checksum: str) -> None:
    if datapath not in DATAPATHS:
        raise ValueError(f"datapath must be one of {', '.join(DATAPATHS)}, not {datapath!r}")
    if checksum not in CHECKSUM_MODES:
        raise ValueError(f"checksum must be one of {', '.join(CHECKSUM_MODES)}, not {checksum!r}")


def _device_state(filters: list[_Filter]) -> _State | None:
    for flt in filters:
        if flt.state is not None:
            return flt.state
    return None


def _in_place(filters: list[_Filter], want: _State, launcher: Launcher) -> bool:
    """True when exactly the filters of `want` are installed with `want` as their state,
    passing exactly `launcher`'s MAC and addresses to the bridge."""
    main = [f for f in filters if f.role in ("mirror", "bpf")]
    if len(main) != 1 or main[0].role != want.datapath or main[0].state != want \
            or main[0].target != want.peer:
        return False
    rest = [f for f in filters if f is not main[0]]
    if want.datapath == "mirror":
        have = sorted((f.prio, f.protocol, f.keys) for f in rest)
        return have == sorted(_pass_rules(launcher))
    return not rest and main[0].digest == launcher.digest()


def _restore_device(ns: NetNS, netns: str, dev: Link, state: _State | None) -> dict[str, Any]:
    """Undo what `state` says netaccel did to `dev`; remove our filters in any case."""
    done: dict[str, Any] = {"device": dev.name, "removed_filters": False,
                            "removed_qdisc": False, "features_on": []}
    ours, foreign = _read_filters(ns, dev.index)
    if ours:
        _remove_filters(ns, dev.index)
        done["removed_filters"] = True
    if state is None:
        return done
    if state.features_off:
        _set_features(netns, dev.name, state.features_off, True)
        done["features_on"] = list(state.features_off)
    if state.created_qdisc and tc.ingress_qdisc_kind(ns, dev.index) is not None:
        if foreign:  # someone else put filters on the qdisc we made: leave it to them
            done["kept_qdisc_for_prios"] = foreign
        else:
            ns.tc("del", index=dev.index, handle=0xFFFF0000, parent=0xFFFFFFF1)
            done["removed_qdisc"] = True
    return done


def accelerate(netns: str, interface: str = "eth0", datapath: str = "bpf",
               checksum: str = "keep") -> dict[str, Any]:
    """Redirect tap <-> veth around the bridge (DHCP excepted); return the new status.

    Idempotent: when the requested setup is already in place nothing is touched. Filters
    left by an earlier run (e.g. before a crash) are adopted: their in-kernel state keeps
    the original qdisc and offload facts, so `restore` still returns the exact original.

    The bridge's MAC and addresses (what is passed to the launcher) are read now: after
    they change (e.g. a DHCP server address added to the bridge), apply again. A re-apply
    whose set differs from the installed one replaces the filters; one that matches them
    changes nothing.
    """
    _validate(datapath, checksum)
    with _netns(netns) as ns:
        devs = _find(ns, netns, interface)  # VmShapeError before any change
        launcher = _launcher(ns, devs.bridge)
        pairs = ((devs.tap, devs.veth), (devs.veth, devs.tap))
        features = _checksum_features(netns, [devs.tap.name, devs.veth.name])
        peer_redirect = datapath == "bpf" and redirect_peer_possible(ns, devs.veth)
        plans: list[tuple[Link, Link, _State, _State | None, list[_Filter]]] = []
        for dev, peer in pairs:
            filters, _ = _read_filters(ns, dev.index)
            old = _device_state(filters)
            qdisc = tc.ingress_qdisc_kind(ns, dev.index)
            created = old.created_qdisc if old else qdisc is None
            off = set(old.features_off) if old else set()
            if checksum == "off":
                off |= {n for n, f in features[dev.name].items() if f["on"] and f["changeable"]}
            else:
                off = set()
            want = _State(datapath, checksum, created or qdisc is None,
                          tuple(n for n in CHECKSUM_FEATURES if n in off), peer.index,
                          peer_redirect and dev == devs.tap)
            plans.append((dev, peer, want, old, filters))

        todo = [p for p in plans if not _device_done(p, features, launcher)]
        if todo:
            try:
                with contextlib.ExitStack() as stack:
                    fds = (stack.enter_context(_bpf_programs(devs, launcher, peer_redirect))
                           if datapath == "bpf" else {})
                    for dev, peer, want, old, filters in todo:
                        fd = fds.get("tap" if dev == devs.tap else "veth")
                        _apply_device(ns, netns, dev, peer, want, old, filters, fd, launcher)
            except BaseException as exc:
                # Fail open: take everything of ours off both devices, then report.
                for dev, _, want, old, _ in plans:
                    with contextlib.suppress(Exception):
                        _restore_device(ns, netns, dev, _merge_for_rollback(want, old))
                if isinstance(exc, (NetlinkError, OSError)):
                    raise VmDatapathError(
                        f"netns {netns}: accelerate ({datapath}) failed and was rolled back "
                        f"(traffic is on the bridge): {exc}"
                    ) from exc
                raise
        return _status(ns, netns, interface, devs)


def _device_done(plan: tuple[Link, Link, _State, _State | None, list[_Filter]],
                 features: dict[str, dict[str, dict[str, bool]]], launcher: Launcher) -> bool:
    dev, _, want, old, filters = plan
    if old != want or not _in_place(filters, want, launcher):
        return False
    if want.checksum == "off":
        feats = features[dev.name]
        return not any(f["on"] and f["changeable"] for f in feats.values())
    return True


def _merge_for_rollback(want: _State, old: _State | None) -> _State:
    """The state to undo after a failure: everything `want` could have changed."""
    return want if old is None else _State(
        want.datapath, want.checksum, old.created_qdisc or want.created_qdisc,
        tuple(n for n in CHECKSUM_FEATURES if n in set(want.features_off) | set(old.features_off)),
        want.peer, want.redirect_peer,
    )


def _apply_device(ns: NetNS, netns: str, dev: Link, peer: Link, want: _State,
                  old: _State | None, filters: list[_Filter], bpf_fd: int | None,
                  launcher: Launcher) -> None:
    if tc.ingress_qdisc_kind(ns, dev.index) is None:
        ns.tc("add", "clsact", index=dev.index)
    # Replace our filters (if any). Between the delete and the add the bridge carries the
    # traffic, which is the normal path, so the gap is harmless.
    if filters:
        _remove_filters(ns, dev.index)
    if want.datapath == "mirror":
        _install_mirror(ns, dev, peer, want, launcher)
    else:
        assert bpf_fd is not None
        _install_bpf(ns, dev, bpf_fd, want, launcher)
    # Offloads last: the state saying what to turn back on is in the kernel first.
    turn_on = tuple(n for n in (old.features_off if old else ()) if n not in want.features_off)
    _set_features(netns, dev.name, turn_on, True)
    _set_features(netns, dev.name, want.features_off, False)


def restore(netns: str, interface: str = "eth0") -> None:
    """Return the tap and veth to their exact state before `accelerate` (no-op if none)."""
    with _netns(netns) as ns:
        try:
            devs = _find(ns, netns, interface)
            links = [devs.tap, devs.veth]
        except VmShapeError:
            # The shape changed (e.g. the tap is gone): clean our filters wherever they are.
            links = [Link(lk.get_attr("IFLA_IFNAME"), lk["index"], _kind(lk))
                     for lk in ns.get_links()]
        for dev in links:
            filters, _ = _read_filters(ns, dev.index)
            if filters:
                _restore_device(ns, netns, dev, _device_state(filters))


def status(netns: str, interface: str = "eth0") -> dict[str, Any]:
    """Devices, datapath in place, filters with counters per direction, offload state.

    "bridge_passed" counts what the pass rules let through to the bridge (DHCP and frames
    for the launcher); the mirror's u32 filters only count with CONFIG_CLS_U32_PERF.
    "launcher" is the bridge's MAC and addresses now; "launcher_current" says whether the
    installed rules pass exactly those (False: apply again).
    """
    with _netns(netns) as ns:
        return _status(ns, netns, interface, _find(ns, netns, interface))


def _status(ns: NetNS, netns: str, interface: str, devs: Devices) -> dict[str, Any]:
    sides = {"tap": (devs.tap, "tap_to_veth"), "veth": (devs.veth, "veth_to_tap")}
    features = _checksum_features(netns, [devs.tap.name, devs.veth.name])
    filters_out: list[dict[str, Any]] = []
    directions: dict[str, dict[str, int | None]] = {
        "tap_to_veth": {"packets": None, "bytes": None},
        "veth_to_tap": {"packets": None, "bytes": None},
        "bridge_passed": {"packets": None, "bytes": None},
    }
    launcher = _launcher(ns, devs.bridge)
    current = True
    datapaths: set[str] = set()
    states: dict[str, dict[str, Any] | None] = {}
    foreign_prios: dict[str, list[int]] = {}
    bpf_counted: set[int] = set()
    for side, (dev, direction) in sides.items():
        filters, foreign = _read_filters(ns, dev.index)
        state = _device_state(filters)
        states[dev.name] = None if state is None else {
            "datapath": state.datapath, "checksum": state.checksum,
            "created_qdisc": state.created_qdisc, "features_off": list(state.features_off),
            "redirect_peer": state.redirect_peer,
        }
        if state is not None:
            datapaths.add(state.datapath)
            current = current and _in_place(filters, state, launcher)
        for flt in filters:
            filters_out.append({
                "device": dev.name, "direction": direction, "role": flt.role, "kind": flt.kind,
                "prio": flt.prio, "protocol": f"0x{flt.protocol:04x}", "packets": flt.packets,
                "bytes": flt.bytes, "redirect_to": flt.target, "prog_id": flt.prog_id,
                "cookie": flt.cookie.hex() if flt.cookie else None,
                "keys": [[f"0x{v:08x}", f"0x{m:08x}", o] for v, m, o in flt.keys],
            })
            if flt.role == "mirror":
                directions[direction] = {"packets": flt.packets, "bytes": flt.bytes}
            elif flt.role in _PASS_ROLES.values() and flt.packets is not None:
                d = directions["bridge_passed"]
                d["packets"] = (d["packets"] or 0) + flt.packets
            elif flt.role == "bpf" and flt.prog_id and flt.prog_id not in bpf_counted:
                bpf_counted.add(flt.prog_id)
                with contextlib.suppress(OSError):
                    counts = _bpf_counters(flt.prog_id)
                    mine = counts.get(direction)
                    if mine:
                        directions[direction] = mine
                    passed = counts.get(f"{side}_to_bridge")
                    if passed:
                        d = directions["bridge_passed"]
                        d["packets"] = (d["packets"] or 0) + passed["packets"]
                        d["bytes"] = (d["bytes"] or 0) + passed["bytes"]
        if foreign:
            foreign_prios[dev.name] = foreign
    datapath = None if not datapaths else datapaths.pop() if len(datapaths) == 1 else "mixed"
    return {
        "netns": netns,
        "interface": interface,
        "devices": devs.as_dict(),
        "datapath": datapath,
        "directions": directions,
        "filters": filters_out,
        "launcher": launcher.as_dict(),
        "launcher_current": current if datapath else None,
        "qdiscs": {d.name: tc.ingress_qdisc_kind(ns, d.index) for d in (devs.tap, devs.veth)},
        "state": states,
        "foreign_prios": foreign_prios,
        "offload": {name: {f: v["on"] for f, v in feats.items()}
                    for name, feats in features.items()},
    }
