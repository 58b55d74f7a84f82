"""A small reader for the kernel's BTF (/sys/kernel/btf/vmlinux): struct member offsets.

    btf = Btf.from_file()                         # the running kernel's type information
    btf.member("sock", "__sk_common.skc_prot")    Member(offset=40, size=8)
    member_offsets({"sk_rcvbuf": ("sock", "sk_rcvbuf"), ...})   {"sk_rcvbuf": 284, ...}

Why: bcc compiles the BPF programs against whatever kernel headers are installed (on our
nodes often an older Debian set than the running kernel), so `offsetof()` of a kernel-internal
struct taken from those headers can be wrong. BTF describes the *running* kernel's layouts.
Only what the bypass needs is implemented: the header, the type and string sections, and
member lookup by name through nested (also anonymous) structs and unions. Bitfield members
are refused (their offset is not a byte offset). Standard library only.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# bytes that follow the 12-byte struct btf_type: (fixed, per vlen item)
_EXTRA = {INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12),
          ENUM: (0, 8), FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0),
          RESTRICT: (0, 0), FUNC: (0, 0), FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12),
          FLOAT: (0, 0), DECL_TAG: (4, 0), TYPE_TAG: (0, 0), ENUM64: (0, 12)}


class BtfError(RuntimeError):
    """BTF is missing or unreadable, or a struct or member is not in it."""


@dataclass(frozen=True)
class Type:
    kind: int
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int  # size for INT/STRUCT/UNION/ENUM/..., referenced type id otherwise
    extra: int         # offset of the data after struct btf_type in the BTF blob


@dataclass(frozen=True)
class Member:
    offset: int  # bytes from the start of the outermost struct
    size: int    # bytes


class Btf:
    """Parsed BTF: types by id (id 0 is void) and struct/union ids by name."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF data is too short for a header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        self._order = "<"
        if magic != BTF_MAGIC:
            magic = struct.unpack_from(">H", data, 0)[0]
            if magic != BTF_MAGIC:
                raise BtfError(f"not BTF (magic {magic:#x})")
            self._order = ">"
            _m, version, _flags, hdr_len = struct.unpack_from(">HBBI", data, 0)
        if version != 1:
            raise BtfError(f"BTF version {version} is not supported")
        type_off, type_len, str_off, str_len = struct.unpack_from(self._order + "4I", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        if hdr_len + max(type_off + type_len, str_off + str_len) > len(data):
            raise BtfError("BTF sections run past the end of the data")
        self.types: list[Type | None] = [None]  # id 0: void
        self._by_name: dict[str, list[int]] = {}
        self._parse_types(self._types_start, self._types_start + type_len)

    @classmethod
    def from_file(cls, path: Path = VMLINUX) -> Btf:
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BtfError(f"cannot read kernel BTF at {path}: {exc.strerror} "
                           "(the kernel needs CONFIG_DEBUG_INFO_BTF=y)") from None

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end if end >= 0 else None].decode("utf-8", "replace")

    def _parse_types(self, pos: int, end: int) -> None:
        unpack = struct.Struct(self._order + "3I").unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack(self._data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind not in _EXTRA:
                raise BtfError(f"unknown BTF kind {kind} (type id {len(self.types)})")
            fixed, per_item = _EXTRA[kind]
            name = self._str(name_off) if name_off else ""
            self.types.append(Type(kind, name, vlen, bool(info >> 31), size_or_type, pos + 12))
            if name and kind in (STRUCT, UNION):
                self._by_name.setdefault(name, []).append(len(self.types) - 1)
            pos += 12 + fixed + per_item * vlen
        if pos != end:
            raise BtfError("the BTF type section is truncated")

    # --- queries ---------------------------------------------------------------------------

    def struct_id(self, name: str) -> int:
        """Id of the struct (or union) called `name`; the complete one if there are several."""
        ids = [i for i in self._by_name.get(name, []) if self.types[i].vlen]
        if not ids:
            raise BtfError(f"struct {name} is not in the kernel's BTF")
        return ids[0]

    def _resolve(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        for _ in range(64):
            t = self.types[type_id]
            if t is None or t.kind not in _MODIFIERS:
                return type_id
            type_id = t.size_or_type
        raise BtfError(f"type id {type_id}: modifier chain too long")

    def size_of(self, type_id: int) -> int:
        type_id = self._resolve(type_id)
        t = self.types[type_id]
        if t is None:
            return 0
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return t.size_or_type
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            elem, _index, nelems = struct.unpack_from(self._order + "3I", self._data, t.extra)
            return nelems * self.size_of(elem)
        raise BtfError(f"type id {type_id} (kind {t.kind}) has no size")

    def _members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct/union's members."""
        t = self.types[type_id]
        out = []
        for i in range(t.vlen):
            name_off, mtype, moff = struct.unpack_from(self._order + "3I", self._data,
                                                       t.extra + 12 * i)
            if t.kind_flag:  # bits 24..31: bitfield size, bits 0..23: bit offset
                if moff >> 24:
                    moff = -1 - (moff & 0xFFFFFF)  # marks a bitfield
                else:
                    moff &= 0xFFFFFF
            out.append((self._str(name_off) if name_off else "", mtype, moff))
        return out

    def _find(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(type id, bit offset) of member `name`, searching anonymous members too."""
        for mname, mtype, moff in self._members(type_id):
            if mname == name:
                return mtype, moff
        for mname, mtype, moff in self._members(type_id):
            inner = self._resolve(mtype)
            if not mname and self.types[inner].kind in (STRUCT, UNION):
                found = self._find(inner, name)
                if found:
                    if moff < 0 or found[1] < 0:
                        return found[0], -1
                    return found[0], moff + found[1]
        return None

    def enum_value(self, enum_name: str, name: str) -> int:
        """The value of enumerator `name` of `enum enum_name` (ENUM or ENUM64)."""
        for t in self.types:
            if t is None or t.kind not in (ENUM, ENUM64) or t.name != enum_name:
                continue
            step = 8 if t.kind == ENUM else 12
            for i in range(t.vlen):
                name_off, lo = struct.unpack_from(self._order + "2I", self._data,
                                                  t.extra + step * i)
                if self._str(name_off) != name:
                    continue
                if t.kind == ENUM64:
                    hi = struct.unpack_from(self._order + "I", self._data, t.extra + step * i + 8)
                    return lo | hi[0] << 32
                return lo - (1 << 32) if t.kind_flag and lo >> 31 else lo
            raise BtfError(f"enum {enum_name} has no {name} in the kernel's BTF")
        raise BtfError(f"enum {enum_name} is not in the kernel's BTF")

    def member(self, struct_name: str, path: str) -> Member:
        """Byte offset and size of `path` ("a.b.c") in struct `struct_name`."""
        type_id, bits = self.struct_id(struct_name), 0
        for part in path.split("."):
            t = self.types[type_id]
            if t.kind not in (STRUCT, UNION):
                raise BtfError(f"struct {struct_name}: {path}: {part!r} is not inside a struct")
            found = self._find(type_id, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path} in the kernel's BTF")
            mtype, moff = found
            if moff < 0 or moff % 8:
                raise BtfError(f"struct {struct_name}: {path} is a bitfield")
            bits += moff
            type_id = self._resolve(mtype)
        return Member(bits // 8, self.size_of(type_id))


def func_id(name: str, btf: Btf | None = None) -> int:
    """BTF type id of the kernel function `name` (what a kfunc call instruction carries)."""
    btf = btf or vmlinux()
    for type_id, t in enumerate(btf.types):
        if t is not None and t.kind == FUNC and t.name == name:
            return type_id
    raise BtfError(f"the kernel's BTF has no function {name}")


@functools.cache
def vmlinux() -> Btf:
    """The running kernel's BTF, parsed once per process."""
    return Btf.from_file(VMLINUX)


def member_offsets(wanted: dict[str, tuple[str, str, int]],
                   btf: Btf | None = None) -> dict[str, int]:
    """{label: (struct, member path, expected size)} -> {label: byte offset}.

    BtfError names every struct/member that is missing or has an unexpected size.
    """
    btf = btf or vmlinux()
    out, problems = {}, []
    for label, (struct_name, path, size) in wanted.items():
        try:
            m = btf.member(struct_name, path)
        except BtfError as exc:
            problems.append(str(exc))
            continue
        if m.size != size:
            problems.append(f"struct {struct_name}: {path} is {m.size} bytes, expected {size}")
            continue
        out[label] = m.offset
    if problems:
        raise BtfError("; ".join(problems))
    return out
