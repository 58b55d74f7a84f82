"""What netaccel does to one device: the in-kernel state record, our tc filters, the plan.

Every device carries its own 16-byte record (`State`) saying which datapath is in place,
whether netaccel created the clsact qdisc, and which checksum features it turned off, so
`restore` undoes exactly that, from any process. For "mirror" the record is the tc action
cookie of the mirred action; for "bpf" it is in the cls_bpf filter's name
("netaccel:<hex>[:<launcher digest>]"; cls_bpf in direct-action mode runs no actions, so it
has no cookie). Our filters sit at reserved priorities (PRIO_*, around "NA" = 0x4e41) on the
ingress hook.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from socket import ntohs

from pyroute2 import NetNS

from node_helper import tc_netlink as tc
from node_helper.vm.devices import Link

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
ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD
# Every prio of ours with its protocol (a tc prio holds one protocol), in delete order: the
# redirect first, so no frame is redirected that a pass filter should have kept.
_PRIO_PROTOCOLS = ((PRIO_MIRROR, ETH_P_ALL), (PRIO_BPF, ETH_P_ALL), (PRIO_DHCP6, ETH_P_IPV6),
                   (PRIO_DHCP4, ETH_P_IP), (PRIO_LAUNCHER_ND, ETH_P_IPV6),
                   (PRIO_LAUNCHER_ARP, ETH_P_ARP), (PRIO_LAUNCHER_MAC, ETH_P_ALL))
PASS_ROLES = {PRIO_LAUNCHER_MAC: "launcher_mac", PRIO_LAUNCHER_ARP: "launcher_arp",
              PRIO_LAUNCHER_ND: "launcher_nd", PRIO_DHCP4: "dhcp4", PRIO_DHCP6: "dhcp6"}
BPF_NAME_PREFIX = "netaccel:"

# Checksum offload features turned off with checksum="off" (ethtool names).
CHECKSUM_FEATURES = (
    "rx-checksum",
    "tx-checksum-ipv4",
    "tx-checksum-ip-generic",
    "tx-checksum-ipv6",
    "tx-checksum-fcoe-crc",
    "tx-checksum-sctp",
)

Key = tuple[int, int, int]  # u32 key: (value, mask, offset from the network header)

_STATE_FMT = ">4sBBBBII"  # magic, version, datapath, flags, reserved, features off, peer
_STATE_MAGIC = b"NAcc"
_STATE_VERSION = 1
_FLAG_CREATED_QDISC = 1
_FLAG_CHECKSUM_OFF = 2
_FLAG_REDIRECT_PEER = 4  # bpf, tap side: bpf_redirect_peer into the veth's peer


@dataclass(frozen=True)
class State:
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
    def decode(cls, raw: bytes | None) -> State | None:
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

    def as_dict(self) -> dict[str, object]:
        return {"datapath": self.datapath, "checksum": self.checksum,
                "created_qdisc": self.created_qdisc, "features_off": list(self.features_off),
                "redirect_peer": self.redirect_peer}

    def merged_for_rollback(self, old: State | None) -> State:
        """The state to undo after a failure: everything this or `old` could have changed."""
        if old is None:
            return self
        off = set(self.features_off) | set(old.features_off)
        return State(self.datapath, self.checksum, old.created_qdisc or self.created_qdisc,
                     tuple(n for n in CHECKSUM_FEATURES if n in off), self.peer,
                     self.redirect_peer)


@dataclass
class Filter:
    """One of our filters as read back from the kernel."""

    prio: int
    protocol: int
    kind: str
    role: str  # launcher_mac, launcher_arp, launcher_nd, dhcp4, dhcp6, mirror, bpf, unknown
    packets: int | None = None
    bytes: int | None = None
    target: int | None = None  # redirect target ifindex
    prog_id: int | None = None
    classid: int | None = None  # bpf: the device id (key of the VM datapath's maps)
    state: State | None = None
    cookie: bytes | None = None
    keys: tuple[Key, ...] = ()  # u32 pass filters: their (value, mask, offset) keys


def bpf_filter_name(state: State) -> str:
    return f"{BPF_NAME_PREFIX}{state.encode().hex()}"


def _u32_filter(flt: Filter, opts: object) -> None:
    if flt.prio in PASS_ROLES:
        flt.role = PASS_ROLES[flt.prio]
        flt.keys = tuple((k["key_val"], k["key_mask"], k["key_off"])
                         for k in opts.get_attr("TCA_U32_SEL")["keys"])
        pcnt = opts.get_attr("TCA_U32_PCNT")  # only with CONFIG_CLS_U32_PERF
        if pcnt is not None:
            flt.packets = pcnt["rhit"]
    elif flt.prio == PRIO_MIRROR:
        flt.role = "mirror"
        acts = opts.get_attr("TCA_U32_ACT")
        act = acts.get_attr("TCA_ACT_PRIO_1") if acts else None
        if act is not None and act.get_attr("TCA_ACT_KIND") == "mirred":
            parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
            flt.target = parms["ifindex"]
            basic = act.get_attr("TCA_ACT_STATS").get_attr("TCA_STATS_BASIC")
            flt.packets, flt.bytes = basic["packets"], basic["bytes"]
            flt.cookie = act.get_attr("TCA_ACT_COOKIE")
            flt.state = State.decode(flt.cookie)


def _bpf_filter(flt: Filter, opts: object) -> None:
    flt.role = "bpf"
    flt.prog_id = opts.get_attr("TCA_BPF_ID")
    classid = opts.get_attr("TCA_BPF_CLASSID")
    flt.classid = classid & 0xFFFF if classid else None  # the device id (its minor)
    name = opts.get_attr("TCA_BPF_NAME") or ""
    if name.startswith(BPF_NAME_PREFIX):
        state_hex = name[len(BPF_NAME_PREFIX):].partition(":")[0]
        with contextlib.suppress(ValueError):
            flt.cookie = bytes.fromhex(state_hex)
            flt.state = State.decode(flt.cookie)
    if flt.state is not None:
        flt.target = flt.state.peer


def read_filters(ns: NetNS, index: int) -> tuple[list[Filter], list[int]]:
    """Our filters (reserved prios) on the ingress hook, and the prios of anyone else's."""
    ours: list[Filter] = []
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
        flt = Filter(prio, protocol, kind, "unknown")
        if kind == "u32":
            _u32_filter(flt, opts)
        elif kind == "bpf" and prio == PRIO_BPF:
            _bpf_filter(flt, opts)
        ours.append(flt)
    return ours, sorted(foreign)


def remove_filters(ns: NetNS, index: int) -> None:
    for prio, proto in _PRIO_PROTOCOLS:
        tc.delete_prio(ns, index, prio, proto)


def device_state(filters: list[Filter]) -> State | None:
    return next((f.state for f in filters if f.state is not None), None)


@dataclass
class DevicePlan:
    """One device's part of an `accelerate`: the wanted state and what is there now."""

    dev: Link
    peer: Link
    want: State
    old: State | None
    filters: list[Filter]
