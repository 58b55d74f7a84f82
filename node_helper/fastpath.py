"""The node fast path: endpoint -> endpoint on one node, skipping the node (bpf/fastpath.c).

    fastpath.add(node_netns, host_veth, endpoint_netns)     a pod: facts read from its netns
    fastpath.add(node_netns, host_veth, launcher_netns, mac=vm_mac, addresses=[vm_ip])  a VM
    fastpath.remove(node_netns, host_veth)                  back to the CNI's path, exactly
    fastpath.status(node_netns) / fastpath.cleanup(node_netns)

One program per node, compiled once (bcc), loaded with its two kfunc calls marked (see the
KFUNCS note in bpf/fastpath.c) and pinned in kernel.pin_dir("fastpath") with its maps:

    prog_<digest>  the program (<digest> covers source, header and cflags)
    endpoints      hash: address -> struct fp_endpoint (ifindex of its node-side veth, MACs)
    counters       per-CPU hash: node-side ifindex -> struct fp_counters
    remote         LPM trie: address ranges of accelerated endpoints on other nodes

Other nodes: `set_remote(cidrs)` names them, and `add_uplink(node_netns, device)` puts the
program on the ingress of the device their traffic arrives on (the VXLAN device of an
encapsulating CNI, the uplink of a routed one), so frames from there to a local endpoint go
straight into it too.

An endpoint is accelerated by its addresses in `endpoints`, its counters entry and a cls_bpf
filter (direct action, PRIO) on the ingress of its node-side veth. The filter's name says
whether netaccel created the clsact qdisc ("<instance>_fp:q"), so `remove` undoes exactly
that. The facts come from the endpoint's own netns, not from a CNI: its interface's MAC and
addresses, and the neighbour entry of its default gateway (the MAC it sends routed frames
to, and expects them from). When the last endpoint goes, everything is unpinned.
Changes are serialised between processes by kernel.lock_file("fastpath").
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError

from node_helper import bpf_abi, bpf_syscall, btf, kernel
from node_helper import tc_netlink as tc
from node_helper.kernel import KernelFeatureError

SOURCE = "fastpath.c"
PROG_PREFIX = "prog_"
ENDPOINTS, COUNTERS, REMOTE = "endpoints", "counters", "remote"
PRIO = 0x4E45  # on the node-side veth's ingress; the VM datapath's prios are 0x4e3e-0x4e44
ETH_P_ALL = 0x0003
TCA_BPF_FLAG_ACT_DIRECT = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PSEUDO_KFUNC_CALL = 2
BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
KFUNCS = {"NA_KF_CT_LOOKUP": "bpf_skb_ct_lookup", "NA_KF_CT_RELEASE": "bpf_ct_release"}
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


class FastPathError(ValueError):
    """An endpoint cannot be put on the fast path as asked (a device that is not a veth into
    another netns, an interface without addresses, ...); the message says why."""


@dataclass(frozen=True)
class Facts:
    """What the program needs of an endpoint, read from its netns (or given, for a VM)."""

    addresses: tuple[str, ...]
    mac: str
    gw_mac: str | None  # None: no resolved gateway; routed frames to it take the kernel path
    vm: bool = False


def pin_dir() -> Path:
    return kernel.pin_dir("fastpath")


def prog_name() -> str:
    return f"{kernel.instance()}_fp"


def filter_name(created_qdisc: bool) -> str:
    return prog_name() + (":q" if created_qdisc else "")


def _cflags() -> list[str]:
    flags = [f'-DNA_PIN_DIR="{pin_dir()}"', f"-DNA_PROG_FP={prog_name()}", "-w"]
    try:
        flags += [f"-D{macro}={btf.func_id(name)}" for macro, name in KFUNCS.items()]
        flags.append(f"-DNA_OFF_NF_CONN_STATUS={btf.vmlinux().member('nf_conn', 'status').offset}")
    except btf.BtfError as exc:
        raise KernelFeatureError(
            f"the node fast path needs the conntrack kfuncs and struct nf_conn in the kernel's "
            f"BTF (CONFIG_NF_CONNTRACK, CONFIG_DEBUG_INFO_BTF, Linux >= 6.0): {exc}") from exc
    return flags


def _digest(cflags: list[str]) -> str:
    return bpf_abi.source_digest(SOURCE, cflags)


def program_pinned() -> bool:
    """Is the current program pinned (an add then compiles nothing)?"""
    try:
        return (pin_dir() / f"{PROG_PREFIX}{_digest(_cflags())}").exists()
    except KernelFeatureError:
        return False


def compile_program() -> None:
    """Compile, load and pin the program (for a short-lived child process: bcc is big)."""
    with kernel.locked("fastpath"):
        _program()


def mark_kfunc_calls(insns: bytes, ids: set[int]) -> tuple[bytes, int]:
    """Mark `call <id>` instructions whose id is a kfunc's BTF id as kfunc calls
    (src_reg = BPF_PSEUDO_KFUNC_CALL, imm = BTF id, off = 0: vmlinux), the encoding libbpf
    emits. Helper ids are small (< 300), BTF ids of functions are not, so none is taken for
    the other. Returns the new instructions and how many were marked."""
    out, marked = bytearray(insns), 0
    for pos in range(0, len(out), 8):
        code, regs, _off, imm = struct.unpack_from("<BBhi", out, pos)
        if code == BPF_CALL and regs == 0 and imm in ids:
            out[pos + 1] = BPF_PSEUDO_KFUNC_CALL << 4  # src_reg: the high nibble
            marked += 1
    return bytes(out), marked


def _program() -> Path:
    """The pin of the current program: reused if pinned with this digest, else compiled,
    loaded and pinned (its maps are created, or reused when pinned). Under the lock."""
    import ctypes

    kernel.ensure_bpffs()
    folder = pin_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cflags = _cflags()
    pin = folder / f"{PROG_PREFIX}{_digest(cflags)}"
    if pin.exists():
        return pin
    prog = kernel.compile_bpf(SOURCE, cflags)
    try:
        bpf_abi.check_map(prog, "netaccel_fp_eps", key="fp_addr_key", value="fp_endpoint")
        bpf_abi.check_map(prog, "netaccel_fp_cnt", key="fp_dev_key", value="fp_counters")
        from bcc.libbcc import lib

        name = prog_name().encode()
        start, size = lib.bpf_function_start(prog.module, name), \
            lib.bpf_function_size(prog.module, name)
        insns, marked = mark_kfunc_calls(ctypes.string_at(start, size),
                                         {btf.func_id(n) for n in KFUNCS.values()})
        if marked < 2:
            raise RuntimeError(f"{SOURCE}: expected 2 conntrack kfunc calls, marked {marked}")
        try:
            fd = bpf_syscall.prog_load(BPF_PROG_TYPE_SCHED_CLS, insns, prog_name())
        except OSError as exc:
            raise KernelFeatureError(f"the kernel refused the fast path program: {exc}") from exc
        with bpf_syscall.closing(fd):
            bpf_syscall.obj_pin(fd, pin)
    finally:
        prog.cleanup()
    for old in folder.glob(f"{PROG_PREFIX}*"):  # older versions: attached filters keep them
        if old != pin:
            old.unlink()
    return pin


def _map(name: str) -> contextlib.AbstractContextManager[int | None]:
    return bpf_syscall.pinned_map(pin_dir() / name)


def addr_key(ip: str) -> bytes:
    """An address as the map key: 16 bytes, IPv4 as ::ffff:a.b.c.d."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        a = ipaddress.IPv6Address(f"::ffff:{a}")
    return a.packed


def _ip(key: bytes) -> str:
    a = ipaddress.IPv6Address(key)
    return str(a.ipv4_mapped or a)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@contextlib.contextmanager
def _netns(netns: str | None) -> Iterator[NetNS | Any]:
    """pyroute2 for a named/path netns, or the current one (None)."""
    if netns is None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            yield ipr
        return
    with NetNS(str(kernel.netns_path(netns))) as ns:
        yield ns


def _link(ns: Any, ifname: str, where: str) -> Any:
    links = ns.get_links(ifname=ifname)
    if not links:
        raise FastPathError(f"no interface {ifname!r} in {where}")
    return links[0]


def read_facts(netns: str, ifname: str = "eth0", node_netns: str | None = None) -> Facts:
    """A pod's facts from its netns: `ifname`'s MAC and global addresses, and its gateway's
    MAC (gateway_mac)."""
    with _netns(netns) as ns:
        link = _link(ns, ifname, f"netns {netns}")
        addrs = tuple(sorted(
            a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=link["index"])
            if a["scope"] == 0 and not a.get_attr("IFA_ADDRESS", "").startswith("fe80")))
        if not addrs:
            raise FastPathError(f"{ifname} in netns {netns} has no global address")
        mac = link.get_attr("IFLA_ADDRESS")
    return Facts(addrs, mac, gateway_mac(netns, node_netns))


def node_side(netns: str, ifname: str, node_netns: str | None = None) -> str:
    """The node-side end (its name in `node_netns`) of the veth `ifname` in `netns`."""
    with _netns(netns) as ns:
        link = _link(ns, ifname, f"netns {netns}")
        peer_index = link.get_attr("IFLA_LINK")
        if link.get_attr("IFLA_LINK_NETNSID") is None or not peer_index:
            raise FastPathError(f"{ifname} in netns {netns} is not a veth into another netns")
    with _netns(node_netns) as node:
        for peer in node.get_links(peer_index):
            if peer.get_attr("IFLA_LINK") == link["index"]:
                return peer.get_attr("IFLA_IFNAME")
    raise FastPathError(f"the peer of {ifname} in netns {netns} is not in the node's netns")


def guest_mac(launcher_netns: str, tap: str) -> str:
    """A VM's MAC from its launcher's netns: the address the in-pod bridge learned on the
    tap's port (the guest's frames come from there). FastPathError until the guest sent one."""
    with _netns(launcher_netns) as ns:
        index = _link(ns, tap, f"netns {launcher_netns}")["index"]
        for entry in ns.fdb("dump"):
            permanent = entry["state"] & 0x80  # NUD_PERMANENT: the bridge's own addresses
            if entry["ifindex"] == index and not permanent and entry.get_attr("NDA_LLADDR"):
                return entry.get_attr("NDA_LLADDR")
    raise FastPathError(f"no MAC learned on {tap} in {launcher_netns} yet: the VM has sent "
                        "nothing (it is retried)")


def gateway_mac(netns: str, node_netns: str | None = None) -> str | None:
    """The MAC the endpoint sends routed frames to: its IPv4 (else IPv6) default gateway's
    neighbour entry in its netns; if it has not resolved it yet, the node device that holds
    the gateway's address (a bridge CNI's gateway is the node's bridge). None: unknown."""
    gateways = []
    with _netns(netns) as ns:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ns.get_default_routes(family=family):
                gw = route.get_attr("RTA_GATEWAY")
                if not gw:
                    continue
                gateways.append(gw)
                for n in ns.get_neighbours(family=family, dst=gw):
                    if n["state"] & NUD_VALID and n.get_attr("NDA_LLADDR"):
                        return n.get_attr("NDA_LLADDR")
    if not gateways:
        return None
    with _netns(node_netns) as node:
        for a in node.get_addr():
            if a.get_attr("IFA_ADDRESS") in gateways:
                links = node.get_links(a["index"])
                if links and links[0].get_attr("IFLA_ADDRESS"):
                    return links[0].get_attr("IFLA_ADDRESS")
    return None


def endpoint_value(facts: Facts, ifindex: int) -> bytes:
    flags = (bpf_abi.constant("FP_F_VM") if facts.vm else 0) | \
        (bpf_abi.constant("FP_F_HAS_GW") if facts.gw_mac else 0)
    return bpf_abi.layout("fp_endpoint").pack(
        ifindex=ifindex, flags=flags, mac=_mac(facts.mac),
        gw_mac=_mac(facts.gw_mac) if facts.gw_mac else bytes(6))


def _dev_key(ifindex: int) -> bytes:
    return bpf_abi.layout("fp_dev_key").pack(ifindex=ifindex)


def _our_filters(ns: Any, index: int) -> tuple[list[Any], list[int]]:
    """(our filters on the device's ingress, the prios of everybody else's)."""
    ours, foreign = [], set()
    for f in tc.dump_filters(ns, index):
        prio = f["info"] >> 16
        if prio == PRIO:
            ours.append(f)
        elif f.get_attr("TCA_KIND"):
            foreign.add(prio)
    return ours, sorted(foreign)


def _filter_names(filters: list[Any]) -> list[str]:
    names = []
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name:
            names.append(name)
    return names


def add(node_netns: str | None, host_veth: str, endpoint_netns: str | None = None,
        ifname: str = "eth0", mac: str | None = None,
        addresses: list[str] | None = None, vm: bool = False) -> dict[str, Any]:
    """Put an endpoint on the fast path: frames it sends to other endpoints on it go straight
    into their netns, and frames they send to it come straight into its netns.

    A pod: its facts are read from `endpoint_netns` (`ifname`). A VM (`vm=True`): `mac` and
    `addresses` are the guest's (KubeVirt's VMI status), the gateway from the launcher's netns.
    Idempotent; returns the endpoint's status."""
    facts = _facts(node_netns, endpoint_netns, ifname, mac, addresses, vm)
    with kernel.locked("fastpath"):
        pin = _program()
        with _netns(node_netns) as ns:
            tc.use_tc_parser(ns)
            dev = _link(ns, host_veth, f"node netns {node_netns or '(current)'}")
            index = dev["index"]
            if dev.get_attr("IFLA_LINK_NETNSID") is None or \
                    (dev.get_attr("IFLA_LINKINFO") and
                     dev.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") != "veth"):
                raise FastPathError(f"{host_veth} is not a veth with its peer in another netns: "
                                    "bpf_redirect_peer cannot reach into it")
            with _map(ENDPOINTS) as eps:
                assert eps is not None
                wanted = {addr_key(a) for a in facts.addresses}
                value = endpoint_value(facts, index)
                for key in wanted:
                    bpf_syscall.map_update(eps, key, value)
                for key, ifx in _endpoint_entries(eps).items():  # addresses it no longer has
                    if ifx == index and key not in wanted:
                        bpf_syscall.map_delete(eps, key)
            _attach(ns, index, pin)
    return endpoint_status(node_netns, host_veth)


def _facts(node_netns: str | None, endpoint_netns: str | None, ifname: str, mac: str | None,
           addresses: list[str] | None, vm: bool) -> Facts:
    if vm:
        if not mac or not addresses:
            raise FastPathError("a VM endpoint needs the guest's MAC and addresses")
        gw = gateway_mac(endpoint_netns, node_netns) if endpoint_netns else None
        return Facts(tuple(addresses), mac, gw, vm=True)
    if endpoint_netns is None:
        raise FastPathError("a pod endpoint needs its netns (its facts are read there)")
    facts = read_facts(endpoint_netns, ifname, node_netns)
    if addresses:  # a subset the caller wants (the others stay on the CNI's path)
        unknown = set(addresses) - set(facts.addresses)
        if unknown:
            raise FastPathError(f"{sorted(unknown)} are not addresses of {ifname} in "
                                f"{endpoint_netns} ({', '.join(facts.addresses)})")
        facts = Facts(tuple(addresses), facts.mac, facts.gw_mac)
    return facts


def _endpoint_entries(eps_fd: int) -> dict[bytes, int]:
    """address key -> ifindex of every configured address."""
    key_size = bpf_abi.layout("fp_addr_key").size
    lay = bpf_abi.layout("fp_endpoint")
    out = {}
    for key in list(bpf_syscall.map_keys(eps_fd, key_size)):
        raw = bpf_syscall.map_lookup(eps_fd, key, lay.size)
        if raw is not None:
            out[key] = lay.unpack(raw)["ifindex"]
    return out


def remove(node_netns: str | None, host_veth: str, keep_pins: bool = False) -> dict[str, Any]:
    """Take the endpoint off: its filter first (its frames take the CNI's path from the next
    one), then its addresses (frames to it do too), its counters, the qdisc if we made it;
    unpin everything when it was the last (unless `keep_pins`: the next add then compiles
    nothing). Quiet when it was not on."""
    done = {"device": host_veth, "removed_filter": False, "removed_qdisc": False,
            "removed_addresses": []}
    with kernel.locked("fastpath"), _netns(node_netns) as ns:
        tc.use_tc_parser(ns)
        links = ns.get_links(ifname=host_veth)
        index = links[0]["index"] if links else None
        if index is not None:
            ours, foreign = _our_filters(ns, index)
            if ours:
                created = any(n.endswith(":q") for n in _filter_names(ours))
                tc.delete_prio(ns, index, PRIO, ETH_P_ALL)
                done["removed_filter"] = True
                if created and not foreign and tc.ingress_qdisc_kind(ns, index) is not None:
                    ns.tc("del", index=index, handle=0xFFFF0000, parent=0xFFFFFFF1)
                    done["removed_qdisc"] = True
        _forget(index, done, keep_pins)
    return done


def _forget(index: int | None, done: dict[str, Any], keep_pins: bool) -> None:
    with _map(ENDPOINTS) as eps, _map(COUNTERS) as cnt:
        if eps is not None and index is not None:
            for key, ifx in _endpoint_entries(eps).items():
                if ifx == index:
                    bpf_syscall.map_delete(eps, key)
                    done["removed_addresses"].append(_ip(key))
        if cnt is not None and index is not None:
            bpf_syscall.map_delete(cnt, _dev_key(index))
        left = cnt is not None and any(True for _ in bpf_syscall.map_keys(
            cnt, bpf_abi.layout("fp_dev_key").size))
    if not left and not keep_pins:
        unpin_all()


RTN_UNICAST = 1


def uplinks_for(node_netns: str | None, cidrs: list[str]) -> tuple[dict[str, list[str]],
                                                                   list[str]]:
    """The devices the node's routes send each of `cidrs` through ({device: [cidr, ...]},
    from a route lookup of an address in it, as `ip route get` does), and the networks with
    no unicast route (none yet, unreachable, or a local one)."""
    routes: dict[str, list[str]] = {}
    unrouted = []
    with _netns(node_netns) as ns:
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr)
            probe = net.network_address + (1 if net.num_addresses > 1 else 0)
            try:
                found = ns.route("get", dst=str(probe))
            except NetlinkError:  # ENETUNREACH, EHOSTUNREACH, ...
                found = []
            oif = found[0].get_attr("RTA_OIF") if found else None
            links = ns.get_links(oif) if oif and found[0]["type"] == RTN_UNICAST else []
            if links:
                routes.setdefault(links[0].get_attr("IFLA_IFNAME"), []).append(cidr)
            else:
                unrouted.append(cidr)
    return routes, unrouted


def add_uplink(node_netns: str | None, device: str) -> dict[str, Any]:
    """Run the program on `device`'s ingress (where other nodes' frames arrive): frames for a
    local endpoint go straight into it. Idempotent."""
    with kernel.locked("fastpath"):
        pin = _program()
        with _netns(node_netns) as ns:
            tc.use_tc_parser(ns)
            index = _link(ns, device, f"node netns {node_netns or '(current)'}")["index"]
            _attach(ns, index, pin)
    return endpoint_status(node_netns, device)


def _attach(ns: Any, index: int, pin: Path) -> None:
    """Our counters entry and filter on the device (kept if already there)."""
    with _map(COUNTERS) as cnt:
        assert cnt is not None
        size = bpf_abi.layout("fp_counters").percpu_size
        if bpf_syscall.map_lookup(cnt, _dev_key(index), size) is None:
            bpf_syscall.map_update(cnt, _dev_key(index), bytes(size))
    if _our_filters(ns, index)[0]:
        return
    created = tc.ingress_qdisc_kind(ns, index) is None
    if created:
        ns.tc("add", "clsact", index=index)
    with bpf_syscall.closing(bpf_syscall.obj_get(pin)) as prog_fd:
        tc.add_filter(ns, index, PRIO, ETH_P_ALL, "bpf", [
            ["TCA_BPF_FD", prog_fd],
            ["TCA_BPF_NAME", filter_name(created)],
            ["TCA_BPF_FLAGS", TCA_BPF_FLAG_ACT_DIRECT],
        ])


def set_remote(cidrs: list[str]) -> list[str]:
    """Make the remote set exactly `cidrs` (accelerated endpoints of other nodes); returns it.
    The program must be loaded (an endpoint or uplink added) first."""
    from node_helper.sockets import lpm_key, parse_cidrs

    nets = parse_cidrs(cidrs, allow_empty=True)
    with kernel.locked("fastpath"), _map(REMOTE) as fd:
        if fd is None:
            raise FastPathError("the fast path is not loaded: add an endpoint or uplink first")
        wanted = {lpm_key(n) for n in nets}
        for key in wanted:
            bpf_syscall.map_update(fd, key, struct.pack("=I", 1))
        for key in list(bpf_syscall.map_keys(fd, len(next(iter(wanted), b"\0" * 20)))):
            if key not in wanted:
                bpf_syscall.map_delete(fd, key)
    return remote()


def remote() -> list[str]:
    from node_helper.sockets import LPM_KEY, key_to_cidr

    with _map(REMOTE) as fd:
        return [] if fd is None else sorted(key_to_cidr(k) for k in
                                            bpf_syscall.map_keys(fd, LPM_KEY.size))


def unpin_all() -> None:
    kernel.unpin("fastpath")


def counters(index: int) -> dict[str, int] | None:
    lay = bpf_abi.layout("fp_counters")
    with _map(COUNTERS) as fd:
        raw = None if fd is None else bpf_syscall.map_lookup(fd, _dev_key(index),
                                                               lay.percpu_size)
    return None if raw is None else lay.sum_percpu(raw)


def endpoint_status(node_netns: str | None, host_veth: str) -> dict[str, Any]:
    """One device: is our filter on, its addresses, MACs and counters."""
    with _netns(node_netns) as ns:
        tc.use_tc_parser(ns)
        links = ns.get_links(ifname=host_veth)
        if not links:
            return {"device": host_veth, "present": False, "on": False}
        index = links[0]["index"]
        ours, _ = _our_filters(ns, index)
    lay = bpf_abi.layout("fp_endpoint")
    addrs, info = [], {}
    with _map(ENDPOINTS) as eps:
        if eps is not None:
            for key, ifx in _endpoint_entries(eps).items():
                if ifx == index:
                    addrs.append(_ip(key))
                    raw = bpf_syscall.map_lookup(eps, key, lay.size)
                    info = lay.unpack(raw) if raw else info
    return {"device": host_veth, "present": True, "on": bool(ours), "ifindex": index,
            "addresses": sorted(addrs),
            "mac": bytes(info["mac"]).hex(":") if info else None,
            "gateway_mac": bytes(info["gw_mac"]).hex(":") if info and any(info["gw_mac"]) else None,
            "vm": bool(info and info["flags"] & bpf_abi.constant("FP_F_VM")),
            "counters": counters(index) or {}}


def status(node_netns: str | None = None) -> dict[str, Any]:
    """Every endpoint on the fast path in `node_netns` (its devices that carry our filter)."""
    out: dict[str, Any] = {"pinned": pin_dir().is_dir(), "endpoints": []}
    with _netns(node_netns) as ns:
        tc.use_tc_parser(ns)
        names = [(link.get_attr("IFLA_IFNAME"), link["index"]) for link in ns.get_links()]
        devices = [name for name, index in names if _our_filters(ns, index)[0]]
    out["endpoints"] = [endpoint_status(node_netns, d) for d in devices]
    out["remote"] = remote()
    return out


def cleanup(node_netns: str | None = None, keep_pins: bool = False) -> list[dict[str, Any]]:
    """Take every endpoint of `node_netns` off the fast path; unpin when none is left."""
    return [remove(node_netns, e["device"], keep_pins)
            for e in status(node_netns)["endpoints"]]
