"""The VM datapath (node_helper/vm/) on the real kernel, with the testbed's VMs.

How "the bridge forwards nothing" is measured: a Linux bridge learns the source MAC of
every frame it receives on a port (br_fdb_update), whether it forwards, floods or delivers
it locally, and the bridge's own netdev counters do not count forwarded frames at all. So
after the datapath is on we flush the bridge's learned (dynamic) FDB entries, run traffic,
and check that k6t-eth0 learned neither the guest's nor the pod's MAC: with the redirect in
place no frame of the flow entered the bridge. With the datapath off, both MACs are learned
again, i.e. the bridge carries the flow.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from lab.testbed import Testbed, is_tap, link_stats
from node_helper import vm as vm_api
from node_helper.kernel import NETNS_DIR, in_netns
from node_helper.vm import VmDatapathError, VmShapeError
from node_helper.vm import api as vm_impl

# The lab's tap classifier (its netns guests sit behind a veth stand-in for the tap).
accelerate = functools.partial(vm_api.accelerate, is_tap=is_tap)
restore = functools.partial(vm_api.restore, is_tap=is_tap)
status = functools.partial(vm_api.status, is_tap=is_tap)
find_devices = functools.partial(vm_api.find_devices, is_tap=is_tap)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

DATAPATHS = ("mirror", "bpf")
BRIDGE_IP = "169.254.75.10"  # where the testbed (like virt-launcher) puts the DHCP server
NUD_PERMANENT, NUD_NOARP = 0x80, 0x40
NTF_MASTER = 0x04


@contextlib.contextmanager
def restored(tb: Testbed) -> Iterator[Testbed]:
    """The testbed; afterwards (even on failure) every VM restored, so nothing stays pinned."""
    try:
        yield tb
    finally:
        for vm in tb.vms:
            with contextlib.suppress(Exception):
                restore(vm.launcher_netns)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    with Testbed.create(pods=1, vms=1) as tb, restored(tb):
        yield tb


# --- snapshots ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A netlink message as plain data, without counters, timestamps and headers."""
    if hasattr(value, "get") and "attrs" in value:
        out = {k: _plain(v) for k, v in value.items()
               if k not in ("attrs", "header", "event", "value")}
        for name, attr in value["attrs"]:
            if "STATS" in name or name in ("TCA_MIRRED_TM", "UNKNOWN", "TCA_U32_PCNT"):
                continue
            out.setdefault(name, []).append(_plain(attr))
        return out
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("header",)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def snapshot(netns: str) -> dict[str, Any]:
    """Every link's qdiscs, tc filters (both hooks) and ethtool features, plus our cookies."""
    snap: dict[str, Any] = {}
    with NetNS(netns) as ns:
        links = {lk["index"]: lk.get_attr("IFLA_IFNAME") for lk in ns.get_links()}
        for index, name in sorted(links.items()):
            qdiscs = [_plain(q) for q in ns.get_qdiscs(index=index) if q["index"] == index]
            filters = []
            for parent in (0xFFFFFFF2, 0xFFFFFFF3):
                with contextlib.suppress(NetlinkError):
                    filters += [_plain(f) for f in ns.get_filters(index=index, parent=parent)]
            snap[name] = {"qdiscs": qdiscs, "filters": filters}
    with in_netns(netns):
        from pyroute2.ethtool import Ethtool

        et = Ethtool()
        try:
            for name in snap:
                if name == "lo":
                    continue
                feats = et.get_features(name).features
                snap[name]["features"] = {k: (f.enable, f.available) for k, f in feats.items()}
        finally:
            et.close()
    with contextlib.suppress(VmShapeError):  # cookies/names: not decoded by pyroute2 itself
        snap["netaccel"] = [
            (f["device"], f["role"], f["cookie"], f["redirect_to"])
            for f in status(netns)["filters"]
        ]
    return snap


# --- traffic -------------------------------------------------------------------------------


@contextlib.contextmanager
def udp_echo(netns: str, addr: str, port: int) -> Iterator[None]:
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                data, peer = sock.recvfrom(65535)
                sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sock.close()


def udp_roundtrips(netns: str, dst: tuple[str, int], count: int = 50) -> int:
    """Send `count` datagrams and return how many came back."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1)
    got = 0
    try:
        for i in range(count):
            payload = f"ping {i}".encode() * 20
            sock.sendto(payload, dst)
            with contextlib.suppress(TimeoutError):
                if sock.recv(65535) == payload:
                    got += 1
    finally:
        sock.close()
    return got


def tcp_echo_roundtrip(client_ns: str, server_ns: str, addr: str, port: int,
                       size: int = 1 << 20) -> None:
    """Send `size` bytes over TCP from client_ns to an echo server in server_ns and back."""
    with in_netns(server_ns):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(1)
    ls.settimeout(10)

    def serve() -> None:
        conn, _ = ls.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with in_netns(client_ns):
        cl = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        cl.settimeout(10)
        cl.connect((addr, port))
        payload = bytes(range(256)) * (size // 256)
        sender = threading.Thread(target=cl.sendall, args=(payload,), daemon=True)
        sender.start()
        received = bytearray()
        while len(received) < len(payload):
            chunk = cl.recv(65536)
            assert chunk, "connection closed early"
            received += chunk
        sender.join()
        assert bytes(received) == payload
    finally:
        cl.close()
        thread.join(timeout=10)
        ls.close()


def mac_of(netns: str, ifname: str) -> str:
    with NetNS(netns) as ns:
        return ns.get_links(ns.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS")


def learned_macs(netns: str, bridge: str = "k6t-eth0") -> set[str]:
    """MACs the bridge learned on its ports (dynamic FDB entries)."""
    with NetNS(netns) as ns:
        br = ns.link_lookup(ifname=bridge)[0]
        ports = {lk["index"] for lk in ns.get_links() if lk.get_attr("IFLA_MASTER") == br}
        return {
            e.get_attr("NDA_LLADDR") for e in ns.fdb("dump")
            if e["ifindex"] in ports and not e["state"] & (NUD_PERMANENT | NUD_NOARP)
        }


def flush_learned(netns: str, bridge: str = "k6t-eth0") -> None:
    with NetNS(netns) as ns:
        br = ns.link_lookup(ifname=bridge)[0]
        ports = {lk["index"] for lk in ns.get_links() if lk.get_attr("IFLA_MASTER") == br}
        for e in ns.fdb("dump"):
            if e["ifindex"] in ports and not e["state"] & (NUD_PERMANENT | NUD_NOARP):
                with contextlib.suppress(NetlinkError):  # ENOENT: aged out meanwhile
                    ns.fdb("del", ifindex=e["ifindex"], lladdr=e.get_attr("NDA_LLADDR"),
                           flags=NTF_MASTER)


# --- tests ---------------------------------------------------------------------------------


def test_find_devices(bed: Testbed) -> None:
    devs = find_devices(bed.vms[0].launcher_netns)
    assert (devs.bridge.name, devs.tap.name, devs.veth.name) == ("k6t-eth0", "tap0", "eth0-nic")
    assert devs.tap.kind == "veth" and devs.bridge.kind == "bridge"
    assert devs.tap.index != devs.veth.index


@pytest.mark.parametrize(("interface", "bridge"), [
    ("eth0", "k6t-eth0"), ("pod1a2b3c4d5e6", "k6t-1a2b3c4d5e6"), ("net1", "k6t-net1"),
])
def test_bridge_names(interface: str, bridge: str) -> None:
    assert vm_api.bridge_name(interface) == bridge


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_flow_bypasses_bridge_then_bridge_again(bed: Testbed, datapath: str) -> None:
    vm, pod = bed.vms[0], bed.pods[0]
    ns = vm.launcher_netns
    macs = {mac_of(vm.guest_netns, "eth0"), mac_of(pod.netns, "eth0")}
    with udp_echo(pod.netns, pod.ipv4, 7001):
        assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7001), 5) == 5  # warm ARP

        st = accelerate(ns, datapath=datapath, checksum="off")
        assert st["datapath"] == datapath
        flush_learned(ns)
        assert learned_macs(ns) == set()  # with the datapath on, nothing re-learns them
        before = status(ns)["directions"]
        assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7001), 50) == 50
        tcp_echo_roundtrip(vm.guest_netns, pod.netns, pod.ipv4, 7002)
        after = status(ns)["directions"]
        for direction in ("tap_to_veth", "veth_to_tap"):
            assert after[direction]["packets"] - before[direction]["packets"] >= 50, direction
        assert learned_macs(ns) & macs == set(), "the bridge saw frames of the flow"

        restore(ns)
        assert status(ns)["datapath"] is None
        flush_learned(ns)
        assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7001), 20) == 20
        tcp_echo_roundtrip(vm.guest_netns, pod.netns, pod.ipv4, 7003, size=1 << 16)
        assert macs <= learned_macs(ns), "the bridge did not carry the flow after restore"


def test_bpf_guest_to_pod_skips_the_veth_transmit(bed: Testbed) -> None:
    """bpf, tap -> veth: bpf_redirect_peer puts the guest's frames straight into the ingress
    of eth0-nic's peer on the node (vm0), so vm0's rx counters rise by the flow while
    eth0-nic's tx counters (veth_xmit) stay flat. With an egress redirect (the mirror
    datapath) the same flow is counted by both."""
    vm, pod = bed.vms[0], bed.pods[0]
    ns, count = vm.launcher_netns, 200

    def deltas(datapath: str) -> tuple[int, int]:
        st = accelerate(ns, datapath=datapath)
        assert st["state"]["tap0"]["redirect_peer"] is (datapath == "bpf")
        assert st["state"]["eth0-nic"]["redirect_peer"] is False  # veth -> tap: egress
        nic, node = link_stats(ns, vm.veth), link_stats(bed.node_netns, vm.host_veth)
        assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7001), count) == count
        after = status(ns)["directions"]["tap_to_veth"]["packets"]
        assert after >= count  # the program still counts what it redirects
        nic2, node2 = link_stats(ns, vm.veth), link_stats(bed.node_netns, vm.host_veth)
        restore(ns)
        return nic2["tx_packets"] - nic["tx_packets"], node2["rx_packets"] - node["rx_packets"]

    with udp_echo(pod.netns, pod.ipv4, 7001):
        assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7001), 5) == 5  # warm ARP
        nic_tx, node_rx = deltas("bpf")
        assert node_rx >= count
        assert nic_tx < count // 10, f"eth0-nic transmitted {nic_tx} frames of the flow"
        nic_tx, node_rx = deltas("mirror")
        assert node_rx >= count and nic_tx >= count


def test_bpf_redirect_peer_needs_a_peer_in_another_netns(bed: Testbed) -> None:
    """With eth0-nic's peer in the launcher netns itself (the kernel would drop a peer
    redirect), accelerate falls back to bpf_redirect to the egress; a re-apply follows."""
    vm = bed.vms[0]
    ns = vm.launcher_netns
    assert accelerate(ns, datapath="bpf")["state"]["tap0"]["redirect_peer"] is True
    with NetNS(bed.node_netns) as node:
        node.link("set", index=node.link_lookup(ifname=vm.host_veth)[0], net_ns_fd=ns)
    with NetNS(ns) as lns:
        assert vm_api.redirect_peer_possible(lns, find_devices(ns).veth) is False
    st = accelerate(ns, datapath="bpf")
    assert st["datapath"] == "bpf" and st["state"]["tap0"]["redirect_peer"] is False
    assert st["launcher_current"] is True
    progs = [f["prog_id"] for f in st["filters"]]
    again = accelerate(ns, datapath="bpf")  # idempotent in the fallback too
    assert [f["prog_id"] for f in again["filters"]] == progs
    restore(ns)
    assert status(ns)["datapath"] is None


def _bridge_listener(ns: str, addr: str, port: int) -> socket.socket:
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"k6t-eth0")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.settimeout(1)
    return sock


def _received(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(2048)
    except TimeoutError:
        return None


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_dhcp_reaches_the_bridge(bed: Testbed, datapath: str) -> None:
    vm = bed.vms[0]
    ns, guest = vm.launcher_netns, vm.guest_netns
    # The guest's test datagrams carry the VM's IP, which the launcher also holds (on the
    # placeholder eth0): the testbed sets accept_local on k6t-eth0 so they are no martians.
    # Unicast to the bridge address without ARP (ARP from the guest is redirected too).
    with NetNS(guest) as gns:
        eth0 = gns.link_lookup(ifname="eth0")[0]
        gns.route("add", dst=f"{BRIDGE_IP}/32", oif=eth0, scope=253)
        gns.neigh("add", dst=BRIDGE_IP, lladdr=mac_of(ns, "k6t-eth0"), ifindex=eth0,
                  state=NUD_PERMANENT)
    accelerate(ns, datapath=datapath, checksum="off")
    unicast = _bridge_listener(ns, BRIDGE_IP, 67)
    broadcast = _bridge_listener(ns, "0.0.0.0", 67)  # what a DHCP server binds
    other = _bridge_listener(ns, "0.0.0.0", 9999)
    with in_netns(guest):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        client.bind(("0.0.0.0", 68))
        before = status(ns)["directions"]["tap_to_veth"]["packets"]
        client.sendto(b"dhcp-unicast", (BRIDGE_IP, 67))
        assert _received(unicast) == b"dhcp-unicast"
        client.sendto(b"dhcp-broadcast", ("255.255.255.255", 67))
        assert _received(broadcast) == b"dhcp-broadcast"
        # A broadcast that is neither DHCP nor for the launcher: redirected, the bridge
        # (which would deliver it locally without netaccel) does not see it.
        client.sendto(b"not-dhcp", ("255.255.255.255", 9999))
        assert _received(other) is None, "a non-DHCP broadcast reached the bridge"
        # Unicast to the bridge's MAC is for the launcher: it reaches the bridge, DHCP or not.
        client.sendto(b"for-the-launcher", (BRIDGE_IP, 9999))
        assert _received(other) == b"for-the-launcher"
        st = status(ns)
        assert st["directions"]["tap_to_veth"]["packets"] - before >= 1
        if datapath == "bpf":  # the mirror's u32 keeps no per-filter counters on this kernel
            assert st["directions"]["bridge_passed"]["packets"] >= 3
            # ... and that with the rest going by bpf_redirect_peer (see the test below).
            assert st["state"]["tap0"]["redirect_peer"] is True
    finally:
        for sock in (client, unicast, broadcast, other):
            sock.close()
    restore(ns)


def _launcher_echo(ns: str, addr: str, port: int) -> tuple[socket.socket, threading.Thread]:
    """A UDP echo on the bridge (SO_BINDTODEVICE: replies leave through k6t-eth0 even to the
    VM's IP, which the launcher also holds on its placeholder eth0)."""
    sock = _bridge_listener(ns, addr, port)
    sock.settimeout(5)

    def serve() -> None:
        with contextlib.suppress(TimeoutError, OSError):
            data, peer = sock.recvfrom(2048)
            sock.sendto(b"reply:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def _exchange(client_ns: str, ifname: str, src: tuple[str, int], dst: tuple[str, int],
              server_ns: str) -> bytes | None:
    """Send one datagram from client_ns to the launcher's echo at `dst`; return the reply."""
    server, thread = _launcher_echo(server_ns, *dst)
    with in_netns(client_ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        client.bind(src)
        client.settimeout(5)
        client.sendto(b"hello", dst)
        try:
            return client.recv(2048)
        except TimeoutError:
            return None
    finally:
        client.close()
        thread.join(timeout=6)
        server.close()


def neighbour(netns: str, dst: str) -> tuple[str | None, int]:
    """(lladdr, NUD state) of `dst` in netns's neighbour table, or (None, 0)."""
    with NetNS(netns) as ns:
        for n in ns.get_neighbours(family=socket.AF_INET):
            if n.get_attr("NDA_DST") == dst:
                return n.get_attr("NDA_LLADDR"), n["state"]
    return None, 0


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_launcher_addresses_resolve_and_answer(bed: Testbed, datapath: str) -> None:
    """ARP for the bridge's address and unicast to it work through the datapath, from both
    sides; ordinary traffic still bypasses the bridge (what a DHCP renewal needs)."""
    vm, pod = bed.vms[0], bed.pods[0]
    ns, guest = vm.launcher_netns, vm.guest_netns
    bridge_mac = mac_of(ns, "k6t-eth0")
    with NetNS(guest) as gns:  # a link route to the bridge address, no static neighbour
        gns.route("add", dst=f"{BRIDGE_IP}/32", oif=gns.link_lookup(ifname="eth0")[0], scope=253)
    with NetNS(pod.netns) as pns:
        pns.route("add", dst=f"{BRIDGE_IP}/32", oif=pns.link_lookup(ifname="eth0")[0], scope=253)
    with NetNS(ns) as lns:  # so the launcher can answer the pod at all
        lns.route("add", dst=f"{pod.ipv4}/32", oif=lns.link_lookup(ifname="k6t-eth0")[0],
                  scope=253)
    st = accelerate(ns, datapath=datapath, checksum="off")
    assert st["launcher"]["mac"] == bridge_mac and BRIDGE_IP in st["launcher"]["ipv4"]
    assert st["launcher_current"] is True
    assert neighbour(guest, BRIDGE_IP) == (None, 0)

    # Guest -> launcher (a DHCP renewal's shape: unicast from the leased address to :67).
    reply = _exchange(guest, "eth0", (vm.ipv4, 68), (BRIDGE_IP, 67), ns)
    assert reply == b"reply:hello", "no unicast exchange between the guest and the launcher"
    assert neighbour(guest, BRIDGE_IP)[0] == bridge_mac  # ARP for the bridge address worked
    # Pod side -> launcher, the same rules on eth0-nic.
    reply = _exchange(pod.netns, "eth0", (pod.ipv4, 0), (BRIDGE_IP, 9999), ns)
    assert reply == b"reply:hello", "no unicast exchange between the pod side and the launcher"
    assert neighbour(pod.netns, BRIDGE_IP)[0] == bridge_mac

    # The pass rules are narrow: ordinary guest <-> pod traffic still skips the bridge.
    macs = {mac_of(guest, "eth0"), mac_of(pod.netns, "eth0")}
    with udp_echo(pod.netns, pod.ipv4, 7030):
        flush_learned(ns)
        with NetNS(guest) as gns, contextlib.suppress(NetlinkError):  # the guest ARPs too
            gns.neigh("del", dst=pod.ipv4, ifindex=gns.link_lookup(ifname="eth0")[0])
        assert udp_roundtrips(guest, (pod.ipv4, 7030), 20) == 20
    assert learned_macs(ns) & macs == set(), "the bridge saw guest <-> pod frames"
    restore(ns)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_reapply_follows_bridge_addresses(bed: Testbed, datapath: str) -> None:
    """An address added to the bridge after accelerate is passed once accelerate runs again."""
    vm = bed.vms[0]
    ns, guest = vm.launcher_netns, vm.guest_netns
    server_ip = vm.ipv4.rsplit(".", 1)[0] + ".250"  # like the testbed's DHCP server address
    original = snapshot(ns)
    st = accelerate(ns, datapath=datapath, checksum="off")
    first = snapshot(ns)
    with NetNS(ns) as lns:
        lns.addr("add", index=lns.link_lookup(ifname="k6t-eth0")[0], address=server_ip,
                 prefixlen=24)
    st = status(ns)
    assert server_ip in st["launcher"]["ipv4"] and st["launcher_current"] is False
    st = accelerate(ns, datapath=datapath, checksum="off")
    assert st["launcher_current"] is True
    second = snapshot(ns)
    if datapath == "bpf":  # the filters stay; the device's config entry changed in place
        assert second == first
    else:
        assert second != first, "the re-apply was skipped"
    if datapath == "mirror":
        arp = [f for f in st["filters"] if f["role"] == "launcher_arp"]
        assert len(arp) == 4  # 169.254.75.10 and server_ip, on both devices
    assert accelerate(ns, datapath=datapath, checksum="off")["launcher_current"] is True
    assert snapshot(ns) == second, "a third apply changed something"
    reply = _exchange(guest, "eth0", (vm.ipv4, 68), (server_ip, 67), ns)
    assert reply == b"reply:hello"
    restore(ns)
    with NetNS(ns) as lns:
        lns.addr("del", index=lns.link_lookup(ifname="k6t-eth0")[0], address=server_ip,
                 prefixlen=24)
    assert snapshot(ns) == original


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_dhcpv6_reaches_the_bridge(bed: Testbed, datapath: str) -> None:
    vm = bed.vms[0]
    ns, guest = vm.launcher_netns, vm.guest_netns
    accelerate(ns, datapath=datapath, checksum="off")
    with in_netns(ns):
        server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        other = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        br = socket.if_nametoindex("k6t-eth0")
    with in_netns(guest):
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        g_eth0 = socket.if_nametoindex("eth0")
    try:
        group = socket.inet_pton(socket.AF_INET6, "ff02::1:2") + br.to_bytes(4, sys.byteorder)
        for sock, port in ((server, 547), (other, 9547)):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"k6t-eth0")
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
            sock.bind(("::", port))
            sock.settimeout(1)
        client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, g_eth0)
        client.sendto(b"solicit", ("ff02::1:2", 547, 0, g_eth0))
        assert _received(server) == b"solicit"
        client.sendto(b"not-dhcpv6", ("ff02::1:2", 9547, 0, g_eth0))
        assert _received(other) is None, "a non-DHCPv6 datagram reached the bridge"
    finally:
        for sock in (client, server, other):
            sock.close()
    restore(ns)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_restore_is_exact_and_apply_idempotent(bed: Testbed, datapath: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ns = bed.vms[0].launcher_netns
    original = snapshot(ns)
    accelerate(ns, datapath=datapath, checksum="off")
    first = snapshot(ns)
    assert first != original

    def no_reapply(*args: Any) -> None:
        raise AssertionError("a second apply re-installed the filters")

    with monkeypatch.context() as mp:
        mp.setattr(vm_impl, "_apply_device", no_reapply)
        st = accelerate(ns, datapath=datapath, checksum="off")
    assert st["launcher_current"] is True
    assert snapshot(ns) == first, "a second apply changed something"
    launcher = st["launcher"]
    assert launcher["ipv4"] == [BRIDGE_IP] and launcher["mac"] == mac_of(ns, "k6t-eth0")
    # per device: MAC + one ARP per IPv4 + one NS per IPv6 + DHCP 67, 68 + DHCPv6 + redirect
    per_device = 1 + len(launcher["ipv4"]) + len(launcher["ipv6"]) + 4
    assert len(st["filters"]) == (2 * per_device if datapath == "mirror" else 2)
    off = st["offload"]
    assert not any(off["tap0"].values()) and not any(off["eth0-nic"].values())
    restore(ns)
    assert snapshot(ns) == original
    restore(ns)  # restoring twice is a no-op
    assert snapshot(ns) == original


@pytest.mark.parametrize("qdisc", ["clsact", "ingress"])
def test_restore_keeps_what_was_there_before(bed: Testbed, qdisc: str) -> None:
    """A pre-existing qdisc with someone's filter and a feature already off stay as they were."""
    ns = bed.vms[0].launcher_netns
    with NetNS(ns) as ipr:
        tap = ipr.link_lookup(ifname="tap0")[0]
        ipr.tc("add", qdisc, index=tap)
        ipr.tc("add-filter", "u32", index=tap, parent=0xFFFFFFF2, prio=10, protocol=0x0800,
               target=0xFFFF0010, keys=["0xc0000201/0xffffffff+16"])  # dst 192.0.2.1
    with in_netns(ns):
        from pyroute2.ethtool import Ethtool

        et = Ethtool()
        feats = et.get_features("eth0-nic")
        feats.features["tx-checksum-ip-generic"].enable = False
        et.set_features("eth0-nic", feats)
        et.close()
    original = snapshot(ns)
    st = accelerate(ns, datapath="mirror", checksum="off")
    assert st["state"]["tap0"]["created_qdisc"] is False
    assert st["state"]["eth0-nic"]["created_qdisc"] is True
    assert "tx-checksum-ip-generic" not in st["state"]["eth0-nic"]["features_off"]
    assert st["foreign_prios"] == {"tap0": [10]}
    assert st["qdiscs"] == {"tap0": qdisc, "eth0-nic": "clsact"}
    vm, pod = bed.vms[0], bed.pods[0]
    with udp_echo(pod.netns, pod.ipv4, 7020):
        assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7020), 10) == 10
    assert status(ns)["directions"]["tap_to_veth"]["packets"] >= 10
    restore(ns)
    assert snapshot(ns) == original


def test_switch_datapath_and_checksum(bed: Testbed) -> None:
    vm, pod = bed.vms[0], bed.pods[0]
    ns = vm.launcher_netns
    original = snapshot(ns)
    with udp_echo(pod.netns, pod.ipv4, 7010):
        for datapath, checksum in (("mirror", "off"), ("bpf", "off"), ("bpf", "keep"),
                                   ("mirror", "keep"), ("mirror", "off")):
            st = accelerate(ns, datapath=datapath, checksum=checksum)
            assert st["datapath"] == datapath
            roles = sorted(f["role"] for f in st["filters"])
            n4, n6 = len(st["launcher"]["ipv4"]), len(st["launcher"]["ipv6"])
            assert roles == (sorted(["dhcp4"] * 4 + ["dhcp6"] * 2 + ["mirror"] * 2
                                    + ["launcher_mac"] * 2 + ["launcher_arp"] * 2 * n4
                                    + ["launcher_nd"] * 2 * n6)
                             if datapath == "mirror" else ["bpf", "bpf"])
            tap_off = st["offload"]["tap0"]
            assert (not any(tap_off.values())) == (checksum == "off")
            if checksum == "keep":
                assert st["offload"] == {k: {f: v for f, v in d.items()}
                                         for k, d in _offload(original).items()}
            assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7010), 10) == 10
    restore(ns)
    assert snapshot(ns) == original


def _offload(snap: dict[str, Any]) -> dict[str, dict[str, bool]]:
    return {dev: {f: snap[dev]["features"][f][0] for f in vm_api.CHECKSUM_FEATURES
                  if f in snap[dev]["features"]} for dev in ("tap0", "eth0-nic")}


def test_adopts_after_a_crash(bed: Testbed) -> None:
    """Another process (the agent before its crash) applied; this one adopts and restores."""
    ns = bed.vms[0].launcher_netns
    original = snapshot(ns)
    code = ("import sys; from lab.testbed import is_tap; from node_helper import vm; "
            "vm.accelerate(sys.argv[1], datapath='mirror', checksum='off', is_tap=is_tap); "
            "import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, ns], check=True, timeout=30)
    applied = snapshot(ns)
    assert applied != original
    st = accelerate(ns, datapath="mirror", checksum="off")  # adopt: no change
    assert st["datapath"] == "mirror"
    assert snapshot(ns) == applied
    restore(ns)
    assert snapshot(ns) == original


def test_failure_midway_rolls_back(bed: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = bed.vms[0].launcher_netns
    original = snapshot(ns)
    calls = {"n": 0}
    real = vm_impl.set_features

    def flaky(netns: str, ifname: str, names: tuple[str, ...], on: bool) -> None:
        calls["n"] += 1
        if ifname == "eth0-nic" and not on and names:
            raise NetlinkError(errno.EBUSY, "injected")
        real(netns, ifname, names, on)

    monkeypatch.setattr(vm_impl, "set_features", flaky)
    with pytest.raises(VmDatapathError, match="rolled back"):
        accelerate(ns, datapath="mirror", checksum="off")
    monkeypatch.undo()
    assert snapshot(ns) == original


def _only_a_veth(tb: Testbed) -> str:
    return tb.pods[0].netns  # a pod: eth0 veth, no bridge


def _bridge_without_tap(tb: Testbed) -> str:
    ns = tb.vms[0].launcher_netns
    with NetNS(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="tap0")[0], master=0)
    return ns


def _two_taps(tb: Testbed) -> str:
    ns = tb.vms[0].launcher_netns
    _add_real_tap(ns, "tap1")
    return ns


@pytest.mark.parametrize("make", [_only_a_veth, _bridge_without_tap, _two_taps])
def test_not_kubevirt_shaped(bed: Testbed, make: Any) -> None:
    ns = make(bed)
    before = snapshot(ns)
    for datapath in DATAPATHS:
        with pytest.raises(VmShapeError) as err:
            accelerate(ns, datapath=datapath, checksum="off")
        assert "k6t-eth0" in str(err.value)
    assert snapshot(ns) == before


def _add_real_tap(ns: str, name: str) -> None:
    """A real tun/tap device (as QEMU would use) enslaved to k6t-eth0."""
    with in_netns(ns):
        ipr = IPRoute()
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="k6t-eth0")[0],
                     state="up")
        finally:
            ipr.close()


def test_real_tap(bed: Testbed) -> None:
    ns = bed.vms[0].launcher_netns
    with NetNS(ns) as ipr:  # replace the veth stand-in by a real tap
        ipr.link("del", index=ipr.link_lookup(ifname="tap0")[0])
    _add_real_tap(ns, "tap0")
    devs = find_devices(ns)
    assert devs.tap.name == "tap0" and devs.tap.kind == "tun"
    original = snapshot(ns)
    for datapath in DATAPATHS:
        st = accelerate(ns, datapath=datapath, checksum="off")
        assert st["datapath"] == datapath
        targets = {f["device"]: f["redirect_to"] for f in st["filters"]
                   if f["role"] in ("mirror", "bpf")}
        assert targets == {"tap0": devs.veth.index, "eth0-nic": devs.tap.index}
        restore(ns)
        assert snapshot(ns) == original


def test_bad_arguments(bed: Testbed) -> None:
    ns = bed.vms[0].launcher_netns
    with pytest.raises(ValueError, match="datapath"):
        accelerate(ns, datapath="xdp")
    with pytest.raises(ValueError, match="checksum"):
        accelerate(ns, checksum="maybe")
    with pytest.raises(VmShapeError, match="na-no-such-netns"):
        accelerate("na-no-such-netns")
    assert not (NETNS_DIR / "na-no-such-netns").exists()  # and it was not created

