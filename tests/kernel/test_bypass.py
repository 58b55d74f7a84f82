"""Socket bypass on the real kernel: redirection, address families, selectivity, life cycle,
bad input. Integrity and socket semantics live in test_bypass_integrity/_semantics.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lab.testbed import Testbed, popen_in, run_in, wait_for_port
from node_helper import kernel, sockets
from node_helper.kernel import KernelFeatureError

from .conftest import (
    FAMILIES,
    Bypass,
    assert_nothing_of_ours,
    connected_pair,
    delta,
    veth_packets,
)

pytestmark = pytest.mark.kernel
BULK = 50 * 1024 * 1024


WINDOW = 2 * 1024 * 1024  # below the bypass's per-connection bound (rcv_floor_bytes, 4 MiB)


def _bulk(cl, srv, nbytes: int = BULK) -> None:
    """Send nbytes client -> server while a thread reads them all; then a 1-byte ack back.

    The sender keeps at most WINDOW bytes unread, as TCP's flow control would: in one Python
    process the sender thread otherwise starves the reader of the GIL, and the bypass (which
    does not block a sender) would rightly move a stream that runs ahead of its reader to the
    kernel path (test_bypass_flow.py tests that)."""
    got = 0
    progress = threading.Condition()

    def reader() -> None:
        nonlocal got
        while got < nbytes:
            chunk = srv.recv(1 << 20)
            if not chunk:
                break
            with progress:
                got += len(chunk)
                progress.notify()
        srv.sendall(b"k")

    th = threading.Thread(target=reader)
    th.start()
    block = b"\xa5" * (1 << 20)
    for off in range(0, nbytes, len(block)):
        with progress:
            assert progress.wait_for(lambda off=off: off - got <= WINDOW - len(block), 10)
        cl.sendall(block[: nbytes - off])
    assert cl.recv(1) == b"k"
    th.join(10)
    assert got == nbytes


@pytest.mark.parametrize("mode", ["bypass", "kernel"])
def test_bulk_transfer_skips_the_veths(testbed: Testbed, bypass: Bypass, mode: str) -> None:
    p0, p1 = testbed.pods[:2]
    if mode == "bypass":
        bypass.on()
    else:
        assert sockets.attached_programs() == [] and not sockets.PIN_DIR.exists()
    before_c, before_v = bypass.counters(), veth_packets(testbed, p0, p1)
    with connected_pair(p0, p1) as (cl, srv):
        _bulk(cl, srv)
    d, veth = delta(before_c, bypass.counters()), veth_packets(testbed, p0, p1) - before_v
    if mode == "bypass":
        assert d["inserted"] == 2
        assert d["redirected_bytes"] >= BULK + 1
        assert d["fallback_msgs"] == 0
        assert veth < 60, f"{veth} packets crossed the veths during a bypassed 50 MB transfer"
    else:
        assert d == dict.fromkeys(d, 0)
        assert veth > 1000
        assert_nothing_of_ours()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_bypassed(testbed: Testbed, bypass: Bypass, family: str) -> None:
    p0, p1 = testbed.pods[:2]
    bypass.on()
    before_c, before_v = bypass.counters(), veth_packets(testbed, p0, p1)
    with connected_pair(p0, p1, family) as (cl, srv):
        assert sockets.status()["sockets"] == 2
        cl.sendall(b"ping")
        assert srv.recv(16) == b"ping"
        srv.sendall(b"pong")
        assert cl.recv(16) == b"pong"
        _bulk(cl, srv, 5 * 1024 * 1024)
    d = delta(before_c, bypass.counters())
    assert d["inserted"] == 2 and d["redirected_msgs"] >= 3 and d["fallback_dirs"] == 0
    assert veth_packets(testbed, p0, p1) - before_v < 40
    assert sockets.status()["sockets"] == 0  # closed sockets leave the sockhash by themselves


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pod_outside_the_set_is_not_bypassed(testbed: Testbed, bypass: Bypass,
                                             family: str) -> None:
    p0, p2 = testbed.pods[0], testbed.pods[2]
    bypass.on(pods=2)  # pod2 is not in the accelerated set
    before_c, before_v = bypass.counters(), veth_packets(testbed, p0, p2)
    with connected_pair(p0, p2, family) as (cl, srv):
        _bulk(cl, srv, 5 * 1024 * 1024)
    d = delta(before_c, bypass.counters())
    assert d["inserted"] == 0 and d["redirected_msgs"] == 0
    assert d["skipped_not_in_set"] >= 2  # a node-wide counter: other sockets count too
    assert veth_packets(testbed, p0, p2) - before_v > 100  # 5 MB in TSO segments


def test_qperf_between_pods(testbed: Testbed, bypass: Bypass) -> None:
    p0, p1 = testbed.pods[:2]
    bypass.on()
    server = popen_in(p1.netns, ["qperf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(p1.netns, 19765)
        before = bypass.counters()
        out = run_in(p0.netns, ["qperf", "-t", "1", "-m", "4K", p1.ipv4, "tcp_lat", "tcp_bw"],
                     timeout=30).stdout
    finally:
        server.kill()
        server.wait()
    lat = re.search(r"latency\s*=\s*([\d.]+)\s*(\w+)", out)
    bw = re.search(r"bw\s*=\s*([\d.]+)\s*(\S+)", out)
    assert lat and bw, out
    assert float(lat.group(1)) > 0 and float(bw.group(1)) > 0
    d = delta(before, bypass.counters())
    assert d["inserted"] >= 4 and d["redirected_msgs"] > 1000, d  # control + data connections


def test_enable_is_idempotent_and_updates_the_set(testbed: Testbed, bypass: Bypass) -> None:
    first = bypass.on()
    ids = sockets.attached_programs()
    assert first["enabled"] and len(ids) == 1
    second = bypass.on(pods=3)
    assert sockets.attached_programs() == ids  # adopted, not attached twice
    assert len(second["cidrs"]) == 6 and set(first["cidrs"]) < set(second["cidrs"])
    third = bypass.on(pods=1)
    assert sockets.attached_programs() == ids
    assert sorted(third["cidrs"]) == sorted([f"{testbed.pods[0].ipv4}/32",
                                             f"{testbed.pods[0].ipv6}/128"])


def test_status_from_another_process(testbed: Testbed, bypass: Bypass) -> None:
    bypass.on()
    with connected_pair(*testbed.pods[:2]) as (cl, srv):
        cl.sendall(b"x" * 100)
        assert srv.recv(100)
        out = subprocess.run(
            [sys.executable, "-c",
             "import json; from node_helper import sockets; print(json.dumps(sockets.status()))"],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
        ).stdout
    st = json.loads(out)
    for key in ("enabled", "sockets", "redirected_msgs", "redirected_bytes", "fallback_msgs",
                "inserted", "cidrs", "cgroup", "pin_dir"):
        assert key in st
    assert st["enabled"] and st["sockets"] == 2 and st["redirected_bytes"] >= 100


def test_disable_when_nothing_is_enabled(bypass_clean: None) -> None:
    sockets.disable()
    sockets.disable()
    assert not sockets.status()["enabled"]
    assert_nothing_of_ours()


@pytest.mark.parametrize("leftover", ["pins_partial", "attached_without_pins"])
def test_fresh_start_cleans_a_crashed_run(testbed: Testbed, bypass: Bypass,
                                          leftover: str) -> None:
    bypass.on()
    old = sockets.attached_programs()
    if leftover == "pins_partial":
        (sockets.PIN_DIR / "prog_msg").unlink()
    else:
        for pin in list(sockets.PIN_DIR.iterdir()):
            pin.unlink()
    assert not sockets.status()["enabled"]
    st = bypass.on()
    new = sockets.attached_programs()
    assert st["enabled"] and len(new) == 1 and new != old
    with connected_pair(*testbed.pods[:2]) as (cl, srv):
        cl.sendall(b"after restart")
        assert srv.recv(64) == b"after restart"
    assert sockets.status()["redirected_msgs"] >= 1


# --- bad input and missing features: clear error, nothing half-attached -------------------

@pytest.mark.parametrize("cidrs,needle", [
    (["10.251.0.0/33"], "10.251.0.0/33"),
    (["10.251.1.10/32", "not-a-cidr"], "not-a-cidr"),
    (["10.251.1.1/24"], "10.251.1.1/24"),  # host bits set
    ([], "empty"),
])
def test_invalid_cidrs(bypass_clean: None, cidrs: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        sockets.enable(cidrs)
    assert_nothing_of_ours()


def test_invalid_cidr_while_enabled_keeps_the_set(testbed: Testbed, bypass: Bypass) -> None:
    before = bypass.on()["cidrs"]
    with pytest.raises(ValueError, match="bogus"):
        sockets.enable(["10.251.1.10/32", "bogus"])
    assert sockets.status()["cidrs"] == before


def test_no_cgroup2(bypass_clean: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "mountinfo"
    fake.write_text("22 1 0:21 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    monkeypatch.setattr(sockets, "_MOUNTINFO", fake)
    with pytest.raises(KernelFeatureError, match="cgroup v2"):
        sockets.enable(["10.251.1.10/32"])
    sockets.disable()  # still safe
    assert sockets.status()["enabled"] is False
    monkeypatch.undo()
    assert_nothing_of_ours()


def test_bcc_without_headers(bypass_clean: None, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "MODULES_DIR", tmp_path)
    with pytest.raises(KernelFeatureError, match="linux-headers"):
        sockets.enable(["10.251.1.10/32"])
    assert not list(tmp_path.iterdir())  # reported, not "fixed" behind the operator's back
    assert_nothing_of_ours()


def test_no_sockhash(bypass_clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockets, "BPF_MAP_TYPE_SOCKHASH", 4242)  # a map type no kernel has
    with pytest.raises(KernelFeatureError, match="sockhash"):
        sockets.enable(["10.251.1.10/32"])
    assert_nothing_of_ours()


def test_failure_mid_way_undoes_everything(bypass_clean: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = sockets.prog_attach

    def attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
        if attach_type == sockets.BPF_CGROUP_SOCK_OPS:
            raise OSError(1, os.strerror(1))
        real(target_fd, prog_fd, attach_type, flags)

    monkeypatch.setattr(sockets, "prog_attach", attach)
    with pytest.raises(KernelFeatureError, match="cgroup v2 root"):
        sockets.enable(["10.251.1.10/32"])
    assert_nothing_of_ours()
