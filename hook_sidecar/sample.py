"""Synthetic KubeVirt-style inputs (domain XML + VMI JSON) for the bench and tests."""

from __future__ import annotations

import json

_HEAD = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
\t<name>{ns}_{name}</name>
\t<memory unit='b'>2147483648</memory>
\t<vcpu placement='static'>2</vcpu>
\t<os>
\t\t<type arch='x86_64' machine='q35'>hvm</type>
\t</os>
\t<devices>
\t\t<emulator>/usr/libexec/qemu-kvm</emulator>
"""
_IFACE = """\t\t<interface type='ethernet'>
\t\t\t<address type='pci' domain='0x0000' bus='0x{bus:02x}' slot='0x00' function='0x0'/>
\t\t\t<target dev='{tap}' managed='no'/>
\t\t\t<model type='virtio-non-transitional'/>
\t\t\t<mac address='02:00:00:00:{hi:02x}:{lo:02x}'/>
\t\t\t<mtu size='1450'/>
\t\t\t<alias name='ua-{name}'/>
\t\t\t<rom enabled='no'/>
\t\t</interface>
"""
_TAIL = """\t</devices>
\t<qemu:commandline>
\t\t<qemu:arg value='-fw_cfg'/>
\t</qemu:commandline>
</domain>
"""


def iface_names(count: int) -> list[str]:
    """``default`` (pod network) then Multus-style names ``net1``, ``net2`` ..."""
    return ["default"] + [f"net{i}" for i in range(1, count)]


def sample_domain(interfaces: int = 1, ns: str = "default", name: str = "testvmi") -> bytes:
    """A tab-indented domain with that many virtio interfaces (no <driver>)."""
    parts = [_HEAD.format(ns=ns, name=name)]
    for i, iface in enumerate(iface_names(interfaces)):
        tap = "tap0" if i == 0 else f"tap{i:011x}"
        parts.append(_IFACE.format(bus=i + 1, tap=tap, hi=i >> 8, lo=i & 0xFF, name=iface))
    parts.append(_TAIL)
    return "".join(parts).encode()


def sample_vmi(interfaces: int = 1, ns: str = "default", name: str = "testvmi",
               annotations: dict[str, str] | None = None) -> dict:
    """A VirtualMachineInstance object matching sample_domain()."""
    names = iface_names(interfaces)
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": ns, "annotations": dict(annotations or {})},
        "spec": {
            "domain": {"devices": {"interfaces": [
                {"name": n, "masquerade" if n == "default" else "bridge": {}} for n in names]}},
            "networks": [{"name": "default", "pod": {}}] + [
                {"name": n, "multus": {"networkName": f"ns/{n}"}} for n in names[1:]],
        },
    }


def sample_vmi_json(interfaces: int = 1, **kwargs: object) -> bytes:
    return json.dumps(sample_vmi(interfaces, **kwargs)).encode()  # type: ignore[arg-type]
