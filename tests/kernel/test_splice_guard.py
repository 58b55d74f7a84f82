"""The splice guard (bpf/sockmap.c, rules 8-10; node_helper/splice_guard.py) on the real kernel.

A reader that splices a bypassed socket either gets every byte (its sender switched to TCP
before anything was redirected) or an immediate error (the connection is reset), never a
hang or a short stream; afterwards its workload runs on TCP from the first byte.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lab.testbed import Testbed
from node_helper import sockets, splice_guard

from .conftest import (
    FAMILIES,
    Bypass,
    client_socket,
    connected_pair,
    delta,
    listen,
    next_port,
    splice_guard_running,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]
MB = 1 << 20


def pattern(offset: int, length: int) -> bytes:
    period = bytes(range(251))
    start = offset % 251
    reps = (start + length) // 251 + 1
    return (period * reps)[start:start + length]


def splice_all(sock: socket.socket, want: int, deadline: float) -> tuple[bytes, int | None]:
    """Read with os.splice through a pipe until `want` bytes, EOF, an error or the deadline:
    (bytes read, errno or None). Non-blocking so that a hang ends at the deadline."""
    r, w = os.pipe()
    sock.setblocking(False)
    got = bytearray()
    try:
        while len(got) < want and time.monotonic() < deadline:
            try:
                n = os.splice(sock.fileno(), w, 1 << 16)
            except BlockingIOError:
                time.sleep(0.002)
                continue
            except OSError as exc:
                return bytes(got), exc.errno
            if n == 0:
                return bytes(got), None  # end of file
            got += os.read(r, n)
        return bytes(got), None
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture
def guard() -> Iterator[list[dict]]:
    """The user-space half running, as in the agent; yields the events it handled."""
    with splice_guard_running() as handled:
        yield handled


@pytest.mark.parametrize("family", FAMILIES)
def test_splice_from_the_first_byte_gets_every_byte(testbed: Testbed, bypass: Bypass,
                                                    guard: list, family: str) -> None:
    bypass.on()
    before = bypass.counters()
    with connected_pair(*testbed.pods[:2], family) as (cl, srv):
        result: dict = {}

        def read() -> None:
            result["data"], result["err"] = splice_all(srv, 4 * MB, time.monotonic() + 10)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.2)  # the reader is in splice before the first byte is sent
        cl.sendall(pattern(0, 4 * MB))
        reader.join(15)
    d = delta(before, bypass.counters())
    assert result["err"] is None and result["data"] == pattern(0, 4 * MB)
    assert d["splice_safe"] >= 1 and d["fallback_dirs_splice"] == 1, d
    assert d["splice_doomed"] == 0 and guard == [], d


def test_splice_after_bytes_were_redirected_is_reset_at_once(testbed: Testbed, bypass: Bypass,
                                                             guard: list) -> None:
    bypass.on()
    before = bypass.counters()
    with connected_pair(*testbed.pods[:2]) as (cl, srv):
        cl.sendall(pattern(0, MB))  # redirected: on the psock queue, invisible to splice
        t0 = time.monotonic()
        data, err = splice_all(srv, MB, t0 + 10)
        took = time.monotonic() - t0
        assert err in (errno.ECONNABORTED, errno.ECONNRESET), (err, len(data))
        assert took < 2.0, f"the reset took {took:.2f} s"
        assert data == b""  # never a byte out of order
        with pytest.raises(OSError) as sender:  # the sender sees the end too
            for _ in range(50):
                cl.send(b"x" * 1024)
                time.sleep(0.01)
        assert sender.value.errno in (errno.ECONNRESET, errno.EPIPE, errno.EACCES)
    d = delta(before, bypass.counters())
    deadline = time.monotonic() + 2  # the guard records the event after the reset returned
    while not guard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d["splice_doomed"] == 1 and len(guard) == 1 and guard[0]["reset"] == 0, (d, guard)
    assert guard[0]["queued"] == MB


def test_the_splicing_workload_then_runs_on_tcp(testbed: Testbed, bypass: Bypass,
                                                guard: list) -> None:
    bypass.on(pods=3)
    port = next_port()
    with connected_pair(*testbed.pods[:2], port=port) as (cl, srv):
        cl.sendall(b"hello")
        splice_all(srv, 5, time.monotonic() + 5)  # doomed: the first one pays
    learned = {(e["address"], e["port"]) for e in sockets.no_bypass() if e["source"] == "learned"}
    assert (testbed.pods[1].ipv4, port) in learned
    before = bypass.counters()
    for _ in range(5):  # every new connection to that workload is correct
        with connected_pair(*testbed.pods[:2], port=port) as (cl, srv):
            sender = threading.Thread(target=cl.sendall, args=(pattern(0, MB),))
            sender.start()  # on TCP: more than the buffers hold, so read while it sends
            data, err = splice_all(srv, MB, time.monotonic() + 10)
            sender.join(10)
            assert err is None and data == pattern(0, MB)
    d = delta(before, bypass.counters())
    assert d["skipped_no_bypass"] == 5 and d["redirected_bytes"] == 0, d
    with connected_pair(testbed.pods[0], testbed.pods[2]) as (cl, srv):  # others: bypassed
        cl.sendall(b"still bypassed")
        assert srv.recv(64) == b"still bypassed"
    assert delta(before, bypass.counters())["redirected_bytes"] == 14


def test_configured_opt_out_and_bad_input(testbed: Testbed, bypass: Bypass) -> None:
    bypass.on()
    port = next_port()
    sockets.set_no_bypass([(testbed.pods[1].ipv4, port)])
    before = bypass.counters()
    with connected_pair(*testbed.pods[:2], port=port) as (cl, srv):
        cl.sendall(b"x" * 1000)
        data, err = splice_all(srv, 1000, time.monotonic() + 5)
        assert err is None and data == b"x" * 1000
    d = delta(before, bypass.counters())
    assert d["skipped_no_bypass"] == 1 and d["redirected_bytes"] == 0, d
    with pytest.raises(ValueError, match="port"):
        sockets.set_no_bypass([(testbed.pods[1].ipv4, 70000)])
    with pytest.raises(ValueError):
        sockets.set_no_bypass([("10.0.0.300", 80)])
    assert [(e["port"], e["source"]) for e in sockets.no_bypass()
            if e["address"] == testbed.pods[1].ipv4] == [(port, "configured")]
    sockets.set_no_bypass([])
    assert not [e for e in sockets.no_bypass() if e["source"] == "configured"]


def test_sendfile_from_a_bypassed_socket_is_guarded_too(testbed: Testbed, bypass: Bypass,
                                                        guard: list, tmp_path) -> None:  # noqa: ANN001
    bypass.on()
    before = bypass.counters()
    with connected_pair(*testbed.pods[:2]) as (cl, srv):
        cl.sendall(b"y" * 4096)
        out = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        with contextlib.closing(socket.socket()):
            try:
                n = os.sendfile(out, srv.fileno(), None, 4096)
                err = None
            except OSError as exc:
                n, err = 0, exc.errno
        os.close(out)
        assert n == 0 and err in (errno.ECONNABORTED, errno.ECONNRESET, errno.EINVAL,
                                  errno.EAGAIN, None)
    d = delta(before, bypass.counters())
    assert d["splice_seen"] == 1 and d["splice_doomed"] == 1, d


def test_a_reset_never_hits_the_listener(testbed: Testbed) -> None:
    """The reader socket may be gone when the reset comes (its application closed it after
    the premature end of file). By 4-tuple alone the kernel would then find the listening
    socket on that address and port and destroy it; the cookie makes the reset miss."""
    import struct as _struct

    from node_helper import kernel

    pod0, pod1 = testbed.pods[:2]
    port = next_port()
    with listen(pod1, "ipv4", port) as ls:
        cl = client_socket(pod0, "ipv4")
        cl.connect((pod1.ipv4, port))
        srv, _ = ls.accept()
        cookie = _struct.unpack("=Q", srv.getsockopt(socket.SOL_SOCKET, 57, 8))[0]  # SO_COOKIE
        rport = cl.getsockname()[1]
        cl.close()  # the client first: its side keeps TIME_WAIT, the server's is then gone
        srv.close()
        time.sleep(0.2)  # LAST_ACK -> closed
        with kernel.in_netns(pod1.netns):
            code = splice_guard.destroy(socket.AF_INET, pod1.ipv4, port, pod0.ipv4, rport,
                                        cookie)
        assert code in (errno.ENOENT, errno.ESTALE), code
        again = client_socket(pod0, "ipv4")
        with again:
            again.settimeout(5)
            again.connect((pod1.ipv4, port))  # the listener is alive
            ls.settimeout(5)
            ls.accept()[0].close()
