"""Socket semantics on bypassed sockets equal those on the kernel path.

Every test runs twice (mode = kernel | bypass) with the same assertions; in bypass mode it also
checks that the connection really was redirected."""

from __future__ import annotations

import array
import asyncio
import fcntl
import hashlib
import os
import random
import select
import socket
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.testbed import Testbed

from .conftest import Bypass, connected_pair, delta

pytestmark = pytest.mark.kernel


@pytest.fixture(params=["kernel", "bypass"])
def pair(request: pytest.FixtureRequest, testbed: Testbed,
         bypass: Bypass) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server) pair between pod0 and pod1, bypassed or not."""
    if request.param == "bypass":
        bypass.on()
    before = bypass.counters()
    with connected_pair(*testbed.pods[:2], "v4mapped") as (cl, srv):
        yield cl, srv
    d = delta(before, bypass.counters())
    if request.param == "bypass":
        assert d["inserted"] == 2 and d["redirected_msgs"] > 0 and d["fallback_msgs"] == 0, d
    else:
        assert d["redirected_msgs"] == 0


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def _recv_all(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(1 << 16):
        buf += chunk
    return bytes(buf)


def test_half_close(pair: tuple[socket.socket, socket.socket]) -> None:
    cl, srv = pair
    request = os.urandom(300_000)

    def send() -> None:
        cl.sendall(request)
        cl.shutdown(socket.SHUT_WR)

    th = threading.Thread(target=send)
    th.start()
    got = _recv_all(srv)  # EOF only after every byte
    th.join(10)
    assert got == request
    # The half-closed client still reads the reply.
    srv.sendall(hashlib.sha256(got).digest() + b"bye")
    srv.shutdown(socket.SHUT_WR)
    assert _recv_all(cl) == hashlib.sha256(request).digest() + b"bye"


def test_half_close_then_reply(pair: tuple[socket.socket, socket.socket]) -> None:
    cl, srv = pair
    cl.sendall(b"question")
    cl.shutdown(socket.SHUT_WR)
    assert _recv_all(srv) == b"question"
    srv.sendall(b"answer")
    srv.close()
    assert _recv_all(cl) == b"answer"


def test_msg_peek(pair: tuple[socket.socket, socket.socket]) -> None:
    cl, srv = pair
    cl.sendall(b"hello world")
    assert _wait_readable(srv)
    assert srv.recv(5, socket.MSG_PEEK) == b"hello"
    assert srv.recv(5, socket.MSG_PEEK) == b"hello"  # peeking consumes nothing
    assert _recv_exactly(srv, 11) == b"hello world"


def _wait_readable(s: socket.socket, timeout: float = 5) -> bool:
    return bool(select.select([s], [], [], timeout)[0])


def _fionread(s: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), termios.FIONREAD, buf, True)
    return buf[0]


def test_fionread(pair: tuple[socket.socket, socket.socket]) -> None:
    cl, srv = pair
    assert _fionread(srv) == 0
    cl.sendall(b"x" * 1000)
    deadline = time.monotonic() + 5
    while _fionread(srv) < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _fionread(srv) == 1000
    srv.recv(400)
    assert _fionread(srv) == 600


def test_sendfile(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    cl, srv = pair
    cl.settimeout(None)  # sendfile on a socket with a timeout (O_NONBLOCK inside) gives EAGAIN
    data = random.Random(5).randbytes(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    got = bytearray()
    th = threading.Thread(target=lambda: got.extend(_recv_all(srv)))
    th.start()
    with open(path, "rb") as fh:
        offset = 0
        while offset < len(data):
            offset += os.sendfile(cl.fileno(), fh.fileno(), offset, len(data) - offset)
    cl.shutdown(socket.SHUT_WR)
    th.join(20)
    assert not th.is_alive()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_nonblocking_epoll_ping_pong(pair: tuple[socket.socket, socket.socket]) -> None:
    """Non-blocking sockets, level-triggered epoll, 300 exchanges of 1 B..64 KiB each way."""
    cl, srv = pair
    for s in (cl, srv):
        s.setblocking(False)
    rng = random.Random(9)
    ep = select.epoll()
    ep.register(cl.fileno(), select.EPOLLIN)
    ep.register(srv.fileno(), select.EPOLLIN)
    deadline = time.monotonic() + 20
    try:
        for _ in range(300):
            for tx, rx in ((cl, srv), (srv, cl)):
                msg = rng.randbytes(rng.randint(1, 65536))
                view, got = memoryview(msg), bytearray()
                while len(got) < len(msg):
                    assert time.monotonic() < deadline, "stalled"
                    if view:
                        try:
                            view = view[tx.send(view):]
                        except BlockingIOError:
                            pass
                    for fd, _ev in ep.poll(0.5):
                        if fd == rx.fileno():
                            try:
                                got += rx.recv(1 << 17)
                            except BlockingIOError:
                                pass
                assert bytes(got) == msg
    finally:
        ep.close()


def test_asyncio_streams(pair: tuple[socket.socket, socket.socket]) -> None:
    cl, srv = pair

    async def main() -> None:
        for s in (cl, srv):
            s.setblocking(False)
        cr, cw = await asyncio.open_connection(sock=cl)
        sr, sw = await asyncio.open_connection(sock=srv)

        async def echo() -> None:
            while data := await sr.read(1 << 16):
                sw.write(data)
                await sw.drain()
            sw.close()

        task = asyncio.create_task(echo())
        rng = random.Random(3)
        for _ in range(200):
            msg = rng.randbytes(rng.randint(1, 100_000))
            cw.write(msg)
            await cw.drain()
            assert await cr.readexactly(len(msg)) == msg
        cw.write_eof()
        await task
        assert await cr.read() == b""
        cw.close()

    asyncio.run(asyncio.wait_for(main(), 30))
