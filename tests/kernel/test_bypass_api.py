"""The socket API on bypassed sockets, side by side with the kernel path (docs/socket-api.md).

Every test runs with mode = kernel | bypass and the same assertions; in bypass mode the `pair`
fixture also checks that the connection really was redirected. Where the bypass differs in a
harmless way the test says so explicitly (`if p.bypass:`) and docs/socket-api.md explains it.
Rows already covered by test_bypass_semantics.py (MSG_PEEK, FIONREAD, sendfile from a file,
SHUT_WR both ways, level-triggered epoll) are not repeated here; the splice-like readers are
in test_bypass_splice.py."""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import random
import re
import select
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from lab.testbed import Testbed
from node_helper.kernel import netns_argv

from . import native
from .conftest import Bypass, connected_pair, delta, next_port

pytestmark = pytest.mark.kernel

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
SO_EE_ORIGIN_ZEROCOPY = 5
SIOCOUTQ = termios.TIOCOUTQ
SIOCOUTQNSD = 0x894B
POLLRDHUP = 0x2000
MSG_WAITFORONE = 0x10000
IP_RECVERR, IPV6_RECVERR = 11, 25


@dataclass
class Pair:
    cl: socket.socket  # in pod0
    srv: socket.socket  # accepted in pod1
    mode: str
    port: int
    tb: Testbed

    @property
    def bypass(self) -> bool:
        return self.mode == "bypass"


@pytest.fixture(params=["kernel", "bypass"])
def p(request: pytest.FixtureRequest, testbed: Testbed, bypass: Bypass) -> Iterator[Pair]:
    """A connected (client, server) pair between pod0 and pod1, bypassed or not."""
    if request.param == "bypass":
        bypass.on()
    before = bypass.counters()
    port = next_port()
    with connected_pair(*testbed.pods[:2], "v4mapped", port=port) as (cl, srv):
        yield Pair(cl, srv, request.param, port, testbed)
    d = delta(before, bypass.counters())
    if request.param == "bypass":
        assert d["inserted"] == 2 and d["redirected_msgs"] > 0, d
    else:
        assert d["redirected_msgs"] == 0


def _pieces(data: bytes, seed: int = 1) -> Iterator[bytes]:
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        n = rng.randint(1, 200_000)
        yield data[i:i + n]
        i += n


def _send_then_close(s: socket.socket, data: bytes, delay: float = 0) -> threading.Thread:
    def run() -> None:
        for piece in _pieces(data):
            s.sendall(piece)
            if delay:
                time.sleep(delay)
        s.shutdown(socket.SHUT_WR)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def _recv_all(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(1 << 16):
        buf += chunk
    return bytes(buf)


def _ioctl_int(s: socket.socket, req: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), req, buf, True)
    return buf[0]


def _wait_for(cond: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --- readers: read / recv / recv_into / recvmsg / recvmsg_into / recvmmsg / readv ---------

class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int,
                           ctypes.c_void_p]


def recvmmsg(fd: int, vlen: int = 4, size: int = 16384) -> list[bytes]:
    """recvmmsg(2) with MSG_WAITFORONE: blocks for the first message only. At end of file
    every returned message is empty."""
    bufs = [ctypes.create_string_buffer(size) for _ in range(vlen)]
    iovs = (_Iovec * vlen)(*(_Iovec(ctypes.addressof(b), size) for b in bufs))
    msgs = (_Mmsghdr * vlen)()
    for i in range(vlen):
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1
    n = _libc.recvmmsg(fd, msgs, vlen, MSG_WAITFORONE, None)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return [bufs[i].raw[:msgs[i].len] for i in range(n)]


def _read_with(reader: str, s: socket.socket) -> bytes:
    buf = bytearray()
    fd = s.fileno()
    while True:
        if reader == "read":
            chunk = os.read(fd, 65536)
        elif reader == "recv":
            chunk = s.recv(65536)
        elif reader == "recv_into":
            b = bytearray(65536)
            chunk = bytes(b[:s.recv_into(b)])
        elif reader == "recvmsg":
            chunk = s.recvmsg(65536)[0]
        elif reader == "recvmsg_into":
            a, b = bytearray(1000), bytearray(30000)
            n = s.recvmsg_into([a, b])[0]
            chunk = bytes((a + b)[:n])
        elif reader == "readv":
            a, b = bytearray(7), bytearray(40000)
            n = os.readv(fd, [a, b])
            chunk = bytes((a + b)[:n])
        else:
            chunk = b"".join(recvmmsg(fd))
        if not chunk:
            return bytes(buf)
        buf += chunk


@pytest.mark.parametrize("reader", ["read", "recv", "recv_into", "recvmsg", "recvmsg_into",
                                    "recvmmsg", "readv"])
def test_readers(p: Pair, reader: str) -> None:
    data = random.Random(reader).randbytes(2 * 1024 * 1024 + 11)
    p.srv.setblocking(True)  # os.read/readv/recvmmsg need a blocking fd
    th = _send_then_close(p.cl, data)
    assert _read_with(reader, p.srv) == data
    th.join(5)


# --- recv flags ---------------------------------------------------------------------------

def test_msg_waitall_reader_first(p: Pair) -> None:
    """MSG_WAITALL returns the whole request in one call, even when it arrives in pieces; at
    end of file it returns what there is. The reader waits before the data comes (the usual
    "read a fixed-size record" loop): identical on the bypass, whose guard moves the sender
    to TCP when the read starts (bpf/sockmap.c, rule 9)."""
    p.cl.sendall(b"hi")  # one redirected message first: the connection is bypassed
    assert p.srv.recv(2) == b"hi"
    data = random.Random(2).randbytes(300_000)
    p.srv.setblocking(True)  # with a timeout Python polls, then recvs without blocking
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(p.srv.recv(len(data), socket.MSG_WAITALL)))
    reader.start()
    time.sleep(0.2)  # the reader is waiting before the first piece is sent
    for i in range(0, len(data), 30_000):
        p.cl.sendall(data[i:i + 30_000])
        time.sleep(0.01)
    reader.join(10)
    assert got and len(got[0]) == len(data), f"MSG_WAITALL returned {len(got[0])} bytes"
    assert got[0] == data
    p.cl.sendall(b"tail")
    p.cl.shutdown(socket.SHUT_WR)
    assert p.srv.recv(100, socket.MSG_WAITALL) == b"tail"


def test_msg_waitall_after_bytes_were_queued(p: Pair) -> None:
    """Bytes already redirected when a MSG_WAITALL read starts: the kernel path returns the
    whole request; on the bypass that one read returns early with what was queued
    (tcp_bpf_recvmsg does not wait for all, and no hook here can make it), the guard moves
    the sender to TCP, and every later MSG_WAITALL read is full. Never a byte lost or out of
    order (docs/socket-api.md)."""
    data = random.Random(3).randbytes(300_000)
    p.cl.sendall(data[:30_000])
    time.sleep(0.1)  # queued at the receiver before its read starts
    p.srv.setblocking(True)
    sender = threading.Thread(target=lambda: [
        (p.cl.sendall(data[i:i + 30_000]), time.sleep(0.01))
        for i in range(30_000, len(data), 30_000)])
    sender.start()
    first = p.srv.recv(len(data), socket.MSG_WAITALL)
    if p.mode == "kernel":
        assert len(first) == len(data)
    else:
        # the early return, once: what was queued (the sender may have added a piece
        # before the read took the guard's flag), not the whole request
        assert 30_000 <= len(first) < len(data), len(first)
    rest = p.srv.recv(len(data) - len(first), socket.MSG_WAITALL) if len(first) < len(data) else b""
    assert len(rest) == len(data) - len(first)  # full: now served by TCP
    sender.join(10)
    assert first + rest == data


def test_msg_dontwait(p: Pair) -> None:
    p.srv.setblocking(True)
    with pytest.raises(BlockingIOError):
        p.srv.recv(100, socket.MSG_DONTWAIT)
    p.cl.sendall(b"12345")
    assert select.select([p.srv], [], [], 5)[0]
    assert p.srv.recv(100, socket.MSG_DONTWAIT) == b"12345"
    with pytest.raises(BlockingIOError):
        p.srv.recv(100, socket.MSG_DONTWAIT)
    p.cl.shutdown(socket.SHUT_WR)
    assert select.select([p.srv], [], [], 5)[0]
    assert p.srv.recv(100, socket.MSG_DONTWAIT) == b""


# --- send side: MSG_ZEROCOPY, MSG_MORE / TCP_CORK, TCP_NODELAY -----------------------------

def _zerocopy_completions(s: socket.socket, want: int, timeout: float) -> tuple[set[int], set]:
    """Sequence numbers completed on the error queue (and the ee_codes seen)."""
    done: set[int] = set()
    codes: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(done) < want and time.monotonic() < deadline:
        select.select([], [], [s], 0.05)  # errors raise POLLERR
        try:
            _, anc, _, _ = s.recvmsg(0, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        for level, typ, cdata in anc:
            assert (level, typ) in ((socket.SOL_IP, IP_RECVERR),
                                    (socket.IPPROTO_IPV6, IPV6_RECVERR))
            ee_errno, origin, _type, code, _pad, lo, hi = struct.unpack_from("=IBBBBII", cdata)
            assert ee_errno == 0 and origin == SO_EE_ORIGIN_ZEROCOPY
            done.update(range(lo, hi + 1))
            codes.add(code)
    return done, codes


def test_msg_zerocopy(p: Pair) -> None:
    """SO_ZEROCOPY + MSG_ZEROCOPY: every send is completed on the error queue (the
    application may reuse its buffer only then), and the bytes arrive.

    On the bypass (bpf/sockmap.c, rule 12) the setsockopt moves the socket's sends to TCP at
    once and the socket then leaves the sockhash (the demoter runs, as in the agent). While
    it is still in the sockhash, tcp_bpf pushes a send to TCP one page fragment (<= 32 KiB)
    at a time and each push completes with its own id: all completions arrive, ids stay
    contiguous, but a 64 KiB send may take two. Once it left: one id per send, as on the
    kernel path. Leaving moves the other direction to TCP too (nothing can be redirected
    into a socket outside the sockhash: sockmap.c, DEMOTION)."""
    from node_helper import demote, sockets

    p.srv.sendall(b"hello")  # the reverse direction: redirected on the bypass
    assert p.cl.recv(5) == b"hello"
    stop = threading.Event()
    demoter = threading.Thread(target=demote.run, args=(stop,), daemon=True)
    if p.bypass:
        demoter.start()
    p.cl.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    p.cl.setblocking(True)  # with a timeout, Python would wait for POLLIN before MSG_ERRQUEUE
    rng = random.Random(4)
    sent = bytearray()
    got = bytearray()
    th = threading.Thread(target=lambda: got.extend(_recv_all(p.srv)), daemon=True)
    th.start()

    buffers = []  # zerocopy: a buffer must live (unchanged) until its completion

    def send(n: int, size: int) -> int:
        sends = 0
        for _ in range(n):
            buffers.append(rng.randbytes(size))
            view = memoryview(buffers[-1])
            sent.extend(view)
            while view:
                view = view[p.cl.sendmsg([view], [], MSG_ZEROCOPY):]
                sends += 1
        return sends

    def left_sockhash() -> bool:
        return not p.bypass or sockets.read_demote_counters()["demoted"] >= 1

    try:
        # 1. Right after the setsockopt: every send completed, ids contiguous from 0.
        first = send(8, 65536)
        done, _ = _zerocopy_completions(p.cl, first, 2)
        ids = len(done)
        assert done == set(range(ids)) and ids >= first, f"{sorted(done)} for {first} sends"
        if not p.bypass:
            assert ids == first
        # 2. Keep sending (the demotion's last step watches the sender's own queue) until
        #    the socket left the sockhash.
        deadline = time.monotonic() + 5
        while not left_sockhash() and time.monotonic() < deadline:
            ids += send(1, 4096)
            time.sleep(0.01)
        assert left_sockhash(), "the zerocopy sender did not leave the sockhash in 5 s"
        more, _ = _zerocopy_completions(p.cl, 1 << 30, 0.3)  # the rest of phase 2 (any)
        done |= more
        ids = max(done) + 1
        assert done == set(range(ids))
        # 3. Identical to the kernel path: one id per send.
        later = send(8, 65536)
        done, _ = _zerocopy_completions(p.cl, later, 2)
        assert done == set(range(ids, ids + later)), f"{sorted(done)} for {later} sends"
    finally:
        stop.set()
        if demoter.is_alive():
            demoter.join(5)
    p.cl.shutdown(socket.SHUT_WR)
    th.join(5)
    assert bytes(got) == bytes(sent)
    p.srv.sendall(b"bye")  # the reverse direction still works (on TCP since the demotion)
    assert p.cl.recv(3) == b"bye"
    if p.bypass:
        st = sockets.status()
        assert st["fallback_dirs_zerocopy"] == 1 and st["fallback_dirs_demote"] == 1, st
        assert st["redirected_msgs"] == 1 and st["demoted"] == 1, st  # only "hello"


def test_msg_more_and_tcp_cork(p: Pair) -> None:
    """Corked data arrives complete and in order once the cork is pulled (or the last send has
    no MSG_MORE). The kernel path holds partial frames back; the bypass hands each send over at
    once (earlier, never later)."""
    held: dict[str, bool] = {}
    p.cl.sendall(b"a" * 100, socket.MSG_MORE)
    held["msg_more"] = not select.select([p.srv], [], [], 0.05)[0]
    p.cl.sendall(b"b" * 100)
    got = bytearray()
    t0 = time.monotonic()
    while len(got) < 200:
        got += p.srv.recv(1000)
    assert got == b"a" * 100 + b"b" * 100 and time.monotonic() - t0 < 1

    p.cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    for piece in (b"x" * 10, b"y" * 20, b"z" * 30):
        p.cl.sendall(piece)
    held["tcp_cork"] = not select.select([p.srv], [], [], 0.05)[0]
    p.cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    got = bytearray()
    t0 = time.monotonic()
    while len(got) < 60:
        got += p.srv.recv(1000)
    assert got == b"x" * 10 + b"y" * 20 + b"z" * 30 and time.monotonic() - t0 < 0.1
    if p.bypass:
        assert held == {"msg_more": False, "tcp_cork": False}
    else:
        assert held == {"msg_more": True, "tcp_cork": True}


def test_tcp_nodelay(p: Pair) -> None:
    for s in (p.cl, p.srv):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    t0 = time.monotonic()
    for i in range(300):
        p.cl.sendall(bytes([i % 256]))
        assert p.srv.recv(1) == bytes([i % 256])
        p.srv.sendall(b"k")
        assert p.cl.recv(1) == b"k"
    assert time.monotonic() - t0 < 2


# --- receive side: SO_RCVLOWAT, SIOCINQ / SIOCOUTQ ------------------------------------------

def test_so_rcvlowat(p: Pair) -> None:
    """Below SO_RCVLOWAT the kernel path reports no POLLIN and recv waits; the bypass reports
    the socket readable as soon as any redirected byte is queued and recv returns it. Above the
    mark both are readable and the bytes are the same."""
    p.srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1000)
    p.cl.sendall(b"a" * 500)
    assert _wait_for(lambda: _ioctl_int(p.srv, termios.FIONREAD) == 500)
    pl = select.poll()
    pl.register(p.srv, select.POLLIN)
    readable_below = bool(pl.poll(100))
    p.srv.settimeout(0.2)
    try:
        first = p.srv.recv(2000)
    except TimeoutError:
        first = b""
    p.srv.settimeout(5)
    p.cl.sendall(b"b" * 600)
    assert pl.poll(2000)
    got = first
    while len(got) < 1100:
        got += p.srv.recv(2000)
    assert got == b"a" * 500 + b"b" * 600
    if p.bypass:
        assert readable_below and first == b"a" * 500
    else:
        assert not readable_below and first == b""


def test_siocinq_siocoutq(p: Pair) -> None:
    """Bytes sent to a reader that is not reading are in the sender's SIOCOUTQ or the
    receiver's SIOCINQ (FIONREAD), never lost between the two; SIOCOUTQNSD <= SIOCOUTQ. The
    kernel path may keep some unacknowledged; the bypass keeps none (SIOCOUTQ 0)."""
    size = 256 * 1024
    p.cl.sendall(random.Random(6).randbytes(size))

    def settled() -> bool:
        return _ioctl_int(p.cl, SIOCOUTQ) + _ioctl_int(p.srv, termios.FIONREAD) == size
    assert _wait_for(settled, 5)
    assert _ioctl_int(p.cl, SIOCOUTQNSD) <= _ioctl_int(p.cl, SIOCOUTQ)
    if p.bypass:
        assert _ioctl_int(p.cl, SIOCOUTQ) == 0 and _ioctl_int(p.srv, termios.FIONREAD) == size
    got = bytearray()
    while len(got) < size:
        got += p.srv.recv(1 << 16)
    assert _wait_for(lambda: _ioctl_int(p.cl, SIOCOUTQ) == 0, 5)
    assert _ioctl_int(p.srv, termios.FIONREAD) == 0


# --- TCP_INFO (what `ss -ti` shows) ----------------------------------------------------------

def _tcp_info(s: socket.socket) -> dict[str, int]:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    bytes_acked, bytes_received = struct.unpack_from("=QQ", raw, 120)
    segs_out, segs_in = struct.unpack_from("=II", raw, 136)
    data_segs_in, data_segs_out = struct.unpack_from("=II", raw, 152)
    (bytes_sent,) = struct.unpack_from("=Q", raw, 200)
    return {"bytes_acked": bytes_acked, "bytes_received": bytes_received, "segs_out": segs_out,
            "segs_in": segs_in, "data_segs_in": data_segs_in, "data_segs_out": data_segs_out,
            "bytes_sent": bytes_sent}


def _ss_bytes_received(p: Pair) -> int:
    """bytes_received of the server socket as `ss -ti` in pod1 prints it (0 when absent)."""
    out = subprocess.run(netns_argv(p.tb.pods[1].netns, ["ss", "-tinH", f"sport = :{p.port}"]),
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return max((int(n) for n in re.findall(r"bytes_received:(\d+)", out)), default=0)


def test_tcp_info_counters(p: Pair) -> None:
    """The kernel path counts the payload in TCP_INFO; the bypass carries it outside TCP, so
    the byte and data-segment counters stay at their handshake values (ss -ti shows none of
    the traffic). State, RTT and the rest are the handshake's."""
    size = 1024 * 1024
    th = _send_then_close(p.cl, random.Random(7).randbytes(size))
    assert len(_recv_all(p.srv)) == size
    th.join(5)
    time.sleep(0.05)  # the final ACKs
    c, s = _tcp_info(p.cl), _tcp_info(p.srv)
    ss_received = _ss_bytes_received(p)
    if p.bypass:
        assert c["bytes_acked"] <= 2 and c["bytes_sent"] == 0 and c["data_segs_out"] == 0, c
        # bytes_received counts sequence space: the FIN is its 1
        assert s["bytes_received"] <= 1 and s["data_segs_in"] == 0, s
        assert ss_received <= 1
    else:
        assert c["bytes_acked"] >= size and c["bytes_sent"] >= size and c["data_segs_out"] > 0
        assert s["bytes_received"] >= size and s["data_segs_in"] > 0, s
        assert ss_received >= size


# --- shutdown, SO_LINGER 0 -----------------------------------------------------------------

@pytest.mark.parametrize("side", ["client", "server"])
def test_shutdown_rd(p: Pair, side: str) -> None:
    """After SHUT_RD, recv no longer blocks: it returns bytes already queued, then b"" (Linux
    keeps accepting the peer's data; nothing is sent to the peer)."""
    me, peer = (p.cl, p.srv) if side == "client" else (p.srv, p.cl)
    peer.sendall(b"q" * 100)
    assert _wait_for(lambda: _ioctl_int(me, termios.FIONREAD) == 100)
    me.shutdown(socket.SHUT_RD)
    me.settimeout(1)
    assert me.recv(1000) == b"q" * 100
    assert me.recv(1000) == b""
    peer.sendall(b"after")  # no error for the peer
    me.sendall(b"still writing")  # the other direction is open
    assert peer.recv(100) == b"still writing"


@pytest.mark.parametrize("side", ["client", "server"])
def test_shutdown_rdwr(p: Pair, side: str) -> None:
    me, peer = (p.cl, p.srv) if side == "client" else (p.srv, p.cl)
    me.sendall(b"last words")
    me.shutdown(socket.SHUT_RDWR)
    assert _recv_all(peer) == b"last words"
    with pytest.raises(BrokenPipeError):
        me.send(b"x")
    assert me.recv(100) == b""


@pytest.mark.parametrize("side", ["client", "server"])
def test_send_after_shut_wr(p: Pair, side: str) -> None:
    """A send after shutdown(SHUT_WR) fails with EPIPE, and the peer never sees bytes after
    its end of file."""
    me, peer = (p.cl, p.srv) if side == "client" else (p.srv, p.cl)
    me.sendall(b"last words")
    me.shutdown(socket.SHUT_WR)
    assert _recv_all(peer) == b"last words"
    try:
        sent = me.send(b"after eof")
    except BrokenPipeError:
        sent = -1
    time.sleep(0.05)
    peer.setblocking(False)
    try:
        late = peer.recv(100)
    except BlockingIOError:
        late = b"(nothing: EAGAIN)"
    assert (sent, late) == (-1, b""), f"send returned {sent}; the peer then read {late!r}"


@pytest.mark.parametrize("unread", [False, True], ids=["read", "unread"])
def test_so_linger_zero(p: Pair, unread: bool) -> None:
    """close() with SO_LINGER {1, 0} resets: the peer sees ECONNRESET, after the bytes it had
    not read yet (Linux keeps the receive queue of a reset socket)."""
    p.cl.sendall(b"d" * 1000)
    if not unread:
        assert p.srv.recv(1000, socket.MSG_WAITALL) == b"d" * 1000
    else:
        assert _wait_for(lambda: _ioctl_int(p.srv, termios.FIONREAD) == 1000)
    p.cl.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.cl.close()
    t0 = time.monotonic()
    got = bytearray()
    with pytest.raises(ConnectionResetError):
        while chunk := p.srv.recv(4096):
            got += chunk
    assert time.monotonic() - t0 < 1
    assert got == (b"d" * 1000 if unread else b"")
    with pytest.raises(OSError) as e:
        p.srv.sendall(b"x")
    assert e.value.errno in (errno.EPIPE, errno.ECONNRESET)


# --- io_uring recv / send ------------------------------------------------------------------

def test_io_uring_recv(p: Pair) -> None:
    data = random.Random(8).randbytes(2 * 1024 * 1024 + 3)
    p.srv.setblocking(True)
    proc = subprocess.Popen([str(native.uring()), "recv", str(p.srv.fileno())],
                            pass_fds=[p.srv.fileno()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        th = _send_then_close(p.cl, data)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    th.join(5)
    assert proc.returncode == 0, err
    assert out == data


def test_io_uring_recv_waitall(p: Pair) -> None:
    """IORING_OP_RECV with MSG_WAITALL, bytes already queued when it starts (the case where
    recv(2) returns early on the bypass): io_uring retries a short read of a stream socket
    itself, so the one request completes with the whole length, as on the kernel path. No
    guard needed (bpf/sockmap.c, rule 8b); nothing moves to TCP."""
    data = random.Random(10).randbytes(300_000)
    p.cl.sendall(data[:30_000])
    time.sleep(0.1)  # queued at the receiver before the request is submitted
    p.srv.setblocking(True)
    before = Bypass.counters()
    proc = subprocess.Popen([str(native.uring()), "recv-waitall", str(p.srv.fileno()),
                             str(len(data))], pass_fds=[p.srv.fileno()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.2)  # the request is waiting for the rest
        for i in range(30_000, len(data), 30_000):
            p.cl.sendall(data[i:i + 30_000])
            time.sleep(0.01)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out == data, f"one IORING_OP_RECV with MSG_WAITALL returned {len(out)} bytes"
    if p.bypass:
        d = delta(before, Bypass.counters())
        assert d["splice_seen"] == 0 and d["fallback_dirs_splice"] == 0, d


def test_io_uring_send(p: Pair) -> None:
    data = random.Random(9).randbytes(2 * 1024 * 1024 + 5)
    p.cl.setblocking(True)
    got = bytearray()
    th = threading.Thread(target=lambda: got.extend(_recv_all(p.srv)), daemon=True)
    th.start()
    proc = subprocess.Popen([str(native.uring()), "send", str(p.cl.fileno())],
                            pass_fds=[p.cl.fileno()], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(data, timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    p.cl.shutdown(socket.SHUT_WR)
    th.join(10)
    assert bytes(got) == data


# --- readiness: epoll edge/level, select/poll with POLLRDHUP --------------------------------

def test_epoll_edge_and_level(p: Pair) -> None:
    p.srv.setblocking(False)
    et, lt = select.epoll(), select.epoll()
    try:
        et.register(p.srv.fileno(), select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP)
        lt.register(p.srv.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        assert et.poll(0.05) == [] and lt.poll(0) == []
        p.cl.sendall(b"1" * 100)
        assert et.poll(2) == [(p.srv.fileno(), select.EPOLLIN)]
        assert et.poll(0.1) == []  # edge: reported once
        assert lt.poll(0) == [(p.srv.fileno(), select.EPOLLIN)]  # level: until read
        assert lt.poll(0) == [(p.srv.fileno(), select.EPOLLIN)]
        p.cl.sendall(b"2" * 100)  # new data: a new edge, though the old is unread
        assert et.poll(2) == [(p.srv.fileno(), select.EPOLLIN)]
        got = bytearray()
        with pytest.raises(BlockingIOError):
            while True:
                got += p.srv.recv(1 << 16)
        assert got == b"1" * 100 + b"2" * 100
        assert et.poll(0.1) == [] and lt.poll(0) == []
        p.cl.shutdown(socket.SHUT_WR)
        hup = select.EPOLLIN | select.EPOLLRDHUP
        assert et.poll(2) == [(p.srv.fileno(), hup)]
        assert lt.poll(0) == [(p.srv.fileno(), hup)]
        assert p.srv.recv(100) == b""
    finally:
        et.close()
        lt.close()


def test_select_poll_pollrdhup(p: Pair) -> None:
    pl = select.poll()
    pl.register(p.srv, select.POLLIN | POLLRDHUP)
    assert pl.poll(50) == [] and select.select([p.srv], [], [], 0.05)[0] == []
    p.cl.sendall(b"data")
    assert _wait_for(lambda: bool(pl.poll(0)))
    assert pl.poll(0) == [(p.srv.fileno(), select.POLLIN)]
    assert select.select([p.srv], [], [], 0)[0] == [p.srv]
    p.cl.shutdown(socket.SHUT_WR)
    assert _wait_for(lambda: pl.poll(0) == [(p.srv.fileno(), select.POLLIN | POLLRDHUP)], 2)
    assert select.select([p.srv], [], [], 0)[0] == [p.srv]
    assert _recv_all(p.srv) == b"data"
    assert pl.poll(0) == [(p.srv.fileno(), select.POLLIN | POLLRDHUP)]
