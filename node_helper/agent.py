"""The node agent (`netaccel node run`): sources -> reconciler -> datapaths, plus metrics.

    sources      each desired.Source runs in its own thread and publishes complete snapshots;
                 the agent keeps the latest per source and merges them (a UID two sources
                 name: the first source given wins, logged)
    reconciler   one loop (node_helper.reconcile): a pass on every new snapshot, when a
                 failed operation is due again, and a resync (everything applied again,
                 idempotent) every `resync_interval`
    netns        a resolver callable Endpoint -> netns path/name: by default the endpoint's
                 own netns field (static file, lab); the Kubernetes deployment passes
                 node_helper.netns_discovery.find_netns
    http         /metrics, /healthz, /readyz (node_helper.metrics)
    logs         JSON, one object a line on stderr: ts, level, logger, msg and the event's
                 fields (event, uid, ident, netns, error, ...)
    report       STATE_FILE (/run/<instance>-agent.json): what the last pass applied, for
                 `netaccel node status`; a report only, never read back by the agent

Everything the datapaths install lives in the kernel: stopping the agent (SIGTERM on a
rolling update, kill -9, a crash) leaves the traffic exactly as it is, and the next agent
adopts it without touching what is already right. Removing it is `netaccel node cleanup`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node_helper import kernel
from node_helper.desired import DesiredState, Endpoint, Source
from node_helper.metrics import AgentMetrics, HttpServer, KernelCollector
from node_helper.reconcile import (
    Datapaths,
    KernelDatapaths,
    Reconciler,
    netns_from_endpoint,
    summarize,
)

RESYNC_INTERVAL = 60.0
HEALTHY_WITHIN = 60.0  # /healthz fails when the loop has not come round for this long
SOURCE_RESTART = 5.0
log = logging.getLogger("netaccel.agent")


def state_file() -> Path:
    return Path("/run") / f"{kernel.instance()}-agent.json"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("netaccel")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Agent:
    def __init__(self, sources: Sequence[Source],
                 resolve: Callable[[Endpoint], str] = netns_from_endpoint,
                 datapaths: Datapaths | None = None,
                 metrics_bind: tuple[str, int] | None = ("127.0.0.1", 9464),
                 per_vm_metrics: bool = False, resync_interval: float = RESYNC_INTERVAL,
                 report_file: Path | None = None, is_tap: Callable[..., bool] | None = None,
                 node_fastpath: bool = False):
        if not sources:
            raise ValueError("the agent needs at least one source of desired state")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"two sources share a name: {names}")
        self.sources = list(sources)
        self.resync_interval = resync_interval
        self.report_file = report_file or state_file()
        self.metrics = AgentMetrics(KernelCollector(self._applied_vms, per_vm_metrics, is_tap))
        self.reconciler = Reconciler(datapaths or KernelDatapaths(is_tap), resolve,
                                     on_error=lambda op: self.metrics.errors.labels(op).inc(),
                                     fastpath=node_fastpath)
        self.metrics_bind = metrics_bind
        self.http: HttpServer | None = None
        self._lock = threading.Lock()
        self._snapshots: dict[str, DesiredState] = {}
        self._wake = threading.Event()
        self._desired = DesiredState()
        self._heartbeat = time.monotonic()
        self._swept = False
        self._last_report: dict[str, Any] | None = None
        self.started = datetime.now(UTC).isoformat(timespec="seconds")

    # --- sources --------------------------------------------------------------------
    def _publisher(self, name: str) -> Callable[[DesiredState], None]:
        def publish(state: DesiredState) -> None:
            with self._lock:
                self._snapshots[name] = DesiredState(state, state.remote_pod_cidrs)
            self.metrics.events.labels(name).inc()
            self._wake.set()
        return publish

    def _run_splice_guard(self, stop: threading.Event) -> None:
        """Reset connections the splice guard cannot save (node_helper.splice_guard)."""
        from node_helper import splice_guard

        while not stop.is_set():
            try:
                splice_guard.run(stop, interval=0.01, on_event=self._splice_event)
            except Exception:  # noqa: BLE001 - logged; the guard must keep running
                log.exception("splice guard failed; restarting it")
                stop.wait(1.0)

    def _run_demoter(self, stop: threading.Event) -> None:
        """Move one-way small-message streams to the kernel path (node_helper.demote)."""
        from node_helper import demote

        demoter = demote.Demoter()
        while not stop.is_set():
            try:
                demote.run(stop, on_demote=lambda _e: self.metrics.demotions.inc(),
                           demoter=demoter)
            except Exception:  # noqa: BLE001 - logged; the demoter must keep running
                log.exception("demoter failed; restarting it")
                stop.wait(1.0)

    def _splice_event(self, event: dict[str, Any]) -> None:
        """One reset connection: a metric, and a log line naming the pod."""
        owner = next((ep for ep in self._desired.values() if event["local"] in ep.ips), None)
        pod = owner.ident if owner else None
        self.metrics.splice_resets.inc()
        if owner is not None:
            message = (f"netaccel reset connection {event['local']}:{event['lport']} <- "
                       f"{event['remote']}:{event['rport']}: it was read with splice/sendfile "
                       f"while {event['queued']} bypassed bytes were queued where splice "
                       "cannot see them; this workload's new connections now use TCP")
            for source in self.sources:
                if hasattr(source, "report"):
                    source.report(owner, "SocketBypassSpliceReset", message)
        log.warning("splice on a bypassed connection reset; the pod's workload now runs on TCP",
                    extra={"fields": {"event": "splice_reset", "pod": pod,
                                      "local": f"{event['local']}:{event['lport']}",
                                      "remote": f"{event['remote']}:{event['rport']}",
                                      "queued": event["queued"], "reset": event["reset"]}})

    def _run_source(self, source: Source, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                source.run(self._publisher(source.name), stop)
            except Exception as exc:  # noqa: BLE001 - logged, restarted
                log.error("source failed, restarting", exc_info=True, extra={"fields": {
                    "event": "source_error", "source": source.name, "error": str(exc)}})
            else:
                if not stop.is_set():
                    log.error("source returned, restarting", extra={"fields": {
                        "event": "source_error", "source": source.name}})
            stop.wait(SOURCE_RESTART)

    def synced(self) -> dict[str, bool]:
        with self._lock:
            return {s.name: s.name in self._snapshots for s in self.sources}

    def merged(self) -> DesiredState:
        """Every source's endpoints (the first source naming a UID wins) and the union of
        their remote pod CIDRs."""
        out = DesiredState()
        remote: set[str] = set()
        with self._lock:
            for source in self.sources:
                snapshot = self._snapshots.get(source.name, DesiredState())
                remote.update(snapshot.remote_pod_cidrs)
                for uid, ep in snapshot.items():
                    if uid in out:
                        log.warning("two sources name one pod; the first wins", extra={
                            "fields": {"event": "source_conflict", "uid": uid,
                                       "source": source.name}})
                        continue
                    out[uid] = ep
        out.remote_pod_cidrs = tuple(sorted(remote))
        return out

    # --- health ---------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._heartbeat
        return age < HEALTHY_WITHIN, {"loop_age_seconds": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        synced = self.synced()
        rec = self.reconciler
        bypass_ok = not rec.bypass_wanted or rec.bypass_attached
        ok = all(synced.values()) and rec.passes > 0 and bypass_ok
        return ok, {"sources": synced, "passes": rec.passes,
                    "bypass": {"wanted": len(rec.bypass_wanted), "attached":
                               rec.bypass_attached},
                    "vms": len(rec.vms), "invalid": len(rec.invalid),
                    "failing": len(rec.failures)}

    def _applied_vms(self) -> list[dict[str, Any]]:
        desired = self._desired
        out = []
        for uid, a in list(self.reconciler.vms.items()):
            ep = desired.get(uid)
            out.append({"namespace": ep.namespace if ep else "", "name": ep.name if ep else "",
                        "netns": a.netns, "interface": a.settings.interface})
        return out

    # --- the loop -------------------------------------------------------------------
    def start_http(self) -> None:
        if self.metrics_bind is not None and self.http is None:
            self.http = HttpServer(self.metrics_bind, self.metrics, self.health, self.ready)
            self.http.start()
            host, port = self.http.address
            log.info("serving /metrics /healthz /readyz", extra={"fields": {
                "event": "http_listening", "host": host, "port": port}})

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set; everything installed stays in the kernel afterwards."""
        log.info("agent starting", extra={"fields": {
            "event": "start", "instance": kernel.instance(), "pid": os.getpid(),
            "sources": [s.name for s in self.sources]}})
        self.reconciler.adopt()
        self.start_http()
        threads = [threading.Thread(target=self._run_source, args=(s, stop),
                                    name=f"source-{s.name}", daemon=True)
                   for s in self.sources]
        threads.append(threading.Thread(target=self._run_splice_guard, args=(stop,),
                                        name="splice-guard", daemon=True))
        threads.append(threading.Thread(target=self._run_demoter, args=(stop,),
                                        name="demoter", daemon=True))
        for t in threads:
            t.start()
        next_resync = time.monotonic() + self.resync_interval
        try:
            while not stop.is_set():
                self._heartbeat = time.monotonic()
                timeout = 1.0
                retry = self.reconciler.next_retry()
                if retry is not None:
                    timeout = max(0.05, min(timeout, retry - time.monotonic()))
                woke = self._wake.wait(timeout)
                self._wake.clear()
                if stop.is_set():
                    break
                self._heartbeat = time.monotonic()
                if not all(self.synced().values()):
                    continue
                now = time.monotonic()
                resync = now >= next_resync
                due = retry is not None and now >= retry
                if not (woke or resync or due or self.reconciler.passes == 0):
                    continue
                if resync:
                    next_resync = now + self.resync_interval
                self.pass_once(resync)
        finally:
            if self.http is not None:
                self.http.stop()
            log.info("agent stopping; everything installed stays in place", extra={
                "fields": {"event": "stop"}})

    def pass_once(self, resync: bool = False) -> None:
        desired = self.merged()
        self._desired = desired
        self.metrics.endpoints = summarize(desired.values())
        result = self.reconciler.reconcile(desired, resync=resync)
        self.metrics.duration.observe(result.duration)
        if not self._swept:
            self._swept = True
            self.reconciler.sweep(desired)
        self.write_report(desired)

    def write_report(self, desired: DesiredState) -> None:
        report = self.reconciler.report(desired)
        idents = {uid: {"namespace": ep.namespace, "name": ep.name} for uid, ep in
                  desired.items()}
        for uid, row in report["vms"].items():
            row.update(idents.get(uid, {}))
        if report == self._last_report:
            return
        self._last_report = report
        body = {"pid": os.getpid(), "started": self.started,
                "updated": datetime.now(UTC).isoformat(timespec="seconds"),
                "metrics": list(self.http.address) if self.http else None, **report}
        tmp = self.report_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(body, indent=1, default=str))
            tmp.replace(self.report_file)
        except OSError as exc:
            log.warning("cannot write the report file", extra={"fields": {
                "path": str(self.report_file), "error": str(exc)}})
