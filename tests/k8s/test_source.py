"""KubernetesSource against a real kube-apiserver: the test plays kubelet and KubeVirt."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from lab.apiserver import APIServer
from lab.kube import apply_rbac, service_account_token
from node_helper.desired import ACCELERATE, VM_CHECKSUM, VM_DATAPATH, Endpoint, VmSettings
from node_helper.source_kubernetes import KubernetesSource, SourceError
from tests.k8s.conftest import REPO, api_client
from tests.k8s.kube import Cluster, Running, unique

RBAC = REPO / "deploy" / "rbac.yaml"
V4, V6 = "10.244.1.", "fd00:10:244:1::"


@pytest.fixture
def cluster(admin: client.ApiClient, vmi_crd_installed: Any) -> Cluster:
    return Cluster(admin)


@pytest.fixture
def run_source(admin: client.ApiClient) -> Iterator[Callable[..., Running]]:
    """Start KubernetesSource(node, api) in a thread; all are stopped afterwards."""
    running: list[Running] = []

    def start(node: str, api: client.ApiClient = admin, **kw: Any) -> Running:
        kw.setdefault("backoff_max", 1.0)
        r = Running(KubernetesSource(node, api, **kw))
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop()


def has(uid: str, **want: Any) -> Callable[[dict[str, Endpoint]], bool]:
    def check(state: dict[str, Endpoint]) -> bool:
        ep = state.get(uid)
        return ep is not None and all(getattr(ep, k) == v for k, v in want.items())
    return check


def test_pods_vmis_and_namespaces(cluster: Cluster, run_source: Callable[..., Running]) -> None:
    node, other = unique("node"), unique("node")
    opted_ns = cluster.namespace(unique("opted"), {ACCELERATE: "true"})
    plain_ns = cluster.namespace(unique("plain"))
    c = cluster
    uid = {
        "plain": c.pod(plain_ns, "plain", node, [V4 + "10", V6 + "10"]),
        "annotated": c.pod(plain_ns, "annotated", node, [V4 + "11", V6 + "11"],
                           annotations={ACCELERATE: "true"}),
        "by-ns": c.pod(opted_ns, "by-ns", node, [V4 + "12"]),
        "opted-out": c.pod(opted_ns, "opted-out", node, [V4 + "13"],
                           annotations={ACCELERATE: "false"}),
        "no-ip": c.pod(plain_ns, "no-ip", node, annotations={ACCELERATE: "true"}),
        "elsewhere": c.pod(plain_ns, "elsewhere", other, [V4 + "14"],
                           annotations={ACCELERATE: "true"}),
        "host-net": c.pod(opted_ns, "host-net", node, ["192.0.2.1"], host_network=True),
    }
    vmi_tuned = c.vmi(plain_ns, "tuned", node, {ACCELERATE: "true", VM_DATAPATH: "mirror",
                                                VM_CHECKSUM: "off"})
    vmi_by_ns = c.vmi(opted_ns, "by-ns-vm", node)
    vmi_plain = c.vmi(plain_ns, "plain-vm", node)
    launcher = {
        "tuned": c.launcher(plain_ns, "tuned", vmi_tuned, node, [V4 + "20", V6 + "20"]),
        "by-ns": c.launcher(opted_ns, "by-ns-vm", vmi_by_ns, node, [V4 + "21"]),
        "plain": c.launcher(plain_ns, "plain-vm", vmi_plain, node, [V4 + "22"]),
    }

    src = run_source(node)
    state = src.wait_for(lambda s: len(s) == 7 and s[launcher["tuned"][1]].vm is not None,
                         what="with every pod")
    assert state[uid["plain"]] == Endpoint(uid["plain"], plain_ns, "plain",
                                           ips=(V4 + "10", V6 + "10"))
    assert state[uid["annotated"]].bypass and state[uid["annotated"]].ips == (V4 + "11",
                                                                             V6 + "11")
    assert state[uid["by-ns"]].bypass
    assert not state[uid["opted-out"]].bypass
    for absent in ("no-ip", "elsewhere", "host-net"):
        assert uid[absent] not in state, absent
    tuned = state[launcher["tuned"][1]]
    assert tuned.vm == VmSettings("mirror", "off") and not tuned.bypass
    assert tuned.ips == (V4 + "20", V6 + "20") and tuned.name == launcher["tuned"][0]
    assert state[launcher["by-ns"][1]].vm == VmSettings()
    assert state[launcher["plain"][1]].vm is None
    assert all(ep.error is None for ep in state.values())

    # kubelet gives the last pod its addresses; opt-ins go; objects go
    c.set_ips(plain_ns, "no-ip", [V4 + "15", V6 + "15"])
    src.wait_for(has(uid["no-ip"], bypass=True, ips=(V4 + "15", V6 + "15")), what="no-ip")
    c.annotate_pod(plain_ns, "annotated", {ACCELERATE: None})
    src.wait_for(has(uid["annotated"], bypass=False), what="annotation removed")
    c.label_namespace(opted_ns, {ACCELERATE: None})
    src.wait_for(lambda s: has(uid["by-ns"], bypass=False)(s)
                 and has(launcher["by-ns"][1], vm=None)(s), what="namespace label removed")
    c.annotate_vmi(plain_ns, "tuned", {ACCELERATE: "false"})
    src.wait_for(has(launcher["tuned"][1], vm=None), what="VMI opted out")
    c.annotate_vmi(plain_ns, "tuned", {ACCELERATE: "true", VM_DATAPATH: None})
    src.wait_for(has(launcher["tuned"][1], vm=VmSettings("bpf", "off")), what="VMI back in")
    c.delete_vmi(plain_ns, "tuned")
    src.wait_for(has(launcher["tuned"][1], vm=None), what="VMI deleted")
    c.delete_pod(plain_ns, "plain")
    c.delete_pod(plain_ns, launcher["tuned"][0])
    state = src.wait_for(lambda s: uid["plain"] not in s and launcher["tuned"][1] not in s,
                         what="pods deleted")
    assert uid["elsewhere"] not in state
    assert all(uid["elsewhere"] not in s for s in src.snapshots)
    stats = src.source.stats
    assert stats["events"] >= 8 and stats["relists"] == 0 and stats["last_sync"] is not None


def test_bursts_are_coalesced(cluster: Cluster, run_source: Callable[..., Running]) -> None:
    node = unique("node")
    ns = cluster.namespace(unique("burst"), {ACCELERATE: "true"})
    src = run_source(node, min_interval=0.5)
    src.wait_for(lambda s: s == {}, what="empty")
    start = time.monotonic()
    uids = [cluster.pod(ns, f"p{i}", node, [f"{V4}{30 + i}"]) for i in range(10)]
    src.wait_for(lambda s: set(s) == set(uids), what="with the burst")
    elapsed = time.monotonic() - start
    # 10 creations and 10 status patches: 20 events, at most one publish per 0.5 s
    assert len(src.snapshots) - 1 <= elapsed / 0.5 + 2, (len(src.snapshots), elapsed)


def test_malformed_values_are_endpoint_errors(cluster: Cluster,
                                              run_source: Callable[..., Running]) -> None:
    node = unique("node")
    ns = cluster.namespace(unique("bad"))
    pod_uid = cluster.pod(ns, "yes-pod", node, [V4 + "40"], annotations={ACCELERATE: "yes"})
    vmi_uid = cluster.vmi(ns, "fast", node, {ACCELERATE: "true", VM_DATAPATH: "fast"})
    _, launcher_uid = cluster.launcher(ns, "fast", vmi_uid, node, [V4 + "41"])
    src = run_source(node)
    state = src.wait_for(lambda s: len(s) == 2, what="with both")
    assert f"pod {ns}/yes-pod" in state[pod_uid].error and "'yes'" in state[pod_uid].error
    assert not state[pod_uid].bypass
    assert f"VMI {ns}/fast" in state[launcher_uid].error and "'fast'" in state[launcher_uid].error
    assert state[launcher_uid].vm is None and state[launcher_uid].ips == (V4 + "41",)
    cluster.annotate_pod(ns, "yes-pod", {ACCELERATE: "true"})
    cluster.annotate_vmi(ns, "fast", {VM_DATAPATH: "bpf"})
    src.wait_for(lambda s: has(pod_uid, error=None, bypass=True)(s)
                 and has(launcher_uid, error=None, vm=VmSettings())(s), what="fixed")


def test_restart_and_compaction_relist_and_converge(
        apiserver: APIServer, cluster: Cluster, run_source: Callable[..., Running]) -> None:
    node = unique("node")
    ns = cluster.namespace(unique("restart"), {ACCELERATE: "true"})
    keep = cluster.pod(ns, "keep", node, [V4 + "50"])
    gone = cluster.pod(ns, "gone", node, [V4 + "51"])
    src = run_source(node, backoff_initial=0.1, backoff_max=0.5)
    src.wait_for(lambda s: set(s) == {keep, gone}, what="before the restart")
    relists = src.source.stats["relists"]
    # the watches' versions are now 410 Gone; SIGKILL after 1 s (it lingers with watches open)
    apiserver.compact_etcd(restart_apiserver=True, stop_timeout=1)
    cluster.delete_pod(ns, "gone")
    new = cluster.pod(ns, "new", node, [V4 + "52", V6 + "52"])
    state = src.wait_for(lambda s: set(s) == {keep, new}, timeout=30, what="after the restart")
    assert state[new].ips == (V4 + "52", V6 + "52") and state[new].bypass
    assert src.source.stats["relists"] >= relists + 1, src.source.stats


def _rbac_docs() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(Path(RBAC).read_text()) if d]
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding",
                                               "ServiceAccount"]
    return docs


def test_rbac_yaml_service_account_can_run_the_source(
        apiserver: APIServer, admin: client.ApiClient, cluster: Cluster,
        run_source: Callable[..., Running]) -> None:
    docs = _rbac_docs()
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
    assert (sa["name"], sa["namespace"]) == ("netaccel-node-helper", "netaccel")
    apply_rbac(admin, docs)
    node = unique("node")
    ns = cluster.namespace(unique("rbac"))
    pod_uid = cluster.pod(ns, "p", node, [V4 + "60"], annotations={ACCELERATE: "true"})
    vmi_uid = cluster.vmi(ns, "vm", node, {ACCELERATE: "true"})
    _, launcher_uid = cluster.launcher(ns, "vm", vmi_uid, node, [V4 + "61"])
    token = service_account_token(admin, "netaccel", "netaccel-node-helper", 600)
    with api_client(apiserver, token) as agent:
        src = run_source(node, agent)
        src.wait_for(lambda s: has(pod_uid, bypass=True)(s)
                     and has(launcher_uid, vm=VmSettings())(s), what="as the ServiceAccount")
        assert src.source.stats["errors"] == 0
        src.stop()


def test_other_nodes_pod_cidrs_as_the_service_account(
        apiserver: APIServer, admin: client.ApiClient, cluster: Cluster,
        run_source: Callable[..., Running]) -> None:
    """With watch_nodes (the agent's --node-fastpath): every other node's spec.podCIDRs."""
    apply_rbac(admin, _rbac_docs())
    me, peer, dual, bare = (unique(n) for n in ("me", "peer", "dual", "bare"))
    own, peer4 = "10.250.1.0/24", "10.250.2.0/24"
    dual_stack = ("10.250.3.0/24", "fd00:10:250:3::/64")
    try:
        cluster.node(me, [own])
        cluster.node(peer, [peer4])
        cluster.node(bare)  # no podCIDRs: the CNI allocates addresses itself
        token = service_account_token(admin, "netaccel", "netaccel-node-helper", 600)
        with api_client(apiserver, token) as agent:
            plain = run_source(me, agent)
            src = run_source(me, agent, watch_nodes=True)
            state = src.wait_for(lambda s: peer4 in s.remote_pod_cidrs, what="with the peer")
            assert own not in state.remote_pod_cidrs
            cluster.node(dual, dual_stack)
            src.wait_for(lambda s: set(dual_stack) <= set(s.remote_pod_cidrs), what="dual")
            cluster.delete_node(peer)
            state = src.wait_for(lambda s: peer4 not in s.remote_pod_cidrs, what="peer gone")
            assert set(dual_stack) <= set(state.remote_pod_cidrs)
            assert plain.wait_for(lambda s: True).remote_pod_cidrs == ()  # not asked: none
            assert src.source.stats["errors"] == 0
    finally:
        for name in (me, peer, dual, bare):
            with contextlib.suppress(client.ApiException):
                cluster.delete_node(name)


def test_report_posts_an_event_on_the_pod_as_the_service_account(
        apiserver: APIServer, admin: client.ApiClient, cluster: Cluster) -> None:
    """What the agent posts when the splice guard reset a pod's connection (issue 12)."""
    apply_rbac(admin, _rbac_docs())
    node = unique("node")
    ns = cluster.namespace(unique("event"))
    pod_uid = cluster.pod(ns, "p", node, [V4 + "70"], annotations={ACCELERATE: "true"})
    token = service_account_token(admin, "netaccel", "netaccel-node-helper", 600)
    with api_client(apiserver, token) as agent:
        KubernetesSource(node, agent).report(Endpoint(pod_uid, ns, "p"),
                                             "SocketBypassSpliceReset", "reset 10.0.0.1:80")
    events = client.CoreV1Api(admin).list_namespaced_event(ns).items
    assert [(e.reason, e.type, e.involved_object.kind, e.involved_object.uid, e.message)
            for e in events] == [("SocketBypassSpliceReset", "Warning", "Pod", pod_uid,
                                  "reset 10.0.0.1:80")]


def test_rbac_without_watch_fails_clearly(
        apiserver: APIServer, admin: client.ApiClient, cluster: Cluster,
        caplog: pytest.LogCaptureFixture) -> None:
    docs = copy.deepcopy(_rbac_docs())
    name = "netaccel-node-helper-nowatch"
    for doc in docs:
        doc["metadata"]["name"] = name
        if doc["kind"] == "ClusterRole":
            for rule in doc["rules"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != "watch"]
        if doc["kind"] == "ClusterRoleBinding":
            doc["roleRef"]["name"] = name
            doc["subjects"][0]["name"] = name
    apply_rbac(admin, docs)
    with api_client(apiserver, service_account_token(admin, "netaccel", name, 600)) as agent:
        source = KubernetesSource(unique("node"), agent, backoff_max=1.0)
        published: list[Any] = []
        start = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="netaccel.source.kubernetes"), \
                pytest.raises(SourceError) as err:
            source.run(published.append, threading.Event())
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "refused to watch" in message and "HTTP 403" in message
    assert any(r in message for r in ("pods", "namespaces", "virtualmachineinstances"))
    assert "event=forbidden" in caplog.text
