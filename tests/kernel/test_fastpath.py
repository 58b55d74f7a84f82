"""The node fast path on the real kernel (bpf/fastpath.c, node_helper/fastpath.py): pod<->pod,
VM<->pod and VM<->VM on one testbed node, UDP and TCP, IPv4 and IPv6; what must stay on the
CNI's path; the node's netfilter still judging every flow; restore."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS

from lab import cni, multinode
from lab.testbed import Testbed, run_in
from node_helper import fastpath

from .conftest import next_port
from .nodepath import counters, tcp_bulk, udp_echo, udp_pair

pytestmark = pytest.mark.kernel

@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    """pod0, pod1 on the fast path; pod2 not; vm0, vm1 (netns guests) on it."""
    with Testbed.create(pods=3, vms=2) as tb:
        cni.load(tb.node_netns)
        try:
            for pod in tb.pods[:2]:
                fastpath.add(tb.node_netns, pod.host_veth, pod.netns)
            for vm in tb.vms:
                multinode.fastpath_add_vm(tb, vm)
            yield tb
        finally:
            fastpath.cleanup(tb.node_netns)
    assert not fastpath.pin_dir().exists()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pod_to_pod_udp_and_tcp_take_the_fast_path(bed: Testbed, family: str) -> None:
    p0, p1 = bed.pods[:2]
    dst = p1.ipv4 if family == "ipv4" else p1.ipv6
    c0, c1 = counters(bed.node_netns, p0.host_veth), counters(bed.node_netns, p1.host_veth)
    seen0, bridged0 = cni.forwarded(bed.node_netns), cni.bridged(bed.node_netns)
    assert udp_echo(p0.netns, p1.netns, dst, 100) == 100
    tcp_bulk(p0.netns, p1.netns, dst)
    d0 = {k: v - c0[k] for k, v in counters(bed.node_netns, p0.host_veth).items()}
    d1 = {k: v - c1[k] for k, v in counters(bed.node_netns, p1.host_veth).items()}
    assert d0["fast_packets"] >= 100 and d1["fast_packets"] >= 100, (d0, d1)
    assert d0["fast_bytes"] >= 8 << 20, d0
    # Only each flow's first packets crossed the node (and its netfilter): one UDP flow and
    # one TCP connection, each direction judged once by the node's rules.
    crossed = cni.forwarded(bed.node_netns) - seen0
    assert crossed <= 12, crossed
    # The node's bridge saw the same first packets and nothing else: it forwarded and
    # learned from none of the rest (100 round trips and 8 MiB of TCP).
    bridged = cni.bridged(bed.node_netns) - bridged0
    assert bridged <= 12, bridged
    assert d0["ct_misses"] >= 2 and d1["ct_misses"] >= 1, (d0, d1)


def test_a_one_way_udp_stream_goes_fast_from_its_second_datagram(bed: Testbed) -> None:
    """No answers at all (a UDP stream): its first datagram is judged by the node's rules,
    the rest go straight to the pod, every one of them arrives."""
    p0, p1 = bed.pods[:2]
    port = next_port()
    with udp_pair(p0.netns, p1.netns, p1.ipv4, port, 2) as (srv, cl):
        c0 = counters(bed.node_netns, p0.host_veth)
        for i in range(200):
            cl.sendto(i.to_bytes(4, "big"), (p1.ipv4, port))
            if i % 50 == 49:
                time.sleep(0.01)  # no more than the receive buffer holds
        got = sorted(int.from_bytes(srv.recv(16), "big") for _ in range(200))
    d = {k: v - c0[k] for k, v in counters(bed.node_netns, p0.host_veth).items()}
    assert got == list(range(200))
    assert d["ct_misses"] == 1 and d["fast_packets"] == 199, d


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_vm_to_pod_and_vm_to_vm(bed: Testbed, family: str) -> None:
    vm0, vm1 = bed.vms
    p0 = bed.pods[0]
    ip = {"p0": p0.ipv4, "vm0": vm0.ipv4, "vm1": vm1.ipv4} if family == "ipv4" else \
        {"p0": p0.ipv6, "vm0": vm0.ipv6, "vm1": vm1.ipv6}
    before = {d: counters(bed.node_netns, d) for d in (vm0.host_veth, vm1.host_veth, p0.host_veth)}
    bridged0 = cni.bridged(bed.node_netns)
    assert udp_echo(vm0.guest_netns, p0.netns, ip["p0"], 60) == 60
    assert udp_echo(vm0.guest_netns, vm1.guest_netns, ip["vm1"], 60) == 60
    tcp_bulk(vm1.guest_netns, vm0.guest_netns, ip["vm0"], 2 << 20)
    after = {d: counters(bed.node_netns, d) for d in before}
    fast = {d: after[d]["fast_packets"] - before[d]["fast_packets"] for d in before}
    fast_bytes = {d: after[d]["fast_bytes"] - before[d]["fast_bytes"] for d in before}
    # each UDP flow's first datagram (and first answer) is judged by the node's rules
    assert fast[vm0.host_veth] >= 2 * 60 - 4, fast  # to the pod and to vm1
    assert fast[p0.host_veth] >= 60 - 2, fast  # the pod's answers to vm0
    assert fast_bytes[vm1.host_veth] >= 2 << 20, fast_bytes  # the TCP stream vm1 -> vm0
    # the node bridge: the flows' first packets only (3 flows, each way)
    assert cni.bridged(bed.node_netns) - bridged0 <= 16


def test_not_accelerated_peer_arp_and_nd_take_the_cni_path(bed: Testbed) -> None:
    """pod2 has no filter and no endpoint entry: pod0 <-> pod2 works through the bridge and
    never counts as fast; ARP and ND (flushed neighbours) resolve through the bridge."""
    p0, p2 = bed.pods[0], bed.pods[2]
    for ns in (p0.netns, bed.pods[1].netns):
        run_in(ns, ["ip", "neigh", "flush", "all"])
    c0, bridged0 = counters(bed.node_netns, p0.host_veth), cni.bridged(bed.node_netns)
    assert udp_echo(p0.netns, p2.netns, p2.ipv4, 20) == 20
    assert udp_echo(p0.netns, p2.netns, p2.ipv6, 20) == 20
    assert counters(bed.node_netns, p0.host_veth)["fast_packets"] == c0["fast_packets"]
    assert cni.bridged(bed.node_netns) - bridged0 >= 80  # every datagram, both ways
    # neighbours flushed: the next exchange to pod1 resolves again, then goes fast
    assert udp_echo(p0.netns, bed.pods[1].netns, bed.pods[1].ipv4, 10) == 10
    assert udp_echo(p0.netns, bed.pods[1].netns, bed.pods[1].ipv6, 10) == 10
    assert counters(bed.node_netns, p0.host_veth)["fast_packets"] > c0["fast_packets"]


def test_a_netfilter_drop_rule_still_drops(bed: Testbed) -> None:
    """The node's rules drop pod0 -> pod1 UDP to one port: with the fast path on, nothing of
    that flow gets through (its first packet is judged and dropped, so conntrack never sees
    an answer and the flow never takes the fast path); other flows still go fast."""
    p0, p1 = bed.pods[:2]
    port = next_port()
    cni.nft(bed.node_netns, f"add rule inet cni netpol ip saddr {p0.ipv4} ip daddr {p1.ipv4} "
              f"udp dport {port} drop\n")
    try:
        with udp_pair(p0.netns, p1.netns, p1.ipv4, port, 0.3) as (srv, cl):
            c0 = counters(bed.node_netns, p0.host_veth)
            for _ in range(20):
                cl.sendto(b"blocked", (p1.ipv4, port))
            with pytest.raises(TimeoutError):
                srv.recvfrom(100)
            d = {k: v - c0[k] for k, v in counters(bed.node_netns, p0.host_veth).items()}
        assert d["fast_packets"] == 0 and d["ct_misses"] == 20, d
        assert udp_echo(p0.netns, p1.netns, p1.ipv4, 10) == 10  # another port: allowed
    finally:
        cni.nft(bed.node_netns, "flush chain inet cni netpol\n")


def test_remove_and_add_under_traffic_keep_it_flowing(bed: Testbed) -> None:
    """A UDP stream pod1 -> pod0 runs while pod1 leaves and rejoins the fast path; no
    datagram is lost (the CNI's path takes over at once) and the qdisc we made goes with it."""
    p0, p1 = bed.pods[:2]
    port = next_port()
    got: list[int] = []
    stop = threading.Event()

    def receive(srv: socket.socket) -> None:
        while True:
            try:
                got.append(int.from_bytes(srv.recv(64), "big"))
            except TimeoutError:
                if stop.is_set():
                    return

    with udp_pair(p1.netns, p0.netns, p0.ipv4, port, 0.2) as (srv, cl):
        rx = threading.Thread(target=receive, args=(srv,))
        rx.start()
        sent = 0
        for step in range(3):
            for _ in range(200):
                cl.sendto(sent.to_bytes(8, "big"), (p0.ipv4, port))
                sent += 1
                time.sleep(0.0005)
            if step == 0:
                done = fastpath.remove(bed.node_netns, p1.host_veth)
                assert done["removed_filter"] and done["removed_qdisc"], done
                assert p1.ipv4 in done["removed_addresses"]
            elif step == 1:
                fastpath.add(bed.node_netns, p1.host_veth, p1.netns)
        stop.set()
        rx.join(5)
    assert sorted(got) == list(range(sent)), f"lost {sent - len(set(got))} of {sent}"
    assert fastpath.endpoint_status(bed.node_netns, p1.host_veth)["on"]


def test_cleanup_restores_the_cni_path_exactly(bed: Testbed) -> None:
    """A separate testbed: after cleanup no filter, no qdisc we made, no pin; traffic flows."""
    with Testbed.create(pods=2) as tb:
        with NetNS(tb.node_netns) as ns:
            before = {p.host_veth: ns.get_qdiscs(index=ns.link_lookup(ifname=p.host_veth)[0])
                      for p in tb.pods}
            before = {k: sorted(q.get_attr("TCA_KIND") for q in v) for k, v in before.items()}
        for p in tb.pods:
            fastpath.add(tb.node_netns, p.host_veth, p.netns)
        assert len(fastpath.status(tb.node_netns)["endpoints"]) == 2
        fastpath.cleanup(tb.node_netns)
        assert fastpath.status(tb.node_netns)["endpoints"] == []
        with NetNS(tb.node_netns) as ns:
            after = {p.host_veth: sorted(q.get_attr("TCA_KIND") for q in ns.get_qdiscs(
                index=ns.link_lookup(ifname=p.host_veth)[0])) for p in tb.pods}
        assert after == before
        assert udp_echo(tb.pods[0].netns, tb.pods[1].netns, tb.pods[1].ipv4, 5) == 5
    # the module's endpoints are still there: the pins stay until the last endpoint goes
    assert Path(fastpath.pin_dir()).exists()
