"""The node fast path across two nodes (lab/multinode.py: two testbeds joined by a wire, with
flannel-style VXLAN): pod <-> pod and VM <-> pod, UDP and TCP, IPv4 and IPv6. Each node runs
its own agent instance (multinode.as_node), as in a cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab import cni, multinode
from lab.testbed import Testbed, run_in
from node_helper import fastpath

from .nodepath import counters, tcp_bulk, udp_echo, udp_pair

pytestmark = pytest.mark.kernel


@dataclass
class TwoNodes:
    a: Testbed
    b: Testbed
    cluster: multinode.Cluster

    def node(self, bed: Testbed) -> multinode.Node:
        return self.cluster.node(bed.number)


@pytest.fixture(scope="module")
def two() -> Iterator[TwoNodes]:
    with Testbed.create(pods=2, vms=1) as a, Testbed.create(pods=2) as b, \
            multinode.joined(a, b) as cluster:
        for vm in a.vms:  # the testbed gives a netns guest no default route
            run_in(vm.guest_netns, ["ip", "route", "add", "default", "via",
                                    a.ipv4_cidr.replace(".0/24", ".1")])
        nodes = TwoNodes(a, b, cluster)
        try:
            for bed, peer in ((a, b), (b, a)):
                cni.load(bed.node_netns)
                multinode.fastpath_node(bed, peer, cluster)
            yield nodes
        finally:
            for bed in (a, b):
                with multinode.as_node(bed.number):
                    fastpath.cleanup(bed.node_netns)
                    assert not fastpath.pin_dir().exists()


def _status(bed: Testbed, device: str) -> dict[str, int]:
    with multinode.as_node(bed.number):
        return counters(bed.node_netns, device)


def _forwarded(netns: str) -> int:
    """IpForwDatagrams of a node: what its IP stack routed."""
    lines = [ln.split() for ln in run_in(netns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pod_to_pod_across_the_wire(two: TwoNodes, family: str) -> None:
    """Sent from a pod's veth straight to the VXLAN device (the sending node routes nothing),
    taken from the VXLAN device straight into the pod (the receiving node neither)."""
    src, dst = two.a.pods[0], two.b.pods[1]
    ip = dst.ipv4 if family == "ipv4" else dst.ipv6
    vx_a, vx_b = two.node(two.a).vxlan, two.node(two.b).vxlan
    before = {"src": _status(two.a, src.host_veth), "dst": _status(two.b, dst.host_veth),
              "vx_a": _status(two.a, vx_a), "vx_b": _status(two.b, vx_b)}
    fwd = {n: _forwarded(n) for n in (two.a.node_netns, two.b.node_netns)}
    judged = {n: cni.forwarded(n) for n in fwd}
    assert udp_echo(src.netns, dst.netns, ip, 100) == 100
    tcp_bulk(src.netns, dst.netns, ip, 4 << 20)
    after = {"src": _status(two.a, src.host_veth), "dst": _status(two.b, dst.host_veth),
             "vx_a": _status(two.a, vx_a), "vx_b": _status(two.b, vx_b)}
    d = {k: {c: after[k][c] - before[k][c] for c in after[k]} for k in after}
    assert d["src"]["remote_packets"] >= 100 and d["src"]["remote_bytes"] >= 4 << 20, d
    assert d["dst"]["remote_packets"] >= 90, d  # the answers, back across
    assert d["vx_b"]["fast_packets"] >= 100, d  # arrivals for pod1 of node b
    assert d["vx_a"]["fast_packets"] >= 90, d   # the answers arriving on node a
    for n in fwd:  # each flow's first packets only, both nodes
        assert _forwarded(n) - fwd[n] <= 12, (n, _forwarded(n) - fwd[n])
        assert cni.forwarded(n) - judged[n] <= 12, n


def test_vm_to_remote_pod(two: TwoNodes) -> None:
    vm, dst = two.a.vms[0], two.b.pods[0]
    before = _status(two.a, vm.host_veth)
    assert udp_echo(vm.guest_netns, dst.netns, dst.ipv4, 60) == 60
    tcp_bulk(vm.guest_netns, dst.netns, dst.ipv4, 2 << 20)
    after = _status(two.a, vm.host_veth)
    assert after["remote_packets"] - before["remote_packets"] >= 60
    assert after["remote_bytes"] - before["remote_bytes"] >= 2 << 20


def test_a_drop_rule_on_the_receiving_node_still_drops(two: TwoNodes) -> None:
    """Node b's rules drop a.pod0 -> b.pod0 UDP to one port: node a's rules accept the flow, so
    it leaves node a on the fast path, but node b judges every datagram on its kernel path
    (none is ever confirmed there) and drops it; other flows still go fast."""
    src, dst = two.a.pods[0], two.b.pods[0]
    vx_b = two.node(two.b).vxlan
    cni.nft(two.b.node_netns, f"add rule inet cni netpol ip saddr {src.ipv4} "
                              f"ip daddr {dst.ipv4} udp dport 9 drop\n")
    try:
        with udp_pair(src.netns, dst.netns, dst.ipv4, 9, 0.3) as (srv, cl):
            before_a, before_b = _status(two.a, src.host_veth), _status(two.b, vx_b)
            for _ in range(20):
                cl.sendto(b"blocked", (dst.ipv4, 9))
            with pytest.raises(TimeoutError):
                srv.recvfrom(100)
            after_a, after_b = _status(two.a, src.host_veth), _status(two.b, vx_b)
        assert after_a["remote_packets"] - before_a["remote_packets"] == 19  # a accepted it
        assert after_b["fast_packets"] == before_b["fast_packets"], (before_b, after_b)
        assert after_b["ct_misses"] - before_b["ct_misses"] == 20  # each judged there, dropped
        assert udp_echo(src.netns, dst.netns, dst.ipv4, 10) == 10
    finally:
        cni.nft(two.b.node_netns, "flush chain inet cni netpol\n")


def test_cleanup_of_one_node_keeps_traffic_flowing(two: TwoNodes) -> None:
    """Node a's agent takes everything off (as on uninstall) while node b keeps its fast path:
    traffic both ways still arrives intact, node a's devices carry none of our filters."""
    src, dst = two.a.pods[1], two.b.pods[1]
    with multinode.as_node(two.a.number):
        fastpath.cleanup(two.a.node_netns)
        assert fastpath.status(two.a.node_netns)["endpoints"] == []
        assert not fastpath.pin_dir().exists()
    try:
        assert udp_echo(src.netns, dst.netns, dst.ipv4, 30) == 30
        tcp_bulk(dst.netns, src.netns, src.ipv4, 1 << 20)
    finally:
        with contextlib.suppress(Exception):
            multinode.fastpath_node(two.a, two.b, two.cluster)
