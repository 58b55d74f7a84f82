"""A minimal original-destination TCP forwarder: the testbed's IPv6 sidecar (lab/mesh.py).

HAProxy 2.6 never asks for IPv6's original destination (mesh.IPV6_NOTE), so the IPv6 half of
a meshed pod uses this instead, as UID 1337 like the sidecar (--uid: it drops to it itself):

    outbound  [::1]:15001   connect to the accepted connection's original destination
                            (getsockopt IP6T_SO_ORIGINAL_DST, as Envoy does)
    inbound   [::]:15006    connect from ::6 (Istio's IPv6 inbound passthrough source) to the
                            original destination (the pod's address and the port asked for)

One thread per direction, bytes copied as they come, half-close passed on. It prints
"ready" once both ports listen. Not fast, not for production: enough to give the socket
bypass the socket shapes of an IPv6 sidecar.

    python -m lab.odproxy [--outbound-port 15001] [--inbound-port 15006] [--source ::6]
                          [--uid 1337]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import sys
import threading

IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h


def original_dst(conn: socket.socket) -> tuple[str, int]:
    """The address and port a REDIRECTed IPv6 connection was made to (struct sockaddr_in6)."""
    raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(1 << 16):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):  # one side failed: end both, as a proxy does
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _forward(conn: socket.socket, source: str | None) -> None:
    try:
        target = original_dst(conn)
        up = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        if source:
            up.bind((source, 0))
        up.connect(target)
    except OSError:
        conn.close()
        return
    pumps = [threading.Thread(target=_pump, args=(conn, up), daemon=True),
             threading.Thread(target=_pump, args=(up, conn), daemon=True)]
    for t in pumps:
        t.start()
    for t in pumps:
        t.join()
    conn.close()
    up.close()


def _serve(ls: socket.socket, source: str | None) -> None:
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_forward, args=(conn, source), daemon=True).start()


def _listen(address: str, port: int) -> socket.socket:
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((address, port))
    ls.listen(1024)
    return ls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.odproxy", description=__doc__.split("\n")[0])
    p.add_argument("--outbound-port", type=int, default=15001)
    p.add_argument("--inbound-port", type=int, default=15006)
    p.add_argument("--source", default="::6", help="source address of inbound connections")
    p.add_argument("--uid", type=int, help="run as this UID and GID (sockets are made after)")
    args = p.parse_args(argv)
    if args.uid is not None:  # the mesh's rules exempt the proxy's UID: no redirect loop
        os.setgroups([])
        os.setresgid(args.uid, args.uid, args.uid)
        os.setresuid(args.uid, args.uid, args.uid)
    outbound = _listen("::1", args.outbound_port)
    inbound = _listen("::", args.inbound_port)
    threading.Thread(target=_serve, args=(outbound, None), daemon=True).start()
    print("ready", flush=True)
    _serve(inbound, args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
