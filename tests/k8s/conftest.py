"""A real etcd + kube-apiserver for the whole session, and KubeVirt's VMI CRD in it.

The binaries come from scripts/build-kube-apiserver.sh (run here: a no-op once they are
cached under /var/cache/netaccel; a cold build needs Go, see the script). A failed build or
start fails the tests that need the server: nothing here is skipped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import kube, vmi_crd
from lab.apiserver import APIServer, running_apiserver

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-kube-apiserver.sh"


def build_binaries() -> dict[str, str]:
    """Run the build script; {"KUBE_APISERVER": path, "ETCD": path}."""
    proc = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{BUILD} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}",
                    pytrace=False)
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return {k: found[k] for k in ("KUBE_APISERVER", "ETCD")}


@pytest.fixture(scope="session")
def apiserver() -> Iterator[APIServer]:
    """One API server for the session (starting one costs ~3 s and ~300 MB)."""
    binaries = build_binaries()
    with running_apiserver(kube_apiserver=binaries["KUBE_APISERVER"],
                           etcd=binaries["ETCD"]) as api:
        yield api


@pytest.fixture(scope="session")
def vmi_crd_installed(apiserver: APIServer) -> dict[str, Any]:
    """KubeVirt's VirtualMachineInstance CRD (schema derived from KubeVirt's OpenAPI)."""
    return apiserver.install_crd(vmi_crd.load())


def api_client(api: APIServer, token: str) -> Any:
    """A kubernetes.client.ApiClient for `api` with a bearer token."""
    return kube.api_client(api.url, api.ca_file, token)


@pytest.fixture
def admin(apiserver: APIServer) -> Iterator[Any]:
    """An ApiClient with the admin token (system:masters), new for each test: a pooled
    keep-alive connection left over from another test (a watch, a server restart) once
    made a request read the rest of an old chunked body as its status line."""
    with api_client(apiserver, apiserver.token) as c:
        yield c
