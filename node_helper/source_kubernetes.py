"""Desired state from the Kubernetes API: this node's pods, their VMIs and all namespaces.

`KubernetesSource(node_name, api_client)` implements `desired.Source`. It lists and then
watches three kinds, each in a thread of its own:

    pods        cluster-wide, field selector spec.nodeName=<node>
    VMIs        kubevirt.io/v1 virtualmachineinstances, label selector kubevirt.io/nodeName=<node>
    namespaces  all of them (their labels opt whole namespaces in)
    nodes       all of them, only with `watch_nodes=True` (the agent's --node-fastpath): the
                other nodes' spec.podCIDRs are the snapshot's `remote_pod_cidrs`

and publishes a complete `DesiredState` (one `Endpoint` per pod UID) once the first list of
each kind is in, then after every change (bursts coalesced: at most one publish per
`min_interval`, 50 ms by default).

Watches resume from the last resourceVersion seen (events and bookmarks); a 410 Gone (the
version is no longer in the API server's history, e.g. after compaction or a restart)
relists; any other failure (connection refused, 5xx, a broken stream) reconnects with
exponential backoff and jitter. A 403 (RBAC) is not retried: `run()` logs it and raises
`SourceError` naming the verb and resource the identity may not use. Except for a while after
a watch of that kind has worked: a kube-apiserver that has just (re)started serves requests
before its RBAC caches are filled and answers 403 meanwhile (seen with v1.37: about a second
after a restart), so a 403 there is retried with backoff for up to `forbidden_grace` (30 s)
before it counts as a refusal. A missing VMI resource
(404: KubeVirt not installed) counts as "no VMIs" and is retried slowly.

How a pod becomes an Endpoint (`endpoints()`; a pure function of the three stores):
- pods without an address yet, finished pods (Succeeded/Failed: their addresses may already
  be someone else's) and hostNetwork pods (their address is the node's) are left out;
- ips: every address of status.podIPs (dual-stack), else status.podIP;
- a virt-launcher pod (label kubevirt.io=virt-launcher, kubevirt.io/created-by=<VMI uid>)
  gets `vm` from its VMI's annotations when the VMI opted in (its own annotation, else its
  namespace's label); it never gets the socket bypass (its address belongs to the guest);
- any other pod gets `bypass` when it opted in (its annotation, else its namespace's label);
- a malformed value (annotation or address) gives `Endpoint.error` naming the object.

Logs are one event per line, `event=<name> key=value ...`, on logger
"netaccel.source.kubernetes"; `stats` counts events, relists and errors and holds
`last_sync` (wall-clock time of the last published snapshot).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from node_helper import desired
from node_helper.desired import DesiredState, Endpoint, Publish, SettingsError

log = logging.getLogger("netaccel.source.kubernetes")

KUBEVIRT_GROUP = "kubevirt.io"
KUBEVIRT_VERSION = "v1"
VMI_PLURAL = "virtualmachineinstances"
VMI_NODE_LABEL = "kubevirt.io/nodeName"
LAUNCHER_LABEL = "kubevirt.io"  # = "virt-launcher" on launcher pods
LAUNCHER_VALUE = "virt-launcher"
CREATED_BY_LABEL = "kubevirt.io/created-by"  # the VMI's uid, on launcher pods


class SourceError(RuntimeError):
    """The API server refuses this identity something the source needs (not retried)."""


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


def log_event(level: int, event: str, **fields: Any) -> None:
    """One structured log line: `event=<event> k=v ...` (values with spaces quoted)."""
    if log.isEnabledFor(level):
        parts = [f"event={event}", *(f"{k}={_fmt(v)}" for k, v in fields.items())]
        log.log(level, " ".join(parts))


# --- what the stores hold: the fields the snapshot needs, nothing more --------------------

def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def trim_pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    ips = [entry.get("ip", "") for entry in status.get("podIPs") or []]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return {"uid": meta.get("uid", ""), "namespace": meta.get("namespace", ""),
            "name": meta.get("name", ""), "labels": dict(meta.get("labels") or {}),
            "annotations": dict(meta.get("annotations") or {}), "ips": ips,
            "phase": status.get("phase", ""), "host_network": bool(spec.get("hostNetwork"))}


def trim_vmi(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = _meta(obj)
    return {"uid": meta.get("uid", ""), "namespace": meta.get("namespace", ""),
            "name": meta.get("name", ""), "annotations": dict(meta.get("annotations") or {})}


def trim_namespace(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = _meta(obj)
    return {"name": meta.get("name", ""), "labels": dict(meta.get("labels") or {})}


def trim_node(obj: Mapping[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec") or {}
    cidrs = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
    return {"name": _meta(obj).get("name", ""), "pod_cidrs": cidrs}


def remote_pod_cidrs(nodes: Mapping[str, Mapping[str, Any]], node_name: str) -> list[str]:
    """The pod CIDRs of every node but `node_name` (a malformed one is logged and left out:
    that node's pods take the CNI's path)."""
    out = []
    for name, node in nodes.items():
        if name == node_name:
            continue
        for cidr in node["pod_cidrs"]:
            try:
                out.extend(desired.valid_cidrs([cidr], f"node {name} spec.podCIDRs"))
            except SettingsError as exc:
                log_event(logging.WARNING, "bad_pod_cidr", node=name, error=str(exc))
    return out


def endpoints(pods: Mapping[str, Mapping[str, Any]], vmis: Mapping[str, Mapping[str, Any]],
              namespaces: Mapping[str, Mapping[str, Any]],
              remote: tuple[str, ...] | list[str] = ()) -> DesiredState:
    """The desired state from trimmed pods (by uid), VMIs (by uid) and namespaces (by name),
    with `remote` as its remote_pod_cidrs."""
    state = DesiredState(remote_pod_cidrs=remote)
    for uid, pod in pods.items():
        if not pod["ips"] or pod["host_network"] or pod["phase"] in ("Succeeded", "Failed"):
            continue
        ns_labels = (namespaces.get(pod["namespace"]) or {}).get("labels") or {}
        base = {"uid": uid, "namespace": pod["namespace"], "name": pod["name"]}
        try:
            ips = desired.valid_ips(pod["ips"])
        except SettingsError as exc:
            state[uid] = Endpoint(**base, error=f"pod {pod['namespace']}/{pod['name']}: {exc}")
            continue
        labels = pod["labels"]
        if labels.get(LAUNCHER_LABEL) == LAUNCHER_VALUE and labels.get(CREATED_BY_LABEL):
            vmi = vmis.get(labels[CREATED_BY_LABEL])
            vm, error = None, None
            if vmi is not None:
                vmi_ns_labels = (namespaces.get(vmi["namespace"]) or {}).get("labels") or {}
                try:
                    if desired.opted_in(vmi["annotations"], vmi_ns_labels):
                        vm = desired.vm_settings(vmi["annotations"])
                except SettingsError as exc:
                    error = f"VMI {vmi['namespace']}/{vmi['name']}: {exc}"
            state[uid] = Endpoint(**base, ips=ips, vm=vm, error=error)
            continue
        try:
            bypass = desired.opted_in(pod["annotations"], ns_labels)
            opt_out = desired.no_bypass_ports(pod["annotations"])
        except SettingsError as exc:
            state[uid] = Endpoint(**base, ips=ips,
                                  error=f"pod {pod['namespace']}/{pod['name']}: {exc}")
            continue
        state[uid] = Endpoint(**base, ips=ips, bypass=bypass, no_bypass_ports=opt_out)
    return state


# --- list + watch of one kind ---------------------------------------------------------------

class _Gone(Exception):
    """The watch's resourceVersion is gone (410): relist."""


@dataclass
class _Kind:
    name: str  # "pods", "virtualmachineinstances", "namespaces"
    resource: str  # for messages: "pods", "virtualmachineinstances.kubevirt.io", ...
    scope: str  # for messages: which objects
    call: Callable[..., Any]  # a generated list function (watch=True makes it a watch)
    trim: Callable[[Mapping[str, Any]], dict[str, Any]]
    key: Callable[[Mapping[str, Any]], str]
    optional: bool = False  # 404 counts as an empty list (the CRD is not installed)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    rv: str | None = None
    synced: bool = False
    watched: bool = False  # a watch of this kind has been accepted (RBAC allowed it once)


class _Backoff:
    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum, self.current = initial, maximum, initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.8, 1.2)
        self.current = min(self.current * 2, self.maximum)
        return min(delay, self.maximum)

    def reset(self) -> None:
        self.current = self.initial


def _status_of(exc: Exception) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and status > 0 else None


def _api_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    try:
        return str(json.loads(body).get("message")) if body else str(exc).strip()
    except (ValueError, AttributeError):
        return str(body)[:300]


def _lines(resp: Any) -> Iterator[bytes]:
    """The lines of a watch stream as they arrive (the stream is chunked)."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading `resp` (a close() alone does not interrupt a blocked read)."""
    with contextlib.suppress(Exception):
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()


class KubernetesSource:
    """This node's pods, VMIs and the namespaces, as desired state (see the module docstring).

    `api_client` is a kubernetes.client.ApiClient (in the DaemonSet: in-cluster config, the
    node name from the downward API env NODE_NAME).
    """

    name = "kubernetes"

    def __init__(self, node_name: str, api_client: Any, *, min_interval: float = 0.05,
                 backoff_initial: float = 0.2, backoff_max: float = 30.0,
                 watch_timeout: int = 300, connect_timeout: float = 10.0,
                 forbidden_grace: float = 30.0, watch_nodes: bool = False) -> None:
        from kubernetes import client

        if not node_name:
            raise ValueError("node_name is empty: set NODE_NAME from the downward API "
                             "(fieldRef spec.nodeName) in the DaemonSet")
        self.node_name = node_name
        self.api_client = api_client
        self.min_interval = min_interval
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.watch_timeout, self.connect_timeout = watch_timeout, connect_timeout
        self.forbidden_grace = forbidden_grace
        core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
        node_field = f"spec.nodeName={node_name}"
        node_label = f"{VMI_NODE_LABEL}={node_name}"

        def pods(**kw: Any) -> Any:
            return core.list_pod_for_all_namespaces(field_selector=node_field, **kw)

        def vmis(**kw: Any) -> Any:
            return custom.list_cluster_custom_object(KUBEVIRT_GROUP, KUBEVIRT_VERSION,
                                                     VMI_PLURAL, label_selector=node_label, **kw)

        self._kinds = [
            _Kind("pods", "pods", f"all namespaces, fieldSelector {node_field}", pods,
                  trim_pod, lambda o: _meta(o).get("uid", "")),
            _Kind(VMI_PLURAL, f"{VMI_PLURAL}.{KUBEVIRT_GROUP}",
                  f"all namespaces, labelSelector {node_label}", vmis, trim_vmi,
                  lambda o: _meta(o).get("uid", ""), optional=True),
            _Kind("namespaces", "namespaces", "cluster-wide", core.list_namespace,
                  trim_namespace, lambda o: _meta(o).get("name", "")),
        ]
        self._nodes: _Kind | None = None
        if watch_nodes:
            self._nodes = _Kind("nodes", "nodes", "cluster-wide", core.list_node, trim_node,
                                lambda o: _meta(o).get("name", ""))
            self._kinds.append(self._nodes)
        self._core = core
        self._cond = threading.Condition()
        self._dirty = False
        self._fatal: SourceError | None = None
        self._open: set[Any] = set()
        self.stats: dict[str, Any] = {"events": 0, "relists": 0, "errors": 0,
                                      "publishes": 0, "last_sync": None}

    # -- the Source protocol --------------------------------------------------------------

    def report(self, ep: Endpoint, reason: str, message: str) -> None:
        """A Warning Event on the pod (kubectl describe pod shows it); errors are logged."""
        from kubernetes import client

        now = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{ep.name}.netaccel-",
                                         namespace=ep.namespace),
            involved_object=client.V1ObjectReference(kind="Pod", api_version="v1",
                                                     namespace=ep.namespace, name=ep.name,
                                                     uid=ep.uid),
            reason=reason, message=message, type="Warning", count=1,
            first_timestamp=now, last_timestamp=now,
            source=client.V1EventSource(component="netaccel-node-helper", host=self.node_name),
            reporting_component="netaccel-node-helper", reporting_instance=self.node_name)
        try:
            self._core.create_namespaced_event(ep.namespace, event)
        except Exception as exc:  # noqa: BLE001 - an event is best effort; the log has it all
            log.warning("cannot post an event on pod %s: %s", ep.ident, exc)

    def run(self, publish: Publish, stop: threading.Event) -> None:
        """Publish snapshots until `stop` is set; raises SourceError on an RBAC refusal."""
        halt = threading.Event()  # ends the watcher threads: `stop`, or a refusal
        self._fatal = None
        threads = [threading.Thread(target=self._run_kind, args=(kind, halt), daemon=True,
                                    name=f"k8s-source-{kind.name}") for kind in self._kinds]
        log_event(logging.INFO, "start", node=self.node_name)
        for t in threads:
            t.start()
        last_publish = 0.0
        try:
            while not stop.is_set():
                with self._cond:
                    if self._fatal is None and not (self._dirty and self._synced()):
                        self._cond.wait(0.2)
                    if self._fatal is not None:
                        break
                    if not (self._dirty and self._synced()):
                        continue
                wait = last_publish + self.min_interval - time.monotonic()
                if wait > 0 and stop.wait(wait):  # coalesce what arrives meanwhile
                    break
                with self._cond:
                    self._dirty = False
                    state = self._snapshot()
                last_publish = time.monotonic()
                publish(state)
                self.stats["publishes"] += 1
                self.stats["last_sync"] = time.time()
                log_event(logging.DEBUG, "publish", endpoints=len(state),
                          events=self.stats["events"])
        finally:
            halt.set()
            for resp in list(self._open):
                _shutdown(resp)
            for t in threads:  # a thread still waiting for response headers ends when they
                t.join(timeout=2)  # come (it checks `halt`); it is a daemon
            log_event(logging.INFO, "stop", node=self.node_name, **self.stats)
        if self._fatal is not None:
            raise self._fatal

    # -- internals ------------------------------------------------------------------------

    def _snapshot(self) -> DesiredState:
        pods, vmis, namespaces = (kind.items for kind in self._kinds[:3])
        remote = remote_pod_cidrs(self._nodes.items, self.node_name) if self._nodes else []
        return endpoints(pods, vmis, namespaces, remote)

    def _synced(self) -> bool:
        return all(kind.synced for kind in self._kinds)

    def _changed(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def _count(self, key: str) -> None:
        with self._cond:
            self.stats[key] += 1

    def _run_kind(self, kind: _Kind, halt: threading.Event) -> None:
        backoff = _Backoff(self.backoff_initial, self.backoff_max)
        need_list = True
        forbidden_since: float | None = None  # first 403 of a run of them after a watch worked
        while not halt.is_set():
            verb = "list" if need_list else "watch"
            try:
                if need_list:
                    self._list(kind)
                    need_list = False
                    verb = "watch"
                delivered = self._watch(kind, halt)
                forbidden_since = None
                if delivered:
                    backoff.reset()
                elif not halt.is_set():  # ended at once without a word: do not spin
                    halt.wait(backoff.next())
            except _Gone as exc:
                self._count("relists")
                log_event(logging.INFO, "relist", kind=kind.name, reason=str(exc))
                need_list = True
            except Exception as exc:  # the API server's answer or the connection
                if halt.is_set():
                    return
                status = _status_of(exc)
                if status == 403:
                    now = time.monotonic()
                    forbidden_since = forbidden_since or now
                    if not kind.watched or now - forbidden_since >= self.forbidden_grace:
                        self._refused(kind, verb, exc)
                        halt.set()
                        return
                    self._count("errors")
                    delay = backoff.next()
                    log_event(logging.WARNING, "forbidden_retry", kind=kind.name, verb=verb,
                              error=_api_message(exc), retry_in=f"{delay:.2f}s",
                              hint="allowed before: an API server starting up?")
                    halt.wait(delay)
                    continue
                if status == 410:
                    self._count("relists")
                    log_event(logging.INFO, "relist", kind=kind.name, reason=f"HTTP 410 on {verb}")
                    need_list = True
                    continue
                if status == 404 and kind.optional and need_list:
                    self._absent(kind)
                    halt.wait(self.backoff_max)
                    continue
                self._count("errors")
                delay = backoff.next()
                log_event(logging.WARNING, "error", kind=kind.name, verb=verb,
                          status=status or "-", error=_api_message(exc) if status else repr(exc),
                          retry_in=f"{delay:.2f}s")
                halt.wait(delay)

    def _refused(self, kind: _Kind, verb: str, exc: Exception) -> None:
        err = SourceError(
            f"kubernetes source: the API server refused to {verb} {kind.resource} "
            f"({kind.scope}) for this identity (HTTP 403: {_api_message(exc)}); grant "
            f"get, list and watch on {kind.resource} (see deploy/rbac.yaml)")
        self._count("errors")
        log_event(logging.ERROR, "forbidden", kind=kind.name, verb=verb, error=str(err))
        with self._cond:
            if self._fatal is None:
                self._fatal = err
            self._cond.notify_all()

    def _absent(self, kind: _Kind) -> None:
        log_event(logging.WARNING, "absent", kind=kind.name, resource=kind.resource,
                  hint="is KubeVirt installed? retrying", retry_in=f"{self.backoff_max:.0f}s")
        with self._cond:
            kind.items, kind.rv, kind.synced = {}, None, True
        self._changed()

    def _list(self, kind: _Kind) -> None:
        resp = kind.call(_preload_content=False,
                         _request_timeout=(self.connect_timeout, 60))
        body = json.loads(resp.data)
        items = {}
        for obj in body.get("items") or []:
            items[kind.key(obj)] = kind.trim(obj)
        with self._cond:
            kind.items = items
            kind.rv = (body.get("metadata") or {}).get("resourceVersion")
            kind.synced = True
        log_event(logging.INFO, "list", kind=kind.name, items=len(items), rv=kind.rv)
        self._changed()

    def _watch(self, kind: _Kind, halt: threading.Event) -> bool:
        """Watch from kind.rv until the server ends the watch; True if it delivered events."""
        resp = kind.call(watch=True, resource_version=kind.rv, allow_watch_bookmarks=True,
                         timeout_seconds=self.watch_timeout, _preload_content=False,
                         _request_timeout=(self.connect_timeout, self.watch_timeout + 30))
        self._open.add(resp)
        kind.watched = True
        delivered = False
        try:
            if halt.is_set():
                return delivered
            for line in _lines(resp):
                if halt.is_set():
                    break
                self._handle(kind, json.loads(line))
                delivered = True
        finally:
            self._open.discard(resp)
            with contextlib.suppress(Exception):
                resp.release_conn()
        return delivered

    def _handle(self, kind: _Kind, event: Mapping[str, Any]) -> None:
        kind_of, obj = event.get("type"), event.get("object") or {}
        if kind_of == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone(f"watch: {obj.get('message', 'resource version too old')}")
            raise RuntimeError(f"watch error event: HTTP {code}: {obj.get('message')}")
        rv = _meta(obj).get("resourceVersion")
        self._count("events")
        if kind_of == "BOOKMARK":
            kind.rv = rv or kind.rv
            return
        key = kind.key(obj)
        with self._cond:
            if kind_of in ("ADDED", "MODIFIED"):
                kind.items[key] = kind.trim(obj)
            elif kind_of == "DELETED":
                kind.items.pop(key, None)
            kind.rv = rv or kind.rv
        log_event(logging.DEBUG, "watch", kind=kind.name, type=kind_of, key=key, rv=rv)
        self._changed()
