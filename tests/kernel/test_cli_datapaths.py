"""The CLI over both datapaths, as an operator runs it: JSON out, exit codes that mean something."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pyroute2 import NetNS, netns

from lab.testbed import Testbed
from node_helper import sockets

pytestmark = pytest.mark.kernel
NETACCEL = [sys.executable, "-m", "node_helper.cli"]


def netaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(NETACCEL + list(args), capture_output=True, text=True, timeout=120)


@pytest.fixture
def bed():
    with Testbed.create(pods=2, vms=1) as tb:
        yield tb


@pytest.fixture
def tap_bed(bed: Testbed):
    """The VM with a real tun/tap as tap0: the CLI recognises only real taps (the default
    classifier), not the testbed's veth stand-in."""
    from tests.kernel.test_vm_mirror import _add_real_tap

    ns = bed.vms[0].launcher_netns
    with NetNS(ns) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname="tap0")[0])
    _add_real_tap(ns, "tap0")
    try:
        yield bed
    finally:
        netaccel("vm", "restore", "--netns", ns)


def test_vm_accelerate_status_restore(tap_bed: Testbed) -> None:
    ns = tap_bed.vms[0].launcher_netns
    on = netaccel("vm", "accelerate", "--netns", ns, "--datapath", "mirror", "--json")
    assert on.returncode == 0, on.stderr
    assert json.loads(on.stdout)["datapath"] == "mirror"
    status = json.loads(netaccel("vm", "status", "--netns", ns, "--json").stdout)
    assert status["devices"]["tap"]["name"] == "tap0"
    assert status["devices"]["veth"]["name"] == "eth0-nic"
    assert status["offload"]["eth0-nic"]["tx-checksum-ip-generic"] is True  # default: keep
    off = netaccel("vm", "accelerate", "--netns", ns, "--checksum", "off", "--json")
    assert off.returncode == 0, off.stderr
    for dev in ("tap0", "eth0-nic"):
        assert json.loads(off.stdout)["offload"][dev]["rx-checksum"] is False
        assert json.loads(off.stdout)["offload"][dev]["tx-checksum-ip-generic"] is False
    restored = netaccel("vm", "restore", "--netns", ns)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(netaccel("vm", "status", "--netns", ns, "--json").stdout)["datapath"] is None


def test_vm_on_a_pod_netns_is_a_clear_usage_error(bed: Testbed) -> None:
    res = netaccel("vm", "accelerate", "--netns", bed.pods[0].netns)
    assert res.returncode == 2
    assert "k6t-eth0" in res.stderr  # says which bridge it looked for


def test_bypass_on_needs_explicit_cidrs() -> None:
    res = netaccel("bypass", "on")
    assert res.returncode == 2 and "--cidr" in res.stderr
    bad = netaccel("bypass", "on", "--cidr", "10.251.1.300/32")
    assert bad.returncode == 2 and "invalid CIDR" in bad.stderr
    assert sockets.attached_programs() == []


def test_bypass_on_status_off_from_separate_processes(bed: Testbed) -> None:
    try:
        cidrs = [arg for cidr in bed.pod_cidrs() for arg in ("--cidr", cidr)]
        on = netaccel("bypass", "on", *cidrs, "--json")
        assert on.returncode == 0, on.stderr
        status = json.loads(netaccel("bypass", "status", "--json").stdout)
        assert status["enabled"] is True
        assert sorted(status["cidrs"]) == sorted(bed.pod_cidrs())
        assert {"sockets", "redirected_msgs", "redirected_bytes", "fallback_msgs"} <= set(status)
        assert netaccel("bypass", "off").returncode == 0
        assert json.loads(netaccel("bypass", "status", "--json").stdout)["enabled"] is False
        assert sockets.attached_programs() == []
    finally:
        sockets.disable()


def test_doctor_checks_what_the_agent_needs() -> None:
    res = subprocess.run(NETACCEL + ["doctor", "--json"], capture_output=True, text=True)
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert res.returncode == 0, res.stdout
    assert set(checks) == {"root", "bpf-sockhash", "cgroup-v2", "bpffs", "bcc", "bcc-headers",
                           "tc-cls-bpf", "tc-u32-mirred", "ethtool-netlink"}  # no lab tools
    assert all(c["ok"] for c in checks.values()), checks
    assert not [n for n in netns.listnetns() if n.startswith("na-doctor-")]


def test_doctor_reports_missing_headers_with_the_fix(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from node_helper import doctor, kernel

    monkeypatch.setattr(kernel, "MODULES_DIR", tmp_path)
    checks = {c.name: c for c in doctor.run_checks()}
    for name in ("bcc-headers", "tc-cls-bpf"):
        assert not checks[name].ok and checks[name].required
    assert "linux-headers" in checks["bcc-headers"].fix
    assert checks["tc-u32-mirred"].ok  # the mirror datapath needs no compiler
