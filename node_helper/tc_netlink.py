"""tc filter messages that pyroute2 0.9 cannot express, on the ingress hook.

pyroute2's tc messages drop TCA_ACT_COOKIE and TCA_BPF_ID, its u32 encoder cannot write the
negative key offsets that reach the Ethernet header, and its u32 decoder reads the keys 4
bytes too early. These classes derive from nlmsg/nla directly (subclassing pyroute2's tcmsg
would inherit its already-compiled attribute table) and are installed as the parser of one
NetNS socket at a time (`use_tc_parser`), so nothing global changes.
"""

from __future__ import annotations

import errno
import struct
from socket import htons
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    nla,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELTFILTER, RTM_GETTFILTER, RTM_NEWTFILTER
from pyroute2.netlink.rtnl.tcmsg import act_mirred, cls_u32, tcmsg
from pyroute2.netlink.rtnl.tcmsg.common import stats2

INGRESS_HOOK = 0xFFFFFFF2  # ffff:fff2, the ingress hook of both clsact and ingress qdiscs


class _Action(nla):
    nla_map = (
        ("TCA_ACT_UNSPEC", "none"),
        ("TCA_ACT_KIND", "asciiz"),
        ("TCA_ACT_OPTIONS", "get_options"),
        ("TCA_ACT_INDEX", "uint32"),
        ("TCA_ACT_STATS", "stats2"),
        ("TCA_ACT_PAD", "hex"),
        ("TCA_ACT_COOKIE", "cdata"),
    )
    stats2 = stats2

    @staticmethod
    def get_options(self: nla, *argv: Any, **kwarg: Any) -> Any:
        return act_mirred.options if self.get_attr("TCA_ACT_KIND") == "mirred" else self.hex


class _Actions(nla):
    nla_map = tuple((f"TCA_ACT_PRIO_{i}", "action") for i in range(33))
    action = _Action


class _U32Sel(cls_u32.options.u32_sel):
    """A u32 selector built from explicit (value, mask, offset) keys.

    pyroute2's own encoder parses "value/mask+offset" strings into a byte table indexed by
    offset, so it cannot express the negative offsets that reach the Ethernet header (and it
    re-splits keys at byte boundaries); its decoder reads the keys 4 bytes too early (it
    skips 16 bytes, the selector is 4 bytes of nla header plus 16 bytes of fields).
    """

    def decode(self) -> None:
        nla.decode(self)
        offset = self.offset + 20
        keys = []
        for _ in range(self["nkeys"]):
            key = self.u32_key(data=self.data, offset=offset)
            key.decode()
            keys.append(key)
            offset += 16
        self["keys"] = keys

    def encode(self) -> None:
        keys = [(value & mask, mask, off) for value, mask, off in self["keys"]]
        self["nkeys"] = len(keys)
        self["flags"] = 1  # TC_U32_TERMINAL: a match ends classification
        nla.encode(self)
        offset = self.offset + 20  # 4 bytes nla header + 16 bytes selector fields
        for value, mask, off in keys:
            key = self.u32_key(data=self.data)
            key["key_val"], key["key_mask"] = value, mask
            key["key_off"], key["key_offmask"] = off, 0
            key.offset = offset
            key.encode()
            offset += 16
        self.length = offset - self.offset
        struct.pack_into("H", self.data, self.offset, self.length)


class _U32Options(nla):
    nla_map = (
        ("TCA_U32_UNSPEC", "none"),
        ("TCA_U32_CLASSID", "uint32"),
        ("TCA_U32_HASH", "uint32"),
        ("TCA_U32_LINK", "hex"),
        ("TCA_U32_DIVISOR", "uint32"),
        ("TCA_U32_SEL", "u32_sel"),
        ("TCA_U32_POLICE", "hex"),
        ("TCA_U32_ACT", "actions"),
        ("TCA_U32_INDEV", "hex"),
        ("TCA_U32_PCNT", "u32_pcnt"),
        ("TCA_U32_MARK", "hex"),
        ("TCA_U32_FLAGS", "uint32"),
    )
    u32_sel = _U32Sel
    u32_pcnt = cls_u32.options.u32_pcnt
    actions = _Actions


class _BpfOptions(nla):
    nla_map = (
        ("TCA_BPF_UNSPEC", "none"),
        ("TCA_BPF_ACT", "hex"),
        ("TCA_BPF_POLICE", "hex"),
        ("TCA_BPF_CLASSID", "uint32"),
        ("TCA_BPF_OPS_LEN", "uint32"),
        ("TCA_BPF_OPS", "hex"),
        ("TCA_BPF_FD", "uint32"),
        ("TCA_BPF_NAME", "asciiz"),
        ("TCA_BPF_FLAGS", "uint32"),
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )


class TcMsg(nlmsg):
    prefix = "TCA_"
    fields = tcmsg.fields
    nla_map = (
        ("TCA_UNSPEC", "none"),
        ("TCA_KIND", "asciiz"),
        ("TCA_OPTIONS", "get_options"),
        ("TCA_STATS", "hex"),
        ("TCA_XSTATS", "hex"),
        ("TCA_RATE", "hex"),
        ("TCA_FCNT", "hex"),
        ("TCA_STATS2", "hex"),
        ("TCA_STAB", "hex"),
        ("TCA_PAD", "hex"),
        ("TCA_DUMP_INVISIBLE", "hex"),
        ("TCA_CHAIN", "uint32"),
    )

    @staticmethod
    def get_options(self: nlmsg, *argv: Any, **kwarg: Any) -> Any:
        return {"u32": _U32Options, "bpf": _BpfOptions}.get(self.get_attr("TCA_KIND"), self.hex)


def request(ns: NetNS, msg: nlmsg, msg_type: int, flags: int) -> list[nlmsg]:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    return list(ns.nlm_request_batch([msg]))


def filter_msg(index: int, prio: int, protocol: int, kind: str | None = None) -> TcMsg:
    msg = TcMsg()
    msg["index"] = index
    msg["parent"] = INGRESS_HOOK
    msg["info"] = (prio << 16) | htons(protocol)
    msg["attrs"] = [["TCA_KIND", kind]] if kind else []
    return msg


def add_filter(ns: NetNS, index: int, prio: int, protocol: int, kind: str,
                options: list[list[Any]]) -> None:
    msg = filter_msg(index, prio, protocol, kind)
    msg["attrs"].append(["TCA_OPTIONS", {"attrs": options}])
    request(ns, msg, RTM_NEWTFILTER, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)


def delete_prio(ns: NetNS, index: int, prio: int, protocol: int) -> None:
    """Delete every filter at `prio` on the ingress hook (no error if there is none)."""
    try:
        request(ns, filter_msg(index, prio, protocol), RTM_DELTFILTER,
                 NLM_F_REQUEST | NLM_F_ACK)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):
            raise


def dump_filters(ns: NetNS, index: int) -> list[TcMsg]:
    msg = TcMsg()
    msg["index"] = index
    msg["parent"] = INGRESS_HOOK
    try:
        return [m for m in request(ns, msg, RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP)
                if isinstance(m, TcMsg)]
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT):  # no ingress/clsact qdisc
            return []
        raise


def ingress_qdisc_kind(ns: NetNS, index: int) -> str | None:
    """Kind of the qdisc at ffff: (ingress or clsact) on `index`, or None."""
    for q in ns.get_qdiscs(index=index):
        if q["index"] == index and q["handle"] == 0xFFFF0000:
            return q.get_attr("TCA_KIND")
    return None


def use_tc_parser(ns: NetNS) -> None:
    """Make this NetNS socket decode filter messages with TcMsg (cookies, BPF ids, u32 keys)."""
    ns.marshal.msg_map[RTM_NEWTFILTER] = TcMsg
