"""The test plays kubelet and KubeVirt: namespaces, pods bound to nodes with their status
addresses, VMIs with the node label and their virt-launcher pods; and a running source."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes import client

from node_helper.desired import DesiredState
from node_helper.source_kubernetes import KubernetesSource

IMAGE = "registry.invalid/none:1"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Cluster:
    """Objects in the test API server, created with the admin client."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.v1 = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        self.v1.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        return name

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

    def launcher(self, ns: str, vmi_name: str, vmi_uid: str, node: str,
                 ips: Iterable[str]) -> tuple[str, str]:
        """The VMI's virt-launcher pod; (name, uid)."""
        name = f"virt-launcher-{vmi_name}-{uuid.uuid4().hex[:5]}"
        uid = self.pod(ns, name, node, ips, labels={
            "kubevirt.io": "virt-launcher", "kubevirt.io/created-by": vmi_uid,
            "vm.kubevirt.io/name": vmi_name})
        return name, uid


class Running:
    """A KubernetesSource running in a thread; the snapshots it published."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source
        self.snapshots: list[DesiredState] = []
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.source.run(self._publish, self.stop_event)
        except BaseException as exc:  # handed to the test
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def _publish(self, state: DesiredState) -> None:
        with self._cond:
            self.snapshots.append(state)
            self._cond.notify_all()

    @property
    def latest(self) -> DesiredState | None:
        return self.snapshots[-1] if self.snapshots else None

    def wait_for(self, check: Callable[[DesiredState], bool], timeout: float = 15.0,
                 what: str = "") -> DesiredState:
        """The first published snapshot (latest first) for which `check` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.latest is not None and check(self.latest):
                    return self.latest
                if self.error is not None:
                    raise AssertionError(f"the source failed: {self.error!r}") from self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no snapshot {what} after {timeout}s; latest: "
                                         f"{self.latest}; stats: {self.source.stats}")
                self._cond.wait(left)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the source did not stop within 15 s"
