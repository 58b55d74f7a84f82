"""netns discovery on a testbed laid out the way kubelet and KubeVirt lay a node out: real
processes in real cgroups (under <cgroup v2 root>/netaccel-lab-<k>) and launcher sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from lab.testbed import CGROUP_PREFIX, Testbed, destroy_number
from node_helper import kernel
from node_helper.netns_discovery import NetnsNotFound, find_netns, peer_pid

pytestmark = pytest.mark.kernel


def same_netns(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.fixture(scope="module", params=["systemd", "cgroupfs"])
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Testbed]:
    root = tmp_path_factory.mktemp("kubelet")
    with Testbed.create(pods=3, vms=2, kubelet_root=root, cgroup_driver=request.param) as tb:
        yield tb


def test_layout_is_kubelets(bed: Testbed) -> None:
    assert bed.cgroup_root.parent == kernel.cgroup2_root()
    status = json.loads(bed.to_json())
    assert status["cgroup_driver"] == bed.cgroup_driver
    uids = [p["uid"] for p in status["pods"]] + [v["uid"] for v in status["vms"]]
    assert len(set(uids)) == 5 and all(uuid.UUID(u).version == 4 for u in uids)
    for item in bed.pods + bed.vms:
        cg = Path(item.cgroup)
        assert cg.is_dir() and bed.cgroup_root in cg.parents
        if bed.cgroup_driver == "systemd":
            assert cg.name.endswith(f"pod{item.uid.replace('-', '_')}.slice")
            assert cg.parts[len(bed.cgroup_root.parts)] == "kubepods.slice"
            (scope,) = [d for d in cg.iterdir() if d.is_dir()]
            assert scope.name.startswith(("cri-containerd-", "crio-", "docker-"))
        else:
            assert cg.name == f"pod{item.uid}"
            assert cg.parts[len(bed.cgroup_root.parts)] == "kubepods"
    qos = {Path(p.cgroup).parent.name for p in bed.pods}
    assert len(qos) == 3  # guaranteed, burstable, besteffort
    for vm in bed.vms:
        sock = Path(vm.launcher_socket)
        assert sock == bed.kubelet_root / "pods" / vm.uid / (
            "volumes/kubernetes.io~empty-dir/sockets/launcher-sock")
        assert same_netns(f"/proc/{peer_pid(sock)}/ns/net", f"/var/run/netns/{vm.launcher_netns}")
    # find() gives the same description back from the processes
    again = Testbed.find(bed.number)
    assert [(p.uid, p.cgroup) for p in again.pods] == [(p.uid, p.cgroup) for p in bed.pods]
    assert [(v.uid, v.launcher_socket) for v in again.vms] == \
        [(v.uid, v.launcher_socket) for v in bed.vms]
    assert again.kubelet_root == bed.kubelet_root


def test_finds_each_pod_by_uid(bed: Testbed) -> None:
    for pod in bed.pods:
        for ips in ([pod.ipv4, pod.ipv6], [pod.ipv6]):
            path = find_netns(pod.uid, ips, kubelet_root=bed.kubelet_root,
                              cgroup_root=bed.cgroup_root)
            assert path.startswith("/proc/") and same_netns(path, f"/var/run/netns/{pod.netns}")


def test_finds_each_launcher_by_socket_and_by_cgroup(bed: Testbed) -> None:
    for vm in bed.vms:
        want = f"/var/run/netns/{vm.launcher_netns}"
        path = find_netns(vm.uid, [vm.ipv4], kubelet_root=bed.kubelet_root,
                          cgroup_root=bed.cgroup_root)
        assert same_netns(path, want)
        # without the socket (another kubelet root) the cgroup finds it too
        path = find_netns(vm.uid, [vm.ipv4], kubelet_root=Path("/nonexistent"),
                          cgroup_root=bed.cgroup_root)
        assert same_netns(path, want)


def test_search_finds_a_pod_below_a_kubelet_cgroup_root_prefix(bed: Testbed) -> None:
    pod = bed.pods[0]
    path = find_netns(pod.uid, [pod.ipv4], kubelet_root=bed.kubelet_root,
                      cgroup_root=bed.cgroup_root.parent)  # kubepods one level further down
    assert same_netns(path, f"/var/run/netns/{pod.netns}")


def test_wrong_ip_or_unknown_uid_raise(bed: Testbed) -> None:
    pod, vm = bed.pods[0], bed.vms[0]
    with pytest.raises(NetnsNotFound) as err:
        find_netns(pod.uid, [bed.pods[1].ipv4], kubelet_root=bed.kubelet_root,
                   cgroup_root=bed.cgroup_root)
    assert pod.uid in str(err.value) and "has none of" in str(err.value)
    with pytest.raises(NetnsNotFound) as err:
        find_netns(vm.uid, ["192.0.2.99"], kubelet_root=bed.kubelet_root,
                   cgroup_root=bed.cgroup_root)
    assert "launcher socket" in str(err.value) and "has none of 192.0.2.99" in str(err.value)
    missing = str(uuid.uuid4())
    with pytest.raises(NetnsNotFound) as err:
        find_netns(missing, [pod.ipv4], kubelet_root=bed.kubelet_root,
                   cgroup_root=bed.cgroup_root)
    assert "no launcher socket" in str(err.value) and "no kubelet cgroup" in str(err.value)


def test_teardown_removes_processes_cgroups_and_sockets(tmp_path: Path) -> None:
    bed = Testbed.create(pods=1, vms=1, kubelet_root=tmp_path, cgroup_driver="systemd")
    pids = [pid for name in (bed.pods[0].netns, bed.vms[0].launcher_netns)
            for pid in netns.ns_pids().get(name, [])]
    assert len(pids) == 2
    root, sock = bed.cgroup_root, Path(bed.vms[0].launcher_socket)
    bed.destroy()
    assert not root.exists() and not sock.exists()
    assert not (tmp_path / "pods" / bed.vms[0].uid).exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_crashed_creator_is_cleaned_by_destroy(tmp_path: Path) -> None:
    """A testbed whose creating process died (CLI `testbed up`): processes survive it;
    destroy_number kills them and removes the cgroups."""
    code = ("import sys; from lab.testbed import Testbed; "
            f"b = Testbed.create(pods=1, vms=1, kubelet_root={str(tmp_path)!r}); "
            "print(b.number)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    number = int(out.stdout.split()[-1])
    top = kernel.cgroup2_root() / f"{CGROUP_PREFIX}{number}"
    try:
        assert top.is_dir()
        again = Testbed.find(number)
        assert again.pods[0].uid and again.kubelet_root == tmp_path
    finally:
        destroy_number(number)
    assert not top.exists()
    assert list((tmp_path / "pods").iterdir()) == []  # the launcher's socket folder went too
