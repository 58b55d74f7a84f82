"""Same-node socket bypass: sock_ops + sk_msg (bpf/sockmap.c), loaded with bcc.

    enable(cidrs)  compile, pin under PIN_DIR (/sys/fs/bpf/<instance>/bypass), attach
                   sock_ops to the cgroup v2 root (BPF_F_ALLOW_MULTI) and sk_msg to the
                   sockhash; idempotent.
    disable()      detach and unpin everything of ours; safe when nothing is enabled.
    status()       counters and the accelerated set, read from the pinned maps (any process).

All state lives in the kernel: the attachments are legacy BPF_PROG_ATTACH ones, which outlive
the enabling process, and the maps and programs are pinned in bpffs. Our programs are found by
name (PROG_OPS_NAME, PROG_MSG_NAME), so a crashed run's leftovers can be cleaned up even when
its pins are gone. Map access from user space uses the bpf() syscall directly
(node_helper.bpf_syscall), so status() needs neither bcc nor kernel headers.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from node_helper import bpf_abi, kernel
from node_helper.bpf_syscall import (  # noqa: F401 - re-exported for tests and the CLI
    BPF_CGROUP_SOCK_OPS,
    BPF_F_ALLOW_MULTI,
    BPF_MAP_TYPE_SOCKHASH,
    BPF_SK_MSG_VERDICT,
    all_prog_names,
    closing,
    map_create,
    map_delete,
    map_info,
    map_keys,
    map_lookup,
    map_update,
    obj_get,
    obj_pin,
    possible_cpus,
    prog_attach,
    prog_detach,
    prog_fd_by_id,
    prog_info,
    prog_query,
)
from node_helper.kernel import KernelFeatureError

BPF_SOURCE = "sockmap.c"
PIN_DIR = kernel.pin_dir("bypass")
PROG_OPS_NAME = f"{kernel.instance()}_ops"
PROG_MSG_NAME = f"{kernel.instance()}_msg"
# pin name -> bcc object name
PINNED_PROGS = {"prog_ops": PROG_OPS_NAME, "prog_msg": PROG_MSG_NAME}
PINNED_MAPS = {"map_socks": "netaccel_socks", "map_accel": "netaccel_accel",
               "map_counters": "netaccel_cnt"}
COUNTERS = bpf_abi.layout("bypass_counters")
SOCK_KEY = bpf_abi.layout("sock_key")
LPM_KEY = bpf_abi.layout("lpm_key")
_MOUNTINFO = Path("/proc/self/mountinfo")  # tests point this at a fake one

# --- the accelerated set ------------------------------------------------------------------

def parse_cidrs(cidrs: Sequence[str], allow_empty: bool = False,
                ) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Validate CIDRs (host bits must be zero); ValueError names the offending string."""
    if isinstance(cidrs, str):
        raise ValueError(f"cidrs must be a list of strings, not the string {cidrs!r}")
    if not cidrs and not allow_empty:
        raise ValueError("the accelerated set is empty: give at least one CIDR")
    nets = []
    for text in cidrs:
        try:
            nets.append(ipaddress.ip_network(str(text).strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"invalid CIDR {text!r}: {exc}") from None
    return nets


def lpm_key(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bytes:
    """struct lpm_key for a network: IPv4 as ::ffff:a.b.c.d/(96+len)."""
    if net.version == 4:
        addr = b"\0" * 10 + b"\xff\xff" + net.network_address.packed
        plen = 96 + net.prefixlen
    else:
        addr, plen = net.network_address.packed, net.prefixlen
    # addr words keep network byte order: unpack them natively to pack them back unchanged.
    return struct.pack(LPM_KEY.format, plen, *struct.unpack("=4I", addr))


def key_to_cidr(key: bytes) -> str:
    plen = LPM_KEY.unpack(key)["prefixlen"]
    addr = ipaddress.IPv6Address(key[4:20])
    if addr.ipv4_mapped is not None and plen >= 96:
        return f"{addr.ipv4_mapped}/{plen - 96}"
    return f"{addr}/{plen}"


# --- state inspection ---------------------------------------------------------------------

def _cgroup_root() -> Path:
    return kernel.cgroup2_root(_MOUNTINFO)


def _ours_on_cgroup(cgroup_fd: int) -> list[int]:
    """Ids of our sock_ops programs attached to the cgroup (found by name)."""
    ours = []
    for prog_id in prog_query(cgroup_fd, BPF_CGROUP_SOCK_OPS):
        with contextlib.suppress(OSError), closing(prog_fd_by_id(prog_id)) as fd:
            if prog_info(fd)[1] == PROG_OPS_NAME:
                ours.append(prog_id)
    return ours


def attached_programs(cgroup: Path | None = None) -> list[int]:
    """Ids of netaccel sock_ops programs attached to the cgroup v2 root (empty when off)."""
    cg = cgroup or _cgroup_root()
    with closing(os.open(cg, os.O_RDONLY | os.O_DIRECTORY)) as cgfd:
        return _ours_on_cgroup(cgfd)


def _pins_complete() -> bool:
    return all((PIN_DIR / n).exists() for n in (*PINNED_PROGS, *PINNED_MAPS))


def _is_enabled(cgroup_fd: int) -> bool:
    """Pins complete, the pinned sock_ops attached to the cgroup and sk_msg to the sockhash."""
    if not _pins_complete():
        return False
    try:
        with closing(obj_get(PIN_DIR / "prog_ops")) as ops_fd:
            ops_id = prog_info(ops_fd)[0]
        if _ours_on_cgroup(cgroup_fd) != [ops_id]:  # missing, or a crashed run's one as well
            return False
        with closing(obj_get(PIN_DIR / "prog_msg")) as msg_fd, \
                closing(obj_get(PIN_DIR / "map_socks")) as socks_fd:
            msg_id = prog_info(msg_fd)[0]
            try:
                return msg_id in prog_query(socks_fd, BPF_SK_MSG_VERDICT)
            except OSError as exc:  # kernels < 6.0 cannot query a sockmap: trust the pins
                return exc.errno == errno.EINVAL
    except OSError:
        return False


def _cleanup(cgroup_fd: int | None) -> None:
    """Detach and unpin everything of ours, whatever state it is in. Idempotent."""
    # 1. No new sockets enter the sockhash.
    for prog_id in _ours_on_cgroup(cgroup_fd) if cgroup_fd is not None else []:
        with contextlib.suppress(OSError), closing(prog_fd_by_id(prog_id)) as fd:
            prog_detach(cgroup_fd, fd, BPF_CGROUP_SOCK_OPS)
    # 2. Take the sk_msg program off the sockhash, then let the map go. Sockets still in it
    #    leave the bypass when the last reference to the map is dropped; their already
    #    redirected data stays readable (tests/kernel/test_bypass.py checks it).
    with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "map_socks")) as socks_fd:
        with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "prog_msg")) as msg_fd:
            prog_detach(socks_fd, msg_fd, BPF_SK_MSG_VERDICT)
        with contextlib.suppress(OSError):
            for prog_id in prog_query(socks_fd, BPF_SK_MSG_VERDICT):
                with contextlib.suppress(OSError), closing(prog_fd_by_id(prog_id)) as fd:
                    prog_detach(socks_fd, fd, BPF_SK_MSG_VERDICT)
    # 3. Unpin.
    if PIN_DIR.exists():
        for entry in PIN_DIR.iterdir():
            entry.unlink()
        PIN_DIR.rmdir()
    with contextlib.suppress(OSError):
        PIN_DIR.parent.rmdir()  # only if empty: other netaccel parts may pin there too


@contextlib.contextmanager
def _cgroup_fd() -> Iterator[tuple[Path, int]]:
    cg = _cgroup_root()
    with closing(os.open(cg, os.O_RDONLY | os.O_DIRECTORY)) as fd:
        yield cg, fd


# --- the public API -----------------------------------------------------------------------

def enable(cidrs: Sequence[str], allow_empty: bool = False) -> dict[str, Any]:
    """Bypass TCP between sockets whose two ends are both in `cidrs`; return status().

    Only connections established from now on are bypassed. Already enabled: replace the
    accelerated set in place (connections already bypassed stay so until they close).
    Leftovers of a crashed run are removed first. On failure nothing of ours stays attached
    or pinned. Raises ValueError for bad CIDRs, KernelFeatureError for a missing feature.
    `allow_empty`: an empty set is allowed (the agent keeps the programs attached, and their
    counters, while no pod opts in; no new socket is bypassed then).
    """
    nets = parse_cidrs(cidrs, allow_empty)
    with kernel.locked("bypass"), _cgroup_fd() as (cg, cgfd):
        kernel.ensure_bpffs()
        if _is_enabled(cgfd):
            _set_accel(nets)
            return status()
        _cleanup(cgfd)
        try:
            _fresh_start(cgfd, nets)
        except BaseException:
            _cleanup(cgfd)
            raise
    return status()


def disable() -> None:
    """Detach and unpin everything of ours. Safe when nothing is enabled."""
    with kernel.locked("bypass"):
        try:
            cg = _cgroup_root()
        except KernelFeatureError:  # no cgroup v2: nothing can be attached; just unpin
            cg = None
        if cg is None:
            _cleanup(None)
            return
        with closing(os.open(cg, os.O_RDONLY | os.O_DIRECTORY)) as cgfd:
            _cleanup(cgfd)


def status() -> dict[str, Any]:
    """State and counters, read from the pinned maps (works from any process)."""
    result: dict[str, Any] = {"enabled": False, "sockets": 0, "cidrs": [],
                              "pin_dir": str(PIN_DIR)}
    result.update(dict.fromkeys(COUNTERS.names, 0))
    try:
        cg = _cgroup_root()
        result["cgroup"] = str(cg)
    except KernelFeatureError:
        result["cgroup"] = None
        return result
    with closing(os.open(cg, os.O_RDONLY | os.O_DIRECTORY)) as cgfd:
        result["enabled"] = _is_enabled(cgfd)
    if not _pins_complete():
        return result
    with contextlib.suppress(OSError):
        with closing(obj_get(PIN_DIR / "map_counters")) as fd:
            result.update(_read_counters(fd))
        with closing(obj_get(PIN_DIR / "map_socks")) as fd:
            result["sockets"] = sum(1 for _ in map_keys(fd, SOCK_KEY.size))
            result["sockets_max"] = map_info(fd)[3]
        with closing(obj_get(PIN_DIR / "map_accel")) as fd:
            result["cidrs"] = sorted(key_to_cidr(k) for k in map_keys(fd, LPM_KEY.size))
    return result


# --- internals ----------------------------------------------------------------------------

def _read_counters(fd: int) -> dict[str, int]:
    """Sum the per-CPU slots of the counters map (per-CPU values are 8-byte aligned)."""
    stride = -(-COUNTERS.size // 8) * 8
    raw = map_lookup(fd, b"\0\0\0\0", stride * possible_cpus()) or b""
    totals = dict.fromkeys(COUNTERS.names, 0)
    for cpu in range(len(raw) // stride):
        for name, value in COUNTERS.unpack(raw, cpu * stride).items():
            totals[name] += value
    return totals


def _set_accel(nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    """Make the pinned trie hold exactly `nets` (adds first, then removes)."""
    wanted = {lpm_key(n) for n in nets}
    with closing(obj_get(PIN_DIR / "map_accel")) as fd:
        for key in wanted:
            map_update(fd, key, struct.pack("=I", 1))
        for key in list(map_keys(fd, LPM_KEY.size)):
            if key not in wanted:
                map_delete(fd, key)


def _probe_sockhash() -> None:
    """KernelFeatureError unless the kernel can create a SOCKHASH."""
    try:
        fd = map_create(BPF_MAP_TYPE_SOCKHASH, 4, 4, 1)
    except OSError as exc:
        raise KernelFeatureError(
            f"the kernel cannot create a BPF sockhash ({exc.strerror}): it needs "
            "CONFIG_BPF_SYSCALL, CONFIG_BPF_STREAM_PARSER and CONFIG_CGROUP_BPF (Linux >= 4.18)"
        ) from None
    os.close(fd)


def _compile() -> tuple[Any, Any, Any]:
    """Compile and load bpf/sockmap.c with bcc; return (bpf, ops fn, msg fn)."""
    bpf = kernel.compile_bpf(BPF_SOURCE, [f"-DNA_PROG_OPS={PROG_OPS_NAME}",
                                          f"-DNA_PROG_MSG={PROG_MSG_NAME}"])
    try:
        bpf_abi.check_map(bpf, "netaccel_accel", key="lpm_key")
        bpf_abi.check_map(bpf, "netaccel_cnt", value="bypass_counters")
        bcc = kernel.import_bcc()
        ops = bpf.load_func(PROG_OPS_NAME.encode(), bcc.BPF.SOCK_OPS)
        msg = bpf.load_func(PROG_MSG_NAME.encode(), bcc.BPF.SK_MSG)
    except bpf_abi.AbiError:
        bpf.cleanup()
        raise
    except Exception as exc:
        bpf.cleanup()
        raise KernelFeatureError(f"the kernel refused {BPF_SOURCE}'s programs: {exc}") from exc
    return bpf, ops, msg


def _table_fd(bpf: Any, name: str) -> int:
    """fd of a map bcc created (bcc's Table wrapper does not know SOCKHASH)."""
    from bcc.libbcc import lib

    fd = lib.bpf_table_fd(bpf.module, name.encode())
    if fd < 0:
        raise RuntimeError(f"bcc created no map {name}")
    return fd


def _fresh_start(cgroup_fd: int, nets: Sequence[Any]) -> None:
    _probe_sockhash()
    bpf, ops, msg = _compile()
    try:
        PIN_DIR.mkdir(parents=True, exist_ok=True)
        fds = {name: _table_fd(bpf, name) for name in PINNED_MAPS.values()}
        for net in nets:
            map_update(fds["netaccel_accel"], lpm_key(net), struct.pack("=I", 1))
        for pin, name in PINNED_MAPS.items():
            obj_pin(fds[name], PIN_DIR / pin)
        obj_pin(ops.fd, PIN_DIR / "prog_ops")
        obj_pin(msg.fd, PIN_DIR / "prog_msg")
        # sk_msg first: a socket takes the sockhash's programs when it is inserted, so every
        # inserted socket runs the verdict program from its first message.
        prog_attach(fds["netaccel_socks"], msg.fd, BPF_SK_MSG_VERDICT)
        try:
            prog_attach(cgroup_fd, ops.fd, BPF_CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI)
        except OSError as exc:
            raise KernelFeatureError(
                f"cannot attach sock_ops to the cgroup v2 root: {exc.strerror} "
                "(needs CONFIG_CGROUP_BPF and root)"
            ) from None
    finally:
        bpf.cleanup()
