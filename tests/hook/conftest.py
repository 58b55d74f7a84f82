"""Shared helpers for the hook sidecar tests: fixtures, VMI builder, a real server."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hook_sidecar.proto import (
    api_info_pb2,
    api_info_pb2_grpc,
    api_v1alpha1_pb2,
    api_v1alpha1_pb2_grpc,
    api_v1alpha2_pb2,
    api_v1alpha2_pb2_grpc,
    api_v1alpha3_pb2,
    api_v1alpha3_pb2_grpc,
)
from hook_sidecar.server import HookServer

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
PB2 = {"v1alpha1": (api_v1alpha1_pb2, api_v1alpha1_pb2_grpc),
       "v1alpha2": (api_v1alpha2_pb2, api_v1alpha2_pb2_grpc),
       "v1alpha3": (api_v1alpha3_pb2, api_v1alpha3_pb2_grpc)}
HOST_OFF = {"csum": "off", "gso": "off", "tso4": "off", "tso6": "off", "ecn": "off", "ufo": "off"}
GUEST_OFF = {"csum": "off", "tso4": "off", "tso6": "off", "ecn": "off", "ufo": "off"}

#: VMI spec interfaces matching the fixture domains' aliases.
SPEC_IFACES: dict[str, dict[str, Any]] = {
    "default": {"masquerade": {}},
    "blue": {"bridge": {}},
    "red": {"bridge": {}, "model": "virtio-transitional"},
    "legacy": {"bridge": {}, "model": "e1000"},
    "sriovnet": {"sriov": {}},
    "vf": {"sriov": {}},
}


def domain(name: str) -> bytes:
    return (FIXTURES / f"domain-{name}.xml").read_bytes()


def vmi(annotations: dict[str, str] | None = None, ifaces: list[str] | None = None,
        name: str = "testvmi", namespace: str = "default") -> dict[str, Any]:
    names = ifaces if ifaces is not None else list(SPEC_IFACES)
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": dict(annotations or {})},
        "spec": {"domain": {"devices": {"interfaces": [
            {"name": n, **SPEC_IFACES.get(n, {"bridge": {}})} for n in names]}}},
    }


def vmi_json(annotations: dict[str, str] | None = None, **kwargs: Any) -> bytes:
    return json.dumps(vmi(annotations, **kwargs)).encode()


def iface_by_alias(xml: bytes, name: str) -> ET.Element:
    root = ET.fromstring(xml)
    for iface in root.iter("interface"):
        alias = iface.find("alias")
        if alias is not None and alias.get("name") == f"ua-{name}":
            return iface
    raise AssertionError(f"no interface ua-{name}")


def offload(xml: bytes, name: str) -> tuple[dict[str, str] | None, dict[str, str] | None,
                                              dict[str, str] | None]:
    """(driver attrs, host attrs, guest attrs) of interface ua-<name>; None where absent."""
    driver = iface_by_alias(xml, name).find("driver")
    if driver is None:
        return None, None, None
    host, guest = driver.find("host"), driver.find("guest")
    return (dict(driver.attrib), None if host is None else dict(host.attrib),
            None if guest is None else dict(guest.attrib))


def without_driver_lines(xml: bytes) -> list[bytes]:
    """The document's lines minus those the edit may touch (<driver>, <host>, <guest>)."""
    touched = (b"<driver", b"</driver>", b"<host ", b"<host>", b"<guest ", b"<guest>")
    return [line for line in xml.splitlines() if not line.strip().startswith(touched)]


class Client:
    """A real gRPC client; like virt-launcher it dials a new channel per call."""

    def __init__(self, socket_path: Path) -> None:
        self.target = f"unix:{socket_path}"

    def info(self, timeout: float = 1.0) -> Any:
        with grpc.insecure_channel(self.target) as ch:
            return api_info_pb2_grpc.InfoStub(ch).Info(api_info_pb2.InfoParams(),
                                                       timeout=timeout)

    def call(self, version: str, method: str, **fields: Any) -> Any:
        pb2, pb2_grpc = PB2[version]
        request = getattr(pb2, f"{method}Params")(**fields)
        with grpc.insecure_channel(self.target, options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
            return getattr(pb2_grpc.CallbacksStub(ch), method)(request, timeout=30)

    def define(self, xml: bytes, vmi_bytes: bytes, version: str = "v1alpha3") -> bytes:
        return self.call(version, "OnDefineDomain", domainXML=xml, vmi=vmi_bytes).domainXML


@pytest.fixture
def hook_server(tmp_path: Path) -> Iterator[tuple[HookServer, Client]]:
    """An in-process server on <tmp>/hooks/netaccel.sock."""
    server = HookServer(tmp_path / "hooks" / "netaccel.sock")
    server.start()
    try:
        yield server, Client(server.path)
    finally:
        server.stop(grace=0.5)


def console_script(name: str) -> Path:
    """The installed console script next to the running interpreter."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{path} missing: run scripts/setup.sh (pip install -e .)"
    return path
