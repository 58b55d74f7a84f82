"""The testbed's service mesh on the real kernel with the real HAProxy (lab/mesh.py).

One request app(pod0) -> app(pod1) makes six sockets (docs/mesh.md): the app's, the outbound
proxy's accepted and connected ones in pod0, the inbound proxy's accepted and connected ones in
pod1 (from 127.0.0.6) and the server app's. These tests pin what the mesh does, with and
without the socket bypass, so that pairing mesh sockets in the bypass can be tested against it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from lab import mesh
from lab.bench import bench_mesh
from lab.testbed import Pod, Testbed, run_in
from node_helper import sockets
from node_helper.kernel import in_netns
from tests.meshbed import connect, meshed_testbed

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not Path("/usr/sbin/haproxy").exists(), reason="haproxy not installed"),
]
LAB = [sys.executable, "-m", "lab.cli"]
_ports = itertools.count(21000)


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    """pod0, pod1: meshed clients and servers; pod2: meshed, its sidecar stopped by tests."""
    with meshed_testbed(pods=3) as tb:
        yield tb


@pytest.fixture(params=["bypass off", "bypass on"])
def bypass(request: pytest.FixtureRequest, bed: Testbed) -> Iterator[bool]:
    """Run the test with the socket bypass off, then on for every pod of the testbed."""
    on = request.param == "bypass on"
    if on:
        sockets.enable(bed.pod_cidrs())
    try:
        yield on
    finally:
        sockets.disable()
        assert sockets.attached_programs() == []


@contextlib.contextmanager
def listener(netns_name: str, family: int = socket.AF_INET) -> Iterator[tuple[socket.socket, int]]:
    port = next(_ports)
    with in_netns(netns_name):
        ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    ls.listen(16)
    ls.settimeout(10)
    try:
        yield ls, port
    finally:
        ls.close()


def proxied(pod: Pod, want: int = 1, timeout: float = 5.0,
            **match: object) -> list[dict[str, object]]:
    """The sidecar's logged connections (mesh.parse_log) whose fields equal `match`, once at
    least `want` of them are there (HAProxy logs a connection when it ends)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [c for c in mesh.parse_log(pod.netns)
                 if all(c[k] == v for k, v in match.items())]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def echo(client: socket.socket, server: socket.socket, size: int = 1 << 16) -> None:
    data = bytes(range(256)) * (size // 256)
    client.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = server.recv(1 << 16)
        assert chunk, "server saw end of file early"
        got += chunk
    assert got == data
    server.sendall(got[::-1])
    back = b""
    while len(back) < len(data):
        chunk = client.recv(1 << 16)
        assert chunk, "client saw end of file early"
        back += chunk
    assert back == data[::-1]


def test_sidecar_shape(bed: Testbed) -> None:
    for pod in bed.pods:
        assert pod.mesh and pod.sidecar_pid
        status = Path(f"/proc/{pod.sidecar_pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{mesh.PROXY_UID}\s", status, re.M)
        assert re.search(rf"^Gid:\s+{mesh.PROXY_UID}\s", status, re.M)
        d = mesh.pod_dir(pod.netns)
        assert d.stat().st_uid == mesh.PROXY_UID
        assert int((d / "haproxy.pid").read_text()) == pod.sidecar_pid
        rules = run_in(pod.netns, ["iptables-nft", "-t", "nat", "-S"]).stdout
        assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" in rules
        assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
        assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
        assert "--uid-owner 1337 -j RETURN" in rules
        for port in mesh.EXCLUDED_INBOUND_PORTS:
            assert f"--dport {port} -j RETURN" in rules
        assert run_in(pod.netns, ["ip6tables-nft", "-t", "nat", "-S"]).stdout.count("-A ") == 0


def test_status_and_find_say_meshed(bed: Testbed) -> None:
    found = Testbed.find(bed.number)
    assert found.status() == bed.status()
    assert all(p["mesh"] and p["sidecar_pid"] for p in found.status()["pods"])


def test_app_to_app_through_both_sidecars(bed: Testbed, bypass: bool) -> None:
    client_pod, server_pod = bed.pods[0], bed.pods[1]
    with listener(server_pod.netns) as (ls, port):
        client = connect(client_pod, server_pod.ipv4, port)
        server, peer = ls.accept()
        with client, server:
            # The server app sees the inbound proxy, from 127.0.0.6 to its own address.
            assert peer[0] == mesh.INBOUND_PASSTHROUGH_SOURCE
            assert server.getsockname() == (server_pod.ipv4, port)
            # The client app's socket keeps the original destination (REDIRECT is NAT).
            assert client.getpeername() == (server_pod.ipv4, port)
            echo(client, server)
            cport = client.getsockname()[1]
    target = (server_pod.ipv4, port)
    out = proxied(client_pod, frontend="outbound", client=(client_pod.ipv4, cport))
    assert len(out) == 1 and out[0]["local"] == target and out[0]["server"] == target, out
    src = out[0]["source"]
    assert src[0] == client_pod.ipv4 and src[1] != cport
    # The outbound proxy's own connection (UID 1337) left pod0 once: not redirected back to
    # 15001 in a loop, and it reached pod1's inbound proxy, which connected from 127.0.0.6.
    assert proxied(client_pod, want=2, timeout=0.5, local=target) == out
    inb = proxied(server_pod, frontend="inbound", client=src)
    assert len(inb) == 1, inb
    assert inb[0]["local"] == target and inb[0]["server"] == target
    assert inb[0]["source"] == peer


def test_qperf_control_and_data_connections_cross_the_mesh(bed: Testbed) -> None:
    client_pod, server_pod = bed.pods[0], bed.pods[1]
    before = len(proxied(client_pod, timeout=0, frontend="outbound"))
    server = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{server_pod.netns}", "qperf"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from lab.testbed import wait_for_port

        wait_for_port(server_pod.netns, 19765)
        out = run_in(client_pod.netns, ["qperf", server_pod.ipv4, "-t", "1", "-vu", "tcp_lat"])
        assert "latency" in out.stdout
    finally:
        server.kill()
        server.wait()
    conns = proxied(client_pod, want=before + 2, frontend="outbound")[before:]
    ports = {c["server"][1] for c in conns}
    assert 19765 in ports and len(ports) == 2, conns  # control and the negotiated data port
    for c in conns:
        assert c["server"][0] == server_pod.ipv4
        inb = proxied(server_pod, frontend="inbound", client=c["source"])
        assert len(inb) == 1 and inb[0]["source"][0] == mesh.INBOUND_PASSTHROUGH_SOURCE
        assert inb[0]["server"] == c["server"]


def test_ipv6_is_not_meshed(bed: Testbed) -> None:
    """HAProxy 2.6 has no IPv6 original destination (mesh.IPV6_NOTE): IPv6 goes direct."""
    client_pod, server_pod = bed.pods[0], bed.pods[1]
    with listener(server_pod.netns, socket.AF_INET6) as (ls, port):
        client = connect(client_pod, server_pod.ipv6, port)
        server, peer = ls.accept()
        with client, server:
            assert peer[0] == client_pod.ipv6 and peer[1] == client.getsockname()[1]
            echo(client, server, 4096)


def test_outside_the_accelerated_set_goes_through_the_mesh(bed: Testbed, bypass: bool) -> None:
    """The node's bridge address is in no pod CIDR: the bypass leaves the connection alone,
    the mesh still proxies it (a new connection from the outbound proxy)."""
    client_pod = bed.pods[0]
    node_ip = bed.ipv4_cidr.replace(".0/24", ".1")
    assert f"{node_ip}/32" not in bed.pod_cidrs()
    with listener(bed.node_netns) as (ls, port):
        client = connect(client_pod, node_ip, port)
        server, peer = ls.accept()
        with client, server:
            assert peer[0] == client_pod.ipv4
            assert peer[1] != client.getsockname()[1]  # the proxy's connection, not the app's
            echo(client, server)
            cport = client.getsockname()[1]
    assert proxied(client_pod, frontend="outbound", client=(client_pod.ipv4, cport),
                   local=(node_ip, port), source=peer, server=(node_ip, port))


@contextlib.contextmanager
def sidecar_stopped(bed: Testbed, pod: Pod) -> Iterator[None]:
    bed.stop_sidecar(pod)
    try:
        assert Testbed.find(bed.number).pods[bed.pods.index(pod)].sidecar_pid == 0
        yield
    finally:
        bed.start_sidecar(pod)


def _outcome(fn) -> str:  # noqa: ANN001
    try:
        return fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def test_client_pod_without_its_sidecar_is_refused(bed: Testbed) -> None:
    """Rules but no proxy: the app's connection is REDIRECTed to a closed 15001 and refused,
    the same with the bypass off and on."""
    lonely, server_pod = bed.pods[2], bed.pods[1]
    outcomes = []
    with sidecar_stopped(bed, lonely), listener(server_pod.netns) as (ls, port):
        for on in (False, True):
            if on:
                sockets.enable(bed.pod_cidrs())
            try:
                outcomes.append(_outcome(lambda: connect(lonely, server_pod.ipv4, port).close()
                                         or "connected"))
            finally:
                sockets.disable()
        ls.settimeout(0.2)
        with pytest.raises(TimeoutError):
            ls.accept()
    assert outcomes == ["ECONNREFUSED", "ECONNREFUSED"]


def test_server_pod_without_its_sidecar_fails_the_same_with_the_bypass(bed: Testbed) -> None:
    """The client's outbound proxy accepts, then its connection to the peer is REDIRECTed to
    the peer's closed 15006 and refused: the client app sees its connection closed, and the
    server app sees nothing, the same with the bypass off and on."""
    client_pod, lonely = bed.pods[0], bed.pods[2]
    outcomes = []
    with sidecar_stopped(bed, lonely), listener(lonely.netns) as (ls, port):
        for on in (False, True):
            if on:
                sockets.enable(bed.pod_cidrs())
            try:
                def attempt() -> str:
                    with connect(client_pod, lonely.ipv4, port) as c:
                        c.sendall(b"hello")
                        return f"connected, then read {c.recv(10)!r}"

                outcomes.append(_outcome(attempt))
            finally:
                sockets.disable()
        ls.settimeout(0.2)
        with pytest.raises(TimeoutError):
            ls.accept()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] in ("connected, then read b''", "ECONNRESET"), outcomes


def test_bench_mesh_rows(bed: Testbed) -> None:
    rows = bench_mesh(sizes=[64], seconds=1, tests=("tcp_lat",), progress=lambda _m: None)
    assert len(rows) == 1
    row = rows[0].as_json()
    assert set(row) == {"test", "msg_size", "unit", "baseline", "accelerated", "floor", "ratio"}
    assert row["baseline"] > row["floor"] > 0  # two proxies on the way cost more than none
    # The mesh is back on afterwards and the bypass off.
    assert sockets.attached_programs() == []
    assert "ISTIO_OUTPUT" in run_in(bed.pods[0].netns, ["iptables-nft", "-t", "nat", "-S"]).stdout


def _haproxies() -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "haproxy" \
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.add(int(proc.name))
    return found


def _ours(number: int) -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(f"na{number}-")]


def test_teardown_leaves_nothing() -> None:
    tb = Testbed.create(pods=2, mesh=True)
    pids = {p.sidecar_pid for p in tb.pods}
    assert pids <= _haproxies()
    tb.destroy()
    assert not pids & _haproxies()
    assert _ours(tb.number) == []
    assert not list(mesh.MESH_DIR.glob(f"na{tb.number}-*"))


def test_failed_mesh_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    real = mesh.start_proxy

    def second_fails(netns_name: str, timeout: float = 10.0) -> int:
        if started:
            raise mesh.MeshError("injected")
        started.append(real(netns_name, timeout))
        return started[-1]

    monkeypatch.setattr(mesh, "start_proxy", second_fails)
    with pytest.raises(mesh.MeshError, match="injected"):
        Testbed.create(pods=2, mesh=True, number=248)
    assert started and started[0] not in _haproxies()
    assert _ours(248) == []
    assert not list(mesh.MESH_DIR.glob("na248-*"))


def test_cli_testbed_up_mesh_status_down() -> None:
    up = subprocess.run(LAB + ["testbed", "up", "--pods", "2", "--mesh"], capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    number = json.loads(up.stdout)["number"]
    mine = ["--number", str(number)]
    try:
        status = subprocess.run(LAB + ["testbed", "status", "--json"] + mine,
                                capture_output=True, text=True, check=True)
        pods = json.loads(status.stdout)["pods"]
        assert [p["mesh"] for p in pods] == [True, True]
        pids = {p["sidecar_pid"] for p in pods}
        assert 0 not in pids and pids <= _haproxies()
        text = subprocess.run(LAB + ["testbed", "status"] + mine, capture_output=True,
                              text=True, check=True).stdout
        assert text.count("sidecar pid") == 2
    finally:
        down = subprocess.run(LAB + ["testbed", "down"] + mine, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not pids & _haproxies()
    assert _ours(number) == []
    assert not list(mesh.MESH_DIR.glob(f"na{number}-*"))


def test_sigterm_during_a_benchmark_takes_everything_down() -> None:
    """`kill` of a running `netaccel-lab bench mesh`: exit 130, and its testbed, sidecars and
    the bypass's pins are gone (SIGTERM unwinds like Ctrl-C)."""
    before = set(netns.listnetns())
    proc = subprocess.Popen(LAB + ["bench", "mesh", "--quick", "--seconds", "2"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()
        while line and not line.startswith("[1/"):  # the first point: the bypass ran once
            line = proc.stderr.readline()
        assert line, "the benchmark printed no progress"
        proc.terminate()
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert set(netns.listnetns()) - before == set()
    assert sockets.attached_programs() == [] and not sockets.PIN_DIR.exists()
    assert not (mesh.MESH_DIR.exists() and any(
        d.name.split("-")[0] not in {n.split("-")[0] for n in before}
        for d in mesh.MESH_DIR.iterdir()))
