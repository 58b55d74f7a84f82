"""The Kubernetes source's pure part: API objects -> Endpoints (no API server)."""

from __future__ import annotations

import logging

import pytest

from node_helper.desired import ACCELERATE, VM_CHECKSUM, Endpoint, VmSettings
from node_helper.source_kubernetes import (
    endpoints,
    log_event,
    trim_namespace,
    trim_pod,
    trim_vmi,
)


def pod(uid: str, ips: list[str] | None = None, pod_ip: str | None = None, phase: str = "Running",
        annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
        ns: str = "ns", host_network: bool = False) -> dict:
    status: dict = {"phase": phase}
    if ips is not None:
        status["podIPs"] = [{"ip": ip} for ip in ips]
    if pod_ip:
        status["podIP"] = pod_ip
    return trim_pod({"metadata": {"uid": uid, "namespace": ns, "name": f"p-{uid}",
                                  "annotations": annotations or {}, "labels": labels or {}},
                     "spec": {"hostNetwork": host_network}, "status": status})


def state(*pods: dict, vmis: tuple[dict, ...] = (), namespaces: tuple[dict, ...] = ()) -> dict:
    return endpoints({p["uid"]: p for p in pods}, {v["uid"]: v for v in vmis},
                     {n["name"]: n for n in namespaces})


def test_addresses_dual_stack_normalised_and_pod_ip_fallback() -> None:
    s = state(pod("a", ["10.0.0.1", "FD00::0001"]), pod("b", pod_ip="10.0.0.2"))
    assert s["a"] == Endpoint("a", "ns", "p-a", ips=("10.0.0.1", "fd00::1"))
    assert s["b"].ips == ("10.0.0.2",)


@pytest.mark.parametrize("kw", [{"ips": []}, {"ips": ["10.0.0.1"], "phase": "Succeeded"},
                                {"ips": ["10.0.0.1"], "phase": "Failed"},
                                {"ips": ["10.0.0.1"], "host_network": True}])
def test_left_out(kw: dict) -> None:
    assert state(pod("a", **kw)) == {}


def test_opt_in_own_annotation_wins_over_namespace() -> None:
    nss = (trim_namespace({"metadata": {"name": "in", "labels": {ACCELERATE: "true"}}}),)
    s = state(pod("a", ["10.0.0.1"], ns="in"),
              pod("b", ["10.0.0.2"], ns="in", annotations={ACCELERATE: "false"}),
              pod("c", ["10.0.0.3"], annotations={ACCELERATE: "true"}),
              pod("d", ["10.0.0.4"]), namespaces=nss)
    assert [s[k].bypass for k in "abcd"] == [True, False, True, False]


def test_malformed_annotation_and_address_are_errors() -> None:
    s = state(pod("a", ["10.0.0.1"], annotations={ACCELERATE: "1"}),
              pod("b", ["10.0.0.300"]))
    assert "ns/p-a" in s["a"].error and not s["a"].bypass
    assert "10.0.0.300" in s["b"].error


def test_launcher_gets_its_vmis_settings_never_the_bypass() -> None:
    labels = {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "vmi-1"}
    nss = (trim_namespace({"metadata": {"name": "ns", "labels": {ACCELERATE: "true"}}}),)
    vmi = trim_vmi({"metadata": {"uid": "vmi-1", "namespace": "ns", "name": "vm",
                                 "annotations": {VM_CHECKSUM: "off"}}})
    s = state(pod("l", ["10.0.0.5"], labels=labels), vmis=(vmi,), namespaces=nss)
    assert s["l"].vm == VmSettings(checksum="off") and not s["l"].bypass
    s = state(pod("l", ["10.0.0.5"], labels=labels), namespaces=nss)  # VMI not (yet) seen
    assert s["l"].vm is None and not s["l"].bypass and s["l"].error is None


def test_log_lines_are_one_event(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="netaccel.source.kubernetes"):
        log_event(logging.INFO, "relist", kind="pods", reason="too old: 5 (9)")
    assert caplog.messages == ['event=relist kind=pods reason="too old: 5 (9)"']
