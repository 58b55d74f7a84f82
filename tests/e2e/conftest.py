"""Fixtures for end-to-end tests: a real libvirtd, a QEMU (TCG) guest, a pod-like netns.

Everything a test creates has a unique name (TEST_PREFIX + random hex) and is removed
afterwards, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import NetNS, netns

from node_helper.kernel import in_netns, remove_netns

BRIDGE = "k6t-eth0"  # KubeVirt's in-pod bridge for the pod network's interface


def _e2e_unavailable() -> str | None:
    """Why libvirt/QEMU cannot run here at all (None when they can)."""
    if os.geteuid() != 0:
        return "e2e tests need root (libvirtd, taps, network namespaces)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "python3-libvirt is not installed (run scripts/setup.sh)"
    for exe in ("libvirtd", "virtlogd", "qemu-system-x86_64", "dnsmasq"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (run scripts/setup.sh)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: no tap devices on this machine"
    return None


@pytest.fixture(scope="session")
def libvirt_ready() -> None:
    """A running system libvirtd; domains left over by a crashed earlier run are removed.

    Under CI (CI set) a missing prerequisite fails the tests: CI must run them. Elsewhere
    they are skipped, with the reason.
    """
    reason = _e2e_unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI cannot run the e2e suite: {reason}")
    if reason:
        pytest.skip(reason)
    from lab.qemu_guest import TEST_PREFIX, cleanup_stale, ensure_libvirtd

    ensure_libvirtd()
    cleanup_stale(TEST_PREFIX)


@pytest.fixture(scope="session")
def guest_image(libvirt_ready: None):  # noqa: ANN201 - a GuestImage
    """The cached test guest (kernel + initramfs); built on first use."""
    from lab.qemu_guest import build_guest_image

    return build_guest_image()


@pytest.fixture
def unique_name() -> str:
    from lab.qemu_guest import TEST_PREFIX

    return TEST_PREFIX + uuid.uuid4().hex[:8]


@pytest.fixture
def launcher_netns(unique_name: str) -> Iterator[str]:
    """A virt-launcher-like network namespace holding an (up) bridge named k6t-eth0."""
    from lab.qemu_guest import claim, release

    name = unique_name
    claim(name)  # a parallel session's cleanup_stale() leaves it alone
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("add", ifname=BRIDGE, kind="bridge")
            ns.link("set", index=ns.link_lookup(ifname=BRIDGE)[0], state="up")
        yield name
    finally:
        remove_netns(name)
        release(name)


def udp_socket_in(netns_name: str, address: str, port: int = 0) -> socket.socket:
    """A UDP socket bound inside `netns_name` (it stays there after this returns)."""
    with in_netns(netns_name):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    return sock


def add_address(netns_name: str, ifname: str, address: str, prefixlen: int) -> None:
    with NetNS(netns_name) as ns:
        ns.addr("add", index=ns.link_lookup(ifname=ifname)[0], address=address,
                prefixlen=prefixlen)
