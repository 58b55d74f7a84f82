"""The splice guard's user-space half: reset the connections it cannot save.

bpf/sockmap.c (rules 8-10) sees a splice(2)/sendfile(2) read of a bypassed socket before
the kernel reads it. When redirected bytes are queued or in flight there, splice can never
read them and TCP bytes would overtake them; the programs refuse the sender's further data
and queue an event. Here each event becomes a SOCK_DESTROY (sock_diag netlink, through
pyroute2) of the reading socket, sent from inside the socket's own network namespace:
the reader's splice fails with ECONNABORTED at once and the peer gets a reset, instead of a
hang or a premature end of file. The agent runs `run()` in a thread; `netaccel bypass guard`
runs it in the foreground.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.diag import SOCK_DESTROY, DiagSocket, inet_diag_req
from pyroute2.netlink.exceptions import NetlinkError

from node_helper import kernel, sockets
from node_helper.kernel import NETNS_DIR

log = logging.getLogger("netaccel.splice_guard")
TCP_STATES_ALL = 0xFFFFFFFF
INET_DIAG_NOCOOKIE = 0xFFFFFFFFFFFFFFFF


def _words(ip: str) -> tuple[int, ...]:
    """An address as inet_diag's 4 big-endian words (IPv4 in the first)."""
    packed = ipaddress.ip_address(ip).packed.ljust(16, b"\0")
    return tuple(int.from_bytes(packed[i:i + 4], "big") for i in range(0, 16, 4))


def destroy(family: int, local: str, lport: int, remote: str, rport: int,
            cookie: int = INET_DIAG_NOCOOKIE) -> int:
    """SOCK_DESTROY one TCP socket of the calling thread's netns; 0 or the errno.

    Give the socket's cookie: by 4-tuple alone the kernel's lookup falls back to a listening
    socket on the local address and port when the connection is gone (ESTALE with a cookie
    that is not the found socket's)."""
    req = inet_diag_req()
    req["sdiag_family"] = family
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = TCP_STATES_ALL
    req["idiag_sport"], req["idiag_dport"] = lport, rport
    req["idiag_src"], req["idiag_dst"] = _words(local), _words(remote)
    req["idiag_cookie"] = cookie  # u32 cookie[2], low word first: native order on LE
    try:
        with DiagSocket() as diag:
            diag.bind()
            for msg in diag.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK):
                # pyroute2's diag marshal does not decode the ack: struct nlmsgerr follows
                # the 16-byte header, its first field the negative errno (0: done).
                if msg["header"]["type"] == NLMSG_ERROR:
                    return -struct.unpack_from("=i", msg.data, msg.offset + 16)[0]
    except NetlinkError as exc:
        return exc.code
    return 0


def netns_path(event: dict[str, Any]) -> str:
    """A path to the network namespace with the socket's inode: the reading thread's first
    (usually right), then named ones, then every process's."""
    candidates = [f"/proc/{event['tgid']}/task/{event['tid']}/ns/net",
                  f"/proc/{event['tgid']}/ns/net",
                  *(str(p) for p in sorted(NETNS_DIR.glob("*"))),
                  *(f"/proc/{pid}/ns/net" for pid in os.listdir("/proc") if pid.isdigit())]
    for path in candidates:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == event["netns_ino"]:
                return path
    raise ProcessLookupError(errno.ESRCH, f"no network namespace with inode "
                                          f"{event['netns_ino']} is left")


def _destroy_either(event: dict[str, Any]) -> int:
    """An IPv4 pair may be an AF_INET socket or an AF_INET6 one with mapped addresses."""
    v4 = ipaddress.ip_address(event["local"]).version == 4
    tries = [(socket.AF_INET, event["local"], event["remote"])] if v4 else []
    if v4:
        tries.append((socket.AF_INET6, f"::ffff:{event['local']}", f"::ffff:{event['remote']}"))
    else:
        tries.append((socket.AF_INET6, event["local"], event["remote"]))
    code = errno.ENOENT
    for family, local, remote in tries:
        code = destroy(family, local, event["lport"], remote, event["rport"], event["cookie"])
        if code != errno.ENOENT:
            break
    return code


def handle(event: dict[str, Any]) -> dict[str, Any]:
    """Reset the connection of one event; the event with `reset` (0 or errno) added."""
    try:
        with kernel.in_netns(netns_path(event)):  # this thread only, and back
            code = _destroy_either(event)
    except OSError as exc:  # the process is gone: so is its socket
        code = exc.errno or errno.ESRCH
    result = event | {"reset": code}
    log.warning("splice on a bypassed socket with %d bytes queued%s: connection %s:%d <- %s:%d "
                "of pid %d %s; its workload now runs on TCP", event["queued"],
                " (and one in flight)" if event["pending"] else "", event["local"],
                event["lport"], event["remote"], event["rport"], event["tgid"],
                "reset" if code == 0 else f"not reset ({os.strerror(code)})")
    return result


def run(stop: threading.Event, interval: float = 0.005,
        on_event: Any = None) -> None:
    """Reset every doomed connection as it is reported, until `stop` is set."""
    while not stop.is_set():
        events = sockets.pop_splice_events()
        for event in events:
            result = handle(event)
            if on_event is not None:
                with contextlib.suppress(Exception):
                    on_event(result)
        if not events:
            stop.wait(interval)
