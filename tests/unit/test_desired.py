"""The opt-in keys shared by every source of desired state."""

from __future__ import annotations

import pytest

from node_helper import desired
from node_helper.desired import Endpoint, SettingsError, VmSettings


@pytest.mark.parametrize("annotations, labels, want", [
    ({}, {}, False),
    ({}, {desired.ACCELERATE: "true"}, True),
    ({desired.ACCELERATE: "false"}, {desired.ACCELERATE: "true"}, False),
    ({desired.ACCELERATE: "true"}, {}, True),
    ({}, {desired.ACCELERATE: "yes"}, False),  # a namespace label is only ever "true"
])
def test_opt_in(annotations: dict, labels: dict, want: bool) -> None:
    assert desired.opted_in(annotations, labels) is want


def test_malformed_values_name_key_value_and_choices() -> None:
    with pytest.raises(SettingsError, match="accelerate='yes'.*true or false"):
        desired.opted_in({desired.ACCELERATE: "yes"}, {})
    with pytest.raises(SettingsError, match="vm-datapath='xdp'.*bpf, mirror"):
        desired.vm_settings({desired.VM_DATAPATH: "xdp"})
    with pytest.raises(SettingsError, match="'10.0.0.300'"):
        desired.valid_ips(["10.0.0.300"])


def test_vm_settings_defaults_and_values() -> None:
    assert desired.vm_settings({}) == VmSettings("bpf", "keep", "eth0")
    assert desired.vm_settings({desired.VM_DATAPATH: "mirror",
                                desired.VM_CHECKSUM: "off"}) == VmSettings("mirror", "off")


def test_bypass_cidrs_take_every_address_of_opted_in_pods_only() -> None:
    state = {
        "a": Endpoint("a", "ns", "a", ("10.0.0.1", "fd00::1"), bypass=True),
        "b": Endpoint("b", "ns", "b", ("10.0.0.2",), bypass=False),
        "c": Endpoint("c", "ns", "c", ("10.0.0.3",), bypass=True, error="bad annotation"),
    }
    assert desired.bypass_cidrs(state) == ["10.0.0.1/32", "fd00::1/128"]


@pytest.mark.parametrize("value, want", [
    ("8080", (8080,)), ("9090, 8080,8080", (8080, 9090)), ("all", (0,)), (" all ", (0,)),
])
def test_no_bypass_ports(value: str, want: tuple[int, ...]) -> None:
    assert desired.no_bypass_ports({desired.NO_BYPASS_PORTS: value}) == want
    assert desired.no_bypass_ports({}) == ()


@pytest.mark.parametrize("value", ["", "http", "70000", "-1", "80,x"])
def test_no_bypass_ports_malformed(value: str) -> None:
    with pytest.raises(SettingsError, match="no-bypass-ports"):
        desired.no_bypass_ports({desired.NO_BYPASS_PORTS: value})


def test_opt_outs_only_for_bypassed_valid_pods() -> None:
    state = {
        "a": Endpoint("a", "ns", "a", ("10.0.0.1",), bypass=True, no_bypass_ports=(80,)),
        "b": Endpoint("b", "ns", "b", ("10.0.0.2",), bypass=False, no_bypass_ports=(0,)),
        "c": Endpoint("c", "ns", "c", ("10.0.0.3",), bypass=True, error="x",
                      no_bypass_ports=(80,)),
    }
    assert desired.bypass_opt_outs(state) == [("10.0.0.1", 80)]
