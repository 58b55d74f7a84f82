"""The BPF <-> user space layouts, read from bpf/netaccel_abi.h (one definition, in C).

    layout("sock_key").size               40
    layout("bypass_counters").names       ("redirected_msgs", ...)
    layout("bypass_counters").unpack(raw) {"redirected_msgs": 3, ...}
    check_map(bpf, "netaccel_socks", key="sock_key")   after a bcc compile

The header keeps to a small subset of C (see its top comment) that `parse` reads; fields
are laid out with natural alignment, as clang does for BPF.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Any

from node_helper import bpf_syscall, kernel

HEADER = "netaccel_abi.h"


def source_digest(source: str, cflags: list[str]) -> str:
    """16 hex digits over a program's source, this header and the cflags: the name of its
    pin, so a pinned program is reused only when all three are the same."""
    h = hashlib.sha256()
    for name in (source, HEADER):
        h.update(kernel.bpf_source(name).read_bytes())
    h.update("\0".join(cflags).encode())
    return h.hexdigest()[:16]
_TYPES = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q"}
_STRUCT_RE = re.compile(r"struct\s+(\w+)\s*\{(.*?)\};", re.S)
_FIELD_RE = re.compile(r"^(__u8|__u16|__u32|__u64)\s+(\w+)(?:\[(\w+)\])?;$")
_DEFINE_RE = re.compile(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*$", re.M)


class AbiError(RuntimeError):
    """User space and the BPF programs disagree on a layout (or the header is unreadable)."""


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    count: int  # 1 for a scalar
    offset: int


@dataclass(frozen=True)
class Layout:
    """One struct of the header: fields with offsets, total size, struct-module format."""

    name: str
    fields: tuple[Field, ...]
    size: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def format(self) -> str:
        """struct format (native order, explicit padding) of one instance."""
        out, pos = ["="], 0
        for f in self.fields:
            if f.offset > pos:
                out.append(f"{f.offset - pos}x")
            out.append(f"{f.count}{_TYPES[f.ctype]}")
            pos = f.offset + f.count * struct.calcsize(_TYPES[f.ctype])
        if self.size > pos:
            out.append(f"{self.size - pos}x")
        return "".join(out)

    def pack(self, **values: Any) -> bytes:
        """One instance from field values (missing fields are zero; arrays as sequences)."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise AbiError(f"struct {self.name} has no field(s) {sorted(unknown)}")
        flat: list[int] = []
        for f in self.fields:
            value = values.get(f.name, 0)
            if f.count == 1:
                flat.append(value)
            else:
                items = list(value) if value else []
                if len(items) > f.count:
                    raise AbiError(f"{self.name}.{f.name} holds {f.count}, got {len(items)}")
                flat += items + [0] * (f.count - len(items))
        return struct.pack(self.format, *flat)

    @property
    def percpu_size(self) -> int:
        """Bytes of one value in a per-CPU map's lookup: one 8-byte aligned slot per CPU."""
        return -(-self.size // 8) * 8 * bpf_syscall.possible_cpus()

    def sum_percpu(self, raw: bytes) -> dict[str, Any]:
        """A per-CPU lookup's slots summed: field name -> int, or tuple (arrays, element by
        element)."""
        stride = -(-self.size // 8) * 8
        total: dict[str, Any] = {f.name: 0 if f.count == 1 else (0,) * f.count
                                 for f in self.fields}
        for pos in range(0, len(raw) - stride + 1, stride):
            for name, value in self.unpack(raw, pos).items():
                total[name] = (tuple(a + b for a, b in zip(total[name], value, strict=True))
                               if isinstance(value, tuple) else total[name] + value)
        return total

    def unpack(self, raw: bytes, offset: int = 0) -> dict[str, Any]:
        """Field name -> int (scalars) or tuple (arrays)."""
        values = list(struct.unpack_from(self.format, raw, offset))
        out: dict[str, Any] = {}
        for f in self.fields:
            taken, values = values[:f.count], values[f.count:]
            out[f.name] = taken[0] if f.count == 1 else tuple(taken)
        return out


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def parse_constants(text: str) -> dict[str, int]:
    """Every `#define NAME <integer>` of the header text."""
    return {name: int(value, 0) for name, value in _DEFINE_RE.findall(_strip_comments(text))}


def parse(text: str) -> dict[str, Layout]:
    """Every `struct name { ... };` of the header text, laid out with natural alignment.

    Array sizes are integers or names of the header's integer #defines."""
    consts = parse_constants(text)
    text = _strip_comments(text)
    layouts = {}
    for name, body in _STRUCT_RE.findall(text):
        fields, offset, align = [], 0, 1
        for line in filter(None, (ln.strip() for ln in body.splitlines())):
            m = _FIELD_RE.match(line)
            if not m:
                raise AbiError(f"{HEADER}: struct {name}: cannot read field {line!r}")
            ctype, fname, dim = m.group(1), m.group(2), m.group(3) or "1"
            if not dim.isdigit() and dim not in consts:
                raise AbiError(f"{HEADER}: struct {name}: unknown array size {dim!r}")
            count = int(dim) if dim.isdigit() else consts[dim]
            size = struct.calcsize(_TYPES[ctype])
            offset = -(-offset // size) * size
            fields.append(Field(fname, ctype, count, offset))
            offset += size * count
            align = max(align, size)
        layouts[name] = Layout(name, tuple(fields), -(-offset // align) * align)
    return layouts


@functools.cache
def layouts() -> dict[str, Layout]:
    return parse(kernel.bpf_source(HEADER).read_text())


@functools.cache
def constants() -> dict[str, int]:
    """The header's integer #defines (flags, limits)."""
    return parse_constants(kernel.bpf_source(HEADER).read_text())


def constant(name: str) -> int:
    try:
        return constants()[name]
    except KeyError:
        raise AbiError(f"{HEADER} has no #define {name}") from None


def layout(name: str) -> Layout:
    try:
        return layouts()[name]
    except KeyError:
        raise AbiError(f"{HEADER} has no struct {name}") from None


def _check(what: str, ctype: Any, want: Layout) -> None:
    if issubclass(ctype, ctypes.Array):  # a per-CPU value: one element per CPU
        ctype = ctype._type_
    # bcc names the padding it makes explicit __pad_<n> / __pad_end: not fields of ours
    have = [name for name, *_ in getattr(ctype, "_fields_", []) if not name.startswith("__pad")]
    if ctypes.sizeof(ctype) != want.size or (have and have != list(want.names)):
        raise AbiError(f"{what}: the BPF program has {have} ({ctypes.sizeof(ctype)} bytes), "
                       f"{HEADER} says {list(want.names)} ({want.size} bytes)")


def check_map(bpf: Any, map_name: str, key: str | None = None, value: str | None = None) -> None:
    """Compare a bcc-compiled map's key/value types with the header's layouts."""
    table = bpf.get_table(map_name.encode())
    if key:
        _check(f"{map_name} key", table.Key, layout(key))
    if value:  # per-CPU tables keep the one-CPU type in sLeaf (Leaf is an array of them)
        _check(f"{map_name} value", getattr(table, "sLeaf", table.Leaf), layout(value))
