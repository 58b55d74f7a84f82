"""cleanup_stale(): what a killed test run leaves behind goes; what a live run owns stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from pyroute2 import IPRoute, netns

from lab.qemu_guest import (
    TEST_PREFIX,
    cleanup_stale,
    domain_names,
    host_tap_name,
    is_claimed,
    kubevirt_domain_xml,
    start_guest,
)
from tests.e2e.conftest import BRIDGE

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CRASHING_RUN = textwrap.dedent("""
    import sys, time
    from pyroute2 import NetNS, netns
    from lab.qemu_guest import DhcpServer, claim, kubevirt_domain_xml, start_guest
    name = sys.argv[1]
    claim(name)
    netns.create(name)
    with NetNS(name) as ns:
        ns.link("add", ifname="k6t-eth0", kind="bridge")
        ns.link("set", index=ns.link_lookup(ifname="k6t-eth0")[0], state="up")
    dhcp = DhcpServer(name, "k6t-eth0", "10.224.0.10", "10.224.0.20", server_ip="10.224.0.1")
    dhcp.start()
    guest = start_guest(name, name, "k6t-eth0", kubevirt_domain_xml(name))
    print("STARTED", dhcp.proc.pid, flush=True)
    time.sleep(600)
""")


def test_cleanup_stale_after_crash(launcher_netns: str, guest_image,  # noqa: ANN001
                                   unique_name: str) -> None:
    crashed = unique_name + "c"
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, crashed],
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        line = proc.stdout.readline()
        assert line.startswith("STARTED"), line
        dnsmasq_pid = int(line.split()[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert crashed in domain_names() and crashed in netns.listnetns()
        assert not is_claimed(crashed)

        # A live run's guest (claimed by this process through launcher_netns) must survive.
        live = launcher_netns
        with start_guest(live, live, BRIDGE, kubevirt_domain_xml(live, image=guest_image)):
            removed = cleanup_stale(TEST_PREFIX)
            assert crashed in removed and live not in removed
            assert live in domain_names()
        assert crashed not in domain_names()
        assert crashed not in netns.listnetns()
        with IPRoute() as ip:
            assert not ip.link_lookup(ifname=host_tap_name(crashed))
        assert not os.path.exists(f"/proc/{dnsmasq_pid}")
    finally:
        if proc.poll() is None:
            proc.kill()
        cleanup_stale(crashed)


def test_failed_start_leaves_nothing(launcher_netns: str, guest_image,  # noqa: ANN001
                                     unique_name: str) -> None:
    ns, name = launcher_netns, unique_name
    good = kubevirt_domain_xml(name, image=guest_image)
    with pytest.raises(ValueError, match="no bridge"):
        start_guest(name, ns, "k6t-missing", good)
    with pytest.raises(ValueError, match="target dev 'tap7'"):
        start_guest(name, ns, BRIDGE, good, tap="tap7")
    # libvirt itself refuses this one (unknown NIC model), after the host tap was made.
    bad = good.replace(b'type="virtio-non-transitional"', b'type="no-such-model"')
    with pytest.raises(Exception, match="no-such-model"):
        start_guest(name, ns, BRIDGE, bad)
    assert name not in domain_names()
    with IPRoute() as ip:
        assert not ip.link_lookup(ifname=host_tap_name(name))
    assert is_claimed(name)  # the fixture's claim is not dropped by start_guest's failure
