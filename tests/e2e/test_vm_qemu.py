"""The VM datapath with a real QEMU guest (issue 4): DHCP through the mirror, UDP end to end.

The testbed's QEMU VM is KubeVirt-shaped: launcher netns with k6t-eth0, eth0-nic and tap0,
dnsmasq on k6t-eth0 as virt-launcher's DHCP server, a libvirt domain from the hook sidecar's
edited XML. The guest starts paused, the datapath goes in, then it boots: so its first DHCP
exchange, its renewal and its traffic all cross the accelerated launcher.

The renewal (busybox udhcpc, SIGUSR1) is unicast from the leased address to the server's
address on the bridge: the guest first ARPs for the server, so the datapath must pass ARP for
the bridge's addresses and frames to the bridge's MAC (node_helper/vm/). If the
unicast attempts fail, udhcpc falls back to a broadcast REQUEST (rebinding), which the DHCP
rule alone lets through and which also prints NETACCEL-RENEW: so the test captures what
reaches the bridge and requires the unicast REQUEST to the server among it.

The testbed's launcher also holds the VM's IP (on its placeholder eth0), so the testbed sets
accept_local on k6t-eth0: without it the launcher drops the guest's ARP request and even its
broadcast rebinding REQUEST (source: the leased address) as martians, and the renewal fails
even with no datapath at all (measured: a fresh DISCOVER instead of the renewal).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.testbed import GUEST_UDP_PORT, Testbed, is_tap
from node_helper import vm as vm_api
from node_helper.kernel import in_netns

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class BridgeCapture:
    """IPv4 DHCP requests (UDP dport 67) the launcher's stack receives on k6t-eth0."""

    def __init__(self, netns: str, ifname: str = "k6t-eth0") -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self.sock.bind((ifname, 0x0800))
        self.sock.settimeout(0.2)
        self.dhcp_dst: list[str] = []  # IPv4 destination of each DHCP request, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if addr[2] == socket.PACKET_OUTGOING or len(frame) < 14 + 24:
                continue
            ihl = (frame[14] & 0x0F) * 4
            if frame[14 + 9] == socket.IPPROTO_UDP and len(frame) >= 14 + ihl + 4:
                (dport,) = struct.unpack_from("!H", frame, 14 + ihl + 2)
                if dport == 67:
                    self.dhcp_dst.append(socket.inet_ntoa(frame[14 + 16:14 + 20]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(params=["mirror", "bpf"])
def accelerated_qemu_bed(request: pytest.FixtureRequest, libvirt_ready: None,
                         guest_image: object) -> Iterator[tuple[Testbed, str, BridgeCapture]]:
    bed = Testbed.create(pods=1, vms=1, guest="qemu", paused=True)
    capture = None
    try:
        vm = bed.vms[0]
        st = vm_api.accelerate(vm.launcher_netns, datapath=request.param, checksum="off",
                               is_tap=is_tap)
        # The DHCP server's address (added by the testbed before this) is passed to the bridge.
        assert len(st["launcher"]["ipv4"]) == 2, st["launcher"]
        capture = BridgeCapture(vm.launcher_netns)
        bed.resume_qemu_guests()
        yield bed, request.param, capture
    finally:
        if capture is not None:
            with contextlib.suppress(Exception):
                capture.close()
        with contextlib.suppress(Exception):  # before the netns goes: unpins the program
            vm_api.restore(bed.vms[0].launcher_netns, is_tap=is_tap)
        bed.destroy()


def _console(bed: Testbed) -> str:
    return bed.qemu_guest(bed.vms[0]).console()


def _wait_console(bed: Testbed, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
    return bed.qemu_guest(bed.vms[0]).wait_for(pattern, timeout, since)


def test_dhcp_lease_and_renewal_through_the_datapath(
        accelerated_qemu_bed: tuple[Testbed, str, BridgeCapture]) -> None:
    bed, datapath, capture = accelerated_qemu_bed
    vm = bed.vms[0]
    lease = _wait_console(bed, r"NETACCEL-LEASE ip=(\S+) .* server=(\S+)", 90)
    server = lease.group(2)
    assert lease.group(1) == vm.ipv4  # virt-launcher hands the guest the pod's IP
    renew = _wait_console(bed, rf"NETACCEL-RENEW ip={re.escape(vm.ipv4)}\b", 60, lease.end())
    assert renew
    dhcp_log = Path(vm.extra["dhcp_log"]).read_text()
    assert dhcp_log.count("DHCPACK") >= 2, dhcp_log  # the lease and the renewal
    assert "DHCPDISCOVER" not in dhcp_log[dhcp_log.index("DHCPACK"):], dhcp_log  # renewed
    # ... by unicast to the server (ARP for its address went through), not by the broadcast
    # fallback: the lease's requests went to 255.255.255.255, the renewal to the server.
    deadline = time.monotonic() + 2  # the capture thread may still be reading
    while server not in capture.dhcp_dst and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server in capture.dhcp_dst, (capture.dhcp_dst, _console(bed), dhcp_log)
    status = vm_api.status(vm.launcher_netns, is_tap=is_tap)
    assert status["datapath"] == datapath  # still in place after both exchanges
    assert status["launcher_current"] is True


def test_guest_reaches_pod_over_udp_with_checksum_offload_off(
        accelerated_qemu_bed: tuple[Testbed, str, BridgeCapture]) -> None:
    bed, _, _ = accelerated_qemu_bed
    vm, pod = bed.vms[0], bed.pods[0]
    with in_netns(pod.netns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with listener:
        listener.bind((pod.ipv4, GUEST_UDP_PORT))
        listener.settimeout(90)
        data, peer = listener.recvfrom(2048)
        assert data == f"netaccel-guest {vm.ipv4}\n".encode() and peer[0] == vm.ipv4
        # and back: the guest's UDP echo on port 7
        _wait_console(bed, r"NETACCEL-READY", 30)
        for _ in range(20):
            listener.sendto(b"echo-me", (vm.ipv4, 7))
            listener.settimeout(1.0)
            try:
                data, peer = listener.recvfrom(2048)
            except TimeoutError:
                continue
            if data == b"echo-me":
                break
        assert (data, peer) == (b"echo-me", (vm.ipv4, 7))
    # the hook's XML reached QEMU: the guest negotiated no checksum offload either way
    assert "NETACCEL-CSUM host=0 guest=0" in _console(bed)
    counters = vm_api.status(vm.launcher_netns, is_tap=is_tap)["directions"]
    assert counters["tap_to_veth"]["packets"] > 0 and counters["veth_to_tap"]["packets"] > 0
