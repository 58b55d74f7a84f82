"""Demotion (bpf/sockmap.c, DEMOTION and rule 11): a direction streaming small messages
one-way leaves the bypass mid-stream, by its sending socket's removal from the sockhash.

Hundreds of connections mix request/response, one-way small-message streams (some whose
peer sent a greeting the streaming side reads only at the end, so its own queue is not empty
when it qualifies), streams between two request/response phases, and large-message streams.
The real demoter runs (node_helper.demote) and a second thread deletes senders of pure
one-way streams at random moments (forced deletions). Every byte is checked in order."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from lab.testbed import Testbed
from node_helper import demote, sockets

from .conftest import (
    FAMILIES,
    Bypass,
    client_socket,
    connected_pair,
    delta,
    listen,
    next_port,
    target,
)
from .streams import pattern

pytestmark = pytest.mark.kernel
@contextlib.contextmanager
def _demoter() -> Iterator[demote.Demoter]:
    """The real demoter in a thread, polling every 10 ms, while the block runs."""
    stop = threading.Event()
    demoter = demote.Demoter()
    th = threading.Thread(target=demote.run, args=(stop,),
                          kwargs={"interval": 0.01, "demoter": demoter})
    th.start()
    try:
        yield demoter
    finally:
        stop.set()
        th.join(5)


def _is_pattern(got: bytes) -> bool:
    """`got` is the stream pattern from offset 0 (compared in slices pattern() can give)."""
    return all(got[i:i + 60000] == pattern(i, len(got[i:i + 60000]))
               for i in range(0, len(got), 60000))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Conn:
    """One connection of the plan; run() returns None or what went wrong."""

    def __init__(self, kind: str, family: str, seed: int, flip: bool) -> None:
        self.kind, self.family, self.rng, self.flip = kind, family, random.Random(seed), flip
        self.ports: tuple[int, int] = (0, 0)  # (sender X's local port, receiver's)
        self.forcible = threading.Event()     # set while a raw delete of X is order-safe
        self.sent = 0

    def _stream(self, tx: socket.socket, rx: socket.socket, seconds: float, small: bool) -> None:
        """tx streams the pattern for `seconds`; rx checks it (in a thread)."""
        errors: list[str] = []
        total: list[int] = []

        def reader() -> None:
            got = 0
            try:
                while True:
                    chunk = rx.recv(1 << 16)
                    if not chunk:
                        break
                    if chunk != pattern(got, len(chunk)):
                        errors.append(f"{self.kind}: wrong bytes at offset {got}")
                        return
                    got += len(chunk)
            except OSError as exc:
                errors.append(f"{self.kind}: recv {exc}")
            total.append(got)

        th = threading.Thread(target=reader)
        th.start()
        rng, sent = self.rng, 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(64):
                n = rng.randint(1, 300) if small else rng.choice([4096, 16384, 65536])
                tx.sendall(pattern(sent, n))
                sent += n
        tx.shutdown(socket.SHUT_WR)
        th.join(60)
        assert not th.is_alive(), f"{self.kind}: reader stalled"
        if errors:
            raise AssertionError(errors[0])
        if total != [sent]:
            raise AssertionError(f"{self.kind}: received {total} of {sent} bytes")
        self.sent += sent

    def _ping_pong(self, a: socket.socket, b: socket.socket, rounds: int) -> None:
        for i in range(rounds):
            n = self.rng.randint(1, 200)
            a.sendall(pattern(i, n))
            if _recv_exact(b, n) != pattern(i, n):
                raise AssertionError(f"{self.kind}: wrong request {i}")
            m = self.rng.randint(1, 200)
            b.sendall(pattern(i + 7, m))
            if _recv_exact(a, m) != pattern(i + 7, m):
                raise AssertionError(f"{self.kind}: wrong response {i}")

    def run(self, cl: socket.socket, srv: socket.socket) -> str | None:
        x, y = (srv, cl) if self.flip else (cl, srv)  # x streams to y
        self.ports = (x.getsockname()[1], y.getsockname()[1])
        try:
            if self.kind == "rr":
                self._ping_pong(x, y, self.rng.randint(200, 600))
            elif self.kind == "stream":
                greeting = self.rng.choice([0, 0, 1, 5000, 20000])
                if greeting:  # y speaks first; x reads it only after its stream
                    y.sendall(pattern(3, greeting))
                else:
                    self.forcible.set()
                self._stream(x, y, self.rng.uniform(0.03, 0.3), small=True)
                self.forcible.clear()
                if greeting and _recv_exact(x, greeting) != pattern(3, greeting):
                    raise AssertionError("stream: wrong greeting")
            elif self.kind == "mixed":
                self._ping_pong(x, y, self.rng.randint(5, 50))
                self._stream_then_talk(x, y)
            else:  # big
                self._stream(x, y, self.rng.uniform(0.02, 0.1), small=False)
        except (AssertionError, OSError) as exc:
            return f"{self.kind} {self.family} ports {self.ports} flip {self.flip}: {exc}"
        return None

    def _stream_then_talk(self, x: socket.socket, y: socket.socket) -> None:
        """x streams small messages framed by a length, y replies after; then ping-pong."""
        n_msgs = self.rng.randint(300, 3000)
        sent = 0
        for _ in range(n_msgs):
            n = self.rng.randint(1, 300)
            x.sendall(pattern(sent, n))
            sent += n
        if not _is_pattern(_recv_exact(y, sent)):
            raise AssertionError("mixed: wrong stream")
        self._ping_pong(x, y, self.rng.randint(5, 50))


def _forcer(conns: list[Conn], stop: threading.Event, forced: list[int]) -> None:
    """Delete the sender of a pure one-way stream at random moments (from user space, as
    measured by hand in the issue): order-safe because its peer never sent to it."""
    rng = random.Random(99)
    while not stop.is_set():
        live = [c for c in conns if c.forcible.is_set()]
        if live:
            c = rng.choice(live)
            for key in sockets.socket_keys():
                k = sockets.SOCK_KEY.unpack(key)
                if (k["lport"], k["rport"]) == c.ports and c.forcible.is_set():
                    if sockets.remove_socket(key):
                        forced.append(c.ports)
        stop.wait(rng.uniform(0.001, 0.02))


def test_demotion_mid_stream_keeps_every_byte(testbed: Testbed, bypass: Bypass) -> None:
    rng = random.Random(4321)
    kinds = ["rr"] * 3 + ["stream"] * 4 + ["mixed"] * 2 + ["big"]
    conns = [Conn(rng.choice(kinds), FAMILIES[i % 3], rng.getrandbits(32), rng.random() < 0.5)
             for i in range(520)]
    # A wide window: under the test's thread load a stream may run slower than a real one.
    bypass.on(demote_msgs=64, demote_window_ms=2000)
    p0, p1 = testbed.pods[:2]
    before = bypass.counters()
    stop = threading.Event()
    demoter = demote.Demoter()
    forced: list[int] = []
    demoted: list[dict] = []
    threads = [threading.Thread(target=demote.run, args=(stop,),
                                kwargs={"interval": 0.01, "demoter": demoter,
                                        "on_demote": demoted.append}),
               threading.Thread(target=_forcer, args=(conns, stop, forced))]
    for th in threads:
        th.start()

    def job(c: Conn) -> str | None:
        ls = listen(p1, c.family, next_port(), backlog=1)  # its own: accept() is ours
        cl = client_socket(p0, c.family)
        try:
            cl.settimeout(30)
            cl.connect(target(p1, c.family, ls.getsockname()[1]))
            srv, _ = ls.accept()
            srv.settimeout(30)
            try:
                return c.run(cl, srv)
            finally:
                srv.close()
        finally:
            cl.close()
            ls.close()

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(job, conns))
    finally:
        stop.set()
        for th in threads:
            th.join(10)
    after = bypass.counters()
    d = delta(before, after)
    bad = [r for r in results if r]
    assert bad == [], f"{len(bad)} connections with wrong bytes: {bad[:10]} {forced} {demoted}"
    st = sockets.status()
    n_streams = sum(1 for c in conns if c.kind in ("stream", "mixed"))
    print(f"\ndemotion: {d['demote_candidates']} candidates, {st['demoted']} demoted, "
          f"{st['abandoned']} abandoned, {len(forced)} forced, "
          f"{d['fallback_dirs_demote']} peer directions moved, of {n_streams} streams; "
          f"{demoter.reasons}, {len(demoter.waiting)} waiting")
    # Streams whose peer spoke within the last second wait out rule 9's grace and usually end
    # first ("closed"): only the pure one-way ones are demoted within this test's durations.
    assert d["demote_candidates"] >= n_streams * 0.5, d
    assert st["demoted"] >= 20 and len(forced) >= 10, (st["demoted"], len(forced))
    assert d["insert_errors"] == 0 and d["doomed_drops"] == 0, d


def test_request_response_and_large_stay_bypassed(testbed: Testbed, bypass: Bypass) -> None:
    """Ping-pong of small messages and a stream of large ones never qualify; a small-message
    stream does, and with --policy always it does not."""
    p0, p1 = testbed.pods[:2]
    for policy, want in (("default", 1), ("always", 0)):
        bypass.on(policy=policy)
        try:
            with _demoter() as demoter:
                before = bypass.counters()
                for kind in ("rr", "big", "stream"):
                    conn = Conn(kind, "ipv4", 7, False)
                    with connected_pair(p0, p1) as (cl, srv):
                        if kind == "stream":  # a second of 1-300 B messages: surely qualifies
                            conn._stream(cl, srv, 1.0, small=True)
                        else:
                            assert conn.run(cl, srv) is None
                    d = delta(before, bypass.counters())
                    assert d["demote_candidates"] == (want if kind == "stream" else 0), (kind, d)
                deadline = time.monotonic() + 2
                while demoter.demoted < want and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert demoter.demoted == want, policy
                assert sockets.status()["policy"]["policy"] == policy
        finally:
            bypass.off()


def _keys_of(ports: set[int]) -> list[bytes]:
    return [key for key in sockets.socket_keys()
            if {sockets.SOCK_KEY.unpack(key)["lport"], sockets.SOCK_KEY.unpack(key)["rport"]}
            == ports]


def test_after_a_demotion_both_sockets_leave(testbed: Testbed, bypass: Bypass) -> None:
    """X streams small messages one-way and qualifies. When Y next sends, its direction moves
    to TCP and Y qualifies too (sockmap.c rule 11 d); once each one's queue was seen empty,
    both are out of the sockhash (their reads are plain TCP's: no tcp_bpf EAGAIN). Every byte
    of both directions arrives in order."""
    p0, p1 = testbed.pods[:2]
    bypass.on()
    try:
        with _demoter() as demoter, connected_pair(p0, p1) as (x, y):
            ports = {x.getsockname()[1], y.getsockname()[1]}
            assert len(_keys_of(ports)) == 2
            before = bypass.counters()
            rng, sent, got = random.Random(5), 0, bytearray()
            reader = threading.Thread(target=lambda: got.extend(_recv_exact(y, 1 << 20)))
            reader.start()
            while sent < 1 << 20:  # 1 MiB in small one-way messages: X qualifies
                n = min(rng.randint(1, 300), (1 << 20) - sent)
                x.sendall(pattern(sent, n))
                sent += n
            reader.join(30)
            assert len(got) == sent and _is_pattern(bytes(got))
            assert delta(before, bypass.counters())["demote_candidates"] == 1
            # Both talk now; each one's sends let its sk_msg report its (empty) queue.
            rounds, deadline = 0, time.monotonic() + 10
            while _keys_of(ports) and time.monotonic() < deadline:
                y.sendall(pattern(rounds, 100))
                assert _recv_exact(x, 100) == pattern(rounds, 100)
                x.sendall(pattern(rounds + 1, 100))
                assert _recv_exact(y, 100) == pattern(rounds + 1, 100)
                rounds += 1
                time.sleep(0.01)
            assert _keys_of(ports) == [], "a socket is still in the sockhash after 10 s"
            d = delta(before, bypass.counters())
            # X's own direction moved by Y's mark (2), or X had left already (1)
            assert d["demote_candidates"] == 2 and d["fallback_dirs_demote"] in (1, 2), d
            assert demoter.demoted == 2, demoter.reasons
            y.sendall(b"after")
            assert _recv_exact(x, 5) == b"after"
    finally:
        bypass.off()
