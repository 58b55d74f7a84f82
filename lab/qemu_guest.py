"""Real QEMU guests for tests and the testbed: libvirtd, KubeVirt-shaped domains, DHCP.

The pieces, in the order a test uses them:

* `ensure_libvirtd()` gets a system libvirtd (and virtlogd) running on a machine without
  systemd units for them.
* `build_guest_image()` (from lab.guest_image) gives a Debian cloud kernel and a
  busybox initramfs whose /init reports on the serial console (see that module).
* `kubevirt_domain_xml()` writes a domain like virt-launcher's (bridge binding: an
  `<interface type="ethernet">` on an unmanaged `tap0`), switched to TCG and direct kernel
  boot, with the serial console going to a file.
* `start_guest()` defines and starts it with its tap inside a given network namespace (the
  virt-launcher pod's), enslaved to the bridge there; `QemuGuest.stop()` undoes everything.
* `DhcpServer` runs dnsmasq on that bridge, standing in for virt-launcher's DHCP server.
* `cleanup_stale(prefix)` removes domains and files left behind by a crashed run.

The tap and the network namespace. KubeVirt runs libvirtd inside the pod, so libvirt finds
`tap0` in the pod's namespace. Here libvirtd runs in the host namespace and opens an
unmanaged tap by name in its own namespace. So `start_guest()` creates a persistent tap with a
unique host-side name (`nat<hash of the domain name>`), puts that name into the domain XML,
starts the domain (libvirt opens the tap and hands the fd to QEMU), then moves the tap into
the pod namespace, renames it to `tap0` and enslaves it to the bridge. A tap's file
descriptor stays attached to the device across the move and the rename, so QEMU keeps
working (the e2e tests check DHCP and UDP through it). Libvirt never deletes or reconfigures
an unmanaged tap on destroy, so nothing looks for the old name later.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import ipaddress
import os
import pwd
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import escape, quoteattr

from pyroute2 import IPRoute, NetNS

from lab.guest_image import DEFAULT_CMDLINE, GuestImage, build_guest_image
from node_helper.kernel import NETNS_DIR, netns_argv, remove_netns

__all__ = [
    "DhcpServer",
    "GuestImage",
    "Lease",
    "LibvirtSetupError",
    "QemuGuest",
    "TEST_PREFIX",
    "build_guest_image",
    "claim",
    "cleanup_stale",
    "domain_names",
    "ensure_libvirtd",
    "is_claimed",
    "kubevirt_domain_xml",
    "release",
    "start_guest",
]

LIBVIRT_URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd.log")
RUN_DIR = Path("/var/lib/netaccel/guests")
LOCK_FILE = Path("/run/netaccel-libvirtd.lock")
CLAIM_DIR = Path("/run/netaccel/claims")
TEST_PREFIX = "netaccel-e2e-"
HOST_TAP_PREFIX = "nat"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


# --- libvirtd ------------------------------------------------------------------


class LibvirtSetupError(RuntimeError):
    """libvirtd could not be brought up; the message names the step and what to check."""


# What ensure_libvirtd() sets in qemu.conf, and why: libvirtd started by hand (no systemd,
# no AppArmor profiles, no kvm group set-up) runs QEMU as root without a security driver.
_QEMU_CONF_SETTINGS = {"user": '"root"', "group": '"root"', "security_driver": '"none"'}
_QEMU_CONF_NOTE = (
    "# netaccel (lab/qemu_guest.py ensure_libvirtd): QEMU runs as root with\n"
    "# security_driver \"none\" for the hand-started test libvirtd. Lines it changed end\n"
    "# with '# netaccel, was: <old value>'.\n"
)


def _libvirt():  # noqa: ANN202 - the libvirt module (imported late: tests may skip)
    import libvirt

    # libvirt prints every error to stderr by default; errors reach us as exceptions anyway.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _connect():  # noqa: ANN202 - a libvirt.virConnect
    return _libvirt().open(LIBVIRT_URI)


def _libvirt_answers() -> bool:
    try:
        conn = _connect()
    except Exception:
        return False
    conn.close()
    return True


def _running(comm: str) -> bool:
    """Is a live (not zombie) process named `comm` running?"""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                name, _, rest = (entry / "stat").read_text().partition(" (")[2].rpartition(") ")
                if name == comm and rest.split()[0] != "Z":
                    return True
    return False


def _ensure_accounts() -> None:
    for group in ("kvm", "libvirt-qemu"):
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--gid", "libvirt-qemu", "--groups", "kvm",
             "--home-dir", "/var/lib/libvirt", "--no-create-home",
             "--shell", "/usr/sbin/nologin", "libvirt-qemu"],
            check=True, capture_output=True,
        )


def _configure_qemu_conf(path: Path = QEMU_CONF) -> bool:
    """Set user/group/security_driver in qemu.conf (idempotent); True if it changed."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    changed = False
    for key, value in _QEMU_CONF_SETTINGS.items():
        pattern = re.compile(rf"^\s*{key}\s*=\s*(.*?)\s*(#.*)?$")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if hits and all(pattern.match(lines[i]).group(1) == value for i in hits):
            continue
        for i in hits:
            old = pattern.match(lines[i]).group(1)
            lines[i] = f"{key} = {value}  # netaccel, was: {old}"
        if not hits:
            if _QEMU_CONF_NOTE.splitlines()[0] not in lines:
                lines += ["", *_QEMU_CONF_NOTE.splitlines()]
            lines.append(f"{key} = {value}")
        changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return changed


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _step(name: str, hint: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:
        raise LibvirtSetupError(f"libvirtd set-up, step '{name}' failed: {exc}. {hint}") from exc


def ensure_libvirtd(timeout: float = 30.0) -> None:
    """Make sure a system libvirtd answers on qemu:///system, starting it if needed.

    Idempotent and fast (one connection attempt) when libvirtd already runs. Otherwise:
    creates /var/log/libvirt and /var/run/libvirt, the user/group libvirt-qemu and group kvm,
    sets user/group root and security_driver "none" in /etc/libvirt/qemu.conf, starts
    `virtlogd -d` and `libvirtd -d` (logging to /var/log/libvirt/libvirtd.log) and waits.
    """
    if _libvirt_answers():
        return
    with _file_lock(LOCK_FILE):
        if _libvirt_answers():
            return
        hint_pkg = "Is libvirt-daemon-driver-qemu installed (scripts/setup.sh)?"
        for exe in ("libvirtd", "virtlogd", "qemu-system-x86_64"):
            if shutil.which(exe) is None and not Path("/usr/sbin", exe).exists():
                raise LibvirtSetupError(f"libvirtd set-up: {exe} not found. {hint_pkg}")
        if os.stat("/proc/thread-self/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
            raise LibvirtSetupError(
                "libvirtd set-up: refusing to start libvirtd from inside a network namespace "
                "(it would live there); call ensure_libvirtd() from the host namespace"
            )
        _step("directories", "Check that / is writable.", lambda: [
            Path(d).mkdir(parents=True, exist_ok=True)
            for d in ("/var/log/libvirt/qemu", "/var/run/libvirt", "/var/lib/libvirt/qemu")
        ])
        _step("accounts", "Check groupadd/useradd (package passwd).", _ensure_accounts)
        _step("qemu.conf", f"Check {QEMU_CONF}.", _configure_qemu_conf)
        env = {**os.environ, "LIBVIRT_LOG_OUTPUTS": f"3:file:{LIBVIRTD_LOG}"}
        daemons = [("virtlogd", ["virtlogd", "-d"]), ("libvirtd", ["libvirtd", "-d"])]
        for comm, argv in daemons:
            if not _running(comm):
                _step(f"start {comm}", f"Run '{argv[0]} -v' by hand to see why.",
                      lambda argv=argv: subprocess.run(
                          argv, check=True, capture_output=True, env=env, timeout=30))
        deadline = time.monotonic() + timeout
        while not _libvirt_answers():
            if time.monotonic() > deadline:
                tail = _tail(LIBVIRTD_LOG, 15)
                raise LibvirtSetupError(
                    f"libvirtd set-up, step 'connect': {LIBVIRT_URI} does not answer after "
                    f"{timeout:.0f} s (libvirtd running: {_running('libvirtd')}). "
                    f"See {LIBVIRTD_LOG}:\n{tail}"
                )
            time.sleep(0.2)


# --- domain XML ------------------------------------------------------------------


def guest_mac(name: str) -> str:
    """A stable, locally administered MAC for a guest name."""
    digest = hashlib.sha256(name.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def kubevirt_domain_xml(
    name: str,
    tap: str = "tap0",
    mac: str | None = None,
    image: GuestImage | None = None,
    cmdline: str = "",
    memory_mib: int = 256,
    console_log: Path | None = None,
    model: str = "virtio-non-transitional",
    interface_name: str = "default",
) -> bytes:
    """A domain XML shaped like virt-launcher's for a bridge-bound pod-network interface.

    Like KubeVirt's: Go-style tab indentation, double quotes, explicit end tags, xmlns:qemu
    on the root, `<interface type="ethernet">` with an unmanaged target tap, a virtio model,
    MAC, MTU, `ua-<name>` alias and no option ROM. Unlike it: type "qemu" (TCG), 1 vCPU, small
    memory, direct kernel boot of the test guest, no disks, serial console to a file
    (default RUN_DIR/<name>/console.log). `cmdline` is appended to the default one.
    """
    image = image or build_guest_image()
    mac = mac or guest_mac(name)
    console_log = console_log or RUN_DIR / name / "console.log"
    uid = str(uuid.uuid5(uuid.NAMESPACE_DNS, name))
    full_cmdline = f"{DEFAULT_CMDLINE} {cmdline}".strip()
    log = quoteattr(str(console_log))
    text = f"""<domain type="qemu" xmlns:qemu="{QEMU_NS}">
	<name>{escape(name)}</name>
	<uuid>{uid}</uuid>
	<memory unit="b">{memory_mib * 1024 * 1024}</memory>
	<os>
		<type arch="x86_64" machine="q35">hvm</type>
		<kernel>{escape(str(image.kernel))}</kernel>
		<initrd>{escape(str(image.initramfs))}</initrd>
		<cmdline>{escape(full_cmdline)}</cmdline>
		<smbios mode="sysinfo"></smbios>
	</os>
	<sysinfo type="smbios">
		<system>
			<entry name="manufacturer">KubeVirt</entry>
			<entry name="product">None</entry>
			<entry name="uuid">{uid}</entry>
			<entry name="family">KubeVirt</entry>
		</system>
	</sysinfo>
	<devices>
		<interface type="ethernet">
			<target dev={quoteattr(tap)} managed="no"></target>
			<model type={quoteattr(model)}></model>
			<mac address={quoteattr(mac)}></mac>
			<mtu size="1500"></mtu>
			<alias name={quoteattr("ua-" + interface_name)}></alias>
			<rom enabled="no"></rom>
		</interface>
		<controller type="usb" index="0" model="none"></controller>
		<serial type="file">
			<source path={log}></source>
			<target port="0"></target>
		</serial>
		<console type="file">
			<source path={log}></source>
			<target type="serial" port="0"></target>
		</console>
		<memballoon model="none"></memballoon>
	</devices>
	<metadata>
		<kubevirt xmlns="http://kubevirt.io">
			<uid>{uid}</uid>
		</kubevirt>
	</metadata>
	<features>
		<acpi></acpi>
	</features>
	<vcpu placement="static">1</vcpu>
</domain>
"""
    return text.encode()


@dataclass(frozen=True)
class _Prepared:
    xml: str
    console_log: Path
    queues: int
    mac: str | None


def _prepare_xml(domain_xml: bytes, name: str, tap: str, host_tap: str) -> _Prepared:
    """Point the domain's unmanaged `tap` at `host_tap`, rename it, make it TCG."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(domain_xml)
    root.set("type", "qemu")  # /dev/kvm cannot run stock kernels on this platform
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    target = None
    for iface in root.iterfind("devices/interface[@type='ethernet']"):
        t = iface.find("target")
        if t is not None and t.get("dev") == tap:
            target, interface = t, iface
    if target is None:
        raise ValueError(f"domain XML has no <interface type='ethernet'> on target dev {tap!r}")
    target.set("dev", host_tap)
    target.set("managed", "no")
    driver = interface.find("driver")
    queues = int(driver.get("queues", "1")) if driver is not None else 1
    mac_el = interface.find("mac")
    source = root.find("devices/serial[@type='file']/source")
    if source is None or not source.get("path"):
        raise ValueError("domain XML has no <serial type='file'> console to read")
    return _Prepared(
        xml=ET.tostring(root, encoding="unicode"),
        console_log=Path(source.get("path")),
        queues=queues,
        mac=mac_el.get("address") if mac_el is not None else None,
    )


# --- taps ------------------------------------------------------------------------

_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_MULTI_QUEUE = 0x0100
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def host_tap_name(domain_name: str) -> str:
    """The unique host-side name of a guest's tap before it moves into the pod netns."""
    return HOST_TAP_PREFIX + hashlib.sha256(domain_name.encode()).hexdigest()[:12]


def _create_persistent_tap(name: str, multi_queue: bool) -> None:
    flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR | (_IFF_MULTI_QUEUE if multi_queue else 0)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _delete_link(ifname: str, netns: str | None = None, kind: str | None = None) -> bool:
    """Delete `ifname` (in `netns`, or the host's) if it exists and is of `kind`."""
    if netns is not None and not (NETNS_DIR / netns).exists():
        return False
    with contextlib.ExitStack() as stack:
        ip = stack.enter_context(NetNS(netns) if netns else IPRoute())
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            return False
        if kind is not None:
            link = ip.get_links(idx[0])[0]
            info = link.get_attr("IFLA_LINKINFO")
            if info is None or info.get_attr("IFLA_INFO_KIND") != kind:
                return False
        ip.link("del", index=idx[0])
        return True
    return False


def _move_tap_into(host_tap: str, netns: str, tap: str, bridge: str) -> int:
    """Move the host tap into `netns`, rename it `tap`, enslave it to `bridge`, set it up."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=host_tap)
        if not idx:
            raise RuntimeError(f"tap {host_tap} vanished before it could move to {netns}")
        ip.link("set", index=idx[0], net_ns_fd=netns)
    with NetNS(netns) as ns:
        idx = ns.link_lookup(ifname=host_tap)[0]
        ns.link("set", index=idx, ifname=tap)
        ns.link("set", index=idx, master=ns.link_lookup(ifname=bridge)[0])
        ns.link("set", index=idx, state="up")
        return idx


# --- the guest --------------------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<{path}: {exc.strerror}>"


@dataclass
class QemuGuest:
    """A running libvirt domain whose tap sits in a pod network namespace."""

    name: str
    netns: str
    bridge: str
    tap: str
    host_tap: str
    console_log: Path
    run_dir: Path
    mac: str | None = None
    tap_index: int | None = None
    claimed: bool = field(default=False, repr=False)  # start_guest claimed the name
    stopped: bool = field(default=False, repr=False)

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def console(self) -> str:
        """Everything the guest has written to its serial console so far."""
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_log(self) -> str:
        """libvirt's log of this domain (holds QEMU's command line)."""
        try:
            return (QEMU_LOG_DIR / f"{self.name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_command_line(self) -> str:
        """The last QEMU command line libvirt logged for this domain."""
        lines = self.qemu_log().splitlines()
        starts = [i for i, line in enumerate(lines) if "qemu-system" in line]
        if not starts:
            return ""
        command = []
        for line in lines[starts[-1]:]:
            command.append(line.rstrip("\\").strip())
            if not line.endswith("\\"):
                break
        return " ".join(command)

    def dumpxml(self, inactive: bool = False) -> str:
        """libvirt's XML of the domain (the persistent definition with `inactive`)."""
        lv = _libvirt()
        conn = _connect()
        try:
            flags = lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0
            return conn.lookupByName(self.name).XMLDesc(flags)
        finally:
            conn.close()

    def is_running(self) -> bool:
        conn = _connect()
        try:
            return bool(conn.lookupByName(self.name).isActive())
        except _libvirt().libvirtError:
            return False
        finally:
            conn.close()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0,
                 since: int = 0) -> re.Match[str]:
        """Poll the serial console until `pattern` matches (searching from offset `since`).

        Raises TimeoutError with the console tail, or RuntimeError if QEMU died."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        next_alive_check = time.monotonic() + 1.0
        while True:
            match = rx.search(self.console(), since)
            if match:
                return match
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(
                    f"guest {self.name}: no {rx.pattern!r} on the serial console after "
                    f"{timeout:.0f} s. Console tail ({self.console_log}):\n"
                    f"{_tail(self.console_log, 25)}"
                )
            if now > next_alive_check:
                next_alive_check = now + 1.0
                if not self.is_running():
                    raise RuntimeError(
                        f"guest {self.name} is not running any more while waiting for "
                        f"{rx.pattern!r}. libvirt log:\n"
                        f"{_tail(QEMU_LOG_DIR / f'{self.name}.log', 10)}\n"
                        f"console tail:\n{_tail(self.console_log, 15)}"
                    )
            time.sleep(0.1)

    def stop(self, keep_files: bool = False) -> None:
        """Destroy and undefine the domain, delete its tap and files. Safe to call twice."""
        if self.stopped:
            return
        errors: list[str] = []
        try:
            _destroy_domain(self.name)
        except Exception as exc:
            errors.append(f"domain: {exc}")
        for ifname, ns in ((self.tap, self.netns), (self.host_tap, self.netns),
                           (self.host_tap, None)):
            try:
                _delete_link(ifname, ns, kind="tun")
            except Exception as exc:
                errors.append(f"tap {ifname} in {ns or 'host'}: {exc}")
        if not keep_files:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (QEMU_LOG_DIR / f"{self.name}.log").unlink()
        if self.claimed:
            release(self.name)
        self.stopped = True
        if errors:
            raise RuntimeError(f"stopping guest {self.name}: " + "; ".join(errors))


def _destroy_domain(name: str) -> bool:
    lv = _libvirt()
    conn = _connect()
    try:
        try:
            dom = conn.lookupByName(name)
        except lv.libvirtError:
            return False
        if dom.isActive():
            dom.destroy()
        with contextlib.suppress(lv.libvirtError):  # transient domains are gone already
            dom.undefine()
        return True
    finally:
        conn.close()


def start_guest(name: str, netns: str, bridge: str, domain_xml: bytes,
                tap: str = "tap0", paused: bool = False) -> QemuGuest:
    """Define and start `domain_xml` as `name` with its tap `tap` inside `netns` on `bridge`.

    The XML's unmanaged `<target dev=tap>` is pointed at a unique host-side tap for the start,
    and the domain is forced to type "qemu" (TCG). With `paused`, QEMU starts with its vCPU
    stopped (the tap is already in place): set up the datapath, then resume_guest(name).
    The caller must stop() the guest (or use it as a context manager); a failed start cleans
    up after itself."""
    if not (NETNS_DIR / netns).exists():
        raise ValueError(f"network namespace {netns!r} does not exist")
    with NetNS(netns) as ns:
        if not ns.link_lookup(ifname=bridge):
            raise ValueError(f"no bridge {bridge!r} in network namespace {netns!r}")
        if ns.link_lookup(ifname=tap):
            raise ValueError(f"{netns!r} already has a link named {tap!r}")
    ensure_libvirtd()
    host_tap = host_tap_name(name)
    prepared = _prepare_xml(domain_xml, name, tap, host_tap)
    run_dir = RUN_DIR / name
    guest = QemuGuest(name=name, netns=netns, bridge=bridge, tap=tap, host_tap=host_tap,
                      console_log=prepared.console_log, run_dir=run_dir, mac=prepared.mac)
    claimed_here = not is_claimed(name)
    if claimed_here:
        claim(name)
    guest.claimed = claimed_here
    try:
        _destroy_domain(name)  # a leftover of the same name from a crashed run
        _delete_link(host_tap, kind="tun")
        run_dir.mkdir(parents=True, exist_ok=True)
        prepared.console_log.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            prepared.console_log.unlink()
        with contextlib.suppress(FileNotFoundError):
            (QEMU_LOG_DIR / f"{name}.log").unlink()
        _create_persistent_tap(host_tap, multi_queue=prepared.queues > 1)
        conn = _connect()
        try:
            dom = conn.defineXML(prepared.xml)
            dom.createWithFlags(_libvirt().VIR_DOMAIN_START_PAUSED if paused else 0)
        finally:
            conn.close()
        guest.tap_index = _move_tap_into(host_tap, netns, tap, bridge)
    except BaseException:
        with contextlib.suppress(Exception):
            guest.stop(keep_files=False)
        raise
    return guest


def resume_guest(name: str) -> None:
    """Let a guest started with paused=True run."""
    conn = _connect()
    try:
        conn.lookupByName(name).resume()
    finally:
        conn.close()


def domain_names(prefix: str = "") -> list[str]:
    """Names of the libvirt domains (defined or running) that start with `prefix`."""
    conn = _connect()
    try:
        return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(prefix))
    finally:
        conn.close()


# --- ownership and stale clean-up -------------------------------------------------
#
# Several test sessions may run at once on one machine. A session must not clean up what
# another, still running session owns, so names are claimed: CLAIM_DIR/<name> holds the
# claiming process's pid and start time. A claim whose process is gone is stale.


def _process_start(pid: int) -> str | None:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]  # field 22: start time in ticks


def claim(name: str) -> None:
    """Mark `name` (a domain, netns, ...) as owned by this process until release()."""
    CLAIM_DIR.mkdir(parents=True, exist_ok=True)
    (CLAIM_DIR / name).write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")


def release(name: str) -> None:
    """Drop this process's claim on `name`."""
    with contextlib.suppress(FileNotFoundError):
        (CLAIM_DIR / name).unlink()


def is_claimed(name: str) -> bool:
    """True if a live process claims `name`."""
    try:
        pid, start = (CLAIM_DIR / name).read_text().split()
    except (OSError, ValueError):
        return False
    return _process_start(int(pid)) == start


def cleanup_stale(prefix: str = TEST_PREFIX) -> list[str]:
    """Remove what crashed runs left behind under names starting with `prefix`.

    Domains (destroyed and undefined), their host-side taps and files, and network
    namespaces (after killing the processes in them, e.g. dnsmasq). Names a live process
    claims (see claim()) are left alone. Returns the names removed."""
    if not prefix:
        raise ValueError("cleanup_stale needs a non-empty prefix")
    ensure_libvirtd()
    removed: set[str] = set()
    for name in domain_names(prefix):
        if is_claimed(name):
            continue
        _destroy_domain(name)
        with contextlib.suppress(Exception):
            _delete_link(host_tap_name(name), kind="tun")
        removed.add(name)
    netns_names = [p.name for p in NETNS_DIR.iterdir()] if NETNS_DIR.exists() else []
    for name in netns_names:
        if name.startswith(prefix) and not is_claimed(name):
            remove_netns(name)
            removed.add(name)
    for directory in (RUN_DIR, CLAIM_DIR):
        if directory.exists():
            for d in directory.iterdir():
                if d.name.startswith(prefix) and not is_claimed(d.name):
                    if d.is_dir():
                        shutil.rmtree(d, ignore_errors=True)
                    else:
                        d.unlink(missing_ok=True)
                    with contextlib.suppress(FileNotFoundError):
                        (QEMU_LOG_DIR / f"{d.name}.log").unlink()
                    removed.add(d.name)
    return sorted(removed)


# --- DHCP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """One line of dnsmasq's lease file."""

    expiry: int
    mac: str
    ip: str
    hostname: str
    client_id: str


class DhcpServer:
    """dnsmasq serving DHCP on `bridge` inside `netns` (virt-launcher's DHCP stand-in).

    dnsmasq only answers on an interface holding an address in the range's subnet. Give
    `server_ip` and it is added to the bridge (prefix from `netmask`) for the server's
    lifetime and removed afterwards; without it the bridge must already have such an
    address. No DNS (--port=0). dnsmasq's shortest lease is 120 s (`lease_time` in seconds).
    Files (leases, pid, log) live in a private temp dir, removed on stop().
    """

    def __init__(self, netns: str, bridge: str, range_start: str, range_end: str,
                 netmask: str = "255.255.255.0", lease_time: int = 120,
                 server_ip: str | None = None, router: str | None = None) -> None:
        self.netns = netns
        self.bridge = bridge
        self.range_start = range_start
        self.range_end = range_end
        self.netmask = netmask
        self.lease_time = lease_time
        self.server_ip = server_ip
        self.router = router
        self.workdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._added_address: tuple[str, int] | None = None

    @property
    def lease_file(self) -> Path:
        assert self.workdir is not None, "DhcpServer not started"
        return self.workdir / "dnsmasq.leases"

    @property
    def log_file(self) -> Path:
        assert self.workdir is not None, "DhcpServer not started"
        return self.workdir / "dnsmasq.log"

    def __enter__(self) -> DhcpServer:
        self.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Start dnsmasq and wait until it serves the range."""
        self.workdir = Path(tempfile.mkdtemp(prefix=f"netaccel-dhcp-{self.netns}-"))
        try:
            if self.server_ip:
                prefix = ipaddress.IPv4Network(f"0.0.0.0/{self.netmask}").prefixlen
                with NetNS(self.netns) as ns:
                    idx = ns.link_lookup(ifname=self.bridge)[0]
                    have = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=idx)}
                    if self.server_ip not in have:
                        ns.addr("add", index=idx, address=self.server_ip, prefixlen=prefix)
                        self._added_address = (self.server_ip, prefix)
            argv = [
                "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--port=0", "--bind-interfaces", f"--interface={self.bridge}",
                "--except-interface=lo", "--user=root", "--group=root",
                f"--dhcp-range={self.range_start},{self.range_end},{self.netmask},"
                f"{self.lease_time}",
                "--dhcp-authoritative", "--no-ping", "--log-dhcp",
                f"--dhcp-leasefile={self.lease_file}",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                f"--log-facility={self.log_file}",
            ]
            if self.router:
                argv.append(f"--dhcp-option=option:router,{self.router}")
            with open(self.workdir / "stderr", "wb") as stderr:
                self.proc = subprocess.Popen(
                    netns_argv(self.netns, argv), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=stderr,
                )
            deadline = time.monotonic() + timeout
            while "DHCP, IP range" not in _read(self.log_file):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dnsmasq on {self.bridge} in {self.netns} did not come up "
                        f"(exit code {self.proc.poll()}): "
                        f"{_read(self.workdir / 'stderr')}{_read(self.log_file)}"
                    )
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def leases(self) -> list[Lease]:
        """The current leases (empty before the first one)."""
        out = []
        for line in _read(self.lease_file).splitlines():
            parts = line.split()
            if len(parts) >= 5:
                out.append(Lease(int(parts[0]), parts[1], parts[2], parts[3], parts[4]))
        return out

    def log(self) -> str:
        return _read(self.log_file) if self.workdir else ""

    def stop(self) -> None:
        """Stop dnsmasq, remove the address it was given and its files. Safe to call twice."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self._added_address and (NETNS_DIR / self.netns).exists():
            address, prefix = self._added_address
            with contextlib.suppress(Exception), NetNS(self.netns) as ns:
                idx = ns.link_lookup(ifname=self.bridge)
                if idx:
                    ns.addr("del", index=idx[0], address=address, prefixlen=prefix)
            self._added_address = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
