"""A QEMU guest on a tap inside a pod-like netns: DHCP lease, renewal, UDP both ways."""

from __future__ import annotations

import re
import time

import pytest
from pyroute2 import IPRoute, NetNS

from lab.qemu_guest import (
    QEMU_LOG_DIR,
    DhcpServer,
    domain_names,
    host_tap_name,
    kubevirt_domain_xml,
    start_guest,
)
from tests.e2e.conftest import BRIDGE, udp_socket_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SERVER = "10.222.0.1"
RANGE = ("10.222.0.10", "10.222.0.20")


def _recv_until(sock, want: bytes, timeout: float) -> tuple[bytes, tuple[str, int]]:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        data, peer = sock.recvfrom(2048)
        if data == want or time.monotonic() > deadline:
            return data, peer


def test_guest_boots(launcher_netns: str, guest_image, unique_name: str) -> None:  # noqa: ANN001
    ns, name = launcher_netns, unique_name
    with DhcpServer(ns, BRIDGE, *RANGE, netmask="255.255.255.0", lease_time=120,
                    server_ip=SERVER, router=SERVER) as dhcp:
        listener = udp_socket_in(ns, SERVER)
        port = listener.getsockname()[1]
        xml = kubevirt_domain_xml(name, image=guest_image,
                                  cmdline=f"netaccel.udp_target={SERVER}:{port}")
        with listener, start_guest(name, ns, BRIDGE, xml) as guest:
            t0 = time.monotonic()
            # The tap is in the pod netns as tap0, a port of the bridge; none left on the host.
            with NetNS(ns) as n:
                tap = n.get_links(n.link_lookup(ifname="tap0")[0])[0]
                assert tap.get_attr("IFLA_MASTER") == n.link_lookup(ifname=BRIDGE)[0]
                assert tap.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "tun"
            with IPRoute() as ip:
                assert not ip.link_lookup(ifname=guest.host_tap)

            lease = guest.wait_for(r"NETACCEL-LEASE ip=(\S+)", timeout=60)
            ip = lease.group(1)
            boot_to_lease = time.monotonic() - t0
            assert RANGE[0] <= ip <= RANGE[1] and len(ip) == len(RANGE[0])
            assert any(le.ip == ip and le.mac == guest.mac for le in dhcp.leases()), dhcp.log()

            guest.wait_for(rf"NETACCEL-RENEW ip={re.escape(ip)}\b", timeout=30, since=lease.end())
            assert "DHCPACK" in dhcp.log().split("DHCPREQUEST")[-1]

            # guest -> launcher netns
            data, peer = _recv_until(listener, f"netaccel-guest {ip}\n".encode(), timeout=20)
            assert data == f"netaccel-guest {ip}\n".encode() and peer[0] == ip

            # launcher netns -> guest: the guest's UDP echo service on port 7
            guest.wait_for(r"NETACCEL-READY", timeout=10)
            with udp_socket_in(ns, SERVER) as probe:
                for _ in range(20):
                    probe.sendto(b"ping-from-pod", (ip, 7))
                    probe.settimeout(1.0)
                    try:
                        data, peer = probe.recvfrom(2048)
                        break
                    except TimeoutError:
                        continue
                assert (data, peer) == (b"ping-from-pod", (ip, 7))
            print(f"boot to lease: {boot_to_lease:.1f} s")

    # Everything is gone: domain, tap, libvirt's log.
    assert name not in domain_names()
    with NetNS(ns) as n:
        assert not n.link_lookup(ifname="tap0")
    with IPRoute() as ip:
        assert not ip.link_lookup(ifname=host_tap_name(name))
    assert not (QEMU_LOG_DIR / f"{name}.log").exists()
    assert not guest.run_dir.exists()
    assert dhcp.proc is None
