"""The agent's HTTP endpoint: /metrics (Prometheus), /healthz, /readyz on one port.

Bound to 127.0.0.1 by default (the DaemonSet's probes run on the node, the agent has
hostNetwork): opening it wider is a deliberate `--metrics-bind` choice.

Metrics (read from the kernel at scrape time, so they are right after an agent restart):
    netaccel_bypass_enabled                        1 when the bypass programs are attached
    netaccel_bypass_<counter>_total                the bypass's per-CPU counters, summed
                                                   (redirected_msgs, redirected_bytes, ...)
    netaccel_bypass_sockets / _sockets_max         sockhash fill and capacity
    netaccel_bypass_cidrs                          entries of the accelerated set
    netaccel_vm_datapaths                          launcher pods with the VM datapath applied
    netaccel_vm_datapath_packets_total{direction}  frames redirected tap_to_veth/veth_to_tap
    netaccel_vm_datapath_bytes_total{direction}    (and bridge_passed), summed over the VMs;
                                                   with per_vm, one series per VM (labels
                                                   namespace, pod) instead
    netaccel_fastpath_endpoints                    devices on the node fast path (endpoints'
                                                   node-side veths and uplinks)
    netaccel_fastpath_packets_total{result}        what their frames did, summed: fast, remote
                                                   (to another node), passed (kernel path),
                                                   ct_miss (of those: not judged yet)
    netaccel_fastpath_bytes_total{result}          fast, remote
    netaccel_endpoints{kind}                       desired: endpoints, bypass, vm, invalid
    netaccel_desired_state_events_total{source}    snapshots published by each source
    netaccel_reconcile_errors_total{op}            failed operations (bypass, vm_accelerate,
                                                   vm_restore)
    netaccel_reconcile_duration_seconds            histogram of reconcile passes
The VM sums drop when a VM goes away (its counters go with it): Prometheus treats a drop as
a counter reset, so rate() stays right.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("netaccel.metrics")


def parse_bind(text: str) -> tuple[str, int]:
    """"127.0.0.1:9464", "[::1]:9464", ":9464" (all addresses) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-bind {text!r}: use HOST:PORT, e.g. 127.0.0.1:9464")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


class KernelCollector:
    """Collects the datapaths' counters at scrape time."""

    def __init__(self, vms: Callable[[], list[dict[str, Any]]], per_vm: bool = False,
                 is_tap: Callable[..., bool] | None = None):
        self.vms = vms  # the applied VMs: [{"namespace", "name", "netns", "interface"}]
        self.per_vm = per_vm
        self.is_tap = is_tap

    def collect(self) -> Iterator[Metric]:
        yield from self._bypass()
        yield from self._vm()
        yield from self._fastpath()

    def _fastpath(self) -> Iterator[Metric]:
        from node_helper import fastpath

        try:
            eps = fastpath.status(None)["endpoints"]
        except Exception as exc:  # noqa: BLE001 - a scrape never fails on it
            log.warning("fast path status failed", extra={"fields": {"error": str(exc)}})
            return
        total: dict[str, int] = {}
        for e in eps:
            for name, value in e["counters"].items():
                total[name] = total.get(name, 0) + value
        packets = CounterMetricFamily("netaccel_fastpath_packets", "frames of the endpoints "
                                      "on the node fast path, by result", labels=["result"])
        nbytes = CounterMetricFamily("netaccel_fastpath_bytes", "bytes of the endpoints on "
                                     "the node fast path, by result", labels=["result"])
        for result, name in (("fast", "fast_packets"), ("remote", "remote_packets"),
                             ("passed", "passed_packets"), ("ct_miss", "ct_misses")):
            packets.add_metric([result], total.get(name, 0))
        for result, name in (("fast", "fast_bytes"), ("remote", "remote_bytes")):
            nbytes.add_metric([result], total.get(name, 0))
        yield GaugeMetricFamily("netaccel_fastpath_endpoints", "devices on the node fast path",
                                value=len(eps))
        yield packets
        yield nbytes

    def _bypass(self) -> Iterator[Metric]:
        from node_helper import sockets

        try:
            st = sockets.status()
        except Exception as exc:  # noqa: BLE001 - a scrape never fails on it
            log.warning("bypass status failed", extra={"fields": {"error": str(exc)}})
            return
        yield GaugeMetricFamily("netaccel_bypass_enabled",
                                "1 when the socket bypass programs are attached",
                                value=int(bool(st["enabled"])))
        for name in sockets.SCALAR_COUNTERS:
            yield CounterMetricFamily(f"netaccel_bypass_{name}",
                                      f"socket bypass counter {name} (all CPUs)",
                                      value=st.get(name, 0))
        pairs = CounterMetricFamily("netaccel_bypass_hop_pairs",
                                    "socket pairs formed, by hop", labels=["hop"])
        nbytes = CounterMetricFamily("netaccel_bypass_hop_redirected_bytes",
                                     "bytes redirected, by hop", labels=["hop"])
        for hop, c in st.get("hops", {}).items():
            pairs.add_metric([hop], c["pairs"])
            nbytes.add_metric([hop], c["redirected_bytes"])
        yield pairs
        yield nbytes
        yield GaugeMetricFamily("netaccel_bypass_sockets", "sockets in the bypass sockhash",
                                value=st.get("sockets", 0))
        yield GaugeMetricFamily("netaccel_bypass_sockets_max", "capacity of the sockhash",
                                value=st.get("sockets_max", 0))
        yield GaugeMetricFamily("netaccel_bypass_cidrs", "entries of the accelerated set",
                                value=len(st.get("cidrs", [])))

    def _vm(self) -> Iterator[Metric]:
        from node_helper import vm

        labels = ["namespace", "pod", "direction"] if self.per_vm else ["direction"]
        packets = CounterMetricFamily("netaccel_vm_datapath_packets",
                                      "frames the VM datapath moved", labels=labels)
        nbytes = CounterMetricFamily("netaccel_vm_datapath_bytes",
                                     "bytes the VM datapath moved", labels=labels)
        totals: dict[str, list[int]] = {}
        vms = self.vms()
        for v in vms:
            try:
                kw = {"is_tap": self.is_tap} if self.is_tap else {}
                st = vm.status(v["netns"], v["interface"], **kw)
            except Exception:  # noqa: BLE001, S112 - gone between the pass and the scrape
                continue
            for direction, c in st["directions"].items():
                p, b = c.get("packets") or 0, c.get("bytes") or 0
                if self.per_vm:
                    packets.add_metric([v["namespace"], v["name"], direction], p)
                    nbytes.add_metric([v["namespace"], v["name"], direction], b)
                else:
                    t = totals.setdefault(direction, [0, 0])
                    t[0] += p
                    t[1] += b
        for direction, (p, b) in sorted(totals.items()):
            packets.add_metric([direction], p)
            nbytes.add_metric([direction], b)
        yield GaugeMetricFamily("netaccel_vm_datapaths",
                                "launcher pods with the VM datapath applied", value=len(vms))
        yield packets
        yield nbytes


class AgentMetrics:
    """The agent's own metrics plus the kernel collector, in one registry."""

    def __init__(self, collector: KernelCollector | None = None):
        self.registry = CollectorRegistry()
        self.events = Counter("netaccel_desired_state_events", "snapshots published",
                              ["source"], registry=self.registry)
        self.errors = Counter("netaccel_reconcile_errors", "failed reconcile operations",
                              ["op"], registry=self.registry)
        for op in ("bypass", "vm_accelerate", "vm_restore", "fastpath_add", "fastpath_remove",
                   "fastpath_remote"):
            self.errors.labels(op)  # present (at 0) before the first error
        self.splice_resets = Counter("netaccel_splice_resets", "connections the splice "
                                     "guard reset (a reader spliced bytes it could not see)",
                                     registry=self.registry)
        self.demotions = Counter("netaccel_demotions", "sockets the demoter moved to the "
                                 "kernel path (one-way small-message streams)",
                                 registry=self.registry)
        self.duration = Histogram("netaccel_reconcile_duration_seconds",
                                  "duration of a reconcile pass", registry=self.registry,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10,
                                           30))
        self.endpoints: dict[str, int] = {"endpoints": 0, "bypass": 0, "vm": 0, "invalid": 0}
        self.registry.register(_EndpointCollector(self))
        if collector is not None:
            self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EndpointCollector:
    def __init__(self, metrics: AgentMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("netaccel_endpoints", "desired endpoints by kind", labels=["kind"])
        for kind, n in self.metrics.endpoints.items():
            g.add_metric([kind], n)
        yield g


class HttpServer:
    """/metrics, /healthz, /readyz on one socket, served from a daemon thread."""

    def __init__(self, bind: tuple[str, int], metrics: AgentMetrics,
                 health: Callable[[], tuple[bool, dict[str, Any]]],
                 ready: Callable[[], tuple[bool, dict[str, Any]]]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?")[0]
                try:
                    if path == "/metrics":
                        self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                    elif path in ("/healthz", "/readyz"):
                        ok, detail = (outer.health if path == "/healthz" else outer.ready)()
                        self._send(200 if ok else 503,
                                   json.dumps({"ok": ok, **detail}, default=str).encode(),
                                   "application/json")
                    else:
                        self._send(404, b"not found\n", "text/plain")
                except Exception as exc:  # noqa: BLE001
                    self._send(500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # no access log on stderr
                pass

        self.metrics, self.health, self.ready = metrics, health, ready
        host, port = bind
        server_cls = type("Server", (ThreadingHTTPServer,),
                          {"address_family": _family(host), "daemon_threads": True})
        self.server = server_cls((host, port), Handler)
        self.address = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, name="http",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
