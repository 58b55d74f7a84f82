"""The node agent as it runs on a node: `netaccel node run --static FILE` in a subprocess on a
testbed (2 pods, 1 VM whose tap0 is a real tun/tap, its netns given as /proc/<pid>/ns/net),
checked through the kernel (sockets.status, vm.status), its HTTP endpoint and its JSON logs.

Every test ends with `netaccel node cleanup` (also when it failed) and the fixture checks
that nothing of this run's NETACCEL_INSTANCE is left."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyroute2 import NetNS

from lab.testbed import Testbed, popen_in
from node_helper import inventory, kernel, sockets
from node_helper import vm as vm_api
from node_helper.vm import bpf
from node_helper.vm.plan import read_filters
from tests.kernel.conftest import assert_nothing_of_ours, client_socket, listen, next_port
from tests.kernel.test_vm_mirror import _add_real_tap

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2]
NETACCEL = [sys.executable, "-m", "node_helper.cli"]
EXPECTED_METRICS = (
    "netaccel_bypass_enabled", "netaccel_bypass_redirected_bytes_total",
    "netaccel_bypass_redirected_msgs_total", "netaccel_bypass_sockets",
    "netaccel_bypass_sockets_max", "netaccel_vm_datapaths",
    "netaccel_vm_datapath_packets_total", "netaccel_vm_datapath_bytes_total",
    "netaccel_endpoints", "netaccel_desired_state_events_total",
    "netaccel_reconcile_errors_total", "netaccel_reconcile_duration_seconds_bucket",
)


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.1)


def netaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(NETACCEL + list(args), capture_output=True, text=True, timeout=120,
                          cwd=REPO)


class AgentProc:
    """One `netaccel node run <args>` subprocess, its JSON log and its HTTP port (also used
    by tests/k8s/test_agent_e2e.py)."""

    def __init__(self, args: list[str], log: Path, netns: str | None = None):
        self.log = log
        self.out = log.open("a")
        self.netns = netns  # run inside this netns (a testbed's node), its HTTP port there
        argv = [*NETACCEL, "node", "run", *args, "--metrics-bind", "127.0.0.1:0",
                "--resync", "3"]
        self.proc = subprocess.Popen(kernel.netns_argv(netns, argv) if netns else argv,
                                     stdout=self.out, stderr=self.out, cwd=REPO)
        listening = wait_for(lambda: self.event("http_listening"), 30, "the agent's HTTP port")
        self.port = listening["port"]

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]  # JSON lines

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        assert self.proc.poll() is None, f"agent exited {self.proc.returncode}:\n" + \
            self.log.read_text()[-3000:]
        return [r for r in self.records() if r.get("event") == event
                and all(r.get(k) == v for k, v in match.items())]

    def event(self, event: str, **match: Any) -> dict[str, Any] | None:
        found = self.events(event, **match)
        return found[0] if found else None

    def source_lines(self, event: str) -> list[str]:
        """The Kubernetes source's log lines (`event=<name> k=v ...` in msg)."""
        return [r["msg"] for r in self.records()
                if r.get("logger") == "netaccel.source.kubernetes"
                and r["msg"].startswith(f"event={event}")]

    def get(self, path: str) -> tuple[int, str]:
        with kernel.in_netns(self.netns) if self.netns else contextlib.nullcontext():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                            timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

    def ready(self) -> dict[str, Any]:
        code, body = self.get("/readyz")
        return json.loads(body) if code == 200 else {}

    def metric(self, name: str, labels: str = "") -> float | None:
        _, body = self.get("/metrics")
        for line in body.splitlines():
            if line.startswith(f"{name}{labels} ") or (not labels and
                                                        line.startswith(f"{name}{{")):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            self.out.close()


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    """2 pods and 1 VM whose tap0 is a real tap (the agent's default tap classifier)."""
    assert not (kernel.BPFFS / kernel.instance()).exists(), "pins left by an earlier test"
    with Testbed.create(pods=2, vms=1) as tb:
        ns = tb.vms[0].launcher_netns
        with NetNS(ns) as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname="tap0")[0])
        _add_real_tap(ns, "tap0")
        # a process in the launcher netns: the agent gets /proc/<pid>/ns/net, as in a cluster
        holder = popen_in(ns, ["sleep", "infinity"])
        try:
            yield tb
        finally:
            holder.kill()
            holder.wait()


@pytest.fixture
def agent(bed: Testbed, tmp_path: Path) -> Iterator[Callable[[], AgentProc]]:
    """Starts agents on `tmp_path/desired.yaml`; kills them and runs `node cleanup` after."""
    with agents_then_cleanup(bed, lambda log: AgentProc(
            ["--static", str(tmp_path / "desired.yaml")], log), tmp_path) as start:
        yield start


@contextlib.contextmanager
def agents_then_cleanup(bed: Testbed, make: Callable[[Path], AgentProc],
                        tmp_path: Path) -> Iterator[Callable[[], AgentProc]]:
    """Yields `start()` (a new agent, logging to tmp_path/agent<n>.log); afterwards, also
    when the test failed: kill -9 them all, `netaccel node cleanup`, assert_clean."""
    started: list[AgentProc] = []

    def start() -> AgentProc:
        started.append(make(tmp_path / f"agent{len(started)}.log"))
        return started[-1]

    try:
        yield start
    finally:
        for a in started:
            a.stop(signal.SIGKILL)
        res = netaccel("node", "cleanup", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert_clean(bed)


def assert_clean(bed: Testbed) -> None:
    """Nothing of ours: no program of our names on the cgroup root, no pins under
    /sys/fs/bpf/<instance>, no filter or qdisc of ours on any testbed device."""
    assert_nothing_of_ours()
    assert not (kernel.BPFFS / kernel.instance()).exists()
    for name in [bed.node_netns, *[p.netns for p in bed.pods],
                 *[v.launcher_netns for v in bed.vms]]:
        with NetNS(name) as ns:
            for link in ns.get_links():
                filters, _ = read_filters(ns, link["index"])
                assert filters == [], f"{name}/{link.get_attr('IFLA_IFNAME')}: {filters}"
    for v in bed.vms:
        st = vm_api.status(v.launcher_netns)
        assert st["datapath"] is None and set(st["qdiscs"].values()) == {None}, st


def holder_path(bed: Testbed) -> str:
    """/proc/<pid>/ns/net of the process holding the launcher netns."""
    target = inventory.netns_id(kernel.netns_path(bed.vms[0].launcher_netns))
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if inventory.netns_id(proc / "ns" / "net") == target:
                    return str(proc / "ns" / "net")
    raise AssertionError("no process in the launcher netns")


def desired(bed: Testbed, bypass: tuple[int, ...] = (0, 1), vm: bool = True,
            extra: list[Any] | None = None) -> dict[str, Any]:
    pods: list[Any] = [{"uid": f"uid-{p.name}", "namespace": "t", "name": p.name,
                        "ips": [p.ipv4, p.ipv6], "netns": p.netns, "bypass": i in bypass}
                       for i, p in enumerate(bed.pods)]
    pods.append({"uid": "uid-vm0", "namespace": "t", "name": "virt-launcher-vm0",
                 "ips": [bed.vms[0].ipv4], "netns": holder_path(bed),
                 "vm": {"datapath": "bpf", "checksum": "off"} if vm else False})
    return {"pods": pods + (extra or [])}


def write(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    os.replace(tmp, path)


def host_routes(bed: Testbed, *pods: int) -> list[str]:
    return sorted(c for i in pods for c in (f"{bed.pods[i].ipv4}/32",
                                            f"{bed.pods[i].ipv6}/128"))


def vm_filters(bed: Testbed) -> list[tuple[str, Any, Any]]:
    st = vm_api.status(bed.vms[0].launcher_netns)
    return sorted((f["device"], f["prog_id"], f["redirect_to"]) for f in st["filters"])


def exchange(bed: Testbed, n: int = 20) -> None:
    """A short TCP exchange pod0 -> pod1."""
    port = next_port()
    ls = listen(bed.pods[1], "ipv4", port)
    cl = client_socket(bed.pods[0], "ipv4")
    with ls, cl:
        cl.settimeout(10)
        ls.settimeout(10)
        cl.connect((bed.pods[1].ipv4, port))
        srv, _ = ls.accept()
        with srv:
            srv.settimeout(10)
            for _ in range(n):
                cl.sendall(b"x" * 1000)
                got = 0
                while got < 1000:
                    got += len(srv.recv(1000 - got))


def test_agent_programs_edits_and_reports(bed: Testbed, tmp_path: Path,
                                          agent: Callable[[], AgentProc]) -> None:
    f = tmp_path / "desired.yaml"
    offload_before = vm_api.status(bed.vms[0].launcher_netns)["offload"]
    bad = {"uid": "uid-bad", "namespace": "t", "name": "bad", "ips": ["not-an-ip"],
           "bypass": True}
    lost = {"uid": "uid-lost", "namespace": "t", "name": "virt-launcher-gone",
            "netns": "na-no-such-netns", "vm": True}
    write(f, desired(bed, extra=[bad, lost]))
    a = agent()
    ready = wait_for(a.ready, 60, "/readyz")
    assert ready["invalid"] == 1 and ready["vms"] == 1 and ready["bypass"]["attached"]

    # programmed: the bypass for both pods, the VM datapath for vm0 (checksum off)
    st = sockets.status()
    assert st["enabled"] and st["cidrs"] == host_routes(bed, 0, 1)
    vst = vm_api.status(bed.vms[0].launcher_netns)
    assert vst["datapath"] == "bpf" and vst["launcher_current"]
    assert vst["offload"]["eth0-nic"]["rx-checksum"] is False
    before = sockets.status()["redirected_bytes"]
    exchange(bed)
    assert sockets.status()["redirected_bytes"] - before >= 20_000

    # the malformed entry: one log line, a metric; the unreachable VM: errors, retried
    bad_logs = [r for r in a.records() if r.get("event") == "endpoint_invalid"]
    assert len(bad_logs) == 1 and bad_logs[0]["uid"] == "uid-bad"
    assert "not-an-ip" in bad_logs[0]["error"]
    assert a.metric("netaccel_endpoints", '{kind="invalid"}') == 1
    wait_for(lambda: (a.metric("netaccel_reconcile_errors_total", '{op="vm_accelerate"}')
                      or 0) >= 2, 10, "a retried vm_accelerate error")
    retries = [r for r in a.records() if r.get("event") == "reconcile_error"
               and r.get("key") == "uid-lost"]
    assert [r["attempts"] for r in retries][:2] == [1, 2] and retries[1]["retry_in"] == 2

    # HTTP: health, readiness, metric names
    assert a.get("/healthz")[0] == 200
    _, body = a.get("/metrics")
    names = {line.split("{")[0].split(" ")[0] for line in body.splitlines()
             if line and not line.startswith("#")}
    assert set(EXPECTED_METRICS) <= names, set(EXPECTED_METRICS) - names
    assert a.metric("netaccel_bypass_enabled") == 1
    assert a.metric("netaccel_vm_datapaths") == 1
    assert (a.metric("netaccel_bypass_redirected_bytes_total") or 0) >= 20_000
    assert a.get("/nothing")[0] == 404

    # pod1 opts out: exactly its addresses leave the set; the VM is not touched
    filters = vm_filters(bed)
    write(f, desired(bed, bypass=(0,), extra=[bad, lost]))
    wait_for(lambda: sockets.status()["cidrs"] == host_routes(bed, 0), 10, "pod1 out")
    assert sockets.status()["enabled"] and vm_filters(bed) == filters

    # a file that does not parse: logged, the last good snapshot stays
    write(f, "pods: [unclosed\n")
    wait_for(lambda: any(r.get("event") == "source_error" for r in a.records()), 10)
    time.sleep(1)
    assert sockets.status()["cidrs"] == host_routes(bed, 0) and vm_filters(bed) == filters

    # the VM opts out: restored exactly (filters, qdiscs, offloads); the bypass stays
    write(f, desired(bed, bypass=(0,), vm=False))
    wait_for(lambda: vm_api.status(bed.vms[0].launcher_netns)["datapath"] is None, 10,
             "the VM restored")
    vst = vm_api.status(bed.vms[0].launcher_netns)
    assert vst["offload"] == offload_before and set(vst["qdiscs"].values()) == {None}
    assert sockets.status()["cidrs"] == host_routes(bed, 0)
    assert not bpf.pinned()  # the last VM took the pinned program with it

    # nobody opts in: the programs stay attached with an empty set (counters kept)
    write(f, desired(bed, bypass=(), vm=False))
    wait_for(lambda: sockets.status()["cidrs"] == [], 10, "an empty set")
    assert sockets.status()["enabled"] and sockets.status()["redirected_bytes"] >= 20_000
    assert a.stop() == 0


class Stream:
    """A TCP stream pod0 -> pod1 carrying a counting byte pattern, checked on receipt."""

    def __init__(self, bed: Testbed):
        port = next_port()
        ls = listen(bed.pods[1], "ipv4", port)
        self.cl = client_socket(bed.pods[0], "ipv4")
        self.cl.settimeout(10)
        ls.settimeout(10)
        self.cl.connect((bed.pods[1].ipv4, port))
        self.srv, _ = ls.accept()
        ls.close()
        self.srv.settimeout(10)
        self.sent = self.received = 0
        self.bad: str | None = None
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    @staticmethod
    def pattern(offset: int, n: int) -> bytes:
        return bytes((offset + i) % 251 for i in range(n))

    def _send(self) -> None:
        chunk = 4096
        while not self.stop.is_set():
            self.cl.sendall(self.pattern(self.sent, chunk))
            self.sent += chunk
            time.sleep(0.002)
        self.cl.shutdown(socket.SHUT_WR)

    def _recv(self) -> None:
        while True:
            data = self.srv.recv(65536)
            if not data:
                return
            if data != self.pattern(self.received, len(data)) and self.bad is None:
                self.bad = f"corrupt data at offset {self.received}"
            self.received += len(data)

    def flowing(self, seconds: float = 1.0) -> bool:
        start = self.received
        time.sleep(seconds)
        return self.received > start

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)
        self.cl.close()
        self.srv.close()


def test_restart_mid_stream_kill9_and_cleanup(bed: Testbed, tmp_path: Path,
                                              agent: Callable[[], AgentProc]) -> None:
    write(tmp_path / "desired.yaml", desired(bed))
    first = agent()
    wait_for(first.ready, 60, "/readyz")
    progs = sockets.attached_programs()
    filters = vm_filters(bed)
    assert len(progs) == 1 and filters
    stream = Stream(bed)
    try:
        assert stream.flowing()
        c0 = sockets.status()["redirected_bytes"]

        # SIGTERM (a rolling update): everything stays, the stream keeps flowing
        assert first.stop() == 0
        assert stream.flowing() and sockets.attached_programs() == progs
        c1 = sockets.status()["redirected_bytes"]
        assert c1 > c0

        # the next agent adopts without re-attaching anything
        second = agent()
        wait_for(second.ready, 60, "/readyz after restart")
        time.sleep(3.5)  # past a resync (--resync 3): idempotent, still nothing re-attached
        assert sockets.attached_programs() == progs and vm_filters(bed) == filters
        assert not [r for r in second.records()[-200:] if r.get("event") == "reconcile_error"]
        assert stream.flowing()
        c2 = sockets.status()["redirected_bytes"]
        assert c2 > c1
        assert (second.metric("netaccel_bypass_redirected_bytes_total") or 0) >= c2

        # kill -9: fail open, in the kernel everything goes on
        assert second.stop(signal.SIGKILL) == -signal.SIGKILL
        assert stream.flowing() and sockets.attached_programs() == progs
        assert sockets.status()["redirected_bytes"] > c2
        assert vm_filters(bed) == filters
    finally:
        stream.finish()
    assert stream.bad is None
    assert stream.received == stream.sent > 0, "bytes lost"

    # status from the kernel with no agent running; then the uninstall path
    res = netaccel("node", "status", "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["bypass"]["enabled"] and st["agent"]["agent_running"] is False
    (row,) = st["vms"]
    assert row["uid"] == "uid-vm0" and row["datapath"] == "bpf"
    assert row["name"] == "virt-launcher-vm0"
    for _ in range(2):  # idempotent
        res = netaccel("node", "cleanup", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["ok"] is True
    assert_clean(bed)


def test_restart_restores_what_was_removed_while_down(bed: Testbed, tmp_path: Path,
                                                      agent: Callable[[], AgentProc]) -> None:
    """A VM that opted out while no agent ran is restored by the next agent's sweep."""
    f = tmp_path / "desired.yaml"
    write(f, desired(bed))
    first = agent()
    wait_for(first.ready, 60, "/readyz")
    assert vm_api.status(bed.vms[0].launcher_netns)["datapath"] == "bpf"
    first.stop(signal.SIGKILL)
    write(f, desired(bed, vm=False))
    second = agent()
    wait_for(second.ready, 60, "/readyz")
    wait_for(lambda: vm_api.status(bed.vms[0].launcher_netns)["datapath"] is None, 10,
             "the unclaimed VM datapath restored")
    assert any(r.get("event") == "vm_restored" and r.get("reason") for r in second.records())
    assert sockets.status()["cidrs"] == host_routes(bed, 0, 1)


def test_opt_out_ports_and_splice_resets(bed: Testbed, tmp_path: Path,
                                         agent: Callable[[], AgentProc]) -> None:
    """The static file's no_bypass_ports reach the kernel; a reader that splices bytes it
    cannot see is reset by the agent, which logs the pod's name and counts it."""
    f = tmp_path / "desired.yaml"
    opted_out = next_port()
    doc = desired(bed, vm=False)
    doc["pods"][1]["no_bypass_ports"] = [opted_out]
    write(f, doc)
    a = agent()
    wait_for(lambda: {(e["address"], e["port"]) for e in sockets.no_bypass()
                      if e["source"] == "configured"}
             == {(bed.pods[1].ipv4, opted_out), (bed.pods[1].ipv6, opted_out)},
             what="the configured opt-out")
    before = sockets.status()

    def pair(port: int) -> tuple[socket.socket, socket.socket]:
        ls = listen(bed.pods[1], "ipv4", port)
        cl = client_socket(bed.pods[0], "ipv4")
        with ls:
            cl.settimeout(10)
            ls.settimeout(10)
            cl.connect((bed.pods[1].ipv4, port))
            srv, _ = ls.accept()
        return cl, srv

    cl, srv = pair(opted_out)  # left on TCP from its first byte
    with cl, srv:
        cl.sendall(b"o" * 100)
        assert srv.recv(100) == b"o" * 100
    assert sockets.status()["skipped_no_bypass"] == before["skipped_no_bypass"] + 1
    cl, srv = pair(next_port())  # bypassed: bytes queued, then the reader splices
    with cl, srv:
        cl.sendall(b"q" * 5000)
        r, w = os.pipe()
        try:
            srv.setblocking(False)  # poll, so that a hang ends at the deadline
            err = None
            deadline = time.monotonic() + 5
            while err is None and time.monotonic() < deadline:
                try:
                    assert os.splice(srv.fileno(), w, 4096) != 0, "a premature end of file"
                except BlockingIOError:
                    time.sleep(0.005)
                except OSError as exc:
                    err = exc.errno
            assert err == 103  # ECONNABORTED, within ms
        finally:
            os.close(r)
            os.close(w)
    resets = wait_for(lambda: [r for r in a.records() if r.get("event") == "splice_reset"],
                      10, "the agent's splice_reset log line")
    assert resets[0]["pod"] == "t/pod1" and resets[0]["reset"] == 0, resets
    assert wait_for(lambda: a.metric("netaccel_splice_resets_total"), 10) == 1
