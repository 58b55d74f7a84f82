"""The VM datapath with a real QEMU guest (issue 4): DHCP through the mirror, UDP end to end.

The testbed's QEMU VM is KubeVirt-shaped: launcher netns with k6t-eth0, eth0-nic and tap0,
dnsmasq on k6t-eth0 as virt-launcher's DHCP server, a libvirt domain from the hook sidecar's
edited XML. The guest starts paused, the datapath goes in, then it boots: so its first DHCP
exchange, its renewal and its traffic all cross the accelerated launcher.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_helper import vm_mirror
from node_helper.kernel import in_netns
from node_helper.testbed import GUEST_UDP_PORT, Testbed

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(params=["mirror", "bpf"])
def accelerated_qemu_bed(request: pytest.FixtureRequest, libvirt_ready: None,
                         guest_image: object) -> Iterator[tuple[Testbed, str]]:
    bed = Testbed.create(pods=1, vms=1, guest="qemu", paused=True)
    try:
        vm = bed.vms[0]
        vm_mirror.accelerate(vm.launcher_netns, datapath=request.param, checksum="off")
        bed.resume_qemu_guests()
        yield bed, request.param
    finally:
        bed.destroy()


def _console(bed: Testbed) -> str:
    return Path(bed.vms[0].extra["console_log"]).read_text(errors="replace")


def _wait_console(bed: Testbed, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.compile(pattern).search(_console(bed), since)
        if m:
            return m
        time.sleep(0.2)
    tail = _console(bed)[-2000:]
    raise AssertionError(f"no {pattern!r} on the console after {timeout}s:\n{tail}")


def test_dhcp_lease_and_renewal_through_the_datapath(
        accelerated_qemu_bed: tuple[Testbed, str]) -> None:
    bed, datapath = accelerated_qemu_bed
    vm = bed.vms[0]
    lease = _wait_console(bed, r"NETACCEL-LEASE ip=(\S+)", 90)
    assert lease.group(1) == vm.ipv4  # virt-launcher hands the guest the pod's IP
    renew = _wait_console(bed, rf"NETACCEL-RENEW ip={re.escape(vm.ipv4)}\b", 60, lease.end())
    assert renew
    dhcp_log = Path(vm.extra["dhcp_log"]).read_text()
    assert dhcp_log.count("DHCPACK") >= 2, dhcp_log  # the lease and the renewal
    status = vm_mirror.status(vm.launcher_netns)
    assert status["datapath"] == datapath  # still in place after both exchanges


def test_guest_reaches_pod_over_udp_with_checksum_offload_off(
        accelerated_qemu_bed: tuple[Testbed, str]) -> None:
    bed, _ = accelerated_qemu_bed
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
    counters = vm_mirror.status(vm.launcher_netns)["directions"]
    assert counters["tap_to_veth"]["packets"] > 0 and counters["veth_to_tap"]["packets"] > 0
