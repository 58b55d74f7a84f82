"""Pure parts of the agent: the static file's format, the reconciler's decisions (against a
fake kernel), the metrics bind address, the JSON log format."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from node_helper.agent import Agent, JsonFormatter
from node_helper.desired import DesiredState, Endpoint, VmSettings
from node_helper.metrics import parse_bind
from node_helper.reconcile import Reconciler
from node_helper.source_static import FileError, StaticSource, parse

GOOD = """
pods:
  - uid: a
    namespace: ns
    name: pod-a
    ips: [10.0.0.1, "fd00::0001"]
    netns: /proc/1/ns/net
    bypass: true
  - uid: v
    namespace: ns
    name: virt-launcher-x
    netns: na1-vm0
    vm: {datapath: mirror, checksum: "off", interface: pod0123456789a}
  - {uid: w, namespace: ns, name: w, vm: true}
"""


def test_static_format() -> None:
    state = parse(GOOD)
    assert state["a"] == Endpoint("a", "ns", "pod-a", ("10.0.0.1", "fd00::1"), True, None,
                                  "/proc/1/ns/net")
    assert state["v"].vm == VmSettings("mirror", "off", "pod0123456789a")
    assert state["w"].vm == VmSettings() and not state["w"].bypass
    assert parse("") == {} and parse("pods: []") == {}
    assert parse(GOOD).remote_pod_cidrs == ()


def test_static_remote_pod_cidrs_normalised() -> None:
    state = parse("remote_pod_cidrs: [10.244.2.0/24, 'fd00:10:244:2:0::/64']\npods: []")
    assert state.remote_pod_cidrs == ("10.244.2.0/24", "fd00:10:244:2::/64")


@pytest.mark.parametrize(("entry", "error"), [
    ("{uid: x, namespace: n, name: p, ips: [1.2.3]}", "not an IP address"),
    ("{uid: x, namespace: n, name: p, bypass: yes please}", "bypass must be"),
    ("{uid: x, namespace: n, name: p, vm: {datapath: fast}}", "vm-datapath"),
    ("{uid: x, namespace: n, name: p, vm: {speed: 1}}", "unknown keys"),
    ("{uid: x, namespace: n, name: p, colour: red}", "unknown keys"),
    ("{uid: x, name: p}", "namespace must be"),
    ("{namespace: n, name: p}", "uid must be"),
    ("just a string", "must be a mapping"),
])
def test_static_malformed_entry_is_an_endpoint_error(entry: str, error: str) -> None:
    state = parse(f"pods:\n  - {{uid: ok, namespace: n, name: fine, bypass: true}}\n"
                  f"  - {entry}\n")
    assert state["ok"].error is None and state["ok"].bypass
    (bad,) = [ep for ep in state.values() if ep.uid != "ok"]
    assert bad.error and error in bad.error


def test_static_duplicate_uid() -> None:
    state = parse("pods: [{uid: a, namespace: n, name: p}, {uid: a, namespace: n, name: q}]")
    assert state["a"].error is None and "already used" in state["static:1"].error


@pytest.mark.parametrize("text", ["pods: [unclosed", "- a list", "pods: 3", "pod: []",
                                  "remote_pod_cidrs: 10.2.0.0/24", "remote_pod_cidrs: [3]",
                                  "remote_pod_cidrs: [10.2.0.1/24]"])
def test_static_malformed_file(text: str) -> None:
    with pytest.raises(FileError):
        parse(text)


def test_static_source_rereads_and_keeps_last_good(tmp_path: Path) -> None:
    f = tmp_path / "d.yaml"
    f.write_text("pods: [{uid: a, namespace: n, name: p}]")
    got: list[dict[str, Endpoint]] = []
    stop = threading.Event()
    t = threading.Thread(target=StaticSource(f, 0.02).run, args=(got.append, stop))
    t.start()
    try:
        _wait(lambda: len(got) == 1)
        f.write_text("pods: [oops")
        f.with_suffix(".x").write_text("pods: [{uid: b, namespace: n, name: q}]")
        threading.Event().wait(0.2)
        assert len(got) == 1  # the broken file published nothing
        f.with_suffix(".x").replace(f)
        _wait(lambda: len(got) == 2)
        assert list(got[1]) == ["b"]
    finally:
        stop.set()
        t.join()


def _wait(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        threading.Event().wait(0.02)
    raise AssertionError("timed out")


# --- the reconciler against a fake kernel ---------------------------------------------------

class FakeKernel:
    def __init__(self) -> None:
        self.attached, self.cidrs = False, set[str]()
        self.vms: dict[str, VmSettings] = {}  # netns -> settings
        self.ids = {"ns1": (1, 1), "ns2": (1, 2), "ns3": (1, 3)}
        self.fail: set[str] = set()
        self.calls: list[tuple[Any, ...]] = []
        self.forgotten: list[int] = []
        self.fastpaths: set[str] = set()

    def bypass_state(self) -> tuple[bool, set[str]]:
        return self.attached, set(self.cidrs)

    def bypass_opt_out(self, entries: list[tuple[str, int]]) -> None:
        self.calls.append(("opt_out", tuple(entries)))
        self.opt_outs = list(entries)

    def bypass_apply(self, cidrs: list[str]) -> tuple[bool, set[str]]:
        self.calls.append(("bypass", tuple(cidrs)))
        if "bypass" in self.fail:
            raise OSError("no")
        self.attached, self.cidrs = True, set(cidrs)
        return True, set(cidrs)

    def netns_id(self, netns: str) -> tuple[int, int] | None:
        return self.ids.get(netns)

    def netns_cookie(self, netns: str) -> int | None:
        return 100 + self.ids[netns][1] if netns in self.ids else None

    def vm_accelerate(self, netns: str, s: VmSettings) -> dict[str, Any]:
        self.calls.append(("accelerate", netns, s.datapath))
        if netns in self.fail:
            raise RuntimeError(f"{netns} broken")
        self.vms[netns] = s
        return {}

    def vm_restore(self, netns: str, interface: str) -> None:
        self.calls.append(("restore", netns))
        self.vms.pop(netns, None)

    def vm_forget(self, cookie: int) -> None:
        self.forgotten.append(cookie)

    def vm_installed(self) -> list[tuple[str, tuple[int, int]]]:
        return [(n, self.ids[n]) for n in self.vms]

    def fastpath_add(self, netns: str, e: Endpoint) -> str:
        self.calls.append(("fastpath_add", netns))
        if f"fastpath:{netns}" in self.fail:
            raise RuntimeError(f"no MAC learned in {netns} yet")
        device = f"veth-{netns}"
        self.fastpaths.add(device)
        return device

    def fastpath_remove(self, device: str) -> None:
        self.calls.append(("fastpath_remove", device))
        self.fastpaths.discard(device)

    def fastpath_installed(self) -> list[str]:
        return sorted(self.fastpaths)

    def fastpath_remote(self, cidrs: list[str]) -> tuple[list[str], list[str]]:
        """Routes: 10.251.* via vx1, fd00:6e61:* via vx1, 10.252.* via eth9; else none."""
        self.calls.append(("fastpath_remote", tuple(cidrs)))
        if "remote" in self.fail:
            raise OSError("map gone")
        self.remote = list(cidrs)
        via = {"10.251": "vx1", "fd00:6e61": "vx1", "10.252": "eth9"}
        uplinks = {dev for c in cidrs for prefix, dev in via.items() if c.startswith(prefix)}
        self.fastpaths |= uplinks
        return sorted(uplinks), [c for c in cidrs if not any(map(c.startswith, via))]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ep(uid: str, ips: tuple[str, ...] = (), bypass: bool = False, vm: str | None = None,
       error: str | None = None, **vm_kw: str) -> Endpoint:
    return Endpoint(uid, "n", uid, ips, bypass, VmSettings(**vm_kw) if vm else None, vm, error)


def state(*eps: Endpoint, remote: tuple[str, ...] = ()) -> DesiredState:
    return DesiredState({e.uid: e for e in eps}, remote)


def test_bypass_set_in_place_and_kept_attached_when_empty() -> None:
    k = FakeKernel()
    r = Reconciler(k, clock=Clock())
    r.reconcile(state(ep("a")))
    assert k.calls == []  # nobody wants it: nothing attached
    r.reconcile(state(ep("a", ("10.0.0.1",), True), ep("b", ("fd00::1",), True)))
    assert k.cidrs == {"10.0.0.1/32", "fd00::1/128"}
    r.reconcile(state(ep("a", ("10.0.0.1",), True), ep("b", ("fd00::1",), True)))
    assert [c for c in k.calls if c[0] == "bypass"] == k.calls[:1]  # unchanged: no call
    r.reconcile(state(ep("a", ("10.0.0.1",), True)))
    assert k.cidrs == {"10.0.0.1/32"}
    r.reconcile(state())
    assert k.attached and k.cidrs == set()


def test_opt_outs_follow_the_pods_that_want_them() -> None:
    k = FakeKernel()
    r = Reconciler(k, clock=Clock())
    a = ep("a", ("10.0.0.1", "fd00::1"), True)
    r.reconcile(state(replace(a, no_bypass_ports=(8080,))))
    assert k.opt_outs == [("10.0.0.1", 8080), ("fd00::1", 8080)]
    calls = len(k.calls)
    r.reconcile(state(replace(a, no_bypass_ports=(8080,))))
    assert len(k.calls) == calls  # unchanged: no call
    r.reconcile(state(replace(a, no_bypass_ports=(8080,), error="bad annotation")))
    assert k.opt_outs == [("10.0.0.1", 8080), ("fd00::1", 8080)]  # invalid: kept as it was
    r.reconcile(state(a))
    assert k.opt_outs == []
    r.reconcile(state(replace(a, bypass=False, no_bypass_ports=(0,))))
    assert k.opt_outs == []  # only pods that are bypassed have opt-outs


def test_invalid_endpoint_left_untouched() -> None:
    k = FakeKernel()
    r = Reconciler(k, clock=Clock())
    r.reconcile(state(ep("a", ("10.0.0.1",), True), ep("v", vm="ns1")))
    r.reconcile(state(ep("a", ("10.0.0.1",), True, error="bad"), ep("v", vm="ns1", error="x")))
    assert k.cidrs == {"10.0.0.1/32"} and "ns1" in k.vms
    assert set(r.report({})["invalid"]) == {"a", "v"}
    r.reconcile(state())  # gone for good: undone
    assert k.cidrs == set() and k.vms == {}


def test_vm_restore_exactly_what_was_applied_and_backoff() -> None:
    k = FakeKernel()
    clock = Clock()
    errors: list[str] = []
    r = Reconciler(k, clock=clock, on_error=errors.append)
    k.fail.add("ns2")
    r.reconcile(state(ep("v1", vm="ns1", datapath="mirror"), ep("v2", vm="ns2")))
    assert k.vms == {"ns1": VmSettings("mirror")} and errors == ["vm_accelerate"]
    delays = []
    for _ in range(7):  # backoff doubles to the cap; not retried before due
        f = r.failures["v2"]
        delays.append(f.next_try - clock.now)
        r.reconcile(state(ep("v1", vm="ns1", datapath="mirror"), ep("v2", vm="ns2")))
        assert r.failures["v2"].attempts == f.attempts
        clock.now = f.next_try
        r.reconcile(state(ep("v1", vm="ns1", datapath="mirror"), ep("v2", vm="ns2")))
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    k.fail.clear()
    clock.now += 30
    r.reconcile(state(ep("v1", vm="ns1", datapath="mirror"), ep("v2", vm="ns2")))
    assert set(k.vms) == {"ns1", "ns2"} and not r.failures
    # settings change: applied again; moved netns: the old one restored first
    r.reconcile(state(ep("v1", vm="ns3", datapath="bpf"), ep("v2", vm="ns2")))
    assert k.vms == {"ns3": VmSettings("bpf"), "ns2": VmSettings()}
    # opt-out of v2; v1's netns vanishes, then v1 goes: its cookie is forgotten
    r.reconcile(state(ep("v1", vm="ns3")))
    assert set(k.vms) == {"ns3"}
    del k.ids["ns3"]
    r.reconcile(state())
    assert k.forgotten == [103] and r.vms == {}


def test_adoption_and_sweep() -> None:
    k = FakeKernel()
    k.attached, k.cidrs = True, {"10.0.0.1/32"}
    k.vms = {"ns1": VmSettings(), "ns2": VmSettings(), "ns3": VmSettings()}
    r = Reconciler(k, clock=Clock())
    r.adopt()
    k.fail.add("ns2")  # wanted but failing: still claimed, not swept
    desired = state(ep("a", ("10.0.0.1",), True), ep("v1", vm="ns1"), ep("v2", vm="ns2"))
    r.reconcile(desired)
    assert not [c for c in k.calls if c[0] == "bypass"]  # adopted as it is
    assert r.sweep(desired) == ["ns3"]
    assert set(k.vms) == {"ns1", "ns2"}


def test_agent_merges_sources_first_wins() -> None:
    class Src:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, publish: Any, stop: threading.Event) -> None:
            pass

    agent = Agent([Src("one"), Src("two")], datapaths=FakeKernel(), metrics_bind=None)
    agent._publisher("two")(state(ep("a", bypass=True), ep("b"), remote=("10.2.0.0/24",)))
    assert agent.synced() == {"one": False, "two": True}
    agent._publisher("one")(state(ep("a"), remote=("10.3.0.0/24", "10.2.0.0/24")))
    merged = agent.merged()
    assert not merged["a"].bypass and set(merged) == {"a", "b"}
    assert merged.remote_pod_cidrs == ("10.2.0.0/24", "10.3.0.0/24")  # the union
    with pytest.raises(ValueError):
        Agent([Src("x"), Src("x")], metrics_bind=None)


@pytest.mark.parametrize(("text", "bind"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)),
    (":9464", ("0.0.0.0", 9464))])
def test_parse_bind(text: str, bind: tuple[str, int]) -> None:
    assert parse_bind(text) == bind


@pytest.mark.parametrize("text", ["9464", "host:", "h:99999", "h:x"])
def test_parse_bind_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bind(text)


def test_json_log_line() -> None:
    rec = logging.LogRecord("netaccel.x", logging.ERROR, __file__, 1, "vm failed", None, None)
    rec.fields = {"uid": "u", "error": "e"}
    out = json.loads(JsonFormatter().format(rec))
    assert out["level"] == "error" and out["msg"] == "vm failed" and out["uid"] == "u"
    assert "\n" not in JsonFormatter().format(rec)


# --- the node fast path ------------------------------------------------------------------

def fp_ep(uid: str, netns: str, bypass: bool = True, vm: bool = False) -> Endpoint:
    return Endpoint(uid, "n", uid, ("10.0.0.1",), bypass, VmSettings() if vm else None, netns)


def test_fastpath_follows_the_opted_in_endpoints_only_when_enabled() -> None:
    k = FakeKernel()
    Reconciler(k, clock=Clock()).reconcile(state(fp_ep("a", "ns1")))
    assert not [c for c in k.calls if c[0].startswith("fastpath")]  # off by default
    r = Reconciler(k, clock=Clock(), fastpath=True)
    r.reconcile(state(fp_ep("a", "ns1"), fp_ep("b", "ns2", bypass=False, vm=True),
                      fp_ep("c", "ns3", bypass=False)))
    assert k.fastpaths == {"veth-ns1", "veth-ns2"}  # c opted in to nothing
    k.calls.clear()
    r.reconcile(state(fp_ep("a", "ns1"), fp_ep("b", "ns2", bypass=False, vm=True)))
    assert not [c for c in k.calls if c[0].startswith("fastpath")]  # nothing changed
    r.reconcile(state(fp_ep("b", "ns2", bypass=False, vm=True)))  # a went away
    assert k.fastpaths == {"veth-ns2"} and ("fastpath_remove", "veth-ns1") in k.calls
    assert r.report({})["fastpath"] == {"b": {"ident": "n/b", "device": "veth-ns2"}}


def test_fastpath_failure_is_retried_and_keeps_the_device_from_the_sweep() -> None:
    k, clock = FakeKernel(), Clock()
    k.fastpaths.add("veth-ns9")  # left by an earlier run, claimed by nobody
    k.fail.add("fastpath:ns1")
    r = Reconciler(k, clock=clock, fastpath=True)
    result = r.reconcile(state(fp_ep("a", "ns1")))
    assert [e["op"] for e in result.errors] == ["fastpath_add"]
    assert r.sweep(state(fp_ep("a", "ns1"))) == []  # a may claim it: not before it is known
    k.fail.clear()
    clock.now += 1.0
    r.reconcile(state(fp_ep("a", "ns1")))
    assert "veth-ns1" in k.fastpaths and not r.failures
    assert r.sweep(state(fp_ep("a", "ns1"))) == ["veth-ns9"]
    assert k.fastpaths == {"veth-ns1"}



def test_remote_pod_cidrs_and_their_uplinks_follow_the_snapshot() -> None:
    k, clock = FakeKernel(), Clock()
    r = Reconciler(k, clock=clock, fastpath=True)
    a = fp_ep("a", "ns1")
    r.reconcile(state(remote=("10.251.2.0/24",)))  # no local endpoint: nothing to do
    assert not [c for c in k.calls if c[0] == "fastpath_remote"]
    r.reconcile(state(a, remote=("10.251.2.0/24", "fd00:6e61:2::/64")))
    assert k.remote == ["10.251.2.0/24", "fd00:6e61:2::/64"] and "vx1" in k.fastpaths
    assert r.report({})["fastpath_remote"] == {
        "cidrs": ["10.251.2.0/24", "fd00:6e61:2::/64"], "uplinks": ["vx1"]}
    k.calls.clear()
    r.reconcile(state(a, remote=("10.251.2.0/24", "fd00:6e61:2::/64")))
    assert k.calls == []  # unchanged: no call
    # a node whose route is not there yet: reported, the rest applied, retried
    result = r.reconcile(state(a, remote=("10.251.2.0/24", "10.99.0.0/24")))
    assert [e["op"] for e in result.errors] == ["fastpath_remote"]
    assert "10.99.0.0/24" in result.errors[0]["error"] and k.remote[0] == "10.251.2.0/24"
    assert r.sweep(state(a)) == []  # a failure keeps every device from the sweep
    clock.now += 1.0
    r.reconcile(state(a, remote=("10.252.3.0/24",)))  # routed through another device
    assert k.remote == ["10.252.3.0/24"] and ("fastpath_remove", "vx1") in k.calls
    assert "vx1" not in k.fastpaths and "eth9" in k.fastpaths and not r.failures
    assert r.sweep(state(a)) == []  # the uplink is claimed
    r.reconcile(state())  # the last endpoint went: the remote set and uplinks go too
    assert k.remote == [] and k.fastpaths == set()
    assert r.report({})["fastpath_remote"] == {"cidrs": [], "uplinks": []}


def test_a_remote_failure_is_retried_with_backoff() -> None:
    k, clock = FakeKernel(), Clock()
    r = Reconciler(k, clock=clock, fastpath=True)
    k.fail.add("remote")
    result = r.reconcile(state(fp_ep("a", "ns1"), remote=("10.251.2.0/24",)))
    assert [e["op"] for e in result.errors] == ["fastpath_remote"]
    r.reconcile(state(fp_ep("a", "ns1"), remote=("10.251.2.0/24",)))
    assert len([c for c in k.calls if c[0] == "fastpath_remote"]) == 1  # not due yet
    k.fail.clear()
    clock.now += 1.0
    r.reconcile(state(fp_ep("a", "ns1"), remote=("10.251.2.0/24",)))
    assert k.remote == ["10.251.2.0/24"] and not r.failures
