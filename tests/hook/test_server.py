"""The gRPC server through a real client on a real Unix socket."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from hook_sidecar.proto import api_info_pb2, api_info_pb2_grpc, api_v1alpha3_pb2
from hook_sidecar.server import DEFAULT_SOCKET, HookServer, SocketInUseError

from .conftest import (
    GUEST_OFF,
    HOST_OFF,
    Client,
    console_script,
    domain,
    offload,
    vmi_json,
    without_driver_lines,
)

VERSIONS = ["v1alpha1", "v1alpha2", "v1alpha3"]


def test_info(hook_server: tuple[HookServer, Client]) -> None:
    info = hook_server[1].info()
    assert info.name == "netaccel"
    assert list(info.versions) == VERSIONS
    assert [(p.name, p.priority) for p in info.hookPoints] == [("OnDefineDomain", 0),
                                                               ("Shutdown", 0)]


def test_info_without_v1alpha3_does_not_ask_for_shutdown(tmp_path: Path) -> None:
    server = HookServer(tmp_path / "s.sock", versions=["v1alpha2", "v1alpha1"])
    server.start()
    try:
        info = Client(server.path).info()
        assert list(info.versions) == ["v1alpha1", "v1alpha2"]
        assert [p.name for p in info.hookPoints] == ["OnDefineDomain"]
        with pytest.raises(grpc.RpcError) as err:
            Client(server.path).call("v1alpha3", "Shutdown")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0.5)


@pytest.mark.parametrize("version", VERSIONS)
def test_on_define_domain_every_version_every_fixture(
        hook_server: tuple[HookServer, Client], version: str) -> None:
    client = hook_server[1]
    single = client.define(domain("single"), vmi_json(), version)
    assert offload(single, "default") == ({}, HOST_OFF, GUEST_OFF)
    assert without_driver_lines(single) == domain("single").splitlines()
    assert b"<qemu:commandline>" in single and b"xmlns:qemu=" in single

    mq = client.define(domain("multiqueue"), vmi_json(), version)
    assert offload(mq, "default") == ({"name": "vhost", "queues": "4"}, HOST_OFF, GUEST_OFF)

    multus = client.define(domain("multus"), vmi_json(), version)
    for name in ("default", "blue", "red"):
        assert offload(multus, name) == ({}, HOST_OFF, GUEST_OFF)
    assert b"<target dev='tap7c52b7ea1e0' managed='no'/>" in multus

    hotplug = client.define(domain("placeholder"), vmi_json(), version)
    assert offload(hotplug, "placeholder-0") == ({}, HOST_OFF, GUEST_OFF)

    mixed = client.define(domain("mixed"), vmi_json(), version)
    assert offload(mixed, "legacy") == (None, None, None)
    assert offload(mixed, "vf") == (None, None, None)
    assert without_driver_lines(mixed) == domain("mixed").splitlines()

    for out in (single, mq, multus, hotplug, mixed):  # idempotent through the wire too
        assert client.define(out, vmi_json(), version) == out


@pytest.mark.parametrize("version", ["v1alpha2", "v1alpha3"])
def test_pre_cloud_init_iso_passes_through(hook_server: tuple[HookServer, Client],
                                           version: str) -> None:
    res = hook_server[1].call(version, "PreCloudInitIso", cloudInitNoCloudSource=b'{"a": 1}',
                              vmi=vmi_json(), cloudInitData=b"#cloud-config\n")
    assert res.cloudInitNoCloudSource == b'{"a": 1}'
    assert res.cloudInitData == b"#cloud-config\n"


def test_shutdown_in_process(hook_server: tuple[HookServer, Client]) -> None:
    server, client = hook_server
    assert client.call("v1alpha3", "Shutdown") == api_v1alpha3_pb2.ShutdownResult()
    assert server.stopping.wait(1)


def test_one_log_line_per_call(hook_server: tuple[HookServer, Client],
                               caplog: pytest.LogCaptureFixture) -> None:
    client = hook_server[1]
    with caplog.at_level(logging.INFO, logger="netaccel.hook"):
        out = client.define(domain("single"), vmi_json(namespace="ns1", name="vm1"))
        with pytest.raises(grpc.RpcError):
            client.define(b"<domain>", vmi_json(namespace="ns1", name="vm1"))
    lines = [r.getMessage() for r in caplog.records if "OnDefineDomain" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("v1alpha3/OnDefineDomain vmi=ns1/vm1 ")
    assert f"out={len(out) + 3}B" in lines[0] and "ms OK" in lines[0]
    assert "INVALID_ARGUMENT" in lines[1] and "truncated" in lines[1]


def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "netaccel.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # leaves the file, nobody listens
    first = HookServer(path)
    first.start()
    try:
        assert Client(path).info().name == "netaccel"
        with pytest.raises(SocketInUseError, match="in use"):
            HookServer(path).start()
        assert Client(path).info().name == "netaccel"  # the live one was left alone
    finally:
        first.stop(0.5)
    assert not path.exists()


def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "netaccel.sock"
    path.write_text("precious")
    with pytest.raises(SocketInUseError, match="not a socket"):
        HookServer(path).start()
    assert path.read_text() == "precious"


def _spawn(sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(console_script("netaccel-hook")), "serve", "--socket",
                             str(sock), *extra], stderr=subprocess.PIPE)


def _wait_socket(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "server did not create its socket"
        time.sleep(0.005)


def test_console_script_cold_start_info_then_shutdown_exits_0(tmp_path: Path) -> None:
    sock = tmp_path / "hooks" / "netaccel.sock"
    t0 = time.perf_counter()
    proc = _spawn(sock, "--version", "v1alpha3")
    try:
        _wait_socket(sock, proc)
        t_sock = time.perf_counter()
        with grpc.insecure_channel(f"unix:{sock}") as ch:  # virt-launcher's 1 s deadline
            info = api_info_pb2_grpc.InfoStub(ch).Info(api_info_pb2.InfoParams(), timeout=1)
        t_info = time.perf_counter()
        assert list(info.versions) == ["v1alpha3"]
        print(f"cold start: socket after {1000 * (t_sock - t0):.0f} ms, "
              f"Info answered {1000 * (t_info - t_sock):.1f} ms later")
        assert Client(sock).call("v1alpha3", "Shutdown") == api_v1alpha3_pb2.ShutdownResult()
        assert proc.wait(10) == 0
        log = proc.stderr.read().decode() if proc.stderr else ""
        assert "v1alpha3/Shutdown" in log and "Info vmi=-" in log
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_console_script_sigterm_exits_0_and_live_socket_exits_3(tmp_path: Path) -> None:
    sock = tmp_path / "netaccel.sock"
    proc = _spawn(sock)
    try:
        _wait_socket(sock, proc)
        Client(sock).info()
        second = _spawn(sock)
        assert second.wait(10) == 3
        assert b"in use" in (second.stderr.read() if second.stderr else b"")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_version_is_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run([str(console_script("netaccel-hook")), "serve", "--socket",
                          str(tmp_path / "s.sock"), "--version", "v2"], capture_output=True)
    assert res.returncode == 2
    assert b"unknown version(s) v2" in res.stderr
    assert os.listdir(tmp_path) == []


def test_cli_default_socket_matches_the_server() -> None:
    from hook_sidecar import cli

    assert cli.DEFAULT_SOCKET == DEFAULT_SOCKET == "/var/run/kubevirt-hooks/netaccel.sock"
