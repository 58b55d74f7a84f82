"""The namespace testbed on the real kernel: shape, reachability, rediscovery, teardown."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from pyroute2 import NetNS, netns

from lab.testbed import (
    TAP_STANDIN_ALIAS,
    Testbed,
    TestbedError,
    link_stats,
    popen_in,
    run_in,
)
from node_helper.kernel import in_netns

pytestmark = pytest.mark.kernel
LAB = [sys.executable, "-m", "lab.cli"]


@pytest.fixture
def bed():
    with Testbed.create(pods=2, vms=1) as tb:
        yield tb


def _ours(number: int) -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(f"na{number}-")]


def test_shape_and_addresses(bed: Testbed) -> None:
    assert sorted(_ours(bed.number)) == sorted(
        [bed.node_netns, bed.pods[0].netns, bed.pods[1].netns,
         bed.vms[0].launcher_netns, bed.vms[0].guest_netns])
    vm = bed.vms[0]
    with NetNS(vm.launcher_netns) as ns:
        links = {link.get("ifname"): link for link in ns.get_links()}
        bridge = links["k6t-eth0"].get("index")
        assert links["eth0-nic"].get("master") == bridge
        assert links["tap0"].get("master") == bridge
        assert links["tap0"].get("ifalias") == TAP_STANDIN_ALIAS
        assert links["eth0"].get("master") is None  # the address placeholder is no bridge port
        addrs = {a.get("address") for a in ns.get_addr(index=links["eth0"].get("index"))}
        assert vm.ipv4 in addrs


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_pods_and_vm_guest_reach_each_other(bed: Testbed, family: int) -> None:
    server = bed.pods[1]
    address = server.ipv4 if family == socket.AF_INET else server.ipv6
    with in_netns(server.netns):
        listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen()
    clients = [bed.pods[0].netns] + ([bed.vms[0].guest_netns] if family == socket.AF_INET else [])
    for client_ns in clients:
        with in_netns(client_ns):
            client = socket.create_connection((address, listener.getsockname()[1]), timeout=5)
        conn, _ = listener.accept()
        client.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        client.close()
        conn.close()
    listener.close()


def test_traffic_crosses_the_node_bridge(bed: Testbed) -> None:
    before = link_stats(bed.node_netns, bed.pods[0].host_veth)
    run_in(bed.pods[0].netns, ["ping", "-c", "3", "-i", "0.2", "-W", "1", bed.pods[1].ipv4])
    after = link_stats(bed.node_netns, bed.pods[0].host_veth)
    assert after["rx_packets"] - before["rx_packets"] >= 3


def test_find_rebuilds_the_description(bed: Testbed) -> None:
    found = Testbed.find(bed.number)
    assert found.status() == bed.status()
    with pytest.raises(TestbedError, match="not up"):
        Testbed.find(250)


def test_destroy_kills_processes_and_removes_everything() -> None:
    tb = Testbed.create(pods=1)
    proc = popen_in(tb.pods[0].netns, ["sleep", "60"])
    tb.destroy()
    assert proc.wait(timeout=5) == -9
    assert _ours(tb.number) == []


def test_failed_create_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Testbed, j: int) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(Testbed, "_add_vm", boom)
    with pytest.raises(RuntimeError, match="injected"):
        Testbed.create(pods=1, vms=1, number=249)
    assert _ours(249) == []


def test_cli_testbed_up_status_down() -> None:
    up = subprocess.run(LAB + ["testbed", "up", "--pods", "3"], capture_output=True,
                        text=True, check=True)
    number = json.loads(up.stdout)["number"]
    mine = ["--number", str(number)]
    try:
        status = subprocess.run(LAB + ["testbed", "status", "--json"] + mine,
                                capture_output=True, text=True, check=True)
        data = json.loads(status.stdout)
        assert data["number"] == number
        assert [p["name"] for p in data["pods"]] == ["pod0", "pod1", "pod2"]
        assert set(data["pods"][0]) >= {"name", "netns", "ipv4", "ipv6"}
        assert data["vms"] == []
    finally:
        down = subprocess.run(LAB + ["testbed", "down"] + mine, capture_output=True,
                              text=True)
    assert down.returncode == 0, down.stderr
    assert _ours(number) == []
    missing = subprocess.run(LAB + ["testbed", "status"] + mine, capture_output=True,
                             text=True)
    assert missing.returncode == 1 and f"testbed {number} is not up" in missing.stderr


def test_find_without_a_number_needs_exactly_one() -> None:
    with Testbed.create(pods=0) as one, Testbed.create(pods=0) as two:
        with pytest.raises(TestbedError, match="several testbeds are up"):
            Testbed.find()
        assert Testbed.find(two.number).number == two.number
    assert one.number != two.number


def test_lab_bypass_shortcut_enables_the_testbed_pods() -> None:
    from node_helper import sockets

    with Testbed.create(pods=2) as bed:
        try:
            on = subprocess.run(LAB + ["bypass", "on", "--number", str(bed.number), "--json"],
                                capture_output=True, text=True, timeout=120)
            assert on.returncode == 0, on.stderr
            assert sorted(json.loads(on.stdout)["cidrs"]) == sorted(bed.pod_cidrs())
            off = subprocess.run(LAB + ["bypass", "off"], capture_output=True, text=True)
            assert off.returncode == 0, off.stderr
            assert sockets.attached_programs() == []
        finally:
            sockets.disable()
