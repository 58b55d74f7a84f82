"""node_helper.btf: a synthetic BTF blob (nested anonymous unions, typedefs, bitfields) and,
where the machine has one, the running kernel's BTF."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from node_helper import btf


class Builder:
    """Builds little-endian BTF: add types in order (ids from 1), then bytes()."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, size_or_type: int, extra: bytes = b"",
            kind_flag: bool = False) -> int:
        info = (kind << 24) | vlen | (1 << 31 if kind_flag else 0)
        self.types += struct.pack("<3I", self.s(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int) -> int:
        return self.add(btf.INT, name, 0, size, struct.pack("<I", size * 8))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]],
               kind: int = btf.STRUCT, kind_flag: bool = False) -> int:
        extra = b"".join(struct.pack("<3I", self.s(n), t, off) for n, t, off in members)
        return self.add(kind, name, len(members), size, extra, kind_flag)

    def bytes(self) -> bytes:
        hdr = struct.pack("<HBBI4I", btf.BTF_MAGIC, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + bytes(self.types) + bytes(self.strings)


def sample() -> btf.Btf:
    b = Builder()
    u32 = b.int_("unsigned int", 4)                     # 1
    u64 = b.int_("long long unsigned int", 8)           # 2
    ptr = b.add(btf.PTR, "", 0, 0)                      # 3: void *
    td = b.add(btf.TYPEDEF, "u32_t", 0, u32)            # 4
    cst = b.add(btf.CONST, "", 0, td)                   # 5
    arr = b.add(btf.ARRAY, "", 0, 0, struct.pack("<3I", u32, u32, 4))  # 6: u32[4]
    inner = b.struct("", 16, [("x", u64, 0), ("p", ptr, 64)])            # 7: anon struct
    anon = b.struct("", 16, [("a", u64, 0), ("", inner, 0)], kind=btf.UNION)  # 8: anon union
    common = b.struct("common", 32, [("fam", u32, 0), ("prot", ptr, 64),
                                     ("addrs", arr, 128)])               # 9
    bits = b.struct("bits", 4, [("lo", u32, (3 << 24) | 0), ("hi", u32, (5 << 24) | 8),
                                ("whole", u32, 0)], kind_flag=True)      # 10
    b.add(btf.FWD, "outer", 0, 0)                                        # 11: forward decl
    b.add(btf.FUNC_PROTO, "", 2, 0, struct.pack("<4I", 0, u32, 0, u64))  # 12
    b.add(btf.ENUM, "e", 2, 4, struct.pack("<4I", b.s("A"), 0, b.s("B"), 1))  # 13
    b.struct("outer", 96, [("__common", common, 0), ("rcvbuf", cst, 256),
                           ("", anon, 320), ("flags", bits, 448), ("user", ptr, 512),
                           ("tail", u32, 576)])                          # 14
    return btf.Btf(b.bytes())


def test_members_through_nesting_typedefs_and_anonymous_unions() -> None:
    t = sample()
    assert t.member("outer", "rcvbuf") == btf.Member(32, 4)       # const typedef u32
    assert t.member("outer", "__common.prot") == btf.Member(8, 8)
    assert t.member("outer", "__common.addrs") == btf.Member(16, 16)
    assert t.member("outer", "a") == btf.Member(40, 8)            # in the anonymous union
    assert t.member("outer", "p") == btf.Member(48, 8)            # anon struct in anon union
    assert t.member("outer", "user") == btf.Member(64, 8)
    assert t.member("common", "fam") == btf.Member(0, 4)
    assert t.struct_id("outer") == 14  # the complete struct, not the forward declaration


def test_missing_names_and_bitfields_are_errors() -> None:
    t = sample()
    with pytest.raises(btf.BtfError, match="struct nope is not in"):
        t.member("nope", "x")
    with pytest.raises(btf.BtfError, match="has no member __common.nothing"):
        t.member("outer", "__common.nothing")
    with pytest.raises(btf.BtfError, match="not inside a struct"):
        t.member("outer", "tail.x")
    with pytest.raises(btf.BtfError, match="bitfield"):
        t.member("bits", "hi")
    assert t.member("bits", "whole") == btf.Member(0, 4)  # kind_flag struct, plain member


def test_member_offsets_reports_every_problem() -> None:
    t = sample()
    assert btf.member_offsets({"r": ("outer", "rcvbuf", 4)}, t) == {"r": 32}
    with pytest.raises(btf.BtfError) as err:
        btf.member_offsets({"r": ("outer", "rcvbuf", 8), "m": ("outer", "gone", 4)}, t)
    assert "rcvbuf is 4 bytes, expected 8" in str(err.value)
    assert "no member gone" in str(err.value)


def test_bad_data() -> None:
    with pytest.raises(btf.BtfError, match="too short"):
        btf.Btf(b"\x9f\xeb")
    with pytest.raises(btf.BtfError, match="not BTF"):
        btf.Btf(b"\0" * 32)
    good = sample()._data
    with pytest.raises(btf.BtfError, match="past the end"):
        btf.Btf(good[:-5])
    with pytest.raises(btf.BtfError, match="cannot read kernel BTF"):
        btf.Btf.from_file(Path("/nonexistent/vmlinux"))


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="no kernel BTF on this machine")
def test_running_kernel_members_the_bypass_needs() -> None:
    t = btf.vmlinux()
    # Stable facts of every kernel with BTF: sock_common is sock's first member, skc_family
    # sits at 16 (after the addr pair, hash and port pair), pointers are 8 bytes.
    assert t.member("sock", "__sk_common").offset == 0
    assert t.member("sock", "__sk_common.skc_family") == btf.Member(16, 2)
    assert t.member("sock", "sk_user_data").size == 8
    assert t.member("sock", "sk_rcvbuf").size == 4
    assert t.member("proto", "memory_allocated").size == 8
    # The nested path and the flattened name agree (skc_prot is found in sock_common).
    assert t.member("sock", "__sk_common.skc_prot") == t.member("sock_common", "skc_prot")


def test_enum_values() -> None:
    b = Builder()
    b.int_("int", 4)
    b.add(btf.ENUM, "colour", 2, 4, struct.pack("<Ii", b.s("RED"), 0)
          + struct.pack("<Ii", b.s("MINUS"), -3), kind_flag=True)  # signed enum
    b.add(btf.ENUM64, "big", 1, 8, struct.pack("<3I", b.s("HUGE"), 5, 1))
    t = btf.Btf(b.bytes())
    assert t.enum_value("colour", "RED") == 0
    assert t.enum_value("colour", "MINUS") == -3
    assert t.enum_value("big", "HUGE") == (1 << 32) | 5
    with pytest.raises(btf.BtfError, match="has no BLUE"):
        t.enum_value("colour", "BLUE")
    with pytest.raises(btf.BtfError, match="enum shape is not"):
        t.enum_value("shape", "RED")


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="no kernel BTF on this machine")
def test_running_kernel_io_uring_splice_layout() -> None:
    """What the io_uring splice guard reads (bpf/sockmap.c, rule 8b), where the kernel has
    io_uring: the opcode is uapi (30), the command area starts the request."""
    t = btf.vmlinux()
    try:
        op = t.enum_value("io_uring_op", "IORING_OP_SPLICE")
    except btf.BtfError:
        pytest.skip("no io_uring in this kernel")
    assert op == 30
    assert t.member("io_kiocb", "cmd").offset == 0
    assert t.member("io_splice", "splice_fd_in").size == 4
    assert t.member("io_splice", "splice_fd_in").offset + 8 <= t.member("io_kiocb", "cmd").size
