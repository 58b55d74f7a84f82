"""What happens to redirected bytes that wait unread when a direction leaves the bypass
(docs/bypass-kernel.md, "Switching with bytes queued"). Each test states a measured kernel
behaviour the bypass's design depends on; if one starts failing, the kernel changed and the
design notes (bpf/sockmap.c, rules 4, 5, 6 and 11) must be read again.

- `bypass off` (sockets.disable) releases nothing that a live connection uses: every
  bypassed socket's psock holds the sk_msg program, the program holds the sockhash (its
  used maps), so the map outlives its pins and existing connections stay bypassed until they
  close. Queued bytes therefore survive it.
- Deleting one receiving socket from the sockhash drops its psock and its queue.
- After a flow-control switch, a recv() that drains the psock queue returns short while TCP
  bytes (and the peer's FIN) already wait in the TCP receive queue, and epoll reports
  EPOLLRDHUP: a reader that takes "short read + RDHUP" for end of file (HAProxy's
  raw_sock_to_buf does) stops early and loses the TCP bytes.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from lab.testbed import Testbed
from node_helper import sockets

from .conftest import Bypass, connected_pair, veth_packets
from .streams import pattern

pytestmark = pytest.mark.kernel
MB = 1 << 20
READ = 16384  # HAProxy's default buffer size


def send(sock: socket.socket, start: int, n: int) -> int:
    """Write the pattern [start, start + n) in 64 KiB messages; return the new offset."""
    end = start + n
    while start < end:
        k = min(65536, end - start)
        sock.sendall(pattern(start, k))
        start += k
    return start


def read_to_eof(sock: socket.socket, start: int = 0) -> int:
    """Read until recv() returns b"" (blocking), checking the pattern; return the offset."""
    sock.settimeout(30)
    while chunk := sock.recv(READ):
        assert chunk == pattern(start, len(chunk)), f"wrong bytes at {start}"
        start += len(chunk)
    return start


def sockhash_key(sock: socket.socket) -> bytes:
    lport, rport = sock.getsockname()[1], sock.getpeername()[1]
    for key in sockets.socket_keys():
        k = sockets.SOCK_KEY.unpack(key)
        if (k["lport"], k["rport"]) == (lport, rport):
            return key
    raise AssertionError(f"no sockhash entry for {lport} -> {rport}")


def test_disable_keeps_live_connections_bypassed(testbed: Testbed, bypass: Bypass) -> None:
    """20 MB queued unread, then `bypass off`, then 4 MB more: nothing is lost, and the 4 MB
    still bypass TCP (the sockhash lives on through the psocks' reference to sk_msg)."""
    p0, p1 = testbed.pods[:2]
    bypass.on(rcv_floor_bytes=1 << 30)
    with connected_pair(p0, p1) as (cl, srv):
        cl.settimeout(30)
        sent = send(cl, 0, 20 * MB)
        sockets.disable()
        assert not sockets.PIN_DIR.exists()
        before = veth_packets(testbed, p0, p1)
        th = threading.Thread(target=lambda: (send(cl, sent, 4 * MB),
                                              cl.shutdown(socket.SHUT_WR)))
        th.start()
        got = read_to_eof(srv)
        th.join(30)
        packets = veth_packets(testbed, p0, p1) - before
    assert got == 24 * MB
    # TCP would need hundreds of segments and ACKs for 4 MB; the FIN exchange is a few.
    assert packets < 20, f"{packets} packets on the veths: the connection left the bypass"


def test_deleting_a_receiver_loses_its_queue(testbed: Testbed, bypass: Bypass) -> None:
    """The fact the demoter is built around (sockmap.c, rule 11): a single delete of the
    receiver drops its psock, and its redirected, unread bytes with it."""
    p0, p1 = testbed.pods[:2]
    bypass.on(rcv_floor_bytes=1 << 30)
    with connected_pair(p0, p1) as (cl, srv):
        cl.settimeout(30)
        sent = send(cl, 0, 4 * MB)
        assert sockets.remove_socket(sockhash_key(srv))
        th = threading.Thread(target=lambda: (send(cl, sent, 64 * 1024),
                                              cl.shutdown(socket.SHUT_WR)))
        th.start()
        srv.settimeout(30)
        first = srv.recv(READ)
        th.join(30)
    # The reader's first bytes are the TCP ones sent after the delete: the 4 MB are gone.
    assert first == pattern(sent, len(first)) != pattern(0, len(first))


def _epoll_reader(sock: socket.socket, haproxy: bool) -> tuple[int, bool]:
    """Non-blocking, level-triggered epoll reader, one READ per wake-up and a little work
    between them. haproxy=True: a short read after EPOLLRDHUP was reported is taken for end
    of file, as HAProxy 2.6 does (raw_sock_to_buf: `ret < try` and FD_POLL_HUP -> read0).
    Returns (bytes read in order, whether a short read came with RDHUP before the end)."""
    sock.setblocking(False)
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    got, hup, short_with_hup = 0, False, False
    try:
        while True:
            events = ep.poll(30)
            assert events, "epoll timed out"
            hup = hup or bool(events[0][1] & (select.EPOLLRDHUP | select.EPOLLHUP))
            try:
                chunk = sock.recv(READ)
            except BlockingIOError:
                continue
            if not chunk:
                return got, short_with_hup
            assert chunk == pattern(got, len(chunk)), f"wrong bytes at {got}"
            got += len(chunk)
            if len(chunk) < READ and hup:
                short_with_hup = True
                if haproxy:
                    return got, short_with_hup
            time.sleep(0.0005)
    finally:
        ep.close()


@pytest.mark.parametrize("haproxy", [False, True], ids=["eof-at-zero", "haproxy-read0"])
def test_short_read_at_the_switch_comes_with_rdhup(testbed: Testbed, bypass: Bypass,
                                                   haproxy: bool) -> None:
    """The early end of file seen through the mesh, without HAProxy. The writer queues just
    under the default 32 MiB floor, then 32 KiB more (over the floor: they take TCP), then
    SHUT_WR; a slow epoll reader drains the queue. While it does, the TCP bytes and the FIN
    are accepted, so epoll reports RDHUP, and the read that empties the psock queue is short
    (tcp_bpf_recvmsg returns what the psock held without going on into the TCP receive
    queue). A reader that waits for recv() == b"" gets every byte; one that takes a short
    read after RDHUP for the end loses the 32 KiB."""
    p0, p1 = testbed.pods[:2]
    bypass.on()
    assert sockets.status()["rcv_floor_bytes"] == 32 * MB
    queued = 32 * MB - 1000  # not a multiple of READ: the draining read is short
    with connected_pair(p0, p1) as (cl, srv):
        cl.settimeout(30)
        sent = send(cl, 0, queued)
        sent = send(cl, sent, 32 * 1024)
        cl.shutdown(socket.SHUT_WR)
        counters = sockets.status()
        got, short_with_hup = _epoll_reader(srv, haproxy)
    assert counters["fallback_dirs_rcv_lag"] == 1
    assert short_with_hup, "the read that drained the psock queue was not short with RDHUP"
    if haproxy:
        assert got == queued, f"read {got} of {sent}: the early end of file was not seen"
    else:
        assert got == sent
