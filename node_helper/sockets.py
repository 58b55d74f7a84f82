"""Same-node socket bypass: sock_ops + sk_msg (bpf/sockmap.c), loaded with bcc.

    enable(cidrs)  compile, pin under PIN_DIR (/sys/fs/bpf/<instance>/bypass), attach
                   sock_ops to the cgroup v2 root (BPF_F_ALLOW_MULTI) and sk_msg to the
                   sockhash; idempotent.
    set_flow_limits(node_mem_limit_pages=, rcv_floor_bytes=)
                   change the flow-control settings of the running bypass (config map).
    disable()      detach and unpin everything of ours; safe when nothing is enabled. Live
                   connections stay bypassed until they close (the sockhash lives on in
                   their psocks, through the sk_msg program).
    status()       counters and the accelerated set, read from the pinned maps (any process).

All state lives in the kernel: the attachments are legacy BPF_PROG_ATTACH ones, which outlive
the enabling process, and the maps and programs are pinned in bpffs. Our programs are found by
name (PROG_OPS_NAME, PROG_MSG_NAME), so a crashed run's leftovers can be cleaned up even when
its pins are gone. Map access from user space uses the bpf() syscall directly
(node_helper.bpf_syscall), so status() needs neither bcc nor kernel headers.

Flow control (bpf/sockmap.c, FLOW CONTROL): a direction whose receiver has more than
max(its rcvbuf, rcv_floor_bytes) redirected bytes unread, or any direction while TCP's node-wide
memory is above node_mem_limit_pages (default half of net.ipv4.tcp_mem[0]), moves to the kernel
path. The programs read kernel-internal fields at offsets taken from the running kernel's BTF
(node_helper.btf), not from the (possibly older) headers bcc compiles with.
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

from node_helper import bpf_abi, btf, kernel
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
    map_pop,
    map_update,
    obj_get,
    obj_pin,
    prog_attach,
    prog_detach,
    prog_fd_by_id,
    prog_info,
    prog_query,
    tracepoint_link,
)
from node_helper.kernel import KernelFeatureError

BPF_SOURCE = "sockmap.c"
PIN_DIR = kernel.pin_dir("bypass")
PROG_OPS_NAME = f"{kernel.instance()}_ops"
PROG_MSG_NAME = f"{kernel.instance()}_msg"
PROG_SPLICE_NAME = f"{kernel.instance()}_spl"  # the splice guard (sockmap.c, rules 8-10)
PROG_SENDFILE_NAME = f"{kernel.instance()}_sfl"
PROG_RECVFROM_NAME = f"{kernel.instance()}_rvf"  # MSG_WAITALL readers
PROG_RECVMSG_NAME = f"{kernel.instance()}_rvm"
PROG_URING_NAME = f"{kernel.instance()}_urs"  # io_uring splice (sockmap.c, rule 8b)
PROG_SETSOCKOPT_NAME = f"{kernel.instance()}_sso"  # SO_ZEROCOPY (sockmap.c, rule 12)
# pin name -> bcc object name
PINNED_PROGS = {"prog_ops": PROG_OPS_NAME, "prog_msg": PROG_MSG_NAME,
                "prog_splice": PROG_SPLICE_NAME, "prog_sendfile": PROG_SENDFILE_NAME,
                "prog_recvfrom": PROG_RECVFROM_NAME, "prog_recvmsg": PROG_RECVMSG_NAME,
                "prog_uring": PROG_URING_NAME, "prog_setsockopt": PROG_SETSOCKOPT_NAME}
PINNED_MAPS = {"map_socks": "netaccel_socks", "map_accel": "netaccel_accel",
               "map_counters": "netaccel_cnt", "map_config": "netaccel_cfg",
               "map_nobypass": "netaccel_nobypass", "map_events": "netaccel_events",
               # demotion (sockmap.c, DEMOTION; node_helper/demote.py)
               "map_peers": "netaccel_peers", "map_demote": "netaccel_demote",
               "map_dstat": "netaccel_dstat"}
# pin name of a tracepoint link -> (its program's pin, tracepoint category, tracepoint):
# pinned links keep the guard attached after this process exits, like the legacy
# attachments of the others.
GUARD_LINKS = {"link_splice": ("prog_splice", "syscalls", "sys_enter_splice"),
               "link_sendfile": ("prog_sendfile", "syscalls", "sys_enter_sendfile64"),
               "link_recvfrom": ("prog_recvfrom", "syscalls", "sys_enter_recvfrom"),
               "link_recvmsg": ("prog_recvmsg", "syscalls", "sys_enter_recvmsg"),
               "link_setsockopt": ("prog_setsockopt", "syscalls", "sys_enter_setsockopt"),
               "link_uring": ("prog_uring", "io_uring", "io_uring_submit_req")}
# Attached only where the kernel has io_uring (its tracepoint and layouts): without it there
# is no io_uring splice to guard.
OPTIONAL_LINKS = {"link_uring"}
COUNTERS = bpf_abi.layout("bypass_counters")
CONFIG = bpf_abi.layout("bypass_config")
SOCK_KEY = bpf_abi.layout("sock_key")
NO_BYPASS_KEY = bpf_abi.layout("no_bypass_key")
SPLICE_EVENT = bpf_abi.layout("splice_event")
LPM_KEY = bpf_abi.layout("lpm_key")
PEER_SOCK = bpf_abi.layout("peer_sock")
DEMOTE_CANDIDATE = bpf_abi.layout("demote_candidate")
DEMOTE_COUNTERS = bpf_abi.layout("demote_counters")
# Hops a socket pair can carry (sockmap.c, PAIRING), by their index in the per-kind counters.
PAIR_KINDS = {bpf_abi.constant(f"PAIR_{name.upper().replace('-', '_')}"): name
              for name in ("pod-pod", "outbound", "inbound", "proxy-proxy")}
# The counters that are one number; the per-kind arrays are reported under "hops".
SCALAR_COUNTERS = tuple(f.name for f in COUNTERS.fields if f.count == 1)
TCP_MEM = Path("/proc/sys/net/ipv4/tcp_mem")
# Per-connection floor of the bound on unread redirected bytes. The receiver's rcvbuf is not
# autotuned for bypassed data (its initial 128 KiB would push every fast stream to TCP), and
# a healthy reader lags in bursts: a direction moved to TCP never comes back, so the floor
# errs on the side of bursts (how it was chosen: docs/results/README.md, "the floor against
# a reader that stalls"); the node guard bounds the sum over all connections.
DEFAULT_RCV_FLOOR_BYTES = 32 << 20
# Demotion policy (sockmap.c, DEMOTION). "default": a direction that sends DEMOTE_MSGS small
# (< DEMOTE_SMALL_BYTES) messages in a row, with no message from its peer between them, within
# DEMOTE_WINDOW_MS, leaves the bypass; "always": never (every connection stays bypassed).
# The bypass loses to the kernel path's coalescing up to 256 B and wins from 1 KiB
# (docs/results/bench-pods.*), so 512 B divides them.
# 256 messages in 50 ms is >= 5 120 messages/s: a bulk stream of small writes qualifies within
# a few ms (1 B at 130 KB/s: 2 ms), a trickle (telemetry, logs at a few hundred per second)
# keeps the bypass's latency, and request/response never builds a run.
POLICIES = ("default", "always")
DEFAULT_DEMOTE_SMALL_BYTES = 512
DEFAULT_DEMOTE_MSGS = 256
DEFAULT_DEMOTE_WINDOW_MS = 50
# Kernel-internal members the programs read: -D macro -> (struct, member path, size).
KERNEL_MEMBERS = {
    "NA_OFF_SK_USER_DATA": ("sock", "sk_user_data", 8),
    "NA_OFF_SK_RCVBUF": ("sock", "sk_rcvbuf", 4),
    "NA_OFF_SKC_PROT": ("sock", "__sk_common.skc_prot", 8),
    "NA_OFF_PSOCK_MSG_TOT_LEN": ("sk_psock", "msg_tot_len", 4),
    "NA_OFF_PROTO_MEMORY_ALLOCATED": ("proto", "memory_allocated", 8),
    # the splice guard: from a file descriptor to its socket's 4-tuple
    "NA_OFF_TASK_FILES": ("task_struct", "files", 8),
    "NA_OFF_FILES_FDT": ("files_struct", "fdt", 8),
    "NA_OFF_FDT_MAX_FDS": ("fdtable", "max_fds", 4),
    "NA_OFF_FDT_FD": ("fdtable", "fd", 8),
    "NA_OFF_FILE_PRIVATE_DATA": ("file", "private_data", 8),
    "NA_OFF_SOCKET_FILE": ("socket", "file", 8),
    "NA_OFF_SOCKET_SK": ("socket", "sk", 8),
    "NA_OFF_SKC_FAMILY": ("sock", "__sk_common.skc_family", 2),
    "NA_OFF_SKC_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr", 4),
    "NA_OFF_SKC_DADDR": ("sock", "__sk_common.skc_daddr", 4),
    "NA_OFF_SKC_NUM": ("sock", "__sk_common.skc_num", 2),
    "NA_OFF_SKC_DPORT": ("sock", "__sk_common.skc_dport", 2),
    "NA_OFF_SKC_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr", 16),
    "NA_OFF_SKC_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr", 16),
    "NA_OFF_SKC_NET": ("sock", "__sk_common.skc_net", 8),
    "NA_OFF_NET_NS_INUM": ("net", "ns.inum", 4),
}
# io_uring splice guard (sockmap.c, rule 8b): where splice_fd_in is in a request.
URING_MEMBERS = {
    "NA_OFF_KIOCB_CMD": ("io_kiocb", "cmd", 64),  # the command area: struct io_splice
    "NA_OFF_SPLICE_FD_IN": ("io_splice", "splice_fd_in", 4),
    "NA_OFF_SPLICE_FLAGS": ("io_splice", "flags", 4),
}
URING_TRACEPOINT = ("io_uring", "io_uring_submit_req")
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
    return all((PIN_DIR / n).exists() for n in (*PINNED_PROGS, *PINNED_MAPS, *GUARD_LINKS)
               if n not in OPTIONAL_LINKS)


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
    # 2. Take the sk_msg program off the sockhash, then let the map go. Sockets already in it
    #    stay bypassed until they close: each one's psock holds the sk_msg program, which
    #    holds the map (tests/kernel/test_bypass_switch.py), so their queued data is never
    #    released here. Deleting them one by one instead would lose it (sockmap.c, rule 11).
    with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "map_socks")) as socks_fd:
        with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "prog_msg")) as msg_fd:
            prog_detach(socks_fd, msg_fd, BPF_SK_MSG_VERDICT)
        with contextlib.suppress(OSError):
            for prog_id in prog_query(socks_fd, BPF_SK_MSG_VERDICT):
                with contextlib.suppress(OSError), closing(prog_fd_by_id(prog_id)) as fd:
                    prog_detach(socks_fd, fd, BPF_SK_MSG_VERDICT)
    # 3. Unpin (the guard's links go with their pins: the tracepoints detach).
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

def enable(cidrs: Sequence[str], node_mem_limit_pages: int | None = None,
           rcv_floor_bytes: int | None = None, allow_empty: bool = False,
           policy: str = "default", demote_small_bytes: int | None = None,
           demote_msgs: int | None = None, demote_window_ms: int | None = None,
           ) -> dict[str, Any]:
    """Bypass TCP between sockets whose two ends are both in `cidrs`; return status().

    Only connections established from now on are bypassed. Already enabled: replace the
    accelerated set in place (connections already bypassed stay so until they close).
    Leftovers of a crashed run are removed first. On failure nothing of ours stays attached
    or pinned. Raises ValueError for bad CIDRs, KernelFeatureError for a missing feature.

    Flow control: node_mem_limit_pages (default: half of net.ipv4.tcp_mem[0]) and
    rcv_floor_bytes (default DEFAULT_RCV_FLOOR_BYTES); each enable sets both.
    `allow_empty`: an empty set is allowed (the agent keeps the programs attached, and their
    counters, while no pod opts in; no new socket is bypassed then).

    Demotion: `policy` "default" (thresholds DEFAULT_DEMOTE_*, or the given ones) or "always"
    (never demote). The kernel only queues candidates; a demoter (node_helper.demote: the
    agent's thread, `netaccel bypass demote` or `guard`) removes them from the sockhash.
    """
    nets = parse_cidrs(cidrs, allow_empty)
    config = flow_config(node_mem_limit_pages, rcv_floor_bytes) | demote_config(
        policy, demote_small_bytes, demote_msgs, demote_window_ms)
    with kernel.locked("bypass"), _cgroup_fd() as (cg, cgfd):
        kernel.ensure_bpffs()
        if _is_enabled(cgfd):
            _set_accel(nets)
            _write_config(config)
            return status()
        _cleanup(cgfd)
        try:
            _fresh_start(cgfd, nets, config)
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


def set_flow_limits(node_mem_limit_pages: int | None = None,
                    rcv_floor_bytes: int | None = None) -> dict[str, int]:
    """Change the running bypass's flow-control settings (None keeps a value); return them.

    Takes effect for the next message of every bypassed connection. KernelFeatureError when
    the bypass is not enabled.
    """
    with kernel.locked("bypass"):
        if not _pins_complete():
            raise KernelFeatureError("the socket bypass is not enabled")
        current = _read_config()
        if node_mem_limit_pages is not None:
            current["node_mem_limit_pages"] = _non_negative("node_mem_limit_pages",
                                                            node_mem_limit_pages)
        if rcv_floor_bytes is not None:
            current["rcv_floor_bytes"] = _non_negative("rcv_floor_bytes", rcv_floor_bytes)
        _write_config(current)
        return current


def status() -> dict[str, Any]:
    """State, counters and flow-control settings, read from the pinned maps (any process)."""
    result: dict[str, Any] = {"enabled": False, "sockets": 0, "cidrs": [],
                              "pin_dir": str(PIN_DIR)}
    result.update(dict.fromkeys(SCALAR_COUNTERS, 0))
    result["hops"] = _hops(dict.fromkeys(COUNTERS.names, ()))
    result.update(dict.fromkeys(CONFIG.names, 0))
    result.update(dict.fromkeys(DEMOTE_COUNTERS.names, 0))
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
            counters = _read_counters(fd)
        result.update({name: counters[name] for name in SCALAR_COUNTERS})
        result["hops"] = _hops(counters)
        with closing(obj_get(PIN_DIR / "map_socks")) as fd:
            result["sockets"] = sum(1 for _ in map_keys(fd, SOCK_KEY.size))
            result["sockets_max"] = map_info(fd)[3]

        with closing(obj_get(PIN_DIR / "map_accel")) as fd:
            result["cidrs"] = sorted(key_to_cidr(k) for k in map_keys(fd, LPM_KEY.size))
        result.update(_read_config())
        result["policy"] = policy_of(result)
        result.update(read_demote_counters())
        result["no_bypass"] = no_bypass()
    return result


# --- workloads left alone, and the splice guard's events -----------------------------------

NB_SOURCES = {bpf_abi.constant("NB_LEARNED"): "learned",
              bpf_abi.constant("NB_CONFIGURED"): "configured"}


def _addr16(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    return (b"\0" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4 else addr.packed


def _ip(raw16: bytes) -> str:
    addr = ipaddress.IPv6Address(raw16)
    return str(addr.ipv4_mapped or addr)


def _nb_key(ip: str, port: int) -> bytes:
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0 (every port) to 65535, not {port}")
    return struct.pack(NO_BYPASS_KEY.format, *struct.unpack("=4I", _addr16(ip)), port)


def no_bypass() -> list[dict[str, Any]]:
    """Workloads the bypass leaves alone: address, local port (0: all), learned/configured."""
    out = []
    with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "map_nobypass")) as fd:
        for key in map_keys(fd, NO_BYPASS_KEY.size):
            value = map_lookup(fd, key, 4)
            source = NB_SOURCES.get(struct.unpack("=I", value)[0], "?") if value else "?"
            out.append({"address": _ip(key[:16]), "port": NO_BYPASS_KEY.unpack(key)["port"],
                        "source": source})
    return sorted(out, key=lambda e: (e["address"], e["port"]))


def set_no_bypass(entries: Sequence[tuple[str, int]]) -> None:
    """Make the configured opt-outs exactly `entries` ((address, port), port 0: all ports);
    what the splice guard learned stays. New connections of those workloads run on TCP."""
    wanted = {_nb_key(ip, port) for ip, port in entries}  # ValueError before any change
    configured = struct.pack("=I", bpf_abi.constant("NB_CONFIGURED"))
    with closing(obj_get(PIN_DIR / "map_nobypass")) as fd:
        for key in wanted:
            map_update(fd, key, configured)
        for key in list(map_keys(fd, NO_BYPASS_KEY.size)):
            if key not in wanted and map_lookup(fd, key, 4) == configured:
                map_delete(fd, key)


def pop_splice_events(most: int = 256) -> list[dict[str, Any]]:
    """Take the splice guard's pending events (connections to reset), oldest first."""
    events = []
    with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "map_events")) as fd:
        while len(events) < most and (raw := map_pop(fd, SPLICE_EVENT.size)) is not None:
            ev = SPLICE_EVENT.unpack(raw)
            events.append({
                "local": _ip(raw[:16]), "remote": _ip(raw[16:32]), "lport": ev["lport"],
                "rport": ev["rport"], "tgid": ev["tgid"], "tid": ev["tid"],
                "netns_ino": ev["netns_ino"], "queued": ev["queued"],
                "pending": bool(ev["pending"]), "passive": bool(ev["passive"]),
                "cookie": ev["cookie"],
            })
    return events


# --- demotion (sockmap.c, DEMOTION) ---------------------------------------------------------

def demote_config(policy: str = "default", demote_small_bytes: int | None = None,
                  demote_msgs: int | None = None, demote_window_ms: int | None = None,
                  ) -> dict[str, int]:
    """The demotion fields of bypass_config for a policy (ValueError for a bad one)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    msgs = DEFAULT_DEMOTE_MSGS if demote_msgs is None else _non_negative("demote_msgs",
                                                                         demote_msgs)
    return {
        "demote_small_bytes": DEFAULT_DEMOTE_SMALL_BYTES if demote_small_bytes is None
        else _non_negative("demote_small_bytes", demote_small_bytes),
        "demote_msgs": 0 if policy == "always" else msgs,
        "demote_window_ns": (DEFAULT_DEMOTE_WINDOW_MS if demote_window_ms is None
                             else _non_negative("demote_window_ms", demote_window_ms))
        * 1_000_000,
    }


def policy_of(config: dict[str, Any]) -> dict[str, Any]:
    """The demotion policy a config says, as recorded in status and bench results."""
    return {"policy": "default" if config.get("demote_msgs") else "always",
            "demote_small_bytes": config.get("demote_small_bytes", 0),
            "demote_msgs": config.get("demote_msgs", 0),
            "demote_window_ms": config.get("demote_window_ns", 0) / 1e6}


def set_policy(policy: str = "default", demote_small_bytes: int | None = None,
               demote_msgs: int | None = None, demote_window_ms: int | None = None,
               ) -> dict[str, Any]:
    """Change the running bypass's demotion policy (next message of every connection)."""
    with kernel.locked("bypass"):
        if not _pins_complete():
            raise KernelFeatureError("the socket bypass is not enabled")
        current = _read_config() | demote_config(policy, demote_small_bytes, demote_msgs,
                                                 demote_window_ms)
        _write_config(current)
        return policy_of(current)


def read_demote_counters() -> dict[str, int]:
    """Demotions user space carried out (netaccel_dstat)."""
    with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "map_dstat")) as fd:
        raw = map_lookup(fd, b"\0\0\0\0", DEMOTE_COUNTERS.size)
        if raw:
            return DEMOTE_COUNTERS.unpack(raw)
    return dict.fromkeys(DEMOTE_COUNTERS.names, 0)


def add_demote_counters(**add: int) -> None:
    """Add to the user-space demotion counters (one writer at a time: a lock file)."""
    with kernel.locked("demote"), closing(obj_get(PIN_DIR / "map_dstat")) as fd:
        raw = map_lookup(fd, b"\0\0\0\0", DEMOTE_COUNTERS.size)
        values = DEMOTE_COUNTERS.unpack(raw) if raw else dict.fromkeys(DEMOTE_COUNTERS.names, 0)
        for name, n in add.items():
            values[name] += n
        map_update(fd, b"\0\0\0\0", DEMOTE_COUNTERS.pack(**values))


def pop_demote_candidates(most: int = 1024) -> list[dict[str, Any]]:
    """Take the queued demotion candidates (sending sockets), oldest first."""
    out = []
    with contextlib.suppress(OSError), closing(obj_get(PIN_DIR / "map_demote")) as fd:
        while len(out) < most and (raw := map_pop(fd, DEMOTE_CANDIDATE.size)) is not None:
            cand = DEMOTE_CANDIDATE.unpack(raw)
            out.append({"key": raw[:SOCK_KEY.size], "cookie": cand["cookie"],
                        "local": _ip(raw[:16]), "remote": _ip(raw[16:32]),
                        "lport": cand["lport"], "rport": cand["rport"]})
    return out


def peer_entry(key: bytes) -> dict[str, Any] | None:
    """A bypassed socket's netaccel_peers entry (its splice/demotion state), or None."""
    with closing(obj_get(PIN_DIR / "map_peers")) as fd:
        raw = map_lookup(fd, key, PEER_SOCK.size)
    return PEER_SOCK.unpack(raw) if raw else None


def remove_socket(key: bytes) -> bool:
    """Delete one socket from the sockhash (False: it was not there). Only order-safe under
    sockmap.c's DEMOTION conditions: node_helper.demote checks them first."""
    with closing(obj_get(PIN_DIR / "map_socks")) as fd:
        return map_delete(fd, key)


def socket_keys() -> list[bytes]:
    """The keys of every socket in the sockhash."""
    with closing(obj_get(PIN_DIR / "map_socks")) as fd:
        return list(map_keys(fd, SOCK_KEY.size))


# --- flow control ---------------------------------------------------------------------------

def _non_negative(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def default_node_mem_limit_pages(tcp_mem: Path = TCP_MEM) -> int:
    """Half of net.ipv4.tcp_mem[0] (pages): the bypass stays well below memory pressure."""
    try:
        low = int(tcp_mem.read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise KernelFeatureError(f"cannot read {tcp_mem} ({exc}): the bypass's node memory "
                                 "guard needs it") from None
    return low // 2


def flow_config(node_mem_limit_pages: int | None = None,
                rcv_floor_bytes: int | None = None) -> dict[str, int]:
    """The bypass_config to write: given values, else the defaults."""
    return {
        "node_mem_limit_pages": default_node_mem_limit_pages() if node_mem_limit_pages is None
        else _non_negative("node_mem_limit_pages", node_mem_limit_pages),
        "rcv_floor_bytes": DEFAULT_RCV_FLOOR_BYTES if rcv_floor_bytes is None
        else _non_negative("rcv_floor_bytes", rcv_floor_bytes),
    }


def kernel_offsets() -> dict[str, int]:
    """The NA_OFF_* offsets of the running kernel (BTF); KernelFeatureError naming what lacks."""
    try:
        return btf.member_offsets(KERNEL_MEMBERS)
    except btf.BtfError as exc:
        raise KernelFeatureError(
            f"the socket bypass's flow control needs kernel struct layouts from BTF: {exc}. "
            "Without them the bypass could not bound what it queues, so it is not started "
            "(the kernel needs CONFIG_DEBUG_INFO_BTF=y and sockmap's psock->msg_tot_len, "
            "Linux >= 6.x)"
        ) from None


def uring_layout() -> dict[str, int] | None:
    """The io_uring guard's -D values (BTF: opcode and offsets; tracefs: the tracepoint's
    record), or None when this kernel has no io_uring to guard (nothing is attached then)."""
    try:
        out = btf.member_offsets(URING_MEMBERS)
        out["NA_IORING_OP_SPLICE"] = btf.vmlinux().enum_value("io_uring_op", "IORING_OP_SPLICE")
        fields = kernel.tracepoint_fields(*URING_TRACEPOINT)
    except (btf.BtfError, KernelFeatureError, OSError):
        return None
    if fields.get("req", (0, 0))[1] != 8 or fields.get("opcode", (0, 0))[1] != 1:
        return None
    out["NA_TP_URING_REQ"], out["NA_TP_URING_OPCODE"] = fields["req"][0], fields["opcode"][0]
    return out


def _pack_config(config: dict[str, int]) -> bytes:
    return CONFIG.pack(**config)  # fields not given (stopping) are 0


def _write_config(config: dict[str, int], fd: int | None = None) -> None:
    if fd is not None:
        map_update(fd, b"\0\0\0\0", _pack_config(config))
        return
    with closing(obj_get(PIN_DIR / "map_config")) as cfd:
        map_update(cfd, b"\0\0\0\0", _pack_config(config))


def _read_config() -> dict[str, int]:
    with closing(obj_get(PIN_DIR / "map_config")) as fd:
        raw = map_lookup(fd, b"\0\0\0\0", CONFIG.size)
    return CONFIG.unpack(raw) if raw else dict.fromkeys(CONFIG.names, 0)


# --- internals ----------------------------------------------------------------------------

def _read_counters(fd: int) -> dict[str, Any]:
    """The counters map's per-CPU slots summed (array counters element by element)."""
    return COUNTERS.sum_percpu(map_lookup(fd, b"\0\0\0\0", COUNTERS.percpu_size) or b"")


def _hops(counters: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per-kind counters by hop name: {"outbound": {"pairs": n, "redirected_bytes": b}, ...}."""
    def at(name: str, i: int) -> int:
        values = counters.get(name) or ()
        return values[i] if i < len(values) else 0
    return {kind: {"pairs": at("pairs", i), "redirected_bytes": at("pair_redirected_bytes", i)}
            for i, kind in sorted(PAIR_KINDS.items())}


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
    offsets = kernel_offsets()  # before compiling: refuse clearly, not half-working
    # No io_uring here: the program compiles (with zeros) but is never attached.
    offsets |= uring_layout() or dict.fromkeys([*URING_MEMBERS, "NA_IORING_OP_SPLICE",
                                                "NA_TP_URING_REQ", "NA_TP_URING_OPCODE"], 0)
    bpf = kernel.compile_bpf(BPF_SOURCE, [f"-DNA_PROG_OPS={PROG_OPS_NAME}",
                                          f"-DNA_PROG_MSG={PROG_MSG_NAME}",
                                          f"-DNA_PROG_SPLICE={PROG_SPLICE_NAME}",
                                          f"-DNA_PROG_SENDFILE={PROG_SENDFILE_NAME}",
                                          f"-DNA_PROG_RECVFROM={PROG_RECVFROM_NAME}",
                                          f"-DNA_PROG_RECVMSG={PROG_RECVMSG_NAME}",
                                          f"-DNA_PROG_URING={PROG_URING_NAME}",
                                          f"-DNA_PROG_SETSOCKOPT={PROG_SETSOCKOPT_NAME}",
                                          *(f"-D{k}={v}" for k, v in sorted(offsets.items()))])
    try:
        bpf_abi.check_map(bpf, "netaccel_accel", key="lpm_key")
        bpf_abi.check_map(bpf, "netaccel_cnt", value="bypass_counters")
        bpf_abi.check_map(bpf, "netaccel_cfg", value="bypass_config")
        bpf_abi.check_map(bpf, "netaccel_peers", key="sock_key", value="peer_sock")
        bpf_abi.check_map(bpf, "netaccel_nobypass", key="no_bypass_key")
        bpf_abi.check_map(bpf, "netaccel_dstat", value="demote_counters")
        bcc = kernel.import_bcc()
        ops = bpf.load_func(PROG_OPS_NAME.encode(), bcc.BPF.SOCK_OPS)
        msg = bpf.load_func(PROG_MSG_NAME.encode(), bcc.BPF.SK_MSG)
        for name in (PROG_SPLICE_NAME, PROG_SENDFILE_NAME, PROG_RECVFROM_NAME,
                     PROG_RECVMSG_NAME, PROG_URING_NAME, PROG_SETSOCKOPT_NAME):
            bpf.load_func(name.encode(), bcc.BPF.TRACEPOINT)
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


def _fresh_start(cgroup_fd: int, nets: Sequence[Any], config: dict[str, int]) -> None:
    _probe_sockhash()
    bpf, ops, msg = _compile()
    try:
        PIN_DIR.mkdir(parents=True, exist_ok=True)
        fds = {name: _table_fd(bpf, name) for name in PINNED_MAPS.values()}
        _write_config(config, fds["netaccel_cfg"])  # before anything is attached
        for net in nets:
            map_update(fds["netaccel_accel"], lpm_key(net), struct.pack("=I", 1))
        for pin, name in PINNED_MAPS.items():
            obj_pin(fds[name], PIN_DIR / pin)
        for pin, name in PINNED_PROGS.items():
            obj_pin(bpf.funcs[name.encode()].fd, PIN_DIR / pin)
        # The splice guard first: from the first bypassed socket on, a splice is seen.
        with_uring = uring_layout() is not None
        for link_pin, (prog_pin, category, tracepoint) in GUARD_LINKS.items():
            if link_pin in OPTIONAL_LINKS and not with_uring:
                continue
            tp_id = kernel.tracepoint_id(category, tracepoint)
            with closing(obj_get(PIN_DIR / prog_pin)) as prog_fd, \
                    closing(tracepoint_link(prog_fd, tp_id)) as link_fd:
                obj_pin(link_fd, PIN_DIR / link_pin)
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
