"""Our API server fixture's own helpers: restart keeps the objects, compaction gives 410."""

from __future__ import annotations

import os

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from lab.apiserver import APIServer, running_apiserver
from tests.k8s.conftest import api_client, build_binaries


def _watch_from(v1: client.CoreV1Api, ns: str, rv: str) -> list[str]:
    return [ev["type"] for ev in watch.Watch().stream(
        v1.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=1)]


def test_restart_keeps_objects_and_compaction_then_gives_410(apiserver: APIServer,
                                                             admin: client.ApiClient) -> None:
    v1 = client.CoreV1Api(admin)
    v1.create_namespace({"metadata": {"name": "fixture-restart"}})
    cm = v1.create_namespaced_config_map("fixture-restart",
                                         {"metadata": {"name": "c"}, "data": {"n": "0"}})
    old_rv = cm.metadata.resource_version
    for i in range(1, 4):
        v1.patch_namespaced_config_map("c", "fixture-restart", {"data": {"n": str(i)}})
    apiserver.compact_etcd()
    # the watch cache still holds the history: compaction alone changes nothing yet
    assert _watch_from(v1, "fixture-restart", old_rv).count("MODIFIED") == 3
    old_pid = apiserver.apiserver_pid
    apiserver.compact_etcd(restart_apiserver=True)
    assert apiserver.apiserver_pid != old_pid
    with pytest.raises(ApiException) as err:
        _watch_from(v1, "fixture-restart", old_rv)
    assert err.value.status == 410
    assert v1.read_namespaced_config_map("c", "fixture-restart").data == {"n": "3"}


def test_compaction_without_watch_cache_gives_410() -> None:
    binaries = build_binaries()
    with running_apiserver(kube_apiserver=binaries["KUBE_APISERVER"], etcd=binaries["ETCD"],
                           watch_cache=False) as api, api_client(api, api.token) as admin:
        v1 = client.CoreV1Api(admin)
        cm = v1.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
        v1.patch_namespaced_config_map("c", "default", {"data": {"n": "1"}})
        api.compact_etcd()
        with pytest.raises(ApiException) as err:
            _watch_from(v1, "default", cm.metadata.resource_version)
        assert err.value.status == 410
        pids, workdir = (api.apiserver_pid, api.etcd_pid), api.workdir
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not workdir.exists()
