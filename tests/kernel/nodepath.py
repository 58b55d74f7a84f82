"""Shared by the node fast path tests: traffic whose every datagram or byte is checked."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from node_helper import fastpath
from node_helper.kernel import in_netns

from .conftest import next_port


def counters(node_netns: str, device: str) -> dict[str, int]:
    return fastpath.endpoint_status(node_netns, device)["counters"]


@contextlib.contextmanager
def udp_pair(src_ns: str, dst_ns: str, dst_ip: str, port: int,
             timeout: float) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server bound to dst_ip:port in dst_ns, client in src_ns), UDP, both with `timeout`;
    closed afterwards."""
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    with in_netns(dst_ns):
        srv = socket.socket(family, socket.SOCK_DGRAM)
    with in_netns(src_ns):
        cl = socket.socket(family, socket.SOCK_DGRAM)
    with srv, cl:
        srv.bind((dst_ip, port))
        srv.settimeout(timeout)
        cl.settimeout(timeout)
        yield srv, cl


def udp_echo(src_ns: str, dst_ns: str, dst_ip: str, count: int = 50,
              size: int = 1200) -> int:
    """`count` datagrams src -> dst, each echoed back; how many round trips completed."""
    port = next_port()
    with udp_pair(src_ns, dst_ns, dst_ip, port, 0.5) as (srv, cl):
        done = 0
        for i in range(count):
            payload = i.to_bytes(4, "big") * (size // 4)
            cl.sendto(payload, (dst_ip, port))
            try:
                data, peer = srv.recvfrom(65536)
                srv.sendto(data, peer)
                if cl.recvfrom(65536)[0] == payload:
                    done += 1
            except TimeoutError:
                continue
        return done


def tcp_bulk(src_ns: str, dst_ns: str, dst_ip: str, size: int = 8 << 20) -> None:
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    port = next_port()
    with in_netns(dst_ns):
        ls = socket.socket(family, socket.SOCK_STREAM)
    with ls:
        ls.bind((dst_ip, port))
        ls.listen()
        ls.settimeout(10)
        with in_netns(src_ns):
            cl = socket.create_connection((dst_ip, port), timeout=10)
        srv, _ = ls.accept()
    data = bytes(range(251)) * (size // 251)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(data):
            chunk = srv.recv(1 << 17)
            if not chunk:
                return
            got.extend(chunk)

    with cl, srv:
        reader = threading.Thread(target=drain)
        reader.start()
        cl.sendall(data)
        reader.join(60)
    assert bytes(got) == data
