"""Issue 3: the hook sidecar's domain edit, accepted by libvirt and honoured by QEMU.

Booted under TCG on a tap in a pod-like netns; the guest prints the virtio-net feature bits
it negotiated. The unedited domain is the control: it must show checksum offload ON, which
proves the test can fail.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from hook_sidecar.domain import edit_domain
from lab.qemu_guest import kubevirt_domain_xml, start_guest
from tests.e2e.conftest import BRIDGE, add_address, udp_socket_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

VMI = (
    b'{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance",'
    b'"metadata":{"name":"x","namespace":"default","annotations":{}},'
    b'"spec":{"domain":{"devices":{"interfaces":[{"name":"default","bridge":{}}]}}}}'
)
HOST_OFF = {"csum": "off", "gso": "off", "tso4": "off", "tso6": "off", "ecn": "off", "ufo": "off"}
GUEST_OFF = {"csum": "off", "tso4": "off", "tso6": "off", "ecn": "off", "ufo": "off"}
# virtio-net feature bits: CSUM 0, GUEST_CSUM 1, GUEST_TSO4 7 .. HOST_UFO 14.
CSUM_BITS = (0, 1)
OFFLOAD_BITS = (0, 1, *range(7, 15))


@pytest.mark.parametrize("edited", [True, False], ids=["hook-edited", "control-unedited"])
def test_hook_domain_in_libvirt(launcher_netns: str, guest_image, unique_name: str,  # noqa: ANN001
                                edited: bool) -> None:
    ns, name = launcher_netns, unique_name
    xml = kubevirt_domain_xml(name, image=guest_image, cmdline="")
    if edited:
        xml = edit_domain(xml, VMI)
    add_address(ns, BRIDGE, "10.223.0.1", 24)
    listener = udp_socket_in(ns, "10.223.0.1")
    port = listener.getsockname()[1]
    xml = xml.replace(
        b"</cmdline>", f" netaccel.ip=10.223.0.2/24 netaccel.udp_target=10.223.0.1:{port}"
        f"</cmdline>".encode(), 1)

    with listener, start_guest(name, ns, BRIDGE, xml) as guest:
        # libvirt kept (or never had) the <driver> children
        iface = ET.fromstring(guest.dumpxml(inactive=True)).find("devices/interface")
        host, guest_el = iface.find("driver/host"), iface.find("driver/guest")
        command = guest.qemu_command_line()
        assert "virtio-net-pci" in command, guest.qemu_log()
        if edited:
            assert host is not None and guest_el is not None, ET.tostring(iface)
            assert {k: host.get(k) for k in HOST_OFF} == HOST_OFF
            assert {k: guest_el.get(k) for k in GUEST_OFF} == GUEST_OFF
            assert '"csum":false' in command and '"guest_csum":false' in command, command
        else:
            assert host is None and guest_el is None
            assert '"csum":false' not in command and '"guest_csum":false' not in command

        features = guest.wait_for(r"NETACCEL-FEATURES ([01]{32,})", timeout=60).group(1)
        csum = guest.wait_for(r"NETACCEL-CSUM host=(\d) guest=(\d)", timeout=10).groups()
        if edited:
            assert csum == ("0", "0")
            assert all(features[b] == "0" for b in OFFLOAD_BITS), features
        else:
            assert csum == ("1", "1")
            assert all(features[b] == "1" for b in CSUM_BITS), features

        # Traffic still flows through the (moved) tap with the device as configured.
        listener.settimeout(20)
        data, peer = listener.recvfrom(2048)
        assert data == b"netaccel-guest 10.223.0.2\n" and peer[0] == "10.223.0.2"
