"""End to end: `netaccel node run --kubernetes` against the real API server, on a testbed laid
out as kubelet does, with the identity of deploy/rbac.yaml.

The test plays kubelet and KubeVirt: it creates the Pods (bound to a node of its own) and the
VMIs with their virt-launcher pods, builds the testbed with the UIDs the API server gave them
(processes in kubelet-style cgroups, launcher command sockets), then patches the Pods' status
addresses. The VMs' tap0 is a real tun/tap (testbed guest "none"): the agent runs with its own
tap classifier, as on a node. Everything is checked in the kernel (sockets.status, vm.status),
on the agent's HTTP endpoint and in its JSON logs; every test ends with `netaccel node
cleanup` and a check that nothing of this run's NETACCEL_INSTANCE is left on the testbed.

The agent finds the pods' cgroups from the real cgroup v2 root (netns discovery's search finds
them below the testbed's netaccel-lab-<k>/); NETACCEL_CGROUP_ROOT is left alone, since it also
moves where the socket bypass attaches.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from lab.apiserver import APIServer
from lab.kube import Cluster, apply_rbac, service_account_token, unique, write_kubeconfig
from lab.testbed import Testbed
from node_helper import kernel, sockets
from node_helper import vm as vm_api
from node_helper.desired import ACCELERATE, VM_CHECKSUM
from tests.k8s.conftest import REPO
from tests.kernel.conftest import assert_testing_this_checkout
from tests.kernel.test_agent import (
    AgentProc,
    Stream,
    agents_then_cleanup,
    assert_clean,
    netaccel,
    wait_for,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]
RBAC = REPO / "deploy" / "rbac.yaml"


@dataclass
class World:
    """A node: namespaces, Pods, VMIs and launchers in the API server, the testbed under them.

    pod0 (annotated) and pod1 (its namespace's label) opt in to the bypass, pod2 too (it is
    made malformed later); vm0's VMI is annotated (checksum off), vm1's opts in by its
    namespace's label and has no kubelet layout until `lay_out_vm1()`."""

    cluster: Cluster
    bed: Testbed
    node: str
    plain: str  # a namespace without the label
    opted: str  # a namespace with netaccel.kubevirt.io/accelerate=true
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod<i> -> (ns, name)
    launchers: dict[str, tuple[str, str]] = field(default_factory=dict)  # vm<j> -> (ns, name)
    vmis: dict[str, tuple[str, str]] = field(default_factory=dict)  # vm<j> -> (ns, name)
    uids: dict[str, str] = field(default_factory=dict)  # pod<i>/vm<j> -> pod UID

    def lay_out_vm1(self) -> None:
        self.bed.lay_out("vm1", self.uids["vm1"])

    def host_routes(self, *pods: int) -> list[str]:
        return sorted(c for i in pods for c in (f"{self.bed.pods[i].ipv4}/32",
                                                f"{self.bed.pods[i].ipv6}/128"))


@pytest.fixture
def world(apiserver: APIServer, admin: client.ApiClient, vmi_crd_installed: Any,
          tmp_path: Path) -> Iterator[World]:
    assert_testing_this_checkout()
    assert not (kernel.BPFFS / kernel.instance()).exists(), "pins left by an earlier test"
    c = Cluster(admin)
    node = unique("node")
    plain = c.namespace(unique("e2e"))
    opted = c.namespace(unique("e2e-opted"), {ACCELERATE: "true"})
    specs = {"pod0": (plain, "client", {ACCELERATE: "true"}),
             "pod1": (opted, "server", {}),
             "pod2": (plain, "third", {ACCELERATE: "true"})}
    uids: dict[str, str] = {}
    pods: dict[str, tuple[str, str]] = {}
    for key, (ns, name, notes) in specs.items():
        uids[key] = c.pod(ns, name, node, annotations=notes)  # no address yet
        pods[key] = (ns, name)
    vmis = {"vm0": (plain, "vm0"), "vm1": (opted, "vm1")}
    launchers: dict[str, tuple[str, str]] = {}
    vmi_uid = {"vm0": c.vmi(plain, "vm0", node, {ACCELERATE: "true", VM_CHECKSUM: "off"}),
               "vm1": c.vmi(opted, "vm1", node)}
    for key, (ns, name) in vmis.items():
        launchers[key] = c.launcher(ns, name, vmi_uid[key], node, ips=())
        uids[key] = launchers[key][1]
        launchers[key] = (ns, launchers[key][0])
    # kubelet: the sandboxes (with the API server's UIDs; vm1's comes late), then the status
    with Testbed.create(pods=3, vms=2, guest="none", kubelet_root=tmp_path / "kubelet",
                        uids={**uids, "vm1": None}) as bed:
        for key, (ns, name) in pods.items():
            p = bed.pods[int(key[3:])]
            c.set_ips(ns, name, [p.ipv4, p.ipv6])
        for key, (ns, name) in launchers.items():
            c.set_ips(ns, name, [bed.vms[int(key[2:])].ipv4])
        yield World(c, bed, node, plain, opted, pods, launchers, vmis, uids)


@pytest.fixture
def kubeconfig(apiserver: APIServer, admin: client.ApiClient, tmp_path: Path) -> Path:
    """Credentials of the ServiceAccount of deploy/rbac.yaml (a TokenRequest), nothing more."""
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    apply_rbac(admin, docs)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
    token = service_account_token(admin, sa["namespace"], sa["name"], 3600)
    return write_kubeconfig(tmp_path / "kubeconfig", apiserver.url, apiserver.ca_file, token)


def start_agent(w: World, kubeconfig: Path, log: Path) -> AgentProc:
    """`netaccel node run --kubernetes` with the ServiceAccount's kubeconfig."""
    assert w.bed.kubelet_root is not None
    return AgentProc(["--kubernetes", "--node-name", w.node, "--kubeconfig", str(kubeconfig),
                      "--kubelet-root", str(w.bed.kubelet_root)], log)


@pytest.fixture
def agent(world: World, kubeconfig: Path, tmp_path: Path) -> Iterator[Any]:
    """Starts agents; kills them, runs `netaccel node cleanup` and checks nothing is left."""
    with agents_then_cleanup(world.bed, lambda log: start_agent(world, kubeconfig, log),
                             tmp_path) as start:
        yield start


def vm_state(bed: Testbed, j: int) -> dict[str, Any]:
    return vm_api.status(bed.vms[j].launcher_netns)


def test_programs_reacts_relists_and_undoes(world: World, agent: Any,
                                            apiserver: APIServer) -> None:
    w, bed, c = world, world.bed, world.cluster
    before = {j: vm_state(bed, j) for j in (0, 1)}
    a = agent()
    ready = wait_for(a.ready, 60, "/readyz")
    assert ready["sources"] == {"kubernetes": True}

    # programmed: the bypass for the three pods, vm0's datapath (checksum off)
    wait_for(lambda: sockets.status()["cidrs"] == w.host_routes(0, 1, 2), 20, "the bypass set")
    assert sockets.status()["enabled"]
    wait_for(lambda: vm_state(bed, 0)["datapath"] == "bpf", 20, "vm0 accelerated")
    vst = vm_state(bed, 0)
    assert vst["launcher_current"] and vst["offload"]["eth0-nic"]["rx-checksum"] is False

    # vm1's sandbox is not there yet: retried with backoff, never fatal; then it comes
    retry = wait_for(lambda: a.event("reconcile_error", key=w.uids["vm1"]), 20, "vm1's retry")
    assert retry["op"] == "vm_accelerate" and "NetnsNotFound" in retry["error"]
    assert (a.metric("netaccel_reconcile_errors_total", '{op="vm_accelerate"}') or 0) >= 1
    assert vm_state(bed, 1)["datapath"] is None
    w.lay_out_vm1()
    wait_for(lambda: vm_state(bed, 1)["datapath"] == "bpf", 30, "vm1 accelerated")
    assert vm_state(bed, 0)["datapath"] == "bpf" and a.proc.poll() is None
    assert wait_for(a.ready, 10)["vms"] == 2

    # a malformed annotation: one log line, the invalid gauge; the pod is left untouched
    ns, name = w.pods["pod2"]
    c.annotate_pod(ns, name, {ACCELERATE: "yes"})
    bad = wait_for(lambda: a.event("endpoint_invalid", uid=w.uids["pod2"]), 15, "reported")
    assert f"pod {ns}/{name}" in bad["error"] and "'yes'" in bad["error"]
    assert a.metric("netaccel_endpoints", '{kind="invalid"}') == 1
    assert sockets.status()["cidrs"] == w.host_routes(0, 1, 2)  # still in the set
    c.annotate_pod(ns, name, {ACCELERATE: "false"})  # fixed, and out
    wait_for(lambda: sockets.status()["cidrs"] == w.host_routes(0, 1), 15, "pod2 out")
    assert len(a.events("endpoint_invalid", uid=w.uids["pod2"])) == 1
    assert a.metric("netaccel_endpoints", '{kind="invalid"}') == 0

    # opt-in removed / objects deleted: exactly theirs undone
    filters1 = vm_state(bed, 1)["filters"]
    c.annotate_vmi(*w.vmis["vm0"], {ACCELERATE: None})
    wait_for(lambda: vm_state(bed, 0)["datapath"] is None, 15, "vm0 restored")
    st = vm_state(bed, 0)
    assert st["offload"] == before[0]["offload"] and st["qdiscs"] == before[0]["qdiscs"]
    assert vm_state(bed, 1)["filters"] == filters1
    c.delete_pod(*w.launchers["vm1"])
    wait_for(lambda: vm_state(bed, 1)["datapath"] is None, 15, "vm1 restored")
    st = vm_state(bed, 1)
    assert st["offload"] == before[1]["offload"] and st["qdiscs"] == before[1]["qdiscs"]
    assert not (kernel.BPFFS / kernel.instance() / "vm").exists()  # the last VM took the pins
    c.annotate_pod(*w.pods["pod0"], {ACCELERATE: None})
    wait_for(lambda: sockets.status()["cidrs"] == w.host_routes(1), 15, "pod0 out")
    progs = sockets.attached_programs()

    # the API server restarts on a compacted etcd (410 for every watch): a change made while
    # the agent is cut off is applied after the relist
    relists = len(a.source_lines("relist"))
    apiserver.compact_etcd(restart_apiserver=True, stop_timeout=1)
    c.annotate_pod(*w.pods["pod0"], {ACCELERATE: "true"})
    c.delete_pod(*w.pods["pod1"])
    wait_for(lambda: sockets.status()["cidrs"] == w.host_routes(0), 30, "converged")
    wait_for(lambda: len(a.source_lines("relist")) > relists, 10, "a relist")
    assert sockets.attached_programs() == progs and a.proc.poll() is None
    assert wait_for(a.ready, 10)["sources"] == {"kubernetes": True}
    # relisted in place: the source was not restarted (a 403 of the API server's start-up,
    # before its RBAC caches are filled, is retried, not taken for a refusal)
    assert not a.events("source_error") and not a.source_lines("forbidden ")


def test_restart_mid_stream_kill9_and_cleanup(world: World, agent: Any) -> None:
    w, bed = world, world.bed
    w.lay_out_vm1()
    first = agent()
    wait_for(first.ready, 60, "/readyz")
    wait_for(lambda: sockets.status()["cidrs"] == w.host_routes(0, 1, 2), 20, "the bypass set")
    wait_for(lambda: all(vm_state(bed, j)["datapath"] == "bpf" for j in (0, 1)), 20, "VMs")
    progs = sockets.attached_programs()
    filters = [vm_state(bed, j)["filters"] for j in (0, 1)]
    assert len(progs) == 1
    stream = Stream(bed)  # pod0 -> pod1, both opted in
    try:
        assert stream.flowing()
        c0 = sockets.status()["redirected_bytes"]
        assert first.stop() == 0  # SIGTERM, a rolling update
        assert stream.flowing() and sockets.attached_programs() == progs
        c1 = sockets.status()["redirected_bytes"]
        assert c1 > c0

        second = agent()  # adopts: same programs, same filters
        wait_for(second.ready, 60, "/readyz after the restart")
        time.sleep(3.5)  # past a resync (--resync 3)
        assert sockets.attached_programs() == progs
        assert [vm_state(bed, j)["filters"] for j in (0, 1)] == filters
        assert not second.events("reconcile_error")
        assert stream.flowing()
        c2 = sockets.status()["redirected_bytes"]
        assert c2 > c1
        assert (second.metric("netaccel_bypass_redirected_bytes_total") or 0) >= c2

        assert second.stop(signal.SIGKILL) == -signal.SIGKILL  # fail open
        assert stream.flowing() and sockets.attached_programs() == progs
        assert sockets.status()["redirected_bytes"] > c2
    finally:
        stream.finish()
    assert stream.bad is None
    assert stream.received == stream.sent > 0, "bytes lost"

    for _ in range(2):  # the uninstall, idempotent
        res = netaccel("node", "cleanup", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["ok"] is True
    assert_clean(bed)
