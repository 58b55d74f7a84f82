"""The launcher netns: KubeVirt's bridge binding devices and the launcher's own MAC/addresses."""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError

from node_helper import tc_netlink as tc
from node_helper.kernel import netns_path

_MULTUS_HASHED = re.compile(r"^pod([0-9a-f]{11})$")


class VmShapeError(ValueError):
    """The namespace is not in KubeVirt's bridge binding shape; the message says what was found."""


class VmDatapathError(RuntimeError):
    """A datapath operation failed (after rolling back); the message says why."""


class VmLimitError(VmShapeError):
    """The launcher has more of something than a datapath supports; nothing was changed."""


@dataclass(frozen=True)
class Link:
    """One network device in the launcher netns."""

    name: str
    index: int
    kind: str
    alias: str | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "kind": self.kind}


IsTap = Callable[[Link], bool]


def is_real_tap(link: Link) -> bool:
    """The default tap classifier: a tun/tap device (what QEMU uses)."""
    return link.kind == "tun"


@dataclass(frozen=True)
class Devices:
    """The bridge binding's devices for one pod interface."""

    bridge: Link
    tap: Link
    veth: Link

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {"bridge": self.bridge.as_dict(), "tap": self.tap.as_dict(),
                "veth": self.veth.as_dict()}


def bridge_name(interface: str) -> str:
    """KubeVirt's bridge name for a pod interface: eth0 -> k6t-eth0, pod<hash> -> k6t-<hash>."""
    if not interface or len(interface) > 15 or "/" in interface or interface.strip() != interface:
        raise VmShapeError(f"{interface!r} is not a valid interface name")
    m = _MULTUS_HASHED.match(interface)
    name = f"k6t-{m.group(1) if m else interface}"
    if len(name) > 15:
        raise VmShapeError(f"interface {interface!r} gives bridge name {name!r}, too long")
    return name


def kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info else None) or "device"


def to_link(msg: Any) -> Link:
    return Link(msg.get_attr("IFLA_IFNAME"), msg["index"], kind(msg), msg.get_attr("IFLA_IFALIAS"))


def all_links(ns: NetNS) -> list[Link]:
    return [to_link(msg) for msg in ns.get_links()]


def _describe(links: list[Any]) -> str:
    return ", ".join(f"{lk.get_attr('IFLA_IFNAME')} ({kind(lk)})" for lk in links) or "nothing"


def find(ns: NetNS, netns: str, interface: str, is_tap: IsTap = is_real_tap) -> Devices:
    """The bridge of `interface` and its two ports, classified by kind (and `is_tap`)."""
    wanted = bridge_name(interface)
    links = [lk for lk in ns.get_links() if lk.get_attr("IFLA_IFNAME") != "lo"]
    by_name = {lk.get_attr("IFLA_IFNAME"): lk for lk in links}
    bridge = by_name.get(wanted)
    if bridge is None or kind(bridge) != "bridge":
        what = "no link" if bridge is None else f"a {kind(bridge)} link"
        hint = ""
        pod_if = by_name.get(interface)
        if pod_if is not None and kind(pod_if) == "veth":
            hint = f" ({interface} is a plain veth: masquerade/passt binding or a plain pod?)"
        raise VmShapeError(
            f"netns {netns}: expected bridge {wanted} for interface {interface} (KubeVirt "
            f"bridge binding), found {what} by that name{hint}; links: {_describe(links)}"
        )
    ports = [lk for lk in links if lk.get_attr("IFLA_MASTER") == bridge["index"]]
    taps = [p for p in ports if is_tap(to_link(p))]
    veths = [p for p in ports if p not in taps and kind(p) == "veth"]
    other = [p for p in ports if p not in taps and p not in veths]
    if len(taps) != 1 or len(veths) != 1 or other:
        raise VmShapeError(
            f"netns {netns}: bridge {wanted} must have exactly one tap (as classified by "
            f"{getattr(is_tap, '__name__', 'is_tap')}) and one veth as ports; found "
            f"{len(taps)} tap(s), {len(veths)} veth(s), ports: {_describe(ports)}"
        )
    return Devices(bridge=to_link(bridge), tap=to_link(taps[0]), veth=to_link(veths[0]))


def find_devices(netns: str, interface: str = "eth0", is_tap: IsTap = is_real_tap) -> Devices:
    """Find the bridge, tap and veth of `interface` in `netns` (by kind, not by name)."""
    with open_netns(netns) as ns:
        return find(ns, netns, interface, is_tap)


@dataclass(frozen=True)
class Launcher:
    """What is meant for the launcher itself: the bridge's own MAC and addresses."""

    mac: str | None  # "aa:bb:cc:dd:ee:ff", None if the bridge has none (all zero)
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "ipv4": list(self.ipv4), "ipv6": list(self.ipv6)}


def read_launcher(ns: NetNS, bridge: Link) -> Launcher:
    """Read the bridge's MAC and addresses now (later changes need a re-apply)."""
    mac = None
    for lk in ns.get_links(bridge.index):
        addr = (lk.get_attr("IFLA_ADDRESS") or "").lower()
        if addr and addr.replace(":", "").strip("0"):
            mac = addr
    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    for msg in ns.get_addr(index=bridge.index):
        if msg["index"] != bridge.index:
            continue
        if msg["family"] == AF_INET:
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                v4.add(ipaddress.IPv4Address(addr))
        elif msg["family"] == AF_INET6:
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                v6.add(ipaddress.IPv6Address(addr.split("%")[0]))
    return Launcher(mac, tuple(str(a) for a in sorted(v4)), tuple(str(a) for a in sorted(v6)))


def redirect_peer_possible(ns: NetNS, dev: Link) -> bool:
    """Can tc ingress bpf_redirect_peer() through `dev` (into its peer's ingress)?

    Only for a veth whose peer is in another netns (the link then reports
    IFLA_LINK_NETNSID): the kernel drops a peer redirect to a device without a peer or to a
    peer in the redirecting netns.
    """
    if dev.kind != "veth":
        return False
    links = ns.get_links(dev.index)
    return bool(links) and links[0].get_attr("IFLA_LINK_NETNSID") is not None


@contextlib.contextmanager
def open_netns(netns: str) -> Iterator[NetNS]:
    """A pyroute2 NetNS of an existing namespace (a name under /var/run/netns or an absolute
    path such as /proc/<pid>/ns/net) whose filter messages decode with tc.TcMsg."""
    try:
        path = netns_path(netns)
    except ValueError as exc:
        raise VmShapeError(str(exc)) from None
    if not path.exists():
        raise VmShapeError(f"network namespace {netns!r} does not exist ({path})")
    try:
        ns = NetNS(str(path), flags=0)  # never create it (pyroute2's default is O_CREAT)
    except (OSError, NetlinkError) as exc:
        raise VmShapeError(f"cannot open network namespace {netns!r}: {exc}") from exc
    try:
        tc.use_tc_parser(ns)
        yield ns
    finally:
        ns.close()
