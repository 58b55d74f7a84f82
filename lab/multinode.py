"""Two testbeds joined into a two-node cluster, the way flannel's VXLAN backend joins nodes.

Testbeds k1 and k2 (lab/testbed.py) keep their pods and VMs; this adds, in both node netns:

    wire    veth wire<peer>  10.250.0.<k>/24   the underlay: node k1's wire<k2> is the peer of
                                               node k2's wire<k1> (a cable between two hosts)
    vxlan   vx<k>            10.250.1.<k>/32, fd00:6e60:1::<k>/128 (the overlay; <k> in hex in
                             IPv6 addresses, as the testbed writes them),
                             VNI 1, dstport 4789, local 10.250.0.<k>, over wire<peer>,
                             MTU = wire MTU - 50 = 1450, no learning (flannel's `nolearning`)
    routes  10.251.<peer>.0/24 (and 10.252.<peer>.0/24 when the peer has pods 80 and up) via
            10.250.1.<peer>, fd00:6e61:<peer>::/64 via fd00:6e60:1::<peer>, dev vx<k> onlink
    neigh   10.250.1.<peer> and fd00:6e60:1::<peer> lladdr <peer's vx MAC> dev vx<k> permanent
    fdb     <peer's vx MAC> dev vx<k> dst 10.250.0.<peer> self permanent

The neighbour and FDB entries are flannel's (it programs both for every node it learns of from
the API server), not a `remote` on the device: the accelerator will meet this form on real
clusters (a static neighbour, so `bpf_redirect_neigh` to the vxlan device never waits for ARP
through the tunnel), and one vxlan device could serve any number of peers. IPv4 and IPv6 pods
share the one vxlan device (flannel makes flannel.1 and flannel-v6.1; the overlay is Ethernet,
so one is enough here). 10.250.0.0/16 and fd00:6e60::/32 cannot clash with the testbeds'
10.251-10.252.<k>.0/24 and fd00:6e61:<k>::/64.

Forwarding (IPv4 and IPv6) is turned on in both node netns (without it nothing crosses; see
fastpath-research FINDINGS Q3). Every pod-side device of both testbeds gets the vxlan MTU, as
flannel's CNI config does (pod eth0 and its node-side veth; a VM's node-side veth, eth0-nic and
tap0, and a netns guest's eth0; a QEMU guest keeps the MTU its kernel chose). With 1500-byte
pods behind a 1450-byte tunnel the underlay fragments every full-size segment silently.

A testbed joins at most one cluster. What teardown needs (the peer, forwarding before the join)
is kept in the alias of the node's br0, which outlives the wire and the vxlan device, so
`unjoin_number(k)` works from the namespaces alone, even after the peer testbed is gone.
Destroying one testbed deletes the wire (a veth dies with its peer) and so the other node's
vxlan device (the kernel deletes a vxlan device whose lower device goes), its routes,
neighbours and FDB entries; `unjoin_number` on the survivor then restores its MTUs, forwarding
and alias. `netaccel-lab testbed down` unjoins first, so the survivor is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from lab.testbed import (
    NODE_BRIDGE,
    PREFIX,
    Testbed,
    TestbedError,
    Vm,
    existing_numbers,
    write_sysctl,
)
from node_helper.kernel import NETNS_DIR, in_netns

VNI = 1
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
TESTBED_MTU = 1500  # every testbed link is made with it (veth's default)
STATE_ALIAS = "netaccel-lab-join"
RTNH_F_ONLINK = 4
FORWARDING = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")
_STATE_RE = re.compile(rf"^{STATE_ALIAS} peer=(\d+) forwarding=(\d),(\d)$")


@contextlib.contextmanager
def as_node(k: int) -> Iterator[str]:
    """Make the agent's calls in this block node k's (NETACCEL_INSTANCE <base>n<k>: its own
    pins and locks), as each node of a real cluster runs its own agent; yields the name."""
    base = os.environ.get("NETACCEL_INSTANCE", "netaccel")
    name = f"{base[:6]}n{k}"
    os.environ["NETACCEL_INSTANCE"] = name
    try:
        yield name
    finally:
        os.environ["NETACCEL_INSTANCE"] = base


def underlay_address(k: int) -> str:
    return f"10.250.0.{k}"


def overlay_addresses(k: int) -> tuple[str, str]:
    return f"10.250.1.{k}", f"fd00:6e60:1::{k:x}"


def node_netns(k: int) -> str:
    return f"{PREFIX}{k}-node"


@dataclass
class Node:
    """One node's side of the cluster."""

    number: int
    netns: str
    wire: str  # veth towards the peer node
    vxlan: str
    underlay: str
    overlay4: str
    overlay6: str
    vxlan_mac: str = ""
    routes: list[str] = field(default_factory=list)  # the peer's pod subnets, via vxlan
    forwarding_before: tuple[str, str] = ("0", "0")  # ip_forward, ipv6 all/forwarding
    # "<netns>/<ifname>" -> MTU before the join, for every device lowered to the vxlan MTU
    mtus_before: dict[str, int] = field(default_factory=dict)


@dataclass
class Cluster:
    """Two joined testbeds: `nodes[0]` is the first testbed given to `join`."""

    nodes: tuple[Node, Node]
    vni: int = VNI
    port: int = VXLAN_PORT
    mtu: int = TESTBED_MTU - VXLAN_OVERHEAD

    def node(self, number: int) -> Node:
        return next(n for n in self.nodes if n.number == number)

    def status(self) -> dict[str, Any]:
        return asdict(self)


def _node(k: int, peer: int) -> Node:
    return Node(k, node_netns(k), f"wire{peer}", f"vx{k}", underlay_address(k),
                *overlay_addresses(k))


def pod_cidrs(bed: Testbed) -> list[str]:
    """A node's pod subnets: what its Node object's spec.podCIDRs would say."""
    subnets = [bed.ipv4_cidr, bed.ipv6_cidr]
    if any(p.ipv4.startswith("10.252.") for p in bed.pods):
        subnets.insert(1, f"10.252.{bed.number}.0/24")
    return subnets


def _mtu_devices(bed: Testbed) -> list[tuple[str, str]]:
    """(netns, ifname) of every device on the pods' and VMs' path (module docstring)."""
    devices = []
    for pod in bed.pods:
        devices += [(pod.netns, "eth0"), (bed.node_netns, pod.host_veth)]
    for vm in bed.vms:
        devices += [(bed.node_netns, vm.host_veth), (vm.launcher_netns, vm.veth),
                    (vm.launcher_netns, vm.tap)]
        if vm.guest_netns:
            devices.append((vm.guest_netns, "eth0"))
    return devices


def _read_sysctl(netns_name: str, key: str) -> str:
    with in_netns(netns_name):
        return Path("/proc/sys", key).read_text().strip()


def _index(ns: NetNS, ifname: str) -> int | None:
    found = ns.link_lookup(ifname=ifname)
    return found[0] if found else None


def _set_mtu(netns_name: str, ifname: str, mtu: int) -> None:
    """Quietly skips a namespace or device that is gone (teardown after a partial build)."""
    if not (NETNS_DIR / netns_name).exists():
        return
    with NetNS(netns_name) as ns:
        idx = _index(ns, ifname)
        if idx is not None:
            ns.link("set", index=idx, mtu=mtu)


def _state(k: int) -> tuple[int, tuple[str, str]] | None:
    """(peer, forwarding before) from node k's br0 alias, or None: not joined (or no node)."""
    if not (NETNS_DIR / node_netns(k)).exists():
        return None
    with NetNS(node_netns(k)) as ns:
        idx = _index(ns, NODE_BRIDGE)
        alias = ns.get_links(idx)[0].get("ifalias") if idx is not None else None
    m = _STATE_RE.match(alias or "")
    return (int(m.group(1)), (m.group(2), m.group(3))) if m else None


def _set_alias(k: int, alias: str) -> None:
    with NetNS(node_netns(k)) as ns:
        ns.link("set", index=_index(ns, NODE_BRIDGE), ifalias=alias)


# --- join -------------------------------------------------------------------------

def join(a: Testbed, b: Testbed) -> Cluster:
    """Join testbeds a and b into a two-node cluster (module docstring); on any failure,
    undo what was done and re-raise."""
    if a.number == b.number:
        raise TestbedError("a testbed cannot be joined to itself")
    for bed in (a, b):
        if not (NETNS_DIR / bed.node_netns).exists():
            raise TestbedError(f"testbed {bed.number} is not up")
        if (state := _state(bed.number)) is not None:
            raise TestbedError(f"testbed {bed.number} is joined to testbed {state[0]} already")
    mtu = TESTBED_MTU - VXLAN_OVERHEAD
    cluster = Cluster((_node(a.number, b.number), _node(b.number, a.number)), mtu=mtu)
    try:
        # teardown's memory first: a half-built join is still found and undone
        for node, peer in zip(cluster.nodes, (b, a), strict=True):
            node.forwarding_before = tuple(_read_sysctl(node.netns, k) for k in FORWARDING)
            _set_alias(node.number, f"{STATE_ALIAS} peer={peer.number} "
                                    f"forwarding={','.join(node.forwarding_before)}")
        _add_wire(*cluster.nodes)
        for node in cluster.nodes:
            _add_vxlan(node, mtu)
        for node, peer, peer_bed in ((cluster.nodes[0], cluster.nodes[1], b),
                                     (cluster.nodes[1], cluster.nodes[0], a)):
            node.routes = pod_cidrs(peer_bed)
            _program_peer(node, peer, node.routes)
            for key in FORWARDING:
                write_sysctl(node.netns, key, "1")
        for node, bed in zip(cluster.nodes, (a, b), strict=True):
            for netns_name, ifname in _mtu_devices(bed):
                with NetNS(netns_name) as ns:
                    idx = _index(ns, ifname)
                    before = ns.get_links(idx)[0].get("IFLA_MTU")
                node.mtus_before[f"{netns_name}/{ifname}"] = before
                if before > mtu:
                    _set_mtu(netns_name, ifname, mtu)
    except BaseException:
        unjoin(cluster)
        raise
    return cluster


def _add_wire(one: Node, two: Node) -> None:
    with NetNS(one.netns) as ns:
        ns.link("add", ifname=one.wire, kind="veth",
                peer={"ifname": two.wire, "net_ns_fd": two.netns})
    for node in (one, two):
        with NetNS(node.netns) as ns:
            idx = _index(ns, node.wire)
            ns.addr("add", index=idx, address=node.underlay, prefixlen=24)
            ns.link("set", index=idx, state="up")


def _add_vxlan(node: Node, mtu: int) -> None:
    """flannel's `ip link add flannel.1 type vxlan id 1 local <node ip> dev <uplink>
    dstport 4789 nolearning`; bound to the wire, so the kernel deletes it with the wire."""
    with NetNS(node.netns) as ns:
        ns.link("add", ifname=node.vxlan, kind="vxlan", vxlan_id=VNI,
                vxlan_link=_index(ns, node.wire), vxlan_local=node.underlay,
                vxlan_port=VXLAN_PORT, vxlan_learning=0, mtu=mtu)
        idx = _index(ns, node.vxlan)
        ns.addr("add", index=idx, address=node.overlay4, prefixlen=32)
        ns.addr("add", index=idx, address=node.overlay6, prefixlen=128)
        ns.link("set", index=idx, state="up")
        node.vxlan_mac = ns.get_links(idx)[0].get("IFLA_ADDRESS")


def _program_peer(node: Node, peer: Node, subnets: list[str]) -> None:
    """What flannel programs for a peer node: neighbours, FDB entry, routes."""
    with NetNS(node.netns) as ns:
        idx = _index(ns, node.vxlan)
        for overlay in (peer.overlay4, peer.overlay6):
            ns.neigh("add", ifindex=idx, dst=overlay, lladdr=peer.vxlan_mac,
                     state=ndmsg.states["permanent"])
        ns.fdb("append", ifindex=idx, lladdr=peer.vxlan_mac, dst=peer.underlay)
        for subnet in subnets:
            gateway = peer.overlay6 if ":" in subnet else peer.overlay4
            ns.route("add", dst=subnet, gateway=gateway, oif=idx, flags=RTNH_F_ONLINK,
                     family=socket.AF_INET6 if ":" in subnet else socket.AF_INET)


# --- teardown ------------------------------------------------------------------------

def _unjoin_side(node: Node, peer: int) -> None:
    """Undo one node's side; idempotent, skips whatever is gone, and a node that is joined
    to another testbed than `peer` (not this cluster's)."""
    state = _state(node.number)
    if not (NETNS_DIR / node.netns).exists() or (state is not None and state[0] != peer):
        return
    with NetNS(node.netns) as ns:
        for ifname in (node.vxlan, node.wire):  # routes, neighbours, FDB go with the vxlan
            if (idx := _index(ns, ifname)) is not None:
                with contextlib.suppress(NetlinkError):  # the peer's side took it already
                    ns.link("del", index=idx)
    if state is not None:  # forwarding exactly as before; the alias last (teardown's memory)
        for key, value in zip(FORWARDING, state[1], strict=True):
            write_sysctl(node.netns, key, value)
        _set_alias(node.number, "")


def _restore_mtus(node: Node) -> None:
    for key, mtu in node.mtus_before.items():
        netns_name, ifname = key.rsplit("/", 1)
        _set_mtu(netns_name, ifname, mtu)


def unjoin(cluster: Cluster) -> None:
    """Take the cluster apart, leaving both testbeds as they were before `join`. Idempotent;
    a testbed that is gone already is skipped."""
    for node in cluster.nodes:
        _restore_mtus(node)
    one, two = cluster.nodes
    _unjoin_side(one, two.number)
    _unjoin_side(two, one.number)


def find(k: int) -> Cluster | None:
    """The cluster testbed k is in, from the namespaces (None: not joined). When the peer
    testbed is gone, its Node is described from the names alone. MTUs before the join are
    taken to be TESTBED_MTU (the only one a testbed makes)."""
    state = _state(k)
    if state is None:
        return None
    peer, forwarding = state
    nodes = []
    for number, other, fwd in ((k, peer, forwarding), (peer, k, None)):
        node = _node(number, other)
        peer_state = _state(number) if fwd is None else state
        if peer_state is not None and peer_state[0] == other:
            node.forwarding_before = peer_state[1]
            with contextlib.suppress(TestbedError):
                bed = Testbed.find(number)
                node.mtus_before = {f"{n}/{i}": TESTBED_MTU for n, i in _mtu_devices(bed)}
            with NetNS(node.netns) as ns:
                if (idx := _index(ns, node.vxlan)) is not None:
                    node.vxlan_mac = ns.get_links(idx)[0].get("IFLA_ADDRESS")
                    node.routes = sorted(
                        f"{r.get('RTA_DST')}/{r['dst_len']}"
                        for family in (socket.AF_INET, socket.AF_INET6)
                        for r in ns.get_routes(family=family, oif=idx)
                        if r.get("RTA_GATEWAY"))
        nodes.append(node)
    return Cluster((nodes[0], nodes[1]))


def unjoin_number(k: int) -> bool:
    """Unjoin testbed k (and its peer, if it is still up and joined to k), from the
    namespaces alone; False if k was not joined. For `testbed down` and after a crash."""
    cluster = find(k)
    if cluster is None:
        return False
    unjoin(cluster)
    return True


@contextlib.contextmanager
def joined(a: Testbed, b: Testbed) -> Iterator[Cluster]:
    """`join` for the duration of a with-block; `unjoin` in any case."""
    cluster = join(a, b)
    try:
        yield cluster
    finally:
        unjoin(cluster)


def cluster_status() -> list[dict[str, Any]]:
    """Every cluster of joined testbeds on this machine (as `Cluster.status()`)."""
    out, seen = [], set()
    for k in existing_numbers():
        if k in seen or (cluster := find(k)) is None:
            continue
        seen |= {n.number for n in cluster.nodes}
        out.append(cluster.status())
    return out


# --- the node fast path on the lab's nodes -------------------------------------------------

def fastpath_add_vm(bed: Testbed, vm: Vm) -> None:
    """A testbed VM on its node's fast path, with its guest's MAC and addresses (what a
    cluster's agent reads from the VMI's status)."""
    from node_helper import fastpath

    guest = fastpath.read_facts(vm.guest_netns)
    fastpath.add(bed.node_netns, vm.host_veth, vm.launcher_netns, vm=True, mac=guest.mac,
                 addresses=list(guest.addresses))


def fastpath_node(bed: Testbed, peer: Testbed, cluster: Cluster) -> None:
    """What node `bed`'s agent would program: its pods and VMs (netns guests), the peer's
    pod CIDRs as the remote set and the device its routes take there (the VXLAN device) as
    the uplink; as that node's agent instance (as_node)."""
    from node_helper import fastpath

    with as_node(bed.number):
        for pod in bed.pods:
            fastpath.add(bed.node_netns, pod.host_veth, pod.netns)
        for vm in bed.vms:
            fastpath_add_vm(bed, vm)
        fastpath.add_uplink(bed.node_netns, cluster.node(bed.number).vxlan)
        fastpath.set_remote(pod_cidrs(peer))
