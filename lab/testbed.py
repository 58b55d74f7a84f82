"""The simulated node: network namespaces shaped like a Kubernetes node running pods and VMs.

Used by the tests, the demo and the benchmarks alike. One testbed is:

    node netns  na<k>-node    bridge br0 (10.251.<k>.1/24, fd00:6e61:<k>::1/64)
    pod netns   na<k>-pod<i>  eth0 (veth, peer pod<i> on br0)
                              10.251.<k>.<10+i>, fd00:6e61:<k>::<10+i>; pods 80 and up
                              (MAX_PODS 300) take 10.252.<k>.<10+i-80> (br0 then also has
                              10.252.<k>.1/24 and the node netns routes between the two)
    VM launcher na<k>-vm<j>   KubeVirt bridge binding: k6t-eth0 bridge, eth0-nic veth (peer vm<j>
                              on br0), dummy eth0 with the VM's IP, tap0 towards the guest
    VM guest    na<k>-vm<j>g  (netns guest) eth0 with the VM's IPs 10.251.<k>.<100+j> and
                              fd00:6e61:<k>::<100+j in hex>/64 (on-link); its peer in
                              the launcher is tap0, a veth standing in for QEMU's tap and marked
                              with the alias TAP_STANDIN_ALIAS.
       or       (none)        (no guest) tap0 is a real tun/tap with nothing behind it (alias
                              TAP_NO_GUEST_ALIAS): the agent's own tap classifier accepts it, so
                              the VM datapath can be programmed at scale; no guest traffic.
       or       netaccel-tb<k>-vm<j>  (QEMU guest) a libvirt domain on a real tap0, address by
                              DHCP from dnsmasq on k6t-eth0 (server 10.251.<k>.<200+j>).

Names and addresses derive from the testbed number <k>, so any process can find a testbed
again from the namespaces alone (no state file). Everything lives in namespaces the testbed
created; `destroy()` removes them all, and so does `destroy_all()` after a crash.

With `kubelet_root` the testbed also lays pods out the way kubelet and KubeVirt do, so that
node_helper.netns_discovery is tested for real: every pod and VM launcher gets a UID
(uuid4, or the one given in `uids`: the API server's, when the Pod objects came first) and a
long-running process inside its netns, placed in a kubelet-style cgroup under
<cgroup v2 root>/netaccel-lab-<k>/ (never the real kubepods; `cgroup_root` is what discovery
is pointed at), named for the `cgroup_driver`:

    systemd   kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_>.slice/
                  <runtime>-<64 hex>.scope
    cgroupfs  kubepods[/<qos>]/pod<uid>/<64 hex>

QoS classes (guaranteed, burstable, besteffort) and runtimes (cri-containerd-, crio-,
docker-) rotate over the pods. A VM's process listens on virt-launcher's command socket,
<kubelet_root>/pods/<uid>/volumes/kubernetes.io~empty-dir/sockets/launcher-sock.
A pod or VM given the UID None in `uids` has no layout until `lay_out(name, uid)` (kubelet
still starting its sandbox while the Pod object already has its address).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from lab import mesh as mesh_mod
from node_helper.kernel import NETNS_DIR, cgroup2_root, in_netns, netns_argv, remove_netns
from node_helper.vm import Link

PREFIX = "na"
TAP_STANDIN_ALIAS = "netaccel-testbed-tap"
TAP_NO_GUEST_ALIAS = "netaccel-testbed-tap-no-guest"
GUESTS = ("netns", "qemu", "none")
QEMU_DOMAIN_PREFIX = "netaccel-tb"
GUEST_UDP_PORT = 7777  # QEMU guests send "netaccel-guest <ip>" here on pod0
NODE_BRIDGE = "br0"
MAX_PODS, MAX_VMS, MAX_QEMU_VMS = 300, 100, 55
FIRST_PLAN_PODS = 80  # pods 0..79 in 10.251.<k>.0/24, the others in 10.252.<k>.0/24
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-(node|pod(\d+)|vm(\d+)g?)$")
CGROUP_PREFIX = "netaccel-lab-"
CGROUP_DRIVERS = ("systemd", "cgroupfs")
QOS_CLASSES = ("", "burstable", "besteffort")  # "" = Guaranteed
RUNTIMES = ("cri-containerd-", "crio-", "docker-")
LAUNCHER_SOCK = "volumes/kubernetes.io~empty-dir/sockets/launcher-sock"
_UID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_POD_UID_RE = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_]"
                         r"[0-9a-f]{12})")
# virt-launcher's command socket, played by a process in the launcher's netns
# (bound relative to its folder: kubelet paths can exceed the 108 bytes of sun_path)
_LISTENER = ("import os, socket, sys\n"
             "os.chdir(os.path.dirname(sys.argv[1]))\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "s.bind(os.path.basename(sys.argv[1]))\n"
             "s.listen(64)\n"
             "while True:\n"
             "    s.accept()[0].close()\n")


def is_tap(link: Link) -> bool:
    """The lab's tap classifier for the VM datapath: a real tun/tap, or the netns guests'
    veth stand-in (marked with TAP_STANDIN_ALIAS). Pass it as `is_tap=` to the VM API."""
    return link.kind == "tun" or (link.kind == "veth" and link.alias == TAP_STANDIN_ALIAS)


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
    uid: str = ""  # with kubelet_root: the pod UID and its kubelet-style cgroup
    cgroup: str = ""
    mesh: bool = False  # with mesh: an Istio-style sidecar (lab/mesh.py)
    sidecar_pid: int = 0  # its HAProxy master while it runs (0: no sidecar, or it died)


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
    uid: str = ""  # with kubelet_root: the launcher pod's UID, cgroup and command socket
    cgroup: str = ""
    launcher_socket: str = ""
    ipv6: str = ""  # a netns guest's (a QEMU guest gets only its IPv4 address by DHCP)


def _addresses(k: int, host: int) -> tuple[str, str]:
    return f"10.251.{k}.{host}", f"fd00:6e61:{k:x}::{host:x}"


def _pod_addresses(k: int, i: int) -> tuple[str, str, str]:
    """Pod i's IPv4 and IPv6 addresses and its IPv4 gateway (module docstring)."""
    v4, v6 = _addresses(k, 10 + i)
    if i < FIRST_PLAN_PODS:
        return v4, v6, _addresses(k, 1)[0]
    return f"10.252.{k}.{10 + i - FIRST_PLAN_PODS}", v6, f"10.252.{k}.1"


@dataclass
class Testbed:
    """A built testbed; create with `Testbed.create`, find again with `Testbed.find`."""

    __test__ = False

    number: int
    pods: list[Pod] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)
    kubelet_root: Path | None = None
    cgroup_driver: str = "systemd"
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)

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

    @property
    def cgroup_root(self) -> Path:
        """Where the kubelet-style cgroups are (point netns discovery's cgroup_root here)."""
        return cgroup2_root() / f"{CGROUP_PREFIX}{self.number}"

    def pod_cidrs(self) -> list[str]:
        """Host routes (/32, /128) for every pod address: the default accelerated set."""
        return [f"{p.ipv4}/32" for p in self.pods] + [f"{p.ipv6}/128" for p in self.pods]

    # --- life cycle -------------------------------------------------------
    @classmethod
    def create(cls, pods: int = 2, vms: int = 0, number: int | None = None,
               guest: str = "netns", paused: bool = False,
               kubelet_root: str | Path | None = None,
               cgroup_driver: str = "systemd",
               uids: Mapping[str, str | None] | None = None, mesh: bool = False) -> Testbed:
        """Build a new testbed; on any failure, remove what was built and re-raise.

        guest="netns": each VM's guest is a network namespace behind a veth standing in for
        the tap (fast). guest="qemu": a real QEMU (TCG) VM started by libvirt from the hook
        sidecar's edited domain XML, on a real tap0, taking its address by DHCP from dnsmasq
        on k6t-eth0 (standing in for virt-launcher's DHCP server). With `paused`, QEMU guests
        wait with stopped vCPUs until `resume_qemu_guests()` (to set up a datapath first).
        guest="none": tap0 is a real tun/tap with no guest behind it (many VMs, cheaply, whose
        datapath the agent programs with its own tap classifier; no guest traffic).
        With `kubelet_root`, pods and launchers get UIDs, processes and a kubelet-style
        layout (cgroups named for `cgroup_driver`, launcher sockets; module docstring).
        `uids` gives UIDs by name ("pod0", "vm1"); None there: no layout until `lay_out`.
        With `mesh`, every pod gets an Istio-style sidecar: HAProxy as UID 1337 in its netns
        and Istio's redirection rules (lab/mesh.py, docs/mesh.md).
        """
        if guest not in GUESTS:
            raise TestbedError(f"guest must be one of {', '.join(GUESTS)}, not {guest!r}")
        if cgroup_driver not in CGROUP_DRIVERS:
            raise TestbedError(f"cgroup_driver must be one of {', '.join(CGROUP_DRIVERS)}")
        # Address plan of 10.251.<k>.0/24: pods .10+i, VMs .100+j, QEMU guests' DHCP servers
        # .200+j (so at most 55 QEMU guests).
        most_vms = MAX_QEMU_VMS if guest == "qemu" else MAX_VMS
        if pods < 0 or vms < 0 or pods > MAX_PODS or vms > most_vms:
            raise TestbedError(f"pods must be between 0 and {MAX_PODS}, vms between 0 and "
                               f"{most_vms} ({guest} guests)")
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
        bed = cls(number=number, cgroup_driver=cgroup_driver,
                  kubelet_root=Path(kubelet_root) if kubelet_root is not None else None)
        try:
            mesh_mod.remove_all(f"{PREFIX}{number}-")  # sidecar folders left by a crash
            bed._build_node(second_plan=pods > FIRST_PLAN_PODS)
            for i in range(pods):
                bed._add_pod(i)
            for j in range(vms):
                if guest == "qemu":
                    bed._add_qemu_vm(j, paused)
                elif guest == "none":
                    bed._add_tap_vm(j)
                else:
                    bed._add_vm(j)
            if bed.kubelet_root is not None:
                bed._kubelet_layout(uids or {})
            if mesh:
                for pod in bed.pods:
                    bed.mesh_pod(pod)
        except BaseException:
            bed.destroy()
            raise
        return bed

    @classmethod
    def find(cls, number: int | None = None) -> Testbed:
        """Rebuild the description of an existing testbed from its namespaces (without a
        number: the one testbed that is up)."""
        numbers = existing_numbers()
        if number is None:
            if not numbers:
                raise TestbedError("no testbed is up: run `netaccel testbed up`")
            if len(numbers) > 1:
                raise TestbedError(
                    f"several testbeds are up ({', '.join(map(str, numbers))}): pick one with "
                    "--number"
                )
            number = numbers[0]
        elif number not in numbers:
            raise TestbedError(f"testbed {number} is not up")
        bed = cls(number=number)
        for name in sorted(netns.listnetns()):
            m = _NS_RE.match(name)
            if not m or int(m.group(1)) != number:
                continue
            if m.group(3) is not None:
                pod = bed._pod(int(m.group(3)))
                pod.mesh = mesh_mod.is_meshed(pod.netns)
                pod.sidecar_pid = mesh_mod.proxy_pid(pod.netns)
                bed.pods.append(pod)
            elif m.group(4) is not None and not name.endswith("g"):
                j = int(m.group(4))
                guest = f"{name}g" if (NETNS_DIR / f"{name}g").exists() else None
                kind = "netns" if guest else "none" if _no_guest_tap(name) else "qemu"
                vm = bed._vm(j, guest, kind)
                if kind == "qemu":
                    vm.extra = {"domain": bed.domain_name(j)}
                bed.vms.append(vm)
        bed.pods.sort(key=lambda p: p.name)
        bed.vms.sort(key=lambda v: v.name)
        bed._find_kubelet_layout()
        return bed

    def destroy(self) -> None:
        """Remove every namespace of this testbed (and so every link in them), its QEMU
        guests, and with a kubelet layout its processes, cgroups and launcher sockets."""
        try:
            for proc in self._procs:
                with contextlib.suppress(OSError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            self._procs.clear()
            destroy_number(self.number)
        finally:
            if self.kubelet_root is not None:
                for uid in [p.uid for p in self.pods] + [v.uid for v in self.vms]:
                    if uid:
                        shutil.rmtree(self.kubelet_root / "pods" / uid, ignore_errors=True)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # --- building ---------------------------------------------------------
    def _pod(self, i: int) -> Pod:
        v4, v6, _ = _pod_addresses(self.number, i)
        return Pod(f"pod{i}", f"{PREFIX}{self.number}-pod{i}", v4, v6, f"pod{i}")

    def _vm(self, j: int, guest_netns: str | None, kind: str) -> Vm:
        v4, v6 = _addresses(self.number, 100 + j)
        return Vm(
            name=f"vm{j}",
            launcher_netns=f"{PREFIX}{self.number}-vm{j}",
            guest_netns=guest_netns,
            ipv4=v4,
            ipv6=v6 if kind == "netns" else "",
            host_veth=f"vm{j}",
            guest_kind=kind,
        )

    def _build_node(self, second_plan: bool = False) -> None:
        _new_netns(self.node_netns)
        with NetNS(self.node_netns) as ns:
            ns.link("add", ifname=NODE_BRIDGE, kind="bridge")
            br = ns.link_lookup(ifname=NODE_BRIDGE)[0]
            gw4, gw6 = _addresses(self.number, 1)
            ns.addr("add", index=br, address=gw4, prefixlen=24)
            ns.addr("add", index=br, address=gw6, prefixlen=64)
            if second_plan:  # pods 80 and up: their /24's gateway, routed to the first
                ns.addr("add", index=br, address=f"10.252.{self.number}.1", prefixlen=24)
            ns.link("set", index=br, state="up")
        if second_plan:
            write_sysctl(self.node_netns, "net/ipv4/ip_forward", "1")

    def _add_pod(self, i: int) -> None:
        pod = self._pod(i)
        _new_netns(pod.netns)
        self._veth_to_bridge(pod.host_veth, pod.netns, "eth0")
        with NetNS(pod.netns) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=pod.ipv4, prefixlen=24)
            ns.addr("add", index=eth0, address=pod.ipv6, prefixlen=64)
            ns.link("set", index=eth0, state="up")
            gw4 = _pod_addresses(self.number, i)[2]
            gw6 = _addresses(self.number, 1)[1]
            ns.route("add", dst="default", gateway=gw4)
            ns.route("add", dst="default", gateway=gw6, family=10)
        self.pods.append(pod)

    def _add_launcher(self, vm: Vm) -> None:
        """The virt-launcher pod's netns in KubeVirt's bridge binding shape, without a tap."""
        _new_netns(vm.launcher_netns)
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
            ns.link("set", index=br, state="up")
        # The guest's source address (the VM's IP) is local to the launcher too, on the
        # placeholder: without accept_local the launcher drops what the guest sends it (ARP
        # for the DHCP server, a unicast renewal) as martians (measured: renewal fails).
        write_sysctl(vm.launcher_netns, f"net/ipv4/conf/{vm.bridge}/accept_local", "1")

    def _add_tap_vm(self, j: int) -> None:
        """A launcher netns whose tap0 is a real tun/tap with no guest behind it."""
        vm = self._vm(j, None, "none")
        self._add_launcher(vm)
        # a tuntap link is made (ioctl) in the calling thread's netns
        with in_netns(vm.launcher_netns), IPRoute() as ipr:
            ipr.link("add", ifname=vm.tap, kind="tuntap", mode="tap")
            tap = ipr.link_lookup(ifname=vm.tap)[0]
            ipr.link("set", index=tap, ifalias=TAP_NO_GUEST_ALIAS)
            ipr.link("set", index=tap, master=ipr.link_lookup(ifname=vm.bridge)[0], state="up")
        self.vms.append(vm)

    def _add_vm(self, j: int) -> None:
        """A launcher netns and a netns guest behind tap0 (a veth standing in for the tap)."""
        vm = self._vm(j, f"{PREFIX}{self.number}-vm{j}g", "netns")
        self._add_launcher(vm)
        _new_netns(vm.guest_netns)
        with NetNS(vm.launcher_netns) as ns:
            br = ns.link_lookup(ifname=vm.bridge)[0]
            ns.link("add", ifname=vm.tap, kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": vm.guest_netns})
            tap = ns.link_lookup(ifname=vm.tap)[0]
            ns.link("set", index=tap, ifalias=TAP_STANDIN_ALIAS)
            ns.link("set", index=tap, master=br, state="up")
        with NetNS(vm.guest_netns) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=vm.ipv4, prefixlen=24)
            ns.addr("add", index=eth0, address=vm.ipv6, prefixlen=64)
            ns.link("set", index=eth0, state="up")
        self.vms.append(vm)

    def domain_name(self, j: int) -> str:
        return f"{QEMU_DOMAIN_PREFIX}{self.number}-vm{j}"

    def resume_qemu_guests(self) -> None:
        """Let QEMU guests created with paused=True boot."""
        from lab import qemu_guest

        for vm in self.vms:
            if vm.guest_kind == "qemu":
                qemu_guest.resume_guest(vm.extra["domain"])

    def qemu_guest(self, vm: Vm):  # noqa: ANN201 - a qemu_guest.QemuGuest
        """A handle on a QEMU VM's running guest (console, wait_for, logs)."""
        from lab import qemu_guest

        if vm.guest_kind != "qemu":
            raise TestbedError(f"{vm.name} has no QEMU guest (guest kind {vm.guest_kind})")
        name = vm.extra["domain"]
        return qemu_guest.QemuGuest(
            name=name, netns=vm.launcher_netns, bridge=vm.bridge, tap=vm.tap,
            host_tap=qemu_guest.host_tap_name(name), run_dir=qemu_guest.RUN_DIR / name,
            console_log=Path(vm.extra.get("console_log") or qemu_guest.RUN_DIR / name /
                             "console.log"),
            mac=vm.extra.get("mac"))

    def _add_qemu_vm(self, j: int, paused: bool = False) -> None:
        """A launcher netns, dnsmasq on k6t-eth0, and a QEMU guest on a real tap0.

        The domain XML is KubeVirt-shaped and goes through the hook sidecar's edit (checksum
        offload off, as the annotation-less default). The guest takes the VM's IP by DHCP,
        sends `netaccel-guest <ip>` by UDP to GUEST_UDP_PORT on pod0 (when there is a pod)
        and echoes UDP and TCP on port 7.
        """
        from hook_sidecar.domain import edit_domain
        from lab import qemu_guest

        vm = self._vm(j, None, "qemu")
        self._add_launcher(vm)
        gw4, _ = _addresses(self.number, 1)
        server_ip, _ = _addresses(self.number, 200 + j)
        qemu_guest.ensure_libvirtd()
        dhcp = qemu_guest.DhcpServer(vm.launcher_netns, vm.bridge, vm.ipv4, vm.ipv4,
                                     server_ip=server_ip, router=gw4)
        dhcp.start()  # runs until the launcher netns is removed (destroy kills it there)
        cmdline = f"netaccel.udp_target={self.pods[0].ipv4}:{GUEST_UDP_PORT}" if self.pods else ""
        name = self.domain_name(j)
        xml = qemu_guest.kubevirt_domain_xml(name, image=qemu_guest.build_guest_image(),
                                             cmdline=cmdline)
        xml = edit_domain(xml, json.dumps(_vmi_for(name)).encode())
        guest = qemu_guest.start_guest(name, vm.launcher_netns, vm.bridge, xml, paused=paused)
        qemu_guest.release(name)  # the testbed owns it, not this process
        vm.extra = {"domain": name, "console_log": str(guest.console_log), "mac": guest.mac,
                    "dhcp_log": str(dhcp.log_file)}
        self.vms.append(vm)

    def _veth_to_bridge(self, host_name: str, peer_netns: str, peer_name: str) -> None:
        with NetNS(self.node_netns) as ns:
            ns.link("add", ifname=host_name, kind="veth",
                    peer={"ifname": peer_name, "net_ns_fd": peer_netns})
            idx = ns.link_lookup(ifname=host_name)[0]
            br = ns.link_lookup(ifname=NODE_BRIDGE)[0]
            ns.link("set", index=idx, master=br, state="up")

    # --- the service mesh (lab/mesh.py) ---------------------------------------
    def mesh_pod(self, pod: Pod) -> None:
        """Give the pod its sidecar: Istio's rules and HAProxy as UID 1337."""
        pod.mesh = True  # first: a half-built sidecar is still torn down with the testbed
        pod.sidecar_pid = mesh_mod.mesh_pod(pod.netns)

    def stop_sidecar(self, pod: Pod) -> None:
        """Kill the pod's proxy and keep its rules: a pod whose sidecar is missing."""
        mesh_mod.stop_proxy(pod.netns)
        pod.sidecar_pid = 0

    def start_sidecar(self, pod: Pod) -> None:
        """Start a meshed pod's proxy again (after `stop_sidecar`)."""
        pod.sidecar_pid = mesh_mod.start_proxy(pod.netns)

    def mesh_redirect(self, on: bool) -> None:
        """Load (on) or remove (off) the redirection rules of every meshed pod; the proxies
        keep running. Off, the meshed pods talk over the plain kernel path."""
        for pod in self.pods:
            if pod.mesh:
                mesh_mod.redirect(pod.netns, on)

    # --- the kubelet-style layout -------------------------------------------
    def _pod_cgroup(self, uid: str, i: int) -> Path:
        """kubelet's pod cgroup for the testbed's cgroup driver; QoS class by index."""
        qos = QOS_CLASSES[i % len(QOS_CLASSES)]
        if self.cgroup_driver == "cgroupfs":
            return self.cgroup_root / "kubepods" / qos / f"pod{uid}" if qos else \
                self.cgroup_root / "kubepods" / f"pod{uid}"
        under = uid.replace("-", "_")
        if qos:
            return (self.cgroup_root / "kubepods.slice" / f"kubepods-{qos}.slice"
                    / f"kubepods-{qos}-pod{under}.slice")
        return self.cgroup_root / "kubepods.slice" / f"kubepods-pod{under}.slice"

    def _container_cgroup(self, pod_cgroup: Path, i: int) -> Path:
        cid = secrets.token_hex(32)
        if self.cgroup_driver == "cgroupfs":
            return pod_cgroup / cid
        return pod_cgroup / f"{RUNTIMES[i % len(RUNTIMES)]}{cid}.scope"

    def _start_in_cgroup(self, netns_name: str, argv: list[str], cgroup: Path) -> int:
        cgroup.mkdir(parents=True, exist_ok=True)
        proc = popen_in(netns_name, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        self._procs.append(proc)
        (cgroup / "cgroup.procs").write_text(str(proc.pid))
        return proc.pid

    def _kubelet_layout(self, uids: Mapping[str, str | None]) -> None:
        for item in [*self.pods, *self.vms]:
            uid = uids.get(item.name, "")
            if uid is not None:
                self.lay_out(item.name, uid or str(uuid.uuid4()))

    def lay_out(self, name: str, uid: str) -> Pod | Vm:
        """Lay pod or VM `name` ("pod3", "vm0") out as kubelet does, with pod UID `uid`: a
        process in its netns inside a kubelet-style cgroup; for a VM also virt-launcher's
        command socket. For testbeds with a kubelet_root; at most once per pod or VM."""
        if self.kubelet_root is None:
            raise TestbedError("this testbed has no kubelet_root: no kubelet layout")
        items = [*self.pods, *self.vms]
        index = next((n for n, item in enumerate(items) if item.name == name), None)
        if index is None:
            raise TestbedError(f"no pod or VM named {name!r} in testbed {self.number}")
        item = items[index]
        if item.uid:
            raise TestbedError(f"{name} is laid out already (uid {item.uid})")
        if not _UID_RE.match(uid):
            raise TestbedError(f"{name}: pod UID {uid!r} is not a UUID")
        item.uid = uid
        cg = self._pod_cgroup(uid, index)
        item.cgroup = str(cg)
        if isinstance(item, Pod):
            self._start_in_cgroup(item.netns, ["sleep", "infinity"],
                                  self._container_cgroup(cg, index))
            return item
        sock = self.kubelet_root / "pods" / uid / LAUNCHER_SOCK
        sock.parent.mkdir(parents=True, exist_ok=True)
        item.launcher_socket = str(sock)
        self._start_in_cgroup(item.launcher_netns, [sys.executable, "-c", _LISTENER, str(sock)],
                              self._container_cgroup(cg, index))
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise TestbedError(f"{item.name}: no launcher socket at {sock} after 10 s")
            time.sleep(0.02)
        return item

    def _find_kubelet_layout(self) -> None:
        """UIDs, cgroups and sockets back from the processes (for `find`)."""
        if not self.cgroup_root.is_dir():
            return
        pids = netns.ns_pids()
        for item, name in [(p, p.netns) for p in self.pods] + \
                [(v, v.launcher_netns) for v in self.vms]:
            for pid in pids.get(name, []):
                with contextlib.suppress(OSError):
                    path = Path(f"/proc/{pid}/cgroup").read_text().split("::", 1)[-1].strip()
                    m = _POD_UID_RE.search(path)
                    if not m or CGROUP_PREFIX not in path:
                        continue
                    item.uid = m.group(1).replace("_", "-")
                    item.cgroup = str(cgroup2_root() / path.lstrip("/")).rsplit("/", 1)[0]
                    self.cgroup_driver = "systemd" if ".slice" in path else "cgroupfs"
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if isinstance(item, Vm) and len(argv) > 3:
                        item.launcher_socket = argv[3].decode()
                        self.kubelet_root = Path(item.launcher_socket).parents[5]
                    break

    # --- using ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-ready description: {"number", "node_netns", "pods": [...], "vms": [...]};
        with a kubelet layout also "kubelet_root", "cgroup_root", "cgroup_driver"."""
        out = {
            "number": self.number,
            "node_netns": self.node_netns,
            "ipv4_cidr": self.ipv4_cidr,
            "ipv6_cidr": self.ipv6_cidr,
            "pods": [asdict(p) for p in self.pods],
            "vms": [asdict(vm) for vm in self.vms],
        }
        if self.kubelet_root is not None:
            out.update(kubelet_root=str(self.kubelet_root), cgroup_root=str(self.cgroup_root),
                       cgroup_driver=self.cgroup_driver)
        return out

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
    """Remove testbed `number`: its QEMU guests, then every namespace named for it (and what
    runs inside; the sidecars' proxies first, waited for, and their folders; their rules go
    with the netns), then its kubelet-style cgroups."""
    _destroy_qemu_guests(number)
    ours = [n for n in netns.listnetns() if (m := _NS_RE.match(n)) and int(m.group(1)) == number]
    sockets = _launcher_sockets(ours)
    try:
        mesh_mod.remove_all(f"{PREFIX}{number}-")
    finally:
        for name in ours:
            remove_netns(name)
    remove_cgroups(number)
    for sock in sockets:  # <kubelet_root>/pods/<uid>/volumes/kubernetes.io~empty-dir/sockets/
        shutil.rmtree(sock.parents[3], ignore_errors=True)
    # dnsmasq's work dirs of the QEMU guests' DHCP servers
    for workdir in Path(tempfile.gettempdir()).glob(f"netaccel-dhcp-{PREFIX}{number}-vm*"):
        shutil.rmtree(workdir, ignore_errors=True)


def _launcher_sockets(netns_names: list[str]) -> list[Path]:
    """The launcher sockets served by processes in these namespaces (from their argv)."""
    found = []
    pids = netns.ns_pids()
    for name in netns_names:
        for pid in pids.get(name, []):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if len(argv) > 3 and argv[3].endswith(b"/" + LAUNCHER_SOCK.encode()):
                    found.append(Path(argv[3].decode()))
    return found


def remove_cgroups(number: int, timeout: float = 10.0) -> None:
    """Kill what is left in <cgroup v2 root>/netaccel-lab-<number> and remove the tree."""
    try:
        top = cgroup2_root() / f"{CGROUP_PREFIX}{number}"
    except (OSError, RuntimeError):  # no cgroup v2 at all: nothing of ours either
        return
    if not top.is_dir():
        return
    dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts),
                  reverse=True)
    for d in dirs:
        with contextlib.suppress(OSError, ValueError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for d in dirs:  # deepest first; a cgroup goes once its processes have exited
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise TestbedError(f"cannot remove cgroup {d}: {exc}") from exc
                time.sleep(0.02)


def _destroy_qemu_guests(number: int) -> None:
    """Destroy and undefine the testbed's libvirt domains (only if libvirt is in use)."""
    if not Path("/var/run/libvirt/libvirt-sock").exists():
        return
    from lab import qemu_guest

    # The socket outlives libvirtd (a reboot, a killed daemon): its domains come back when it
    # starts, so start it rather than fail or skip them.
    qemu_guest.ensure_libvirtd()
    prefix = f"{QEMU_DOMAIN_PREFIX}{number}-"
    for name in qemu_guest.domain_names(prefix):
        qemu_guest.release(name)
    qemu_guest.cleanup_stale(prefix)


def _vmi_for(domain_name: str) -> dict[str, Any]:
    """The VMI a KubeVirt cluster would send the hook for a testbed VM (no annotations)."""
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": domain_name, "namespace": "testbed", "annotations": {}},
        "spec": {"domain": {"devices": {"interfaces": [{"name": "default", "bridge": {}}]}}},
    }


def destroy_all() -> list[int]:
    """Remove every testbed on this machine; return their numbers."""
    numbers = {int(m.group(1)) for n in netns.listnetns() if (m := _NS_RE.match(n))}
    with contextlib.suppress(OSError, RuntimeError):
        numbers |= {int(d.name[len(CGROUP_PREFIX):]) for d in cgroup2_root().iterdir()
                    if d.name.startswith(CGROUP_PREFIX) and d.name[len(CGROUP_PREFIX):].isdigit()}
    if Path("/var/run/libvirt/libvirt-sock").exists():  # guests whose netns already went
        from lab import qemu_guest

        for name in qemu_guest.domain_names(QEMU_DOMAIN_PREFIX):
            if m := re.match(rf"{QEMU_DOMAIN_PREFIX}(\d+)-", name):
                numbers.add(int(m.group(1)))
    numbers = sorted(numbers)
    for number in numbers:
        destroy_number(number)
    return numbers


def _no_guest_tap(launcher_netns: str) -> bool:
    """Does the launcher's tap0 carry TAP_NO_GUEST_ALIAS (a guest="none" VM)?"""
    with contextlib.suppress(OSError, IndexError, NetlinkError), NetNS(launcher_netns) as ns:
        idx = ns.link_lookup(ifname="tap0")[0]
        return ns.get_links(idx)[0].get("ifalias") == TAP_NO_GUEST_ALIAS
    return False


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


def write_sysctl(netns_name: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> as seen from inside `netns_name`."""
    from node_helper.kernel import in_netns

    with in_netns(netns_name):
        Path("/proc/sys", key).write_text(value)


def popen_in(netns_name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start `argv` inside a namespace (no shell)."""
    if not (NETNS_DIR / netns_name).exists():
        raise TestbedError(f"network namespace {netns_name!r} does not exist")
    return subprocess.Popen(netns_argv(netns_name, list(argv)), **kwargs)


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
