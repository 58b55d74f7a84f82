"""Desired state: which pods and VMs of this node want acceleration, and how.

Every source of desired state (the static file, Kubernetes) produces the same thing: a
`DesiredState`, one `Endpoint` per pod keyed by pod UID plus the pod CIDRs of the cluster's
other nodes (for the node fast path across nodes), and hands each new complete snapshot to
`publish`. Sources know nothing of tc or eBPF; the reconciler knows nothing of
where the snapshot came from.

Opt-in (the same keys everywhere; the hook sidecar uses the same prefix):
    netaccel.kubevirt.io/accelerate: "true" | "false"   annotation on a Pod (socket bypass)
                                                          or a VMI (VM datapath); a label with
                                                          "true" on a Namespace opts in all its
                                                          pods and VMIs; the object's own
                                                          annotation wins ("false" opts out)
    netaccel.kubevirt.io/vm-datapath: "bpf" | "mirror"  on a VMI (default bpf)
    netaccel.kubevirt.io/vm-checksum: "keep" | "off"    on a VMI (default keep): rx/tx checksum
                                                          offload of the launcher's tap and veth
    netaccel.kubevirt.io/no-bypass-ports: "8080,9090" | "all"   on a bypassed Pod: connections
                                                          to these local ports (or all of the
                                                          pod's) stay on TCP: for applications
                                                          the bypass cannot serve (splice on a
                                                          connection whose sender closed,
                                                          io_uring splice, MSG_ZEROCOPY;
                                                          docs/socket-api.md)
A malformed value is an `Endpoint.error`: the reconciler reports it and leaves that pod
untouched (whatever was applied for it stays as it was).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

PREFIX = "netaccel.kubevirt.io/"
ACCELERATE = PREFIX + "accelerate"
VM_DATAPATH = PREFIX + "vm-datapath"
VM_CHECKSUM = PREFIX + "vm-checksum"
NO_BYPASS_PORTS = PREFIX + "no-bypass-ports"
_BOOL = {"true": True, "false": False}
VM_DATAPATHS = ("bpf", "mirror")
VM_CHECKSUMS = ("keep", "off")


class SettingsError(ValueError):
    """A malformed opt-in value; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class VmSettings:
    """The VM datapath for one virt-launcher pod (node_helper.vm.api.accelerate arguments)."""

    datapath: str = "bpf"
    checksum: str = "keep"
    interface: str = "eth0"


@dataclass(frozen=True)
class Endpoint:
    """One pod of this node that the sources know about (opted in or not)."""

    uid: str
    namespace: str
    name: str
    ips: tuple[str, ...] = ()  # every address of status.podIPs
    bypass: bool = False  # socket bypass for this pod's addresses
    vm: VmSettings | None = None  # a launcher pod whose VMI opted in to the VM datapath
    netns: str | None = None  # a netns path when the source knows it (static file, lab)
    error: str | None = None  # a malformed opt-in: report, leave the pod untouched
    no_bypass_ports: tuple[int, ...] = ()  # local ports left on TCP; (0,): every port

    @property
    def ident(self) -> str:
        return f"{self.namespace}/{self.name}"


class DesiredState(dict[str, Endpoint]):
    """Pod UID -> Endpoint for this node's pods, and `remote_pod_cidrs`: the pod CIDRs of the
    cluster's other nodes (Node spec.podCIDRs; empty on a one-node cluster, or when the CNI
    allocates addresses itself), where the node fast path sends frames across nodes."""

    def __init__(self, endpoints: Mapping[str, Endpoint] | None = None,
                 remote_pod_cidrs: Iterable[str] = ()) -> None:
        super().__init__(endpoints or {})
        self.remote_pod_cidrs: tuple[str, ...] = tuple(sorted(set(remote_pod_cidrs)))


Publish = Callable[[DesiredState], None]


class Source(Protocol):
    """A source of desired state: calls `publish` with every new complete snapshot.

    A source may also have `report(endpoint, reason, message)`, for what an operator should
    see on the object itself (the Kubernetes source posts an Event on the pod)."""

    name: str

    def run(self, publish: Publish, stop: threading.Event) -> None:
        """Publish snapshots until `stop` is set (blocking; the agent runs it in a thread)."""


def _choice(annotations: Mapping[str, str], key: str, allowed: tuple[str, ...],
            default: str) -> str:
    value = annotations.get(key, default)
    if value not in allowed:
        raise SettingsError(f"{key}={value!r} is not allowed; use one of {', '.join(allowed)}")
    return value


def opted_in(annotations: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
    """The object's own annotation, else its namespace's label, else no."""
    own = annotations.get(ACCELERATE)
    if own is not None:
        if own not in _BOOL:
            raise SettingsError(f"{ACCELERATE}={own!r} is not allowed; use true or false")
        return _BOOL[own]
    return namespace_labels.get(ACCELERATE) == "true"


def vm_settings(annotations: Mapping[str, str], interface: str = "eth0") -> VmSettings:
    """A VMI's VM datapath settings (SettingsError on a malformed value)."""
    return VmSettings(_choice(annotations, VM_DATAPATH, VM_DATAPATHS, "bpf"),
                      _choice(annotations, VM_CHECKSUM, VM_CHECKSUMS, "keep"), interface)


def valid_ips(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Pod addresses, normalised; SettingsError names a malformed one."""
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise SettingsError(f"pod address {value!r} is not an IP address") from None
    return tuple(out)


def no_bypass_ports(annotations: Mapping[str, str]) -> tuple[int, ...]:
    """A pod's opt-out ports: "all" -> (0,), "8080,9090" -> (8080, 9090), absent -> ()."""
    text = annotations.get(NO_BYPASS_PORTS)
    if text is None:
        return ()
    return parse_ports(text if text.strip() != "all" else [0], NO_BYPASS_PORTS)


def parse_ports(value: object, what: str) -> tuple[int, ...]:
    """Ports from "8080,9090" or a list of ints; 0 (or "all") means every port."""
    if isinstance(value, str):
        value = [0] if value.strip() == "all" else [p.strip() for p in value.split(",")]
    if not isinstance(value, list | tuple) or not value:
        raise SettingsError(f"{what}={value!r}: give ports like \"8080,9090\" or \"all\"")
    ports = []
    for item in value:
        try:
            port = int(item)
        except (TypeError, ValueError):
            port = -1
        if not 0 <= port <= 65535 or isinstance(item, bool):
            raise SettingsError(f"{what}: {item!r} is not a port (1-65535, or all)")
        ports.append(port)
    return (0,) if 0 in ports else tuple(sorted(set(ports)))


def valid_cidrs(values: Iterable[str], what: str) -> tuple[str, ...]:
    """Networks, normalised ("10.244.2.0/24"); SettingsError names a malformed one."""
    out = []
    for value in values:
        try:
            if not isinstance(value, str):
                raise TypeError(value)
            out.append(str(ipaddress.ip_network(value)))
        except (TypeError, ValueError):
            raise SettingsError(f"{what}: {value!r} is not a network like 10.244.2.0/24 "
                                "(host bits zero)") from None
    return tuple(out)


def bypass_opt_outs(state: DesiredState) -> list[tuple[str, int]]:
    """(address, local port) pairs the bypass leaves alone, for every opted-in pod."""
    return sorted({(ip, port) for ep in state.values() if ep.bypass and not ep.error
                   for ip in ep.ips for port in ep.no_bypass_ports})


def bypass_cidrs(state: DesiredState) -> list[str]:
    """Host routes for every address of every pod that opted in to the bypass."""
    cidrs = set()
    for ep in state.values():
        if ep.bypass and not ep.error:
            for ip in ep.ips:
                cidrs.add(f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}")
    return sorted(cidrs)
