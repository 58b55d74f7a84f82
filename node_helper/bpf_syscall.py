"""The bpf() syscall through ctypes: pinned objects, maps, program attach/query/info, links.

Shared by the datapaths (sockets, vm) and doctor. User space reads and writes maps
this way, so status and clean-up need neither bcc nor kernel headers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator
from pathlib import Path

_SYS_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD = 5
BPF_MAP_GET_NEXT_KEY, BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_ATTACH, BPF_PROG_DETACH = 4, 6, 7, 8, 9
BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID = 11, 13, 14
BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 15, 16
BPF_MAP_LOOKUP_AND_DELETE_ELEM, BPF_LINK_CREATE = 21, 28
BPF_PERF_EVENT = 41  # attach type of a link to a perf event (a tracepoint)
BPF_CGROUP_SOCK_OPS, BPF_SK_MSG_VERDICT = 3, 7
BPF_F_ALLOW_MULTI = 2
BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_SOCKHASH = 6, 18
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}[platform.machine()]
PERF_TYPE_TRACEPOINT, PERF_FLAG_FD_CLOEXEC = 2, 8
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes | bytearray) -> tuple[int, ctypes.Array]:
    """Call bpf(cmd, attr); return (result, the attr buffer as the kernel left it)."""
    buf = ctypes.create_string_buffer(bytes(attr).ljust(128, b"\0"), 128)
    ret = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return ret, buf


def addr(buf: ctypes.Array) -> int:
    return ctypes.addressof(buf)


def obj_get(path: Path) -> int:
    """Open a pinned object; return its fd."""
    p = ctypes.create_string_buffer(str(path).encode())
    fd, _ = _bpf(BPF_OBJ_GET, struct.pack("=QII", addr(p), 0, 0))
    return fd


def obj_pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(str(path).encode())
    _bpf(BPF_OBJ_PIN, struct.pack("=QII", addr(p), fd, 0))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", fd, 0, addr(k), addr(v), 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IIQQQ", fd, 0, addr(k), addr(v), 0))


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, struct.pack("=IIQQ", fd, 0, addr(k), 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """All keys of a map (GET_NEXT_KEY from "no key")."""
    nxt = ctypes.create_string_buffer(key_size)
    cur: ctypes.Array | None = None
    while True:
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY,
                 struct.pack("=IIQQ", fd, 0, addr(cur) if cur is not None else 0, addr(nxt)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        yield nxt.raw
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    _bpf(BPF_PROG_ATTACH, struct.pack("=IIII", target_fd, prog_fd, attach_type, flags))


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    _bpf(BPF_PROG_DETACH, struct.pack("=III", target_fd, prog_fd, attach_type))


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to target_fd (a cgroup or a sockmap) for attach_type."""
    ids = (ctypes.c_uint32 * 64)()
    _, buf = _bpf(BPF_PROG_QUERY,
                  struct.pack("=IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), 64))
    count = struct.unpack_from("=I", buf.raw, 24)[0]
    return list(ids[:count])


def prog_fd_by_id(prog_id: int) -> int:
    fd, _ = _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("=I", prog_id))
    return fd


def prog_info(fd: int) -> tuple[int, str]:
    """(id, name) of a program fd."""
    info = ctypes.create_string_buffer(256)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 256, addr(info)))
    prog_id = struct.unpack_from("=I", info.raw, 4)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode()
    return prog_id, name


def all_prog_names() -> dict[int, str]:
    """Every loaded BPF program on the machine: id -> name."""
    found: dict[int, str] = {}
    start = 0
    while True:
        try:
            _, buf = _bpf(BPF_PROG_GET_NEXT_ID, struct.pack("=I", start))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return found
            raise
        start = struct.unpack_from("=I", buf.raw, 4)[0]
        with contextlib.suppress(OSError), closing(prog_fd_by_id(start)) as fd:
            found[start] = prog_info(fd)[1]


@contextlib.contextmanager
def pinned_map(path: Path) -> Iterator[int | None]:
    """The fd of the map pinned at `path` for the block, or None when nothing is pinned."""
    try:
        fd = obj_get(path)
    except OSError:
        yield None
        return
    with closing(fd):
        yield fd


@contextlib.contextmanager
def closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def possible_cpus() -> int:
    """How many values a per-CPU map lookup returns (highest possible CPU + 1, as libbpf)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    """Create a map; return its fd."""
    fd, _ = _bpf(BPF_MAP_CREATE, struct.pack("=IIIII", map_type, key_size, value_size,
                                             max_entries, 0))
    return fd


def map_fd_by_id(map_id: int) -> int:
    fd, _ = _bpf(BPF_MAP_GET_FD_BY_ID, struct.pack("=I", map_id))
    return fd


def map_info(fd: int) -> tuple[int, int, int, int]:
    """(type, key_size, value_size, max_entries) of a map fd."""
    info = ctypes.create_string_buffer(128)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 128, addr(info)))
    map_type, _id, key_size, value_size, entries = struct.unpack_from("=IIIII", info.raw, 0)
    return map_type, key_size, value_size, entries


def prog_map_ids(fd: int, most: int = 16) -> list[int]:
    """Ids of the maps a program uses."""
    ids = (ctypes.c_uint32 * most)()
    info = ctypes.create_string_buffer(256)
    struct.pack_into("=IQ", info, 52, most, ctypes.addressof(ids))  # nr_map_ids, map_ids
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 256, addr(info)))
    count = struct.unpack_from("=I", info.raw, 52)[0]
    return list(ids[: min(count, most)])


def map_pop(fd: int, value_size: int) -> bytes | None:
    """Take the oldest value of a queue map; None when it is empty."""
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, struct.pack("=IIQQQ", fd, 0, 0, addr(v), 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def prog_load(prog_type: int, insns: bytes, name: str, license_: str = "GPL") -> int:
    """Load a program from raw instructions (maps already relocated); return its fd. On a
    verifier refusal the OSError's message ends with the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license_.encode())
    log = ctypes.create_string_buffer(1 << 20)
    attr = bytearray(128)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
    # prog_flags, prog_name[16]
    struct.pack_into("=IIQQIIQII16s", attr, 0, prog_type, len(insns) // 8, addr(code),
                     addr(lic), 1, len(log), addr(log), 0, 0, name.encode()[:15])
    try:
        fd, _ = _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        text = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}; verifier: {text[-3000:]}") from None
    return fd


def tracepoint_link(prog_fd: int, tracepoint_id: int) -> int:
    """Attach a tracepoint program through a BPF link (pinnable: the attachment then outlives
    this process); return the link's fd. The program runs for the tracepoint on every CPU."""
    attr = ctypes.create_string_buffer(128)  # struct perf_event_attr (size 128)
    struct.pack_into("=IIQQ", attr, 0, PERF_TYPE_TRACEPOINT, 128, tracepoint_id, 1)
    pfd = _libc.syscall(_SYS_PERF_EVENT_OPEN, attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if pfd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(tracepoint {tracepoint_id}): {os.strerror(err)}")
    try:
        link, _ = _bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog_fd, pfd, BPF_PERF_EVENT, 0))
    finally:
        os.close(pfd)  # the link holds the perf event
    return link
