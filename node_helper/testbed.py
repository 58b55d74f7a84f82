"""The simulated node: network namespaces shaped like a Kubernetes node running pods and VMs.

Used by the tests, the demo and the benchmarks alike. One testbed is:

    node netns  na<k>-node    bridge br0 (10.251.<k>.1/24, fd00:6e61:<k>::1/64)
    pod netns   na<k>-pod<i>  eth0 (veth, peer pod<i> on br0)
                              10.251.<k>.<10+i>, fd00:6e61:<k>::<10+i>
    VM launcher na<k>-vm<j>   KubeVirt bridge binding: k6t-eth0 bridge, eth0-nic veth (peer vm<j>
                              on br0), dummy eth0 with the VM's IP, tap0 towards the guest
    VM guest    na<k>-vm<j>g  (netns guest) eth0 with the VM's IP 10.251.<k>.<100+j>; its peer in
                              the launcher is tap0, a veth standing in for QEMU's tap and marked
                              with the alias TAP_STANDIN_ALIAS.

Names and addresses derive from the testbed number <k>, so any process can find a testbed
again from the namespaces alone (no state file). Everything lives in namespaces the testbed
created; `destroy()` removes them all, and so does `destroy_all()` after a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from node_helper.kernel import CLONE_NEWNET, NETNS_DIR

PREFIX = "na"
TAP_STANDIN_ALIAS = "netaccel-testbed-tap"
NODE_BRIDGE = "br0"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-(node|pod(\d+)|vm(\d+)g?)$")


class TestbedError(RuntimeError):
    """The testbed could not be built or found; the message says why."""

    __test__ = False  # not a pytest test class


@dataclass
class Pod:
    """A pod: its own netns with eth0 on the node bridge."""

    name: str
    netns: str
    ipv4: str
    ipv6: str
    host_veth: str  # the node-side veth on br0


@dataclass
class Vm:
    """A VM in KubeVirt's bridge binding: launcher netns plus a guest (netns or QEMU)."""

    name: str
    launcher_netns: str
    guest_netns: str | None
    ipv4: str
    tap: str = "tap0"
    veth: str = "eth0-nic"
    bridge: str = "k6t-eth0"
    host_veth: str = ""
    guest_kind: str = "netns"
    extra: dict[str, Any] = field(default_factory=dict)


def _addresses(k: int, host: int) -> tuple[str, str]:
    return f"10.251.{k}.{host}", f"fd00:6e61:{k:x}::{host:x}"


@dataclass
class Testbed:
    """A built testbed; create with `Testbed.create`, find again with `Testbed.find`."""

    __test__ = False

    number: int
    pods: list[Pod] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)

    # --- names ------------------------------------------------------------
    @property
    def node_netns(self) -> str:
        return f"{PREFIX}{self.number}-node"

    @property
    def ipv4_cidr(self) -> str:
        return f"10.251.{self.number}.0/24"

    @property
    def ipv6_cidr(self) -> str:
        return f"fd00:6e61:{self.number:x}::/64"

    def pod_cidrs(self) -> list[str]:
        """Host routes (/32, /128) for every pod address: the default accelerated set."""
        return [f"{p.ipv4}/32" for p in self.pods] + [f"{p.ipv6}/128" for p in self.pods]

    # --- life cycle -------------------------------------------------------
    @classmethod
    def create(cls, pods: int = 2, vms: int = 0, number: int | None = None) -> Testbed:
        """Build a new testbed; on any failure, remove what was built and re-raise."""
        if pods < 0 or vms < 0 or pods > 80 or vms > 80:
            raise TestbedError("pods and vms must each be between 0 and 80")
        taken = set(existing_numbers())
        if number is None:
            free = [n for n in range(1, 250) if n not in taken]
            if not free:
                raise TestbedError(
                    "no free testbed number (1..249): run `netaccel testbed down --all`"
                )
            number = random.choice(free)
        elif number in taken:
            raise TestbedError(f"testbed {number} already exists")
        bed = cls(number=number)
        try:
            bed._build_node()
            for i in range(pods):
                bed._add_pod(i)
            for j in range(vms):
                bed._add_vm(j)
        except BaseException:
            bed.destroy()
            raise
        return bed

    @classmethod
    def find(cls, number: int | None = None) -> Testbed:
        """Rebuild the description of an existing testbed from its namespaces."""
        numbers = existing_numbers()
        if number is None:
            if not numbers:
                raise TestbedError("no testbed is up: run `netaccel testbed up`")
            number = min(numbers)
        elif number not in numbers:
            raise TestbedError(f"testbed {number} is not up")
        bed = cls(number=number)
        for name in sorted(netns.listnetns()):
            m = _NS_RE.match(name)
            if not m or int(m.group(1)) != number:
                continue
            if m.group(3) is not None:
                bed.pods.append(bed._pod(int(m.group(3))))
            elif m.group(4) is not None and not name.endswith("g"):
                j = int(m.group(4))
                guest = f"{name}g" if (NETNS_DIR / f"{name}g").exists() else None
                bed.vms.append(bed._vm(j, guest, "netns" if guest else "qemu"))
        bed.pods.sort(key=lambda p: p.name)
        bed.vms.sort(key=lambda v: v.name)
        return bed

    def destroy(self) -> None:
        """Remove every namespace of this testbed (and so every link in them)."""
        destroy_number(self.number)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # --- building ---------------------------------------------------------
    def _pod(self, i: int) -> Pod:
        v4, v6 = _addresses(self.number, 10 + i)
        return Pod(f"pod{i}", f"{PREFIX}{self.number}-pod{i}", v4, v6, f"pod{i}")

    def _vm(self, j: int, guest_netns: str | None, kind: str) -> Vm:
        v4, _ = _addresses(self.number, 100 + j)
        return Vm(
            name=f"vm{j}",
            launcher_netns=f"{PREFIX}{self.number}-vm{j}",
            guest_netns=guest_netns,
            ipv4=v4,
            host_veth=f"vm{j}",
            guest_kind=kind,
        )

    def _build_node(self) -> None:
        _new_netns(self.node_netns)
        with NetNS(self.node_netns) as ns:
            ns.link("add", ifname=NODE_BRIDGE, kind="bridge")
            br = ns.link_lookup(ifname=NODE_BRIDGE)[0]
            gw4, gw6 = _addresses(self.number, 1)
            ns.addr("add", index=br, address=gw4, prefixlen=24)
            ns.addr("add", index=br, address=gw6, prefixlen=64)
            ns.link("set", index=br, state="up")

    def _add_pod(self, i: int) -> None:
        pod = self._pod(i)
        _new_netns(pod.netns)
        self._veth_to_bridge(pod.host_veth, pod.netns, "eth0")
        with NetNS(pod.netns) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=pod.ipv4, prefixlen=24)
            ns.addr("add", index=eth0, address=pod.ipv6, prefixlen=64)
            ns.link("set", index=eth0, state="up")
            gw4, gw6 = _addresses(self.number, 1)
            ns.route("add", dst="default", gateway=gw4)
            ns.route("add", dst="default", gateway=gw6, family=10)
        self.pods.append(pod)

    def _add_vm(self, j: int) -> None:
        """A launcher netns in KubeVirt's bridge binding shape, and a netns guest behind tap0."""
        vm = self._vm(j, f"{PREFIX}{self.number}-vm{j}g", "netns")
        _new_netns(vm.launcher_netns)
        _new_netns(vm.guest_netns)
        self._veth_to_bridge(vm.host_veth, vm.launcher_netns, vm.veth)
        with NetNS(vm.launcher_netns) as ns:
            ns.link("add", ifname=vm.bridge, kind="bridge")
            br = ns.link_lookup(ifname=vm.bridge)[0]
            # virt-launcher's DHCP server listens on a link-local address on the bridge.
            ns.addr("add", index=br, address="169.254.75.10", prefixlen=32)
            nic = ns.link_lookup(ifname=vm.veth)[0]
            ns.link("set", index=nic, master=br, state="up")
            # The dummy keeps the pod's IP so CNI checks pass; the guest owns it on the wire.
            _add_placeholder_link(ns, "eth0")
            dummy = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=dummy, address=vm.ipv4, prefixlen=32)
            ns.link("set", index=dummy, state="up")
            # The stand-in for QEMU's tap: a veth into the guest netns, marked as such.
            ns.link("add", ifname=vm.tap, kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": vm.guest_netns})
            tap = ns.link_lookup(ifname=vm.tap)[0]
            ns.link("set", index=tap, ifalias=TAP_STANDIN_ALIAS)
            ns.link("set", index=tap, master=br, state="up")
            ns.link("set", index=br, state="up")
        with NetNS(vm.guest_netns) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=vm.ipv4, prefixlen=24)
            ns.link("set", index=eth0, state="up")
        self.vms.append(vm)

    def _veth_to_bridge(self, host_name: str, peer_netns: str, peer_name: str) -> None:
        with NetNS(self.node_netns) as ns:
            ns.link("add", ifname=host_name, kind="veth",
                    peer={"ifname": peer_name, "net_ns_fd": peer_netns})
            idx = ns.link_lookup(ifname=host_name)[0]
            br = ns.link_lookup(ifname=NODE_BRIDGE)[0]
            ns.link("set", index=idx, master=br, state="up")

    # --- using ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-ready description: {"number", "node_netns", "pods": [...], "vms": [...]}."""
        return {
            "number": self.number,
            "node_netns": self.node_netns,
            "ipv4_cidr": self.ipv4_cidr,
            "ipv6_cidr": self.ipv6_cidr,
            "pods": [asdict(p) for p in self.pods],
            "vms": [
                {k: v for k, v in asdict(vm).items() if k not in ("extra",)} for vm in self.vms
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.status(), indent=2)


# --- helpers shared by tests, demo and benchmarks ----------------------------

def existing_numbers() -> list[int]:
    """Numbers of the testbeds whose node namespace exists."""
    found = set()
    for name in netns.listnetns():
        m = _NS_RE.match(name)
        if m and m.group(2) == "node":
            found.add(int(m.group(1)))
    return sorted(found)


def destroy_number(number: int) -> None:
    """Remove every namespace named for testbed `number` (ignores ones already gone)."""
    for name in netns.listnetns():
        m = _NS_RE.match(name)
        if m and int(m.group(1)) == number:
            _remove_netns(name)


def destroy_all() -> list[int]:
    """Remove every testbed on this machine; return their numbers."""
    numbers = sorted({int(m.group(1)) for n in netns.listnetns() if (m := _NS_RE.match(n))})
    for number in numbers:
        destroy_number(number)
    return numbers


def _add_placeholder_link(ns: NetNS, ifname: str) -> None:
    """A link that only holds addresses: KubeVirt uses a dummy. Kernels built without
    CONFIG_DUMMY (like this project's CI machine) get an ifb, which forwards nothing either."""
    try:
        ns.link("add", ifname=ifname, kind="dummy")
    except NetlinkError as exc:
        if exc.code != errno.EOPNOTSUPP:
            raise
        ns.link("add", ifname=ifname, kind="ifb")


def _new_netns(name: str) -> None:
    netns.create(name)
    # Addresses must be usable at once: no IPv6 duplicate address detection; loopback up.
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    for key in ("all", "default"):
        write_sysctl(name, f"net/ipv6/conf/{key}/accept_dad", "0")
    write_sysctl(name, "net/ipv4/conf/all/arp_ignore", "1")


def _remove_netns(name: str) -> None:
    # Processes still running inside would keep the namespace alive; the link teardown
    # happens when the last reference goes. Kill what we started there first.
    for pid in netns.ns_pids().get(name, []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        netns.remove(name)
    except OSError:
        pass


def write_sysctl(netns_name: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> as seen from inside `netns_name`."""
    from node_helper.kernel import in_netns

    with in_netns(netns_name):
        Path("/proc/sys", key).write_text(value)


def _enter(netns_name: str):  # noqa: ANN202 - a preexec_fn
    path = str(NETNS_DIR / netns_name).encode()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    return preexec


def popen_in(netns_name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start `argv` inside a namespace (no shell, no `ip netns exec`)."""
    if not (NETNS_DIR / netns_name).exists():
        raise TestbedError(f"network namespace {netns_name!r} does not exist")
    return subprocess.Popen(list(argv), preexec_fn=_enter(netns_name), **kwargs)


def run_in(netns_name: str, argv: Sequence[str], timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside a namespace to completion, capturing text output."""
    proc = popen_in(netns_name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise TestbedError(f"{' '.join(argv)} in {netns_name} timed out after {timeout}s") from None
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise TestbedError(
            f"{' '.join(argv)} in {netns_name} exited {proc.returncode}: {err.strip()[-500:]}"
        )
    return result


def link_stats(netns_name: str, ifname: str) -> dict[str, int]:
    """rx/tx packet and byte counters of one link, read over netlink."""
    with NetNS(netns_name) as ns:
        link = ns.get_links(ns.link_lookup(ifname=ifname)[0])[0]
    stats = link.get_attr("IFLA_STATS64")
    return {k: stats[k] for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}


def wait_for_port(netns_name: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on TCP `port` inside the namespace."""
    deadline = time.monotonic() + timeout
    needle = f":{port:04X} "
    while time.monotonic() < deadline:
        from node_helper.kernel import in_netns

        with in_netns(netns_name):
            tables = Path("/proc/thread-self/net/tcp").read_text() + Path(
                "/proc/thread-self/net/tcp6"
            ).read_text()
        if any(needle in line and line.split()[3] == "0A" for line in tables.splitlines()[1:]):
            return
        time.sleep(0.05)
    raise TestbedError(f"nothing listens on port {port} in {netns_name} after {timeout}s")


def is_testbed_address(address: str) -> bool:
    """True for addresses inside the testbeds' reserved ranges."""
    ip = ipaddress.ip_address(address)
    return ip in ipaddress.ip_network("10.251.0.0/16") or ip in ipaddress.ip_network(
        "fd00:6e61::/32"
    )
