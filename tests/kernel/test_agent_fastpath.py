"""The agent with --node-fastpath, as on a node: `netaccel node run --static FILE` inside the
testbed's node netns (the node-side veths are there), the CNI stand-in's rules loaded. The
opted-in pods get the fast path, metrics show it, a killed agent leaves traffic flowing, an
endpoint that goes is taken off, `node cleanup` restores the CNI's path. On two joined
testbeds, each node's agent programs the path across from the other node's pod CIDRs."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab import cni, multinode
from lab.testbed import Testbed
from node_helper import fastpath, kernel

from .conftest import assert_nothing_of_ours
from .nodepath import udp_echo
from .test_agent import NETACCEL, REPO, AgentProc, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with Testbed.create(pods=3) as tb:
        cni.load(tb.node_netns)
        yield tb


def _write(path: Path, bed: Testbed, pods: list[int], remote: list[str] | None = None) -> None:
    entries = [{"uid": f"uid-{i}", "namespace": "default", "name": f"pod{i}",
                "ips": [bed.pods[i].ipv4, bed.pods[i].ipv6], "netns": bed.pods[i].netns,
                "bypass": True} for i in pods]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"pods": entries, "remote_pod_cidrs": remote or []}))
    tmp.rename(path)


def _node_cleanup(bed: Testbed) -> None:
    res = subprocess.run(kernel.netns_argv(bed.node_netns, [*NETACCEL, "node", "cleanup"]),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def _on(bed: Testbed) -> set[str]:
    return {e["device"] for e in fastpath.status(bed.node_netns)["endpoints"]}


def _on_node(bed: Testbed) -> set[str]:
    with multinode.as_node(bed.number):
        return _on(bed)


def _counters(bed: Testbed, device: str) -> dict[str, int]:
    with multinode.as_node(bed.number):
        return fastpath.endpoint_status(bed.node_netns, device)["counters"]


def test_agent_puts_opted_in_pods_on_the_fast_path(bed: Testbed, tmp_path: Path) -> None:
    desired = tmp_path / "desired.yaml"
    _write(desired, bed, [0, 1])  # pod2 not opted in
    p0, p1, p2 = bed.pods
    args = ["--static", str(desired), "--node-fastpath"]
    agents: list[AgentProc] = []
    try:
        agents.append(AgentProc(args, tmp_path / "agent0.log", netns=bed.node_netns))
        wait_for(lambda: _on(bed) == {p0.host_veth, p1.host_veth}, 60, "both pods on it")
        before = fastpath.endpoint_status(bed.node_netns, p0.host_veth)["counters"]
        assert udp_echo(p0.netns, p1.netns, p1.ipv4, 50) == 50
        assert udp_echo(p0.netns, p2.netns, p2.ipv4, 10) == 10  # not opted in: CNI's path
        after = fastpath.endpoint_status(bed.node_netns, p0.host_veth)["counters"]
        assert after["fast_packets"] - before["fast_packets"] >= 48
        assert wait_for(lambda: agents[0].metric("netaccel_fastpath_endpoints") == 2, 10)
        assert agents[0].metric("netaccel_fastpath_packets_total", '{result="fast"}') >= 48

        # kill -9: what is in the kernel stays, traffic keeps its fast path
        agents[0].stop(signal.SIGKILL)
        mid = fastpath.endpoint_status(bed.node_netns, p0.host_veth)["counters"]
        assert udp_echo(p0.netns, p1.netns, p1.ipv4, 30) == 30
        end = fastpath.endpoint_status(bed.node_netns, p0.host_veth)["counters"]
        assert end["fast_packets"] - mid["fast_packets"] >= 28

        # a new agent adopts it; pod1 leaves the desired state: its device is taken off
        agents.append(AgentProc(args, tmp_path / "agent1.log", netns=bed.node_netns))
        _write(desired, bed, [0])
        wait_for(lambda: _on(bed) == {p0.host_veth}, 30, "pod1 taken off")
        assert udp_echo(p0.netns, p1.netns, p1.ipv4, 20) == 20
    finally:
        for a in agents:
            a.stop(signal.SIGKILL)
        _node_cleanup(bed)
    assert _on(bed) == set()
    assert not fastpath.pin_dir().exists()
    assert_nothing_of_ours()
    assert udp_echo(p0.netns, p1.netns, p1.ipv4, 10) == 10


def test_agents_of_two_nodes_program_the_path_across(tmp_path: Path) -> None:
    """Each node's agent: its pods, the other node's pod CIDRs as the remote set (as its Node
    object says), and the device its routes take there (the VXLAN device) as the uplink."""
    with Testbed.create(pods=2) as a, Testbed.create(pods=2) as b, \
            multinode.joined(a, b) as cluster:
        vx = {bed.number: cluster.node(bed.number).vxlan for bed in (a, b)}
        files = {bed.number: tmp_path / f"desired{bed.number}.yaml" for bed in (a, b)}
        agents: list[AgentProc] = []
        try:
            for bed, peer in ((a, b), (b, a)):
                cni.load(bed.node_netns)
                _write(files[bed.number], bed, [0, 1], multinode.pod_cidrs(peer))
                with multinode.as_node(bed.number):
                    agents.append(AgentProc(["--static", str(files[bed.number]),
                                             "--node-fastpath"],
                                            tmp_path / f"agent{bed.number}.log",
                                            netns=bed.node_netns))
            for bed in (a, b):
                want = {p.host_veth for p in bed.pods} | {vx[bed.number]}
                wait_for(lambda bed=bed, want=want: _on_node(bed) == want, 90,
                         f"node {bed.number}'s pods and uplink")
            remote = agents[0].event("fastpath_remote")
            assert remote and remote["uplinks"] == [vx[a.number]], remote
            assert remote["cidrs"] == sorted(multinode.pod_cidrs(b))
            src, dst = a.pods[0], b.pods[1]
            for ip in (dst.ipv4, dst.ipv6):
                sent, arrived = _counters(a, src.host_veth), _counters(b, vx[b.number])
                assert udp_echo(src.netns, dst.netns, ip, 50) == 50
                assert _counters(a, src.host_veth)["remote_packets"] - \
                    sent["remote_packets"] >= 48, ip
                assert _counters(b, vx[b.number])["fast_packets"] - \
                    arrived["fast_packets"] >= 48, ip

            # node b leaves node a's remote set: the uplink is taken off, the CNI carries it
            _write(files[a.number], a, [0, 1], [])
            wait_for(lambda: vx[a.number] not in _on_node(a), 30, "node a's uplink off")
            sent = _counters(a, src.host_veth)
            assert udp_echo(src.netns, dst.netns, dst.ipv4, 20) == 20
            assert _counters(a, src.host_veth)["remote_packets"] == sent["remote_packets"]
        finally:
            for agent in agents:
                agent.stop(signal.SIGKILL)
            for bed in (a, b):
                with multinode.as_node(bed.number):
                    _node_cleanup(bed)
                    assert _on(bed) == set() and not fastpath.pin_dir().exists()
        assert udp_echo(a.pods[0].netns, b.pods[1].netns, b.pods[1].ipv4, 10) == 10
