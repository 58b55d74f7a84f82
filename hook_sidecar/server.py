"""The gRPC side of the hook: Info and Callbacks v1alpha1..3 on a Unix socket.

virt-launcher dials the socket, asks Info (1 s deadline) which hook points and versions we
serve, then calls OnDefineDomain on a fresh connection for every (re)definition of the
domain, and Shutdown (v1alpha3) once QEMU has exited. Bad input is answered with
INVALID_ARGUMENT and a message; the server keeps serving.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from hook_sidecar import __version__
from hook_sidecar.domain import MAX_DOMAIN_BYTES, on_define_domain
from hook_sidecar.errors import HookInputError
from hook_sidecar.proto import (
    api_info_pb2,
    api_info_pb2_grpc,
    api_v1alpha1_pb2,
    api_v1alpha1_pb2_grpc,
    api_v1alpha2_pb2,
    api_v1alpha2_pb2_grpc,
    api_v1alpha3_pb2,
    api_v1alpha3_pb2_grpc,
)
from hook_sidecar.settings import MAX_VMI_BYTES

log = logging.getLogger("netaccel.hook")

HOOK_NAME = "netaccel"
DEFAULT_SOCKET = "/var/run/kubevirt-hooks/netaccel.sock"
VERSIONS = ("v1alpha1", "v1alpha2", "v1alpha3")
#: gRPC's own receive limit sits above our per-field limits, so a too-big domain gets our
#: clear INVALID_ARGUMENT message; anything beyond this gets gRPC's RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = MAX_DOMAIN_BYTES + MAX_VMI_BYTES + 1024 * 1024

_PB2 = {"v1alpha1": api_v1alpha1_pb2, "v1alpha2": api_v1alpha2_pb2, "v1alpha3": api_v1alpha3_pb2}
_ADD = {
    "v1alpha1": api_v1alpha1_pb2_grpc.add_CallbacksServicer_to_server,
    "v1alpha2": api_v1alpha2_pb2_grpc.add_CallbacksServicer_to_server,
    "v1alpha3": api_v1alpha3_pb2_grpc.add_CallbacksServicer_to_server,
}


class SocketInUseError(RuntimeError):
    """Another live server answers on the socket path (or the path is not a socket)."""


class _Call:
    """Times one RPC and writes its log line."""

    def __init__(self, method: str, size_in: int) -> None:
        self.method, self.size_in, self.t0 = method, size_in, time.perf_counter()
        self.vmi, self.size_out, self.status = "-", 0, "OK"

    def done(self) -> None:
        ms = (time.perf_counter() - self.t0) * 1000
        log.info("%s vmi=%s in=%dB out=%dB %.1fms %s", self.method, self.vmi, self.size_in,
                 self.size_out, ms, self.status)


class InfoServicer(api_info_pb2_grpc.InfoServicer):
    def __init__(self, versions: Iterable[str]) -> None:
        self.versions = list(versions)
        points = [api_info_pb2.HookPoint(name="OnDefineDomain", priority=0)]
        if "v1alpha3" in self.versions:
            points.append(api_info_pb2.HookPoint(name="Shutdown", priority=0))
        self.result = api_info_pb2.InfoResult(name=HOOK_NAME, hookPoints=points,
                                              versions=self.versions)

    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        call = _Call("Info", request.ByteSize())
        call.size_out = self.result.ByteSize()
        call.done()
        return self.result


class CallbacksServicer:
    """Callbacks for one API version (the message classes differ per version)."""

    def __init__(self, version: str, on_shutdown: Callable[[], None]) -> None:
        self.version, self.pb2, self.on_shutdown = version, _PB2[version], on_shutdown

    def OnDefineDomain(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        call = _Call(f"{self.version}/OnDefineDomain", request.ByteSize())
        try:
            xml, call.vmi = on_define_domain(request.domainXML, request.vmi)
            result = self.pb2.OnDefineDomainResult(domainXML=xml)
            call.size_out = result.ByteSize()
            return result
        except HookInputError as exc:
            call.status = f"INVALID_ARGUMENT: {exc}"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # never let one bad call take the sidecar down
            log.exception("OnDefineDomain failed")
            call.status = f"INTERNAL: {exc!r}"
            context.abort(grpc.StatusCode.INTERNAL, f"netaccel hook internal error: {exc!r}")
        finally:
            call.done()

    def PreCloudInitIso(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        call = _Call(f"{self.version}/PreCloudInitIso", request.ByteSize())
        result = self.pb2.PreCloudInitIsoResult(
            cloudInitNoCloudSource=request.cloudInitNoCloudSource,
            cloudInitData=request.cloudInitData,
        )
        call.size_out = result.ByteSize()
        call.done()
        return result

    def Shutdown(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        call = _Call(f"{self.version}/Shutdown", 0)
        call.done()
        self.on_shutdown()
        return self.pb2.ShutdownResult()


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a non-socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUseError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketInUseError(f"{path}: cannot tell whether it is in use: {exc}") from exc
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUseError(f"{path} is in use: another server answers on it")


class HookServer:
    """The gRPC server on a Unix socket; ``wait()`` returns once Shutdown was answered."""

    def __init__(self, socket_path: str | os.PathLike[str],
                 versions: Iterable[str] = VERSIONS, workers: int = 4) -> None:
        self.path = Path(socket_path)
        self.versions = [v for v in VERSIONS if v in set(versions)]
        if not self.versions:
            raise ValueError(f"no supported version among {list(versions)}; use {VERSIONS}")
        self.stopping = threading.Event()
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=opts)
        api_info_pb2_grpc.add_InfoServicer_to_server(InfoServicer(self.versions), self.server)
        for version in self.versions:
            _ADD[version](CallbacksServicer(version, self.stopping.set), self.server)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_socket(self.path)
        if self.server.add_insecure_port(f"unix:{self.path}") == 0:
            raise OSError(f"cannot listen on unix:{self.path}")
        self.server.start()
        log.info("netaccel hook %s serving %s on %s", __version__, ",".join(self.versions),
                 self.path)

    def wait(self) -> None:
        """Block until Shutdown (or stop()) then stop, letting the Shutdown reply go out."""
        self.stopping.wait()
        self.stop()

    def stop(self, grace: float = 2.0) -> None:
        self.stopping.set()
        self.server.stop(grace).wait()
        self.path.unlink(missing_ok=True)


def serve(socket_path: str = DEFAULT_SOCKET, versions: Iterable[str] = VERSIONS) -> int:
    """Run until Shutdown, SIGTERM or SIGINT; return the process exit code."""
    try:
        server = HookServer(socket_path, versions)
        server.start()
    except (SocketInUseError, OSError, ValueError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stopping.set())
    while not server.stopping.wait(0.5):  # a timed wait keeps signals deliverable
        pass
    server.stop()
    log.info("stopped")
    return 0
