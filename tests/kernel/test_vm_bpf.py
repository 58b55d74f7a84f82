"""The bpf VM datapath's node-wide program: one pinned object shared by every VM, configured
per device through a pinned map, unpinned with the last VM, adopted by a new process."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pyroute2 import NetNS

from lab.testbed import Testbed, is_tap
from node_helper import vm as vm_api
from node_helper.vm import VmLimitError, bpf
from tests.kernel.test_vm_mirror import (
    flush_learned,
    learned_macs,
    mac_of,
    restored,
    snapshot,
    udp_echo,
    udp_roundtrips,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(90)]

accelerate = functools.partial(vm_api.accelerate, is_tap=is_tap, datapath="bpf")
restore = functools.partial(vm_api.restore, is_tap=is_tap)
status = functools.partial(vm_api.status, is_tap=is_tap)


def _pins() -> list[str]:
    d = bpf.pin_dir()
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def bed2() -> Iterator[Testbed]:
    assert _pins() == [], "pins left by an earlier test"
    with Testbed.create(pods=1, vms=2) as tb, restored(tb):
        yield tb
    assert not bpf.pin_dir().exists()


def _main(st: dict) -> dict:
    return {f["device"]: f for f in st["filters"] if f["role"] == "bpf"}


def test_same_ifindex_in_two_netns_both_work(bed2: Testbed) -> None:
    """Ifindexes repeat across launcher netns: each device still gets its own config."""
    a, b = bed2.vms
    devs = [vm_api.find_devices(v.launcher_netns, is_tap=is_tap) for v in (a, b)]
    assert devs[0].tap.index == devs[1].tap.index and devs[0].veth.index == devs[1].veth.index
    pod = bed2.pods[0]
    with udp_echo(pod.netns, pod.ipv4, 7101):
        for v in (a, b):
            assert udp_roundtrips(v.guest_netns, (pod.ipv4, 7101), 3) == 3  # warm ARP
            accelerate(v.launcher_netns)
            flush_learned(v.launcher_netns)
        for v in (a, b):
            before = status(v.launcher_netns)["directions"]
            assert udp_roundtrips(v.guest_netns, (pod.ipv4, 7101), 30) == 30
            after = status(v.launcher_netns)["directions"]
            for direction in ("tap_to_veth", "veth_to_tap"):
                assert after[direction]["packets"] - before[direction]["packets"] >= 30
            macs = {mac_of(v.guest_netns, "eth0"), mac_of(pod.netns, "eth0")}
            assert learned_macs(v.launcher_netns) & macs == set()
        ids = {f["device"] + v.name: f["redirect_to"]
               for v in (a, b) for f in _main(status(v.launcher_netns)).values()}
        assert len(ids) == 4


def test_one_program_shared_and_unpinned_after_the_last_restore(bed2: Testbed) -> None:
    a, b = bed2.vms
    prog_ids = set()
    for v in (a, b):
        prog_ids |= {f["prog_id"] for f in _main(accelerate(v.launcher_netns)).values()}
    assert len(prog_ids) == 1, prog_ids
    pins = _pins()
    assert {"config", "counters"} <= set(pins) and len(pins) == 3
    assert bpf.prog_id(bpf.pin_dir() / pins[-1]) == prog_ids.pop()
    assert len(bpf.entries()) == 4  # two devices per VM
    restore(a.launcher_netns)
    assert _pins() == pins and len(bpf.entries()) == 2
    # Switching the other VM to mirror releases the program as well.
    vm_api.accelerate(b.launcher_netns, datapath="mirror", is_tap=is_tap)
    assert not bpf.pin_dir().exists()
    assert not bpf.pin_dir().parent.exists()  # the instance folder went too
    restore(b.launcher_netns)


def test_fifth_bridge_ipv4_is_a_clear_error_and_changes_nothing(bed2: Testbed) -> None:
    ns = bed2.vms[0].launcher_netns
    with NetNS(ns) as ipr:
        br = ipr.link_lookup(ifname="k6t-eth0")[0]
        for i in range(1, 5):  # the testbed has one already: 5 in all
            ipr.addr("add", index=br, address=f"169.254.75.{20 + i}", prefixlen=32)
    before = snapshot(ns)
    with pytest.raises(VmLimitError, match="5 IPv4 addresses.*at most 4"):
        accelerate(ns)
    assert snapshot(ns) == before
    assert not bpf.pin_dir().exists()
    # Four are fine.
    with NetNS(ns) as ipr:
        ipr.addr("del", index=br, address="169.254.75.24", prefixlen=32)
    assert accelerate(ns)["launcher_current"] is True


def test_cli_reports_the_limit_as_bad_input(bed2: Testbed) -> None:
    ns = bed2.vms[0].launcher_netns
    with NetNS(ns) as ipr:
        br = ipr.link_lookup(ifname="k6t-eth0")[0]
        for i in range(1, 5):
            ipr.addr("add", index=br, address=f"169.254.75.{20 + i}", prefixlen=32)
        # the CLI uses the default classifier: give it a real tap
        ipr.link("del", index=ipr.link_lookup(ifname="tap0")[0])
    from tests.kernel.test_vm_mirror import _add_real_tap

    _add_real_tap(ns, "tap0")
    res = subprocess.run([sys.executable, "-m", "node_helper.cli", "vm", "accelerate",
                          "--netns", ns], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "at most 4" in res.stderr, res.stderr


def test_adopt_after_a_restart(bed2: Testbed) -> None:
    """A new process sees the pinned program and maps, changes nothing, reads the counters."""
    vm, pod = bed2.vms[0], bed2.pods[0]
    ns = vm.launcher_netns
    original = snapshot(ns)
    code = ("import sys; from lab.testbed import is_tap; from node_helper import vm; "
            "vm.accelerate(sys.argv[1], datapath='bpf', is_tap=is_tap); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, ns], check=True, timeout=60)
    pins = _pins()
    assert len(pins) == 3
    applied = snapshot(ns)
    with udp_echo(pod.netns, pod.ipv4, 7102):
        assert udp_roundtrips(vm.guest_netns, (pod.ipv4, 7102), 20) == 20
    st = status(ns)
    assert st["datapath"] == "bpf" and st["launcher_current"] is True
    assert st["directions"]["tap_to_veth"]["packets"] >= 20
    again = accelerate(ns)  # adopt: nothing changes
    assert snapshot(ns) == applied and _pins() == pins
    assert again["directions"]["tap_to_veth"]["packets"] >= 20  # counters kept
    restore(ns)
    assert snapshot(ns) == original
    assert not bpf.pin_dir().exists()


def test_launcher_change_updates_the_config_in_place(bed2: Testbed) -> None:
    ns = bed2.vms[0].launcher_netns
    first = _main(accelerate(ns))
    with NetNS(ns) as ipr:
        br = ipr.link_lookup(ifname="k6t-eth0")[0]
        ipr.addr("add", index=br, address="169.254.75.30", prefixlen=32)
    assert status(ns)["launcher_current"] is False
    st = accelerate(ns)
    assert st["launcher_current"] is True
    assert {d: f["prog_id"] for d, f in _main(st).items()} == \
        {d: f["prog_id"] for d, f in first.items()}
    with contextlib.suppress(Exception):
        restore(ns)
