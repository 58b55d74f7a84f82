"""Two testbeds joined as a two-node cluster (lab/multinode.py) on the real kernel: pod to pod
across the VXLAN (TCP and UDP, IPv4 and IPv6), the underlay's UDP 4789, MTU, teardown."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS, netns
from pyroute2.netlink.rtnl import ndmsg

from lab import multinode
from lab.testbed import Testbed, TestbedError, link_stats
from node_helper.kernel import in_netns

pytestmark = pytest.mark.kernel
LAB = [sys.executable, "-m", "lab.cli"]
ETH_P_ALL = 0x0003


@pytest.fixture
def beds() -> Iterator[tuple[Testbed, Testbed]]:
    a = b = None
    try:
        a = Testbed.create(pods=2, vms=1)
        b = Testbed.create(pods=2)
        yield a, b
    finally:
        for bed in (a, b):
            if bed is not None:
                multinode.unjoin_number(bed.number)
                bed.destroy()


@pytest.fixture
def cluster(beds: tuple[Testbed, Testbed]) -> Iterator[multinode.Cluster]:
    with multinode.joined(*beds) as c:
        yield c


def _ours(number: int) -> list[str]:
    return sorted(n for n in netns.listnetns() if n.startswith(f"na{number}-"))


def snapshot(bed: Testbed) -> dict[str, Any]:
    """Everything join could change in a testbed's namespaces: links (kind, MTU, master,
    alias, MAC), addresses, routes of all tables, permanent neighbours and FDB entries, and
    forwarding."""
    out: dict[str, Any] = {}
    for name in _ours(bed.number):
        with NetNS(name) as ns:
            names = {link["index"]: link.get("ifname") for link in ns.get_links()}
            links = sorted(
                (link.get("ifname"), link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")),
                 link.get("IFLA_MTU"), names.get(link.get("IFLA_MASTER")),
                 link.get("ifalias"), link.get("IFLA_ADDRESS"))
                for link in ns.get_links())
            addrs = sorted((names[a["index"]], a.get("IFA_ADDRESS"), a["prefixlen"])
                           for a in ns.get_addr())
            routes = sorted(
                (r["family"], r.get("RTA_TABLE"), r.get("RTA_DST"), r["dst_len"],
                 r.get("RTA_GATEWAY"), names.get(r.get("RTA_OIF")))
                for family in (socket.AF_INET, socket.AF_INET6)
                for r in ns.get_routes(family=family, table=0))
            neigh = sorted(
                (names.get(n["ifindex"]), n.get("NDA_DST"), n.get("NDA_LLADDR"))
                for n in ns.get_neighbours()
                if n["state"] & ndmsg.states["permanent"])
            fdb = sorted((names.get(n["ifindex"]), n.get("NDA_LLADDR"), n.get("NDA_DST"))
                         for n in ns.fdb("dump")
                         if n["state"] & ndmsg.states["permanent"])  # not what was learned
        forwarding = [multinode._read_sysctl(name, key) for key in multinode.FORWARDING]
        out[name] = {"links": links, "addrs": addrs, "routes": routes, "neigh": neigh,
                     "fdb": fdb, "forwarding": forwarding}
    return out


def _links(netns_name: str) -> dict[str, Any]:
    with NetNS(netns_name) as ns:
        return {link.get("ifname"): link for link in ns.get_links()}


def _ip_frag_creates(netns_name: str) -> int:
    with in_netns(netns_name):
        lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
    head, values = (line.split() for line in lines if line.startswith("Ip:"))
    return int(values[head.index("FragCreates")])


class Sniffer:
    """AF_PACKET capture on one link inside a namespace we made (both directions)."""

    def __init__(self, netns_name: str, ifname: str) -> None:
        with in_netns(netns_name):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []

    def drain(self) -> list[bytes]:
        with contextlib.suppress(TimeoutError):
            while True:
                self.frames.append(self.sock.recv(65535))
        self.sock.close()
        return self.frames


def vxlan_frames(frames: list[bytes]) -> list[tuple[str, str, int, bytes]]:
    """(outer src, outer dst, VNI, inner Ethernet frame) of the IPv4/UDP 4789 frames."""
    found = []
    for f in frames:
        if len(f) < 50 or f[12:14] != b"\x08\x00" or f[23] != socket.IPPROTO_UDP:
            continue
        ihl = (f[14] & 0x0F) * 4
        udp = 14 + ihl
        if struct.unpack("!H", f[udp + 2:udp + 4])[0] != multinode.VXLAN_PORT:
            continue
        vni = int.from_bytes(f[udp + 12:udp + 15], "big")
        found.append((socket.inet_ntoa(f[26:30]), socket.inet_ntoa(f[30:34]), vni,
                      f[udp + 16:]))
    return found


def _exchange(kind: int, family: int, client_ns: str, server_ns: str, address: str,
              payload: bytes) -> None:
    """TCP or UDP: the client (in its netns) sends payload, the server echoes it back."""
    with in_netns(server_ns):
        server = socket.socket(family, kind)
    with in_netns(client_ns):
        client = socket.socket(family, kind)
    with server, client:
        server.bind((address, 0))
        server.settimeout(10)
        client.settimeout(10)
        port = server.getsockname()[1]
        if kind == socket.SOCK_DGRAM:
            client.sendto(payload, (address, port))
            data, peer = server.recvfrom(65535)
            server.sendto(data, peer)
            assert client.recv(65535) == payload
            return
        server.listen()
        client.connect((address, port))
        conn, _ = server.accept()
        with conn:
            def echo() -> None:
                got = b""
                while len(got) < len(payload):
                    got += conn.recv(1 << 16)
                conn.sendall(got)

            t = threading.Thread(target=echo)
            t.start()
            client.sendall(payload)
            back = b""
            while len(back) < len(payload):
                chunk = client.recv(1 << 16)
                assert chunk, "connection closed early"
                back += chunk
            t.join(10)
        assert back == payload


def test_shape(beds: tuple[Testbed, Testbed], cluster: multinode.Cluster) -> None:
    a, b = beds
    one, two = cluster.nodes
    assert (one.number, two.number) == (a.number, b.number)
    for node, peer, peer_bed in ((one, two, b), (two, one, a)):
        links = _links(node.netns)
        wire, vx = links[node.wire], links[node.vxlan]
        assert wire.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "veth"
        assert vx.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "vxlan"
        info = vx.get(("IFLA_LINKINFO", "IFLA_INFO_DATA"))
        assert info.get("IFLA_VXLAN_ID") == multinode.VNI
        assert info.get("IFLA_VXLAN_PORT") == multinode.VXLAN_PORT
        assert info.get("IFLA_VXLAN_LOCAL") == node.underlay
        assert info.get("IFLA_VXLAN_LINK") == wire["index"]
        assert info.get("IFLA_VXLAN_LEARNING") == 0
        assert vx.get("IFLA_MTU") == wire.get("IFLA_MTU") - 50 == cluster.mtu == 1450
        assert vx.get("IFLA_ADDRESS") == node.vxlan_mac
        with NetNS(node.netns) as ns:
            neigh = {(n.get("NDA_DST"), n.get("NDA_LLADDR")) for n in ns.get_neighbours(
                ifindex=vx["index"]) if n["state"] & ndmsg.states["permanent"]}
            assert neigh == {(peer.overlay4, peer.vxlan_mac), (peer.overlay6, peer.vxlan_mac)}
            fdb = {(n.get("NDA_LLADDR"), n.get("NDA_DST")) for n in ns.fdb("dump")
                   if n["ifindex"] == vx["index"] and n.get("NDA_DST")}
            assert fdb == {(peer.vxlan_mac, peer.underlay)}
            routes = {(r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"))
                      for family in (socket.AF_INET, socket.AF_INET6)
                      for r in ns.get_routes(family=family, oif=vx["index"])
                      if r.get("RTA_GATEWAY")}
        assert routes == {(f"10.251.{peer.number}.0", 24, peer.overlay4),
                          (f"fd00:6e61:{peer.number:x}::", 64, peer.overlay6)}
        assert node.routes == [peer_bed.ipv4_cidr, peer_bed.ipv6_cidr]
        assert [multinode._read_sysctl(node.netns, k) for k in multinode.FORWARDING] == \
            ["1", "1"]
    for pod in a.pods + b.pods:  # flannel's CNI config: pods get the vxlan MTU
        assert _links(pod.netns)["eth0"].get("IFLA_MTU") == 1450
    assert _links(a.vms[0].guest_netns)["eth0"].get("IFLA_MTU") == 1450
    assert _links(a.node_netns)["br0"].get("IFLA_MTU") == 1450  # follows its ports
    found = multinode.find(b.number)
    assert found is not None and found.nodes[1].number == a.number
    assert found.nodes[0].vxlan_mac == two.vxlan_mac and found.nodes[0].routes == \
        sorted(two.routes)
    assert [c["nodes"][0]["number"] for c in multinode.cluster_status()
            if {n["number"] for n in c["nodes"]} == {a.number, b.number}]
    with pytest.raises(TestbedError, match="joined to testbed"):
        multinode.join(a, b)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_pods_on_two_nodes_talk_over_vxlan(beds: tuple[Testbed, Testbed],
                                           cluster: multinode.Cluster, family: int,
                                           kind: int) -> None:
    a, b = beds
    one, two = cluster.nodes
    server = b.pods[1]
    address = server.ipv4 if family == socket.AF_INET else server.ipv6
    before = [link_stats(n.netns, n.vxlan) for n in cluster.nodes]
    sniffer = Sniffer(two.netns, two.wire)
    try:
        _exchange(kind, family, a.pods[0].netns, server.netns, address,
                  b"netaccel-multinode " * 50)
    finally:
        frames = vxlan_frames(sniffer.drain())
    after = [link_stats(n.netns, n.vxlan) for n in cluster.nodes]
    for b4, af in zip(before, after, strict=True):
        assert af["tx_packets"] > b4["tx_packets"] and af["rx_packets"] > b4["rx_packets"]
    # the underlay carries UDP 4789 between the underlay addresses, both ways, with the
    # pods' packets inside (the payload marker)
    directions = {(src, dst) for src, dst, vni, _ in frames if vni == multinode.VNI}
    assert directions == {(one.underlay, two.underlay), (two.underlay, one.underlay)}
    assert any(b"netaccel-multinode" in inner for *_, inner in frames)


def test_vm_guest_reaches_a_pod_on_the_other_node(beds: tuple[Testbed, Testbed],
                                                  cluster: multinode.Cluster) -> None:
    a, b = beds
    with NetNS(a.vms[0].guest_netns) as ns:  # a netns guest has no default route (QEMU
        ns.route("add", dst="default", gateway=f"10.251.{a.number}.1")  # guests: by DHCP)
    _exchange(socket.SOCK_STREAM, socket.AF_INET, a.vms[0].guest_netns, b.pods[0].netns,
              b.pods[0].ipv4, b"vm" * 1000)


def test_bulk_tcp_is_not_fragmented_on_the_underlay(beds: tuple[Testbed, Testbed],
                                                    cluster: multinode.Cluster) -> None:
    """Pods at the vxlan MTU: full-size segments fit the tunnel, nothing is fragmented."""
    a, b = beds
    before = [_ip_frag_creates(n.netns) for n in cluster.nodes]
    _exchange(socket.SOCK_STREAM, socket.AF_INET, a.pods[0].netns, b.pods[0].netns,
              b.pods[0].ipv4, bytes(range(256)) * 4096)  # 1 MiB each way
    assert [_ip_frag_creates(n.netns) for n in cluster.nodes] == before


def test_unjoin_leaves_both_testbeds_exactly_as_before(beds: tuple[Testbed, Testbed]) -> None:
    a, b = beds
    before = [snapshot(a), snapshot(b)]
    cluster = multinode.join(a, b)
    assert [snapshot(a), snapshot(b)] != before
    multinode.unjoin(cluster)
    assert [snapshot(a), snapshot(b)] == before
    multinode.unjoin(cluster)  # idempotent
    assert multinode.unjoin_number(a.number) is False
    assert [snapshot(a), snapshot(b)] == before
    assert multinode.find(a.number) is None and multinode.find(b.number) is None


def test_failed_join_leaves_nothing(beds: tuple[Testbed, Testbed],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = beds
    before = [snapshot(a), snapshot(b)]

    def boom(*args: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(multinode, "_program_peer", boom)
    with pytest.raises(RuntimeError, match="injected"):
        multinode.join(a, b)
    assert [snapshot(a), snapshot(b)] == before
    with pytest.raises(RuntimeError, match="injected"), multinode.joined(a, b):
        pass
    assert [snapshot(a), snapshot(b)] == before


def test_destroying_one_side_leaves_no_dangling_devices(beds: tuple[Testbed, Testbed]) -> None:
    """Testbed.destroy() alone: the kernel deletes the wire's peer and the vxlan device bound
    to it; unjoin_number on the survivor restores its MTUs, forwarding and br0 alias."""
    a, b = beds
    before_b = snapshot(b)
    cluster = multinode.join(a, b)
    a.destroy()
    deadline = time.monotonic() + 10  # the kernel cleans a removed netns up asynchronously
    while cluster.node(b.number).wire in _links(b.node_netns) and time.monotonic() < deadline:
        time.sleep(0.05)
    links = _links(b.node_netns)
    assert cluster.node(b.number).wire not in links
    assert cluster.node(b.number).vxlan not in links
    assert multinode.unjoin_number(b.number) is True
    assert snapshot(b) == before_b


def test_cli_up_two_nodes_then_down_one_by_one() -> None:
    up = subprocess.run(LAB + ["testbed", "up", "--nodes", "2", "--pods", "1"],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    data = json.loads(up.stdout)
    k1, k2 = (bed["number"] for bed in data["testbeds"])
    try:
        assert [n["number"] for n in data["cluster"]["nodes"]] == [k1, k2]
        status = subprocess.run(LAB + ["testbed", "status", "--json", "--number", str(k2)],
                                capture_output=True, text=True, check=True)
        assert json.loads(status.stdout)["cluster"]["nodes"][1]["number"] == k1
        down = subprocess.run(LAB + ["testbed", "down", "--number", str(k1)],
                              capture_output=True, text=True)
        assert down.returncode == 0, down.stderr
        assert _ours(k1) == []
        links = _links(f"na{k2}-node")
        assert not [n for n in links if n.startswith(("vx", "wire"))]
        assert links["br0"].get("ifalias") is None
        assert links["br0"].get("IFLA_MTU") == 1500 and links["pod0"].get("IFLA_MTU") == 1500
        assert _links(f"na{k2}-pod0")["eth0"].get("IFLA_MTU") == 1500
        assert [multinode._read_sysctl(f"na{k2}-node", k) for k in multinode.FORWARDING] == \
            ["0", "0"]
        text = subprocess.run(LAB + ["testbed", "status", "--number", str(k2)],
                              capture_output=True, text=True, check=True)
        assert "joined" not in text.stdout
    finally:
        for k in (k1, k2):
            subprocess.run(LAB + ["testbed", "down", "--number", str(k)], capture_output=True)
    assert _ours(k1) == _ours(k2) == []


def test_cli_join_unjoin() -> None:
    with Testbed.create(pods=1) as a, Testbed.create(pods=1) as b:
        before = [snapshot(a), snapshot(b)]
        join = subprocess.run(LAB + ["testbed", "join", "--number", str(a.number), "--peer",
                                     str(b.number)], capture_output=True, text=True)
        assert join.returncode == 0, join.stderr
        assert multinode.find(a.number) is not None
        unjoin = subprocess.run(LAB + ["testbed", "unjoin", "--number", str(b.number)],
                                capture_output=True, text=True)
        assert unjoin.returncode == 0, unjoin.stderr
        assert [snapshot(a), snapshot(b)] == before
