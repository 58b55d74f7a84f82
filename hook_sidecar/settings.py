"""VMI JSON + annotations -> what the hook changes (standard library only).

Annotation keys (on the VMI; for a VM put them on ``spec.template.metadata.annotations``):

``netaccel.kubevirt.io/checksum-offload``
    ``off`` (default): turn checksum offload (and the segmentation offloads that depend on
    it) off on both sides of the virtio-net device, i.e. add ``<host csum='off' gso='off'
    tso4='off' tso6='off' ecn='off' ufo='off'/>`` and ``<guest csum='off' tso4='off'
    tso6='off' ecn='off' ufo='off'/>`` to the interface's ``<driver>``.
    ``host-off``: only the ``<host>`` part (what the guest hands to the host unfinished, TX).
    ``guest-off``: only the ``<guest>`` part (what the guest accepts unfinished, RX).
    ``on``: leave offload as KubeVirt configured it (the domain passes through unchanged).

``netaccel.kubevirt.io/interfaces``
    Comma-separated VMI interface names (``spec.domain.devices.interfaces[].name``, found in
    the domain as ``<alias name='ua-NAME'/>``). Default: every virtio interface of the domain,
    hot-plug placeholders included (they become real NICs later). Naming an interface the
    VMI does not have, or one that is not virtio (SR-IOV, ``e1000``, ...), is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hook_sidecar.errors import HookInputError

ANNOTATION_PREFIX = "netaccel.kubevirt.io/"
ANNOTATION_OFFLOAD = ANNOTATION_PREFIX + "checksum-offload"
ANNOTATION_INTERFACES = ANNOTATION_PREFIX + "interfaces"

#: annotation value -> (turn host side off, turn guest side off)
OFFLOAD_MODES: dict[str, tuple[bool, bool]] = {
    "off": (True, True),
    "host-off": (True, False),
    "guest-off": (False, True),
    "on": (False, False),
}
DEFAULT_OFFLOAD = "off"
VIRTIO_MODELS = frozenset({"virtio", "virtio-transitional", "virtio-non-transitional"})
MAX_VMI_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """What to change in the domain XML."""

    host_off: bool = True
    guest_off: bool = True
    #: VMI interface names to edit; None means every virtio interface in the domain.
    interfaces: tuple[str, ...] | None = None

    @property
    def changes_anything(self) -> bool:
        return self.host_off or self.guest_off


def load_vmi(vmi_json: bytes) -> dict[str, Any]:
    """Decode the VMI JSON KubeVirt sends; raise HookInputError if it is not a JSON object."""
    if len(vmi_json) > MAX_VMI_BYTES:
        raise HookInputError(
            f"VMI JSON is {len(vmi_json)} bytes, more than the limit of {MAX_VMI_BYTES} bytes"
        )
    if not vmi_json.strip():
        raise HookInputError("VMI JSON is empty: expected the VirtualMachineInstance object")
    try:
        vmi = json.loads(vmi_json.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise HookInputError(f"VMI JSON is not valid UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise HookInputError(f"VMI JSON is malformed: {exc}") from None
    except RecursionError:
        raise HookInputError("VMI JSON is nested too deeply") from None
    if not isinstance(vmi, dict):
        raise HookInputError(f"VMI JSON must be an object, got {type(vmi).__name__}")
    return vmi


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HookInputError(f"VMI field {where} must be an object, got {type(value).__name__}")
    return value


def vmi_ident(vmi: dict[str, Any]) -> str:
    """``namespace/name`` of the VMI for log lines (``?`` for missing parts, never raises)."""
    meta = vmi.get("metadata") if isinstance(vmi, dict) else None
    if not isinstance(meta, dict):
        return "?/?"
    return f"{meta.get('namespace') or '?'}/{meta.get('name') or '?'}"


def vmi_interfaces(vmi: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``spec.domain.devices.interfaces`` by name."""
    devices = _obj(
        _obj(_obj(vmi.get("spec"), "spec").get("domain"), "spec.domain").get("devices"),
        "spec.domain.devices",
    )
    ifaces = devices.get("interfaces")
    if ifaces is None:
        ifaces = []
    if not isinstance(ifaces, list):
        raise HookInputError("VMI field spec.domain.devices.interfaces must be a list")
    out: dict[str, dict[str, Any]] = {}
    for i, iface in enumerate(ifaces):
        if not isinstance(iface, dict) or not isinstance(iface.get("name"), str):
            raise HookInputError(
                f"VMI field spec.domain.devices.interfaces[{i}] must be an object with a name"
            )
        out[iface["name"]] = iface
    return out


def _not_virtio_reason(iface: dict[str, Any]) -> str | None:
    """Why a VMI spec interface cannot have a virtio device, or None if it can."""
    if "sriov" in iface:
        return "uses the SR-IOV binding (a host PCI device, not virtio)"
    model = iface.get("model") or "virtio"
    if model not in VIRTIO_MODELS:
        return f"has model {model!r}, not virtio"
    return None


def settings_from_vmi(vmi: dict[str, Any]) -> Settings:
    """Read and validate the netaccel annotations of a decoded VMI."""
    annotations = _obj(_obj(vmi.get("metadata"), "metadata").get("annotations"),
                       "metadata.annotations")
    mode = annotations.get(ANNOTATION_OFFLOAD, DEFAULT_OFFLOAD)
    if not isinstance(mode, str) or mode.strip() not in OFFLOAD_MODES:
        raise HookInputError(
            f"annotation {ANNOTATION_OFFLOAD}={mode!r} is not allowed; "
            f"use one of: {', '.join(OFFLOAD_MODES)} (default {DEFAULT_OFFLOAD})"
        )
    host_off, guest_off = OFFLOAD_MODES[mode.strip()]

    raw = annotations.get(ANNOTATION_INTERFACES)
    if raw is None:
        return Settings(host_off, guest_off, None)
    if not isinstance(raw, str):
        raise HookInputError(f"annotation {ANNOTATION_INTERFACES} must be a string")
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not names:
        raise HookInputError(
            f"annotation {ANNOTATION_INTERFACES} is empty; list VMI interface names "
            "separated by commas, or remove it to select every virtio interface"
        )
    known = vmi_interfaces(vmi)
    for name in names:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise HookInputError(
                f"annotation {ANNOTATION_INTERFACES} names interface {name!r}, which the VMI "
                f"does not have (its interfaces: {listed})"
            )
        reason = _not_virtio_reason(known[name])
        if reason:
            raise HookInputError(
                f"annotation {ANNOTATION_INTERFACES} names interface {name!r}, which {reason}; "
                "checksum offload can only be changed on virtio interfaces"
            )
    return Settings(host_off, guest_off, names)


def settings_from_json(vmi_json: bytes) -> Settings:
    """Shortcut: decode the VMI JSON and read its settings."""
    return settings_from_vmi(load_vmi(vmi_json))
