"""Playing kubelet and KubeVirt against an API server (lab.apiserver's, in tests and benches).

`Cluster` creates what they would: namespaces, pods bound to a node with kubelet's status
addresses, VMIs carrying the node label and their virt-launcher pods. `apply_rbac`,
`service_account_token` and `write_kubeconfig` give the agent an identity bound to exactly
deploy/rbac.yaml (a TokenRequest for its ServiceAccount), as the DaemonSet has.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

IMAGE = "registry.invalid/none:1"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def api_client(url: str, ca_file: str | Path, token: str) -> client.ApiClient:
    """A kubernetes.client.ApiClient for `url` with a bearer token."""
    cfg = client.Configuration()
    cfg.host = url
    cfg.ssl_ca_cert = str(ca_file)
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(cfg)


class Cluster:
    """Objects in the API server, created with an admin client."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.v1 = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        self.v1.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        return name

    def ensure_namespace(self, name: str) -> None:
        try:
            self.namespace(name)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def label_namespace(self, name: str, labels: dict[str, str | None]) -> None:
        self.v1.patch_namespace(name, {"metadata": {"labels": labels}})

    def pod(self, ns: str, name: str, node: str, ips: Iterable[str] = (),
            annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
            host_network: bool = False) -> str:
        """A pod bound to `node`; with `ips`, kubelet's status (Running, podIP, podIPs)."""
        spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "c", "image": IMAGE}]}
        if host_network:
            spec["hostNetwork"] = True
        pod = self.v1.create_namespaced_pod(ns, {
            "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
            "spec": spec})
        if ips:
            self.set_ips(ns, name, ips)
        return pod.metadata.uid

    def set_ips(self, ns: str, name: str, ips: Iterable[str]) -> None:
        ips = list(ips)
        self.v1.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}})

    def annotate_pod(self, ns: str, name: str, annotations: dict[str, str | None]) -> None:
        self.v1.patch_namespaced_pod(name, ns, {"metadata": {"annotations": annotations}})

    def delete_pod(self, ns: str, name: str) -> None:
        self.v1.delete_namespaced_pod(name, ns, grace_period_seconds=0)

    def vmi(self, ns: str, name: str, node: str,
            annotations: dict[str, str] | None = None) -> str:
        """A VMI as virt-controller leaves it once scheduled: the node label set."""
        obj = self.custom.create_namespaced_custom_object("kubevirt.io", "v1", ns,
                                                          "virtualmachineinstances", {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "annotations": annotations or {},
                         "labels": {"kubevirt.io/nodeName": node}},
            "spec": {"domain": {"devices": {"interfaces": [{"name": "default", "bridge": {}}]},
                                "resources": {"requests": {"memory": "64Mi"}}},
                     "networks": [{"name": "default", "pod": {}}]}})
        return obj["metadata"]["uid"]

    def annotate_vmi(self, ns: str, name: str, annotations: dict[str, str | None]) -> None:
        self.custom.patch_namespaced_custom_object(
            "kubevirt.io", "v1", ns, "virtualmachineinstances", name,
            {"metadata": {"annotations": annotations}})

    def delete_vmi(self, ns: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object("kubevirt.io", "v1", ns,
                                                    "virtualmachineinstances", name)

    def node(self, name: str, pod_cidrs: Iterable[str] = ()) -> None:
        """A Node with spec.podCIDRs (what kube-controller-manager's IPAM gives it; it cannot
        change once set)."""
        cidrs = list(pod_cidrs)
        spec = {"podCIDR": cidrs[0], "podCIDRs": cidrs} if cidrs else {}
        self.v1.create_node({"metadata": {"name": name}, "spec": spec})

    def delete_node(self, name: str) -> None:
        self.v1.delete_node(name)

    def launcher(self, ns: str, vmi_name: str, vmi_uid: str, node: str,
                 ips: Iterable[str], name: str | None = None) -> tuple[str, str]:
        """The VMI's virt-launcher pod; (name, uid)."""
        name = name or f"virt-launcher-{vmi_name}-{uuid.uuid4().hex[:5]}"
        uid = self.pod(ns, name, node, ips, labels={
            "kubevirt.io": "virt-launcher", "kubevirt.io/created-by": vmi_uid,
            "vm.kubevirt.io/name": vmi_name})
        return name, uid


# --- the agent's identity ----------------------------------------------------------------

def apply_rbac(api_client: client.ApiClient, docs: Iterable[Mapping[str, Any]]) -> None:
    """Create the ServiceAccount, ClusterRole and ClusterRoleBinding of `docs` (deploy/
    rbac.yaml or a variant); objects that exist already are replaced by these."""
    v1, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    ops = {
        "ServiceAccount": (
            lambda d: v1.create_namespaced_service_account(d["metadata"]["namespace"], d),
            lambda d: v1.replace_namespaced_service_account(
                d["metadata"]["name"], d["metadata"]["namespace"], d)),
        "ClusterRole": (rbac.create_cluster_role,
                        lambda d: rbac.replace_cluster_role(d["metadata"]["name"], d)),
        "ClusterRoleBinding": (rbac.create_cluster_role_binding,
                               lambda d: rbac.replace_cluster_role_binding(
                                   d["metadata"]["name"], d)),
    }
    for doc in docs:
        create, replace = ops[doc["kind"]]
        if doc["kind"] == "ServiceAccount":
            Cluster(api_client).ensure_namespace(doc["metadata"]["namespace"])
        try:
            create(doc)
        except ApiException as exc:
            if exc.status != 409:
                raise
            replace(doc)


def service_account_token(api_client: client.ApiClient, ns: str, name: str,
                          seconds: int = 3600) -> str:
    """A bound token for ServiceAccount ns/name (the TokenRequest API)."""
    tr = client.CoreV1Api(api_client).create_namespaced_service_account_token(
        name, ns, {"spec": {"expirationSeconds": seconds}})
    return tr.status.token


def write_kubeconfig(path: Path, url: str, ca_file: str | Path, token: str,
                     user: str = "netaccel-node-helper") -> Path:
    """A kubeconfig (JSON is valid YAML) for a bearer token."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": url,
                                                 "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
        "current-context": "lab"}, indent=2))
    path.chmod(0o600)
    return path
