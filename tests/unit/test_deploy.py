"""deploy/: the DaemonSet asks for what the agent needs and nothing more; uninstall is not a
preStop hook; the cleanup DaemonSet runs `netaccel node cleanup`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE", "SYS_PTRACE"}


def _one(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return doc


def test_namespace() -> None:
    ns = _one("namespace.yaml")
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == "netaccel"


def test_daemonset() -> None:
    ds = _one("daemonset.yaml")
    assert ds["kind"] == "DaemonSet" and ds["metadata"]["namespace"] == "netaccel"
    spec = ds["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "netaccel-node-helper"  # deploy/rbac.yaml
    assert spec["hostNetwork"] and spec["hostPID"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert set(sc["capabilities"]["add"]) == CAPS and sc["capabilities"]["drop"] == ["ALL"]
    assert "lifecycle" not in c, "no preStop: it would undo acceleration on every update"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NETACCEL_CGROUP_ROOT"]["value"] == "/run/netaccel/cgroup"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["args"] == ["--metrics-bind", "127.0.0.1:9464"]
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"]["host"] == "127.0.0.1" and probe["httpGet"]["port"] == 9464
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert volumes == {"bpffs": "/sys/fs/bpf", "cgroup": "/sys/fs/cgroup",
                       "kubelet-pods": "/var/lib/kubelet/pods", "modules": "/lib/modules",
                       "usr-src": "/usr/src"}
    assert set(mounts) == set(volumes)
    for ro in ("cgroup", "kubelet-pods", "modules", "usr-src"):
        assert mounts[ro]["readOnly"] is True
    assert mounts["cgroup"]["mountPath"] == env["NETACCEL_CGROUP_ROOT"]["value"]


def test_cleanup_daemonset_runs_node_cleanup() -> None:
    ds = _one("cleanup.yaml")
    spec = ds["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["command"][-3:] == ["node", "cleanup", "--json"]
    assert set(init["securityContext"]["capabilities"]["add"]) == CAPS
    assert spec["hostPID"] and spec["tolerations"] == [{"operator": "Exists"}]
