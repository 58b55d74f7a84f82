"""Fixtures for the socket-bypass kernel tests: a shared testbed and a bypass that always goes.

Sockets are created inside pod namespaces with `in_netns` (it moves only the calling thread),
so one test process can hold the client in pod0 and the server in pod1.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.testbed import Pod, Testbed, link_stats
from node_helper import kernel, sockets
from node_helper.kernel import in_netns

FAMILIES = ("ipv4", "v4mapped", "ipv6")
_ports = itertools.count(20000)


def next_port() -> int:
    """A port no other test of this session used (the listeners share pod namespaces)."""
    return next(_ports)


def assert_nothing_of_ours() -> None:
    """Nothing netaccel-bypass attached to the cgroup root, pinned, or loaded."""
    assert sockets.attached_programs() == []
    assert not sockets.PIN_DIR.exists()
    deadline = time.monotonic() + 5  # programs are freed after an RCU grace period
    while True:
        left = {i: n for i, n in sockets.all_prog_names().items()
                if n in (sockets.PROG_OPS_NAME, sockets.PROG_MSG_NAME)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == {}, f"netaccel programs still loaded: {left}"


def assert_testing_this_checkout() -> None:
    """The code and the BPF sources under test are this checkout's, not an editable install's
    of another checkout (node_helper.bpf is package data: a venv's editable install maps it to
    its own bpf/, even when node_helper itself comes from PYTHONPATH)."""
    repo = Path(__file__).resolve().parents[2]
    for what, path in (("node_helper", Path(sockets.__file__)),
                       ("node_helper.bpf", kernel.bpf_source(sockets.BPF_SOURCE))):
        assert path.resolve().is_relative_to(repo), (
            f"{what} comes from {path}, not from the checkout under test ({repo}); in a "
            f"second worktree link it: ln -s ../bpf {repo}/node_helper/bpf")


@pytest.fixture(scope="session")
def bypass_clean() -> Iterator[None]:
    """Start from nothing; end with nothing (even when a test failed)."""
    assert_testing_this_checkout()
    sockets.disable()
    yield
    sockets.disable()
    assert_nothing_of_ours()


@pytest.fixture(scope="module")
def testbed(bypass_clean: None) -> Iterator[Testbed]:
    with Testbed.create(pods=3) as tb:
        yield tb


@dataclass
class Bypass:
    """Turn the bypass on for a testbed's pods; read counter deltas."""

    tb: Testbed

    def on(self, pods: int = 2, **limits: int) -> dict[str, Any]:
        cidrs = [c for p in self.tb.pods[:pods] for c in (f"{p.ipv4}/32", f"{p.ipv6}/128")]
        return sockets.enable(cidrs, **limits)

    def off(self) -> None:
        sockets.disable()

    @staticmethod
    def counters() -> dict[str, int]:
        """The scalar counters, and per hop `pairs_<hop>` / `bytes_<hop>` (deltas work)."""
        st = sockets.status()
        out = {k: st[k] for k in sockets.SCALAR_COUNTERS}
        for hop, c in st["hops"].items():
            out[f"pairs_{hop}"] = c["pairs"]
            out[f"bytes_{hop}"] = c["redirected_bytes"]
        return out


@pytest.fixture
def bypass(testbed: Testbed) -> Iterator[Bypass]:
    """The bypass object; whatever the test did, the bypass is off and gone afterwards."""
    try:
        yield Bypass(testbed)
    finally:
        sockets.disable()
        assert_nothing_of_ours()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def listen(pod: Pod, family: str, port: int, backlog: int = 1024,
           setup: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """A listener in the pod: AF_INET, dual-stack AF_INET6 (v4mapped) or AF_INET6 only."""
    with in_netns(pod.netns):
        if family == "ipv4":
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr: tuple = (pod.ipv4, port)
        else:
            ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if family == "v4mapped" else 1)
            addr = ("::", port)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if setup:
            setup(ls)
        ls.bind(addr)
        ls.listen(backlog)
    return ls


def client_socket(pod: Pod, family: str) -> socket.socket:
    """An unconnected client socket in the pod's namespace."""
    with in_netns(pod.netns):
        af = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
        return socket.socket(af, socket.SOCK_STREAM)


def target(pod: Pod, family: str, port: int) -> tuple[str, int]:
    return (pod.ipv6 if family == "ipv6" else pod.ipv4, port)


@contextlib.contextmanager
def connected_pair(src: Pod, dst: Pod, family: str = "ipv4",
                   port: int | None = None) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client in src, accepted server socket in dst), closed afterwards."""
    port = port or next_port()
    ls = listen(dst, family, port)
    cl = client_socket(src, family)
    try:
        cl.settimeout(10)
        cl.connect(target(dst, family, port))
        ls.settimeout(10)
        srv, _ = ls.accept()
        srv.settimeout(10)
        try:
            yield cl, srv
        finally:
            srv.close()
    finally:
        cl.close()
        ls.close()


def veth_packets(tb: Testbed, *pods: Pod) -> int:
    """rx+tx packets of the pods' node-side veths."""
    total = 0
    for pod in pods:
        st = link_stats(tb.node_netns, pod.host_veth)
        total += st["rx_packets"] + st["tx_packets"]
    return total


@contextlib.contextmanager
def splice_guard_running() -> Iterator[list[dict[str, Any]]]:
    """The splice guard's user-space half in a thread, as the agent runs it; yields the
    events it handled (each with `reset`: 0 or an errno)."""
    from node_helper import splice_guard

    handled: list[dict[str, Any]] = []
    stop = threading.Event()
    thread = threading.Thread(target=splice_guard.run, args=(stop,),
                              kwargs={"on_event": handled.append}, daemon=True)
    thread.start()
    try:
        yield handled
    finally:
        stop.set()
        thread.join(5)
