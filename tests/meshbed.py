"""Shared by the mesh tests (tests/lab/test_mesh.py, tests/kernel/test_bypass_mesh.py): a
meshed testbed with the socket bypass off around it, and an app's connection from a pod."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from lab.testbed import Pod, Testbed
from node_helper import sockets
from node_helper.kernel import in_netns


@contextlib.contextmanager
def meshed_testbed(pods: int = 3) -> Iterator[Testbed]:
    """Pods with an Istio-style HAProxy sidecar each; the bypass off before and after."""
    sockets.disable()
    with Testbed.create(pods=pods, mesh=True) as tb:
        try:
            yield tb
        finally:
            sockets.disable()


def connect(pod: Pod, address: str, port: int) -> socket.socket:
    """A TCP connection from an app in the pod (so through its sidecar when meshed)."""
    with in_netns(pod.netns):
        return socket.create_connection((address, port), timeout=10)
