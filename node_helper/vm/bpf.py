"""The "bpf" datapath: one cls_bpf program per node, configured per device through a map.

bpf/tc_redirect.c is compiled once (bcc) and pinned in kernel.pin_dir("vm") with its maps:

    prog_<digest>  the program; <digest> covers the source, the ABI header and the cflags, so
                   a changed program is compiled again (filters already attached keep the old
                   one until they are re-applied)
    config         hash: device id -> struct vm_dev_config (names its netns cookie, ifindex)
    counters       per-CPU hash, same key -> struct vm_dev_counters

A device is accelerated by its config entry plus a cls_bpf filter (direct-action) running the
pinned program; the filter's classid is the device id (the map key, see netaccel_abi.h for
why not the netns cookie) and its name carries the device's State. When the last device is
restored, everything is unpinned. Changes are serialised between processes by
kernel.lock_file("vm"); reading (status) needs neither the lock nor bcc.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import NetNS

from node_helper import bpf_abi, bpf_syscall, kernel
from node_helper import tc_netlink as tc
from node_helper.vm.devices import Launcher, Link, VmDatapathError, VmLimitError
from node_helper.vm.plan import ETH_P_ALL, PRIO_BPF, State, bpf_filter_name

SOURCE = "tc_redirect.c"
PROG_PREFIX = "prog_"
CONFIG, COUNTERS = "config", "counters"
SO_NETNS_COOKIE = 71  # not in Python's socket module
TCA_BPF_FLAG_ACT_DIRECT = 1


def pin_dir() -> Path:
    return kernel.pin_dir("vm")


def netns_cookie(netns: str) -> int:
    """The netns cookie of `netns` (what bpf_get_netns_cookie returns in the program)."""
    with kernel.in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


# Device ids are the minor of the filter's classid (4e41:<id>): the skb keeps 16 bits of it.
CLASSID_MAJOR = 0x4E410000
ID_FIRST, ID_LAST = 1, 0xFFFF


def dev_key(dev_id: int) -> bytes:
    return bpf_abi.layout("vm_dev_key").pack(id=dev_id)


def check_limits(launcher: Launcher) -> None:
    """VmLimitError when the launcher has more bridge addresses than the config holds."""
    for family, have, most in (("IPv4", launcher.ipv4, bpf_abi.constant("VM_MAX_IP4")),
                               ("IPv6", launcher.ipv6, bpf_abi.constant("VM_MAX_IP6"))):
        if len(have) > most:
            raise VmLimitError(
                f"the bridge has {len(have)} {family} addresses ({', '.join(have)}); the bpf "
                f"datapath passes at most {most} to the launcher: use --datapath mirror"
            )


def config_value(state: State, launcher: Launcher, cookie: int, dev: Link) -> bytes:
    """struct vm_dev_config for `dev` in `state` (addresses as their wire bytes)."""
    check_limits(launcher)
    flags = bpf_abi.constant("VM_F_REDIRECT_PEER") if state.redirect_peer else 0
    mac = bytes.fromhex(launcher.mac.replace(":", "")) if launcher.mac else bytes(6)
    if launcher.mac:
        flags |= bpf_abi.constant("VM_F_HAS_MAC")

    def words(packed: bytes) -> list[int]:  # wire bytes, read as native u32 (as the program)
        return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, len(packed), 4)]

    ip6: list[int] = []
    for ip in launcher.ipv6:
        ip6 += words(ipaddress.IPv6Address(ip).packed)
    return bpf_abi.layout("vm_dev_config").pack(
        netns_cookie=cookie, ifindex=dev.index, peer_ifindex=state.peer, flags=flags, mac=mac,
        n_ip4=len(launcher.ipv4), n_ip6=len(launcher.ipv6),
        ip4=[words(ipaddress.IPv4Address(ip).packed)[0] for ip in launcher.ipv4], ip6=ip6)


# --- the pinned objects ----------------------------------------------------------------------


def _cflags() -> list[str]:
    return [f'-DVM_PIN_DIR="{pin_dir()}"', f"-DVM_PROG={prog_name()}", "-w"]


def prog_name() -> str:
    return f"{kernel.instance()}_vm"


def _digest(cflags: list[str]) -> str:
    return bpf_abi.source_digest(SOURCE, cflags)


def program_pinned() -> bool:
    """Is the current program (this digest) pinned, so that `program()` compiles nothing?"""
    return (pin_dir() / f"{PROG_PREFIX}{_digest(_cflags())}").exists()


def pinned_programs() -> list[Path]:
    d = pin_dir()
    return sorted(d.glob(f"{PROG_PREFIX}*")) if d.is_dir() else []


def _maps_compatible() -> bool:
    """True when no maps are pinned or the pinned ones have the header's layouts."""
    want = {CONFIG: (bpf_abi.layout("vm_dev_key").size, bpf_abi.layout("vm_dev_config").size),
            COUNTERS: (bpf_abi.layout("vm_dev_key").size,
                       bpf_abi.layout("vm_dev_counters").size)}
    for name, sizes in want.items():
        path = pin_dir() / name
        if path.exists():
            with bpf_syscall.closing(bpf_syscall.obj_get(path)) as fd:
                if bpf_syscall.map_info(fd)[1:3] != sizes:
                    return False
    return True


def program() -> Path:
    """The pin of the current program: reused if pinned with this digest, else compiled,
    loaded and pinned (its maps are created, or reused when pinned).

    Call under kernel.locked("vm").
    """
    kernel.ensure_bpffs()
    folder = pin_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cflags = _cflags()
    pin = folder / f"{PROG_PREFIX}{_digest(cflags)}"
    if pin.exists():
        return pin
    if not _maps_compatible():
        if configured_keys():
            raise VmDatapathError(
                f"the maps pinned in {folder} have another layout and are in use by an older "
                "netaccel: restore those VMs first")
        _unpin(folder / CONFIG, folder / COUNTERS)
    prog = kernel.compile_bpf(SOURCE, cflags)
    try:
        bpf_abi.check_map(prog, "vm_config", key="vm_dev_key", value="vm_dev_config")
        bpf_abi.check_map(prog, "vm_counters", key="vm_dev_key", value="vm_dev_counters")
        fn = prog.load_func(prog_name().encode(), prog.SCHED_CLS)
        bpf_syscall.obj_pin(fn.fd, pin)
    finally:
        prog.cleanup()
    for old in pinned_programs():  # older versions: attached filters keep them alive
        if old != pin:
            _unpin(old)
    return pin


def prog_id(pin: Path) -> int:
    with bpf_syscall.closing(bpf_syscall.obj_get(pin)) as fd:
        return bpf_syscall.prog_info(fd)[0]


def current_prog_id() -> int | None:
    """Id of the pinned program of this source (what an apply attaches), None if not pinned."""
    pin = pin_dir() / f"{PROG_PREFIX}{_digest(_cflags())}"
    with contextlib.suppress(OSError):
        return prog_id(pin)
    return None


def _map(name: str) -> contextlib.AbstractContextManager[int | None]:
    return bpf_syscall.pinned_map(pin_dir() / name)


def entries() -> dict[int, tuple[int, int]]:
    """Every configured device: id -> (netns cookie, ifindex)."""
    key_lay, cfg_lay = bpf_abi.layout("vm_dev_key"), bpf_abi.layout("vm_dev_config")
    out: dict[int, tuple[int, int]] = {}
    with _map(CONFIG) as fd:
        if fd is None:
            return out
        for key in bpf_syscall.map_keys(fd, key_lay.size):
            raw = bpf_syscall.map_lookup(fd, key, cfg_lay.size)
            if raw is not None:
                cfg = cfg_lay.unpack(raw)
                out[key_lay.unpack(key)["id"]] = (cfg["netns_cookie"], cfg["ifindex"])
    return out


def configured_keys() -> list[int]:
    return list(entries())


def device_id(cookie: int, dev: Link, known: dict[int, tuple[int, int]]) -> int:
    """The device's id: its entry's if it has one, else the first free one."""
    for dev_id, owner in known.items():
        if owner == (cookie, dev.index):
            return dev_id
    for dev_id in range(ID_FIRST, ID_LAST + 1):
        if dev_id not in known:
            return dev_id
    raise VmDatapathError("no free VM datapath device id (65535 devices configured)")


def configure(dev_id: int, value: bytes) -> None:
    """Write the device's config entry; create its (zero) counters unless present."""
    key = dev_key(dev_id)
    with _map(CONFIG) as cfg, _map(COUNTERS) as cnt:
        if cfg is None or cnt is None:
            raise VmDatapathError(f"the VM datapath's maps are not pinned in {pin_dir()}")
        size = bpf_abi.layout("vm_dev_counters").percpu_size
        if bpf_syscall.map_lookup(cnt, key, size) is None:
            bpf_syscall.map_update(cnt, key, bytes(size))
        bpf_syscall.map_update(cfg, key, value)


def config_of(dev_id: int) -> bytes | None:
    with _map(CONFIG) as fd:
        if fd is None:
            return None
        return bpf_syscall.map_lookup(fd, dev_key(dev_id), bpf_abi.layout("vm_dev_config").size)


def counters_of(dev_id: int) -> dict[str, int] | None:
    """The device's counters summed over the CPUs (None without an entry)."""
    lay = bpf_abi.layout("vm_dev_counters")
    with _map(COUNTERS) as fd:
        raw = None if fd is None else bpf_syscall.map_lookup(fd, dev_key(dev_id),
                                                               lay.percpu_size)
    return None if raw is None else lay.sum_percpu(raw)


def forget(cookie: int, devs: Iterable[Link]) -> None:
    """Delete the devices' entries; unpin everything when no device is configured any more."""
    owners = {(cookie, dev.index) for dev in devs}
    known = entries()
    with _map(CONFIG) as cfg, _map(COUNTERS) as cnt:
        for dev_id, owner in known.items():
            if owner in owners:
                for fd in (cnt, cfg):
                    if fd is not None:
                        bpf_syscall.map_delete(fd, dev_key(dev_id))
    if not entries():
        unpin_all()


def forget_netns(cookie: int) -> int:
    """Delete every entry of the netns `cookie` (a launcher netns that is gone, taking its
    filters with it); unpin everything when no device is left. Returns how many went."""
    gone = 0
    with _map(CONFIG) as cfg, _map(COUNTERS) as cnt:
        for dev_id, (owner, _ifindex) in entries().items():
            if owner == cookie:
                for fd in (cnt, cfg):
                    if fd is not None:
                        bpf_syscall.map_delete(fd, dev_key(dev_id))
                gone += 1
    if pinned() and not entries():
        unpin_all()
    return gone


def _unpin(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def unpin_all() -> None:
    """Remove every pin of the VM datapath and its folders (the instance's if it is empty)."""
    kernel.unpin("vm")


def pinned() -> bool:
    return pin_dir().is_dir()


def attach(ns: NetNS, dev: Link, prog_fd: int, state: State, dev_id: int) -> None:
    tc.add_filter(ns, dev.index, PRIO_BPF, ETH_P_ALL, "bpf", [
        ["TCA_BPF_FD", prog_fd],
        ["TCA_BPF_CLASSID", CLASSID_MAJOR | dev_id],
        ["TCA_BPF_NAME", bpf_filter_name(state)],
        ["TCA_BPF_FLAGS", TCA_BPF_FLAG_ACT_DIRECT],
    ])


def open_program(pin: Path) -> int:
    return bpf_syscall.obj_get(pin)


