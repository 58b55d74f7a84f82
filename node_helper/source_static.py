"""The static source of desired state: a YAML file, for nodes without a cluster and the lab.

    pods:
      - uid: 7d9c1c2e-0000-4000-8000-000000000001   # required, unique: the pod UID
        namespace: default                          # required
        name: client                                # required
        ips: [10.244.1.5, fd00:10:244:1::5]         # status.podIPs (default none)
        netns: /proc/4242/ns/net                    # a path, or a name under /var/run/netns
        bypass: true                                # socket bypass for ips (default false)
        no_bypass_ports: [8080]                     # local ports left on TCP ("all": every)
        vm:                                         # a virt-launcher pod: the VM datapath
          datapath: bpf                             # bpf (default) | mirror
          checksum: keep                            # keep (default) | off
          interface: eth0                           # the pod interface (default eth0)

    remote_pod_cidrs: [10.244.2.0/24, fd00:10:244:2::/64]   # other nodes' pod CIDRs (the node
                                                            # fast path across nodes)

`vm: true` means a VM with the defaults; `vm: false`, `vm: null` or no `vm` key means none.
An empty file, or `pods: []`, is a node where nothing wants acceleration.

The file is polled (mtime, size and inode, every POLL_INTERVAL seconds; an editor's
rename-over counts) and every change publishes a complete new snapshot. A file that cannot
be read or parsed, whose top level is not `pods: [...]` (and `remote_pod_cidrs`), or whose
`remote_pod_cidrs` holds something that is not a network, is logged and ignored: the last
good snapshot stays in force (before the first good one nothing is published, so the agent
is not ready). A malformed entry becomes an Endpoint whose `error` says what is wrong (key
`static:<index>` when it has no usable uid); the reconciler reports it and leaves that pod
untouched, while the other entries work.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import yaml

from node_helper import desired
from node_helper.desired import DesiredState, Endpoint, Publish, SettingsError, VmSettings

POLL_INTERVAL = 0.5
_ENTRY_KEYS = {"uid", "namespace", "name", "ips", "netns", "bypass", "vm", "no_bypass_ports"}
_VM_KEYS = {"datapath", "checksum", "interface"}
log = logging.getLogger("netaccel.source.static")


class FileError(ValueError):
    """The file as a whole is unusable (the last good snapshot stays)."""


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{key} must be a non-empty string, not {value!r}")
    return value.strip()


def _vm(value: Any) -> VmSettings | None:
    if value is None or value is False:
        return None
    if value is True:
        return VmSettings()
    if not isinstance(value, dict):
        raise SettingsError(f"vm must be a mapping (datapath, checksum, interface) or a "
                            f"boolean, not {value!r}")
    unknown = set(value) - _VM_KEYS
    if unknown:
        raise SettingsError(f"vm has unknown keys {sorted(unknown)}; allowed: "
                            f"{', '.join(sorted(_VM_KEYS))}")
    annotations = {desired.VM_DATAPATH: value.get("datapath", "bpf"),
                   desired.VM_CHECKSUM: value.get("checksum", "keep")}
    interface = value.get("interface", "eth0")
    if not isinstance(interface, str) or not interface:
        raise SettingsError(f"vm.interface must be a non-empty string, not {interface!r}")
    return desired.vm_settings(annotations, interface)


def parse_entry(entry: Any, index: int) -> Endpoint:
    """One list entry as an Endpoint (with `error` set when malformed)."""
    if not isinstance(entry, dict):
        return Endpoint(f"static:{index}", "", f"#{index}",
                        error=f"entry {index} must be a mapping, not {type(entry).__name__}")
    uid = entry.get("uid")
    uid = uid.strip() if isinstance(uid, str) and uid.strip() else f"static:{index}"
    namespace = entry.get("namespace") if isinstance(entry.get("namespace"), str) else ""
    name = entry.get("name") if isinstance(entry.get("name"), str) else f"#{index}"
    try:
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise SettingsError(f"unknown keys {sorted(unknown)}; allowed: "
                                f"{', '.join(sorted(_ENTRY_KEYS))}")
        if uid.startswith("static:"):
            _text(entry, "uid")
        namespace, name = _text(entry, "namespace"), _text(entry, "name")
        ips = entry.get("ips") or []
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise SettingsError(f"ips must be a list of addresses, not {ips!r}")
        bypass = entry.get("bypass", False)
        if not isinstance(bypass, bool):
            raise SettingsError(f"bypass must be true or false, not {bypass!r}")
        netns = entry.get("netns")
        if netns is not None and (not isinstance(netns, str) or not netns):
            raise SettingsError(f"netns must be a path or a name, not {netns!r}")
        opt_out = entry.get("no_bypass_ports")
        opt_out = () if opt_out is None else desired.parse_ports(opt_out, "no_bypass_ports")
        return Endpoint(uid, namespace, name, ips=desired.valid_ips(ips), bypass=bypass,
                        vm=_vm(entry.get("vm")), netns=netns, no_bypass_ports=opt_out)
    except SettingsError as exc:
        return Endpoint(uid, namespace, name, error=f"entry {index}: {exc}")


def parse(text: str) -> DesiredState:
    """The whole file as a DesiredState; FileError when it is unusable as a whole."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FileError(f"not valid YAML: {exc}") from None
    if doc is None:
        return DesiredState()
    if not isinstance(doc, dict) or set(doc) - {"pods", "remote_pod_cidrs"}:
        raise FileError("the top level must be a mapping with the keys `pods` (and "
                        "`remote_pod_cidrs`)")
    pods = doc.get("pods") or []
    if not isinstance(pods, list):
        raise FileError(f"pods must be a list, not {type(pods).__name__}")
    remote = doc.get("remote_pod_cidrs") or []
    if not isinstance(remote, list):
        raise FileError(f"remote_pod_cidrs must be a list of networks, not {remote!r}")
    try:
        state = DesiredState(remote_pod_cidrs=desired.valid_cidrs(remote, "remote_pod_cidrs"))
    except SettingsError as exc:
        raise FileError(str(exc)) from None
    for index, entry in enumerate(pods):
        ep = parse_entry(entry, index)
        if ep.uid in state:
            ep = Endpoint(f"static:{index}", ep.namespace, ep.name,
                          error=f"entry {index}: uid {ep.uid} is already used by "
                                f"{state[ep.uid].ident}")
        state[ep.uid] = ep
    return state


class StaticSource:
    """desired.Source over a YAML file (see the module docstring for the format)."""

    name = "static"

    def __init__(self, path: str | os.PathLike[str], poll_interval: float = POLL_INTERVAL):
        self.path = Path(path)
        self.poll_interval = poll_interval

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def read(self) -> DesiredState:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise FileError(f"cannot read: {exc.strerror or exc}") from None
        return parse(text)

    def run(self, publish: Publish, stop: threading.Event) -> None:
        seen: tuple[int, int, int] | None | bool = False  # False: nothing looked at yet
        while not stop.is_set():
            stamp = self._stamp()
            if stamp != seen:
                seen = stamp
                try:
                    state = self.read()
                except FileError as exc:
                    log.error("static file unusable, keeping the last good snapshot",
                              extra={"fields": {"event": "source_error", "source": self.name,
                                                "path": str(self.path), "error": str(exc)}})
                else:
                    bad = [ep for ep in state.values() if ep.error]
                    log.info("static file read", extra={"fields": {
                        "event": "source_snapshot", "source": self.name,
                        "path": str(self.path), "endpoints": len(state),
                        "invalid": len(bad)}})
                    publish(state)
            stop.wait(self.poll_interval)
