"""Flow control of the socket bypass on the real kernel: a receiver that does not read (or
reads slowly) holds its sender back within a bound instead of queueing GBs, node TCP memory
stays below pressure, the node memory guard moves data to the kernel path, and every byte
still arrives in order (bpf/sockmap.c, FLOW CONTROL)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.testbed import Testbed
from node_helper import bpf_abi, sockets
from node_helper.kernel import KernelFeatureError

from .conftest import (
    Bypass,
    assert_nothing_of_ours,
    client_socket,
    connected_pair,
    delta,
    listen,
    next_port,
    target,
    veth_packets,
)
from .streams import PERIOD

pytestmark = pytest.mark.kernel
MB = 1 << 20
TCP_MEM = [int(v) for v in Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()]
_BIG = bytes(range(PERIOD)) * (2 + (4 * MB) // PERIOD)


def _pattern(offset: int, length: int) -> bytes:
    """The stream's bytes [offset, offset + length) (length up to 4 MiB): a prime period, so
    a lost, duplicated or reordered chunk cannot line up again."""
    assert length <= 4 * MB
    start = offset % PERIOD
    return _BIG[start:start + length]


@pytest.fixture(scope="module")
def testbed(bypass_clean: None) -> Iterator[Testbed]:
    """Four pods: the many-connections test needs a pair the others do not use."""
    with Testbed.create(pods=4) as tb:
        yield tb


def node_tcp_mem_pages() -> int:
    """TCP's node-wide memory_allocated in pages (/proc/net/sockstat 'TCP: ... mem N')."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    raise AssertionError("no TCP line in /proc/net/sockstat")


def push_for(socks: list[socket.socket], seconds: float,
             sent: list[int], peak_mem: list[int]) -> None:
    """Write the pattern to every socket (non-blocking) for `seconds`; sent[i] counts."""
    for s in socks:
        s.setblocking(False)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _, writable, _ = select.select([], socks, [], min(left, 0.05))
        for s in writable:
            i = socks.index(s)
            with contextlib.suppress(BlockingIOError):
                sent[i] += s.send(_pattern(sent[i], 64 * 1024))
        peak_mem[0] = max(peak_mem[0], node_tcp_mem_pages())
    for s in socks:
        s.setblocking(True)


def read_and_check(rx: socket.socket, nbytes: int, start: int = 0) -> None:
    """Read exactly nbytes and check they continue the pattern at `start`, in order."""
    got = 0
    rx.settimeout(30)
    while got < nbytes:
        chunk = rx.recv(min(1 << 20, nbytes - got))
        assert chunk, f"EOF after {got} of {nbytes} bytes"
        assert chunk == _pattern(start + got, len(chunk)), f"wrong bytes at {start + got}"
        got += len(chunk)


def test_never_reading_peer_holds_the_sender_back(testbed: Testbed, bypass: Bypass) -> None:
    """Side by side: kernel path, then bypass; 3 s of writing to a peer that does not read."""
    p0, p1 = testbed.pods[:2]
    accepted, peaks = {}, {}
    for mode in ("kernel", "bypass"):
        if mode == "bypass":
            bypass.on()
        before = bypass.counters()
        with connected_pair(p0, p1) as (cl, srv):
            sent, peak = [0], [node_tcp_mem_pages()]
            push_for([cl], 3.0, sent, peak)
            accepted[mode], peaks[mode] = sent[0], peak[0]
            read_and_check(srv, sent[0])  # now the peer reads: all of it, in order
            d = delta(before, bypass.counters())
        print(f"\n{mode}: accepted {sent[0] / MB:.1f} MB in 3 s; node TCP memory peak "
              f"{peak[0]} pages (tcp_mem[0] = {TCP_MEM[0]}); counters {d}")
    # The bound, plus what the kernel path holds after the switch (rcvbuf + sndbuf).
    assert accepted["bypass"] < sockets.DEFAULT_RCV_FLOOR_BYTES + 16 * MB, accepted
    assert peaks["bypass"] < TCP_MEM[0], peaks
    assert d["redirected_bytes"] > 1 * MB  # the bypass carried the start of the stream
    assert d["fallback_dirs_rcv_lag"] == 1 and d["fallback_dirs_node_mem"] == 0, d
    assert d["fallback_dirs"] == 0, d  # no miss


def test_slow_reader_under_a_fast_writer(testbed: Testbed, bypass: Bypass) -> None:
    """Reader: 64 KiB every 10 ms; writer: as fast as it can. Bounded and in order.

    A 4 MiB floor (a setting) keeps the test short: the default would need 32 MiB of
    6.4 MB/s reading before the switch."""
    p0, p1 = testbed.pods[:2]
    total = 24 * MB
    bypass.on(rcv_floor_bytes=4 * MB)
    before = bypass.counters()
    state = {"sent": 0, "read": 0, "max_ahead": 0, "error": None}

    def writer(tx: socket.socket) -> None:
        try:
            while state["sent"] < total:
                n = min(256 * 1024, total - state["sent"])
                tx.sendall(_pattern(state["sent"], n))
                state["sent"] += n
                state["max_ahead"] = max(state["max_ahead"], state["sent"] - state["read"])
        except OSError as exc:
            state["error"] = f"send: {exc}"

    with connected_pair(p0, p1) as (cl, srv):
        cl.settimeout(60)
        th = threading.Thread(target=writer, args=(cl,))
        th.start()
        srv.settimeout(30)
        while state["read"] < total:
            chunk = srv.recv(64 * 1024)
            assert chunk, "early EOF"
            assert chunk == _pattern(state["read"], len(chunk)), f"wrong bytes at {state['read']}"
            state["read"] += len(chunk)
            time.sleep(0.01)
        th.join(30)
        assert not th.is_alive() and state["error"] is None, state
    d = delta(before, bypass.counters())
    print(f"\nslow reader: writer at most {state['max_ahead'] / MB:.1f} MB ahead; {d}")
    assert state["max_ahead"] < 4 * MB + 16 * MB, state
    assert d["redirected_bytes"] > 1 * MB and d["fallback_dirs_rcv_lag"] == 1, d


def test_many_connections_to_non_reading_peers(testbed: Testbed, bypass: Bypass) -> None:
    """200 connections write to peers that do not read: node TCP memory stays below pressure
    (the per-connection bound, then the node guard), and two other pods still talk."""
    p0, p1, p2, p3 = testbed.pods[:4]
    n = 200
    bypass.on(pods=4)
    before = bypass.counters()
    port = next_port()
    ls = listen(p1, "ipv4", port, backlog=n + 8)
    clients, servers = [], []
    try:
        for _ in range(n):
            cl = client_socket(p0, "ipv4")
            clients.append(cl)
            cl.settimeout(10)
            cl.connect(target(p1, "ipv4", port))
            servers.append(ls.accept()[0])
        sent, peak = [0] * n, [node_tcp_mem_pages()]
        push_for(clients, 4.0, sent, peak)
        mid = delta(before, bypass.counters())
        # Another pair, while the 200 are stuck: works, every byte in order.
        with connected_pair(p2, p3) as (a, b):
            th = threading.Thread(target=lambda: [a.sendall(_pattern(off, MB))
                                                  for off in range(0, 8 * MB, MB)])
            th.start()
            read_and_check(b, 8 * MB)
            th.join(10)
        for srv, count in zip(servers, sent, strict=True):
            read_and_check(srv, count)
    finally:
        for s in clients + servers + [ls]:
            s.close()
    print(f"\n{n} connections: {sum(sent) / MB:.0f} MB accepted in 4 s, node TCP memory peak "
          f"{peak[0]} pages (limit {sockets.status()['node_mem_limit_pages']}, tcp_mem "
          f"{TCP_MEM}); counters {mid}")
    assert peak[0] < TCP_MEM[0], (peak, TCP_MEM)
    assert mid["redirected_bytes"] > n * 64 * 1024, mid
    assert mid["fallback_dirs_rcv_lag"] + mid["fallback_dirs_node_mem"] >= n * 0.9, mid


def test_node_memory_guard_moves_data_to_the_kernel_path(testbed: Testbed,
                                                           bypass: Bypass) -> None:
    p0, p1 = testbed.pods[:2]
    bypass.on()
    assert sockets.status()["node_mem_limit_pages"] == TCP_MEM[0] // 2
    before = bypass.counters()
    with connected_pair(p0, p1) as (cl, srv):
        cl.sendall(_pattern(0, 1 * MB))  # bypassed; left unread across the switch
        mid = delta(before, bypass.counters())
        assert mid["redirected_bytes"] == 1 * MB and mid["fallback_msgs"] == 0, mid
        # Any TCP memory at all is now "near pressure".
        assert sockets.set_flow_limits(node_mem_limit_pages=1)["node_mem_limit_pages"] == 1
        assert sockets.status()["node_mem_limit_pages"] == 1
        veth_before = veth_packets(testbed, p0, p1)
        th = threading.Thread(target=lambda: cl.sendall(_pattern(1 * MB, 4 * MB)))
        th.start()
        read_and_check(srv, 5 * MB)  # the redirected MB first, then the TCP bytes, in order
        th.join(10)
        veth = veth_packets(testbed, p0, p1) - veth_before
        d = delta(before, bypass.counters())
        # The other direction still works (bypassed, or moved if TCP memory is > 1 page then:
        # the node-wide count can be near 0 once the 5 MB are read, per-CPU caches aside).
        srv.sendall(b"back")
        assert cl.recv(16) == b"back"
    assert d["fallback_dirs_node_mem"] == 1 and d["fallback_dirs_rcv_lag"] == 0, d
    # A sender reads the node's TCP memory again after NODE_MEM_RECHECK_BYTES: up to that
    # much (plus the message at hand, at most 64 KiB here) is still redirected after the change.
    recheck = bpf_abi.constant("NODE_MEM_RECHECK_BYTES")
    assert 1 * MB <= d["redirected_bytes"] <= 1 * MB + recheck + 64 * 1024, d
    assert d["fallback_msgs"] >= 1, d
    assert veth > 60, f"only {veth} packets on the veths: the 4 MB did not take TCP"


def test_missing_kernel_member_refuses_to_start(testbed: Testbed, bypass: Bypass,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sockets.KERNEL_MEMBERS, "NA_OFF_SK_RCVBUF",
                        ("sock", "sk_no_such_member", 4))
    with pytest.raises(KernelFeatureError, match="sk_no_such_member"):
        bypass.on()
    assert_nothing_of_ours()


def test_bad_flow_settings(testbed: Testbed, bypass: Bypass) -> None:
    with pytest.raises(KernelFeatureError, match="not enabled"):
        sockets.set_flow_limits(node_mem_limit_pages=10)
    with pytest.raises(ValueError, match="node_mem_limit_pages"):
        sockets.enable(testbed.pod_cidrs(), node_mem_limit_pages=-1)
    st = sockets.enable(testbed.pod_cidrs(), rcv_floor_bytes=1 << 20)
    assert st["rcv_floor_bytes"] == 1 << 20 and st["node_mem_limit_pages"] == TCP_MEM[0] // 2
