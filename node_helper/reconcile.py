"""Desired vs actual, keyed by pod UID: what the agent does with each snapshot.

Socket bypass (one node-wide set): the accelerated set is the host routes of every pod that
opted in (desired.bypass_cidrs over the valid endpoints), plus, for an endpoint with an
`error`, whichever of its addresses are already in the set (left untouched). A non-empty set
is applied with sockets.enable, which replaces the set in place when the programs are
attached (same program ids, established bypassed connections keep going). When the set
becomes empty the programs STAY attached with an empty set: nothing new is bypassed, the
sock_ops program costs one trie lookup per established TCP socket, the counters keep rising
monotonically for Prometheus, and the next opt-in needs no compile (seconds with bcc). The
programs are only attached in the first place when some pod wants them; `netaccel node
cleanup` removes everything.

VM datapath (per launcher pod): accelerate(netns, interface, datapath, checksum) with the
endpoint's VmSettings; what was applied is remembered per UID (netns as resolved, its nsfs
inode, its netns cookie, the settings). When the endpoint disappears or opts out exactly
that is restored; if its netns is gone (the pod was deleted, its filters went with it) or
its path now names another namespace (a reused /proc/<pid>), only the bpf datapath's map
entries of its cookie are dropped. A changed netns or interface restores the old one first.

Node fast path (with `fastpath=True`, agent flag --node-fastpath): every valid endpoint that
opted in (bypass pod or VM) gets node_helper.fastpath on its node-side veth, found from its
netns (a VM: its MAC as its launcher's bridge learned it, its addresses the pod's); what was
applied is remembered per UID (the device); an endpoint that goes or opts out is taken off.
After the first complete pass, `sweep` takes off devices no endpoint claims.
Across nodes: while some endpoint of this node is on the fast path, the snapshot's
`remote_pod_cidrs` (the other nodes' pod CIDRs) are its remote set, and the devices this node
routes them through (the VXLAN device of a flannel-style CNI, the uplink of a routed one) get
the program too, for frames arriving for a local endpoint. A remote network this node has no
route to is reported and retried (a CNI programs a new node's route a little after the Node
appears); the others are applied meanwhile.

Failures: each endpoint (and the bypass) fails alone and is retried with exponential backoff
(1 s doubling to BACKOFF_CAP); the others proceed. Endpoints with an `error` are reported
and left as they are. Every operation is idempotent, so a resync (every endpoint applied
again, periodically) repairs drift and costs nothing when nothing drifted.

Restart: the first pass adopts what is installed (sockets.enable keeps attached programs
and their pins, accelerate leaves filters in place when they already say the same), so
nothing flaps. After the first pass on a complete snapshot, `sweep` restores the VM
datapaths installed in namespaces no endpoint claims (pods removed while no agent ran).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from node_helper.desired import (
    DesiredState,
    Endpoint,
    VmSettings,
    bypass_cidrs,
    bypass_opt_outs,
)

BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
BYPASS_KEY = "<bypass>"
REMOTE_KEY = "<fastpath-remote>"
log = logging.getLogger("netaccel.reconcile")

NetnsId = tuple[int, int]
Resolver = Callable[[Endpoint], str]


class NetnsUnknown(LookupError):
    """The endpoint's network namespace cannot be found (yet)."""


def netns_from_endpoint(ep: Endpoint) -> str:
    """The default resolver: the netns the source gave (static file, lab)."""
    if not ep.netns:
        raise NetnsUnknown(f"{ep.ident}: the source gives no netns for this pod")
    return ep.netns


class Datapaths(Protocol):
    """What the reconciler needs from the kernel (KernelDatapaths; a fake in unit tests)."""

    def bypass_state(self) -> tuple[bool, set[str]]: ...
    def bypass_apply(self, cidrs: list[str]) -> tuple[bool, set[str]]: ...
    def bypass_opt_out(self, entries: list[tuple[str, int]]) -> None: ...
    def netns_id(self, netns: str) -> NetnsId | None: ...
    def netns_cookie(self, netns: str) -> int | None: ...
    def vm_accelerate(self, netns: str, settings: VmSettings) -> dict[str, Any]: ...
    def vm_restore(self, netns: str, interface: str) -> None: ...
    def vm_forget(self, cookie: int) -> None: ...
    def vm_installed(self) -> list[tuple[str, NetnsId]]: ...
    def fastpath_add(self, netns: str, ep: Endpoint) -> str: ...
    def fastpath_remove(self, device: str) -> None: ...
    def fastpath_installed(self) -> list[str]: ...
    def fastpath_remote(self, cidrs: list[str]) -> tuple[list[str], list[str]]: ...


FASTPATH = "fastpath:"  # failure key prefix of an endpoint's fast path (its UID follows)


@dataclass(frozen=True)
class AppliedVm:
    """What was applied for one launcher pod."""

    ident: str
    requested: str | None  # Endpoint.netns when applied (a change re-resolves)
    netns: str  # as resolved
    netns_id: NetnsId | None
    cookie: int | None
    settings: VmSettings

    def as_dict(self) -> dict[str, Any]:
        return {"ident": self.ident, "netns": self.netns, "datapath": self.settings.datapath,
                "checksum": self.settings.checksum, "interface": self.settings.interface}


@dataclass
class Failure:
    op: str
    ident: str
    error: str
    attempts: int = 0
    next_try: float = 0.0


@dataclass
class PassResult:
    changes: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # this pass's failures
    duration: float = 0.0


class Reconciler:
    def __init__(self, datapaths: Datapaths, resolve: Resolver = netns_from_endpoint,
                 clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[str], None] = lambda op: None,
                 backoff_base: float = BACKOFF_BASE, backoff_cap: float = BACKOFF_CAP,
                 fastpath: bool = False):
        self.dp = datapaths
        self.resolve = resolve
        self.clock = clock
        self.on_error = on_error
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.vms: dict[str, AppliedVm] = {}
        self.fastpath = fastpath
        self.fastpaths: dict[str, tuple[str, str]] = {}  # uid -> (ident, node-side device)
        self.remote: tuple[str, ...] = ()  # the remote set applied
        self.uplinks: set[str] = set()  # the devices carrying it, with the program on them
        self.failures: dict[str, Failure] = {}
        self.invalid: dict[str, Endpoint] = {}
        self.bypass_attached, self.bypass_set = False, set[str]()
        self.bypass_wanted: set[str] = set()
        self.opt_outs: list[tuple[str, int]] | None = None  # None: not yet applied by us
        self.passes = 0

    # --- bookkeeping ---------------------------------------------------------------
    def adopt(self) -> None:
        """Learn what the kernel holds of the bypass (programs attached, the set)."""
        self.bypass_attached, self.bypass_set = self.dp.bypass_state()
        log.info("adopted", extra={"fields": {"event": "adopt", "bypass": self.bypass_attached,
                                              "cidrs": sorted(self.bypass_set)}})

    def _due(self, key: str) -> bool:
        f = self.failures.get(key)
        return f is None or self.clock() >= f.next_try

    def _fail(self, key: str, op: str, ident: str, exc: BaseException,
              result: PassResult) -> None:
        f = self.failures.get(key)
        if f is None or f.op != op:
            f = self.failures[key] = Failure(op, ident, "")
        f.attempts += 1
        f.error = f"{type(exc).__name__}: {exc}"
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (f.attempts - 1))
        f.next_try = self.clock() + delay
        row = {"key": key, "op": op, "ident": ident, "error": f.error, "attempts": f.attempts,
               "retry_in": delay}
        result.errors.append(row)
        self.on_error(op)
        log.error(f"{op} failed", extra={"fields": {"event": "reconcile_error", **row}})

    def _ok(self, key: str, change: dict[str, Any], result: PassResult) -> None:
        self.failures.pop(key, None)
        result.changes.append(change)
        log.info(change["event"], extra={"fields": change})

    def next_retry(self) -> float | None:
        """When the earliest failed operation is due again (clock time), None if none."""
        return min((f.next_try for f in self.failures.values()), default=None)

    # --- the pass ------------------------------------------------------------------
    def reconcile(self, desired: DesiredState, resync: bool = False) -> PassResult:
        start = self.clock()
        result = PassResult()
        invalid = {uid: ep for uid, ep in desired.items() if ep.error}
        for uid, ep in invalid.items():
            if uid not in self.invalid or self.invalid[uid].error != ep.error:
                log.warning("invalid endpoint left untouched", extra={"fields": {
                    "event": "endpoint_invalid", "uid": uid, "ident": ep.ident,
                    "error": ep.error}})
        self.invalid = invalid
        self._bypass(desired, invalid, resync, result)
        self._opt_out(desired, invalid, result)
        self._vm(desired, invalid, resync, result)
        self._fastpath(desired, invalid, resync, result)
        self._remote(desired, resync, result)
        # forget failures of endpoints nobody wants any more
        for key in [k for k in self.failures if k not in (BYPASS_KEY, REMOTE_KEY)
                    and k.removeprefix(FASTPATH) not in desired and k not in self.vms
                    and k.removeprefix(FASTPATH) not in self.fastpaths]:
            del self.failures[key]
        result.duration = self.clock() - start
        self.passes += 1  # after the pass: /readyz means "a pass has completed"
        return result

    def _bypass(self, desired: DesiredState, invalid: DesiredState, resync: bool,
                result: PassResult) -> None:
        want = set(bypass_cidrs({u: e for u, e in desired.items() if u not in invalid}))
        for uid, ep in invalid.items():  # untouched: keep what of it is in the set
            want |= set(bypass_cidrs({uid: replace(ep, bypass=True, error=None)})) \
                & self.bypass_set
        self.bypass_wanted = want
        if not want and not self.bypass_attached:
            self.failures.pop(BYPASS_KEY, None)
            return
        pending = BYPASS_KEY in self.failures
        if not (resync or pending or want != self.bypass_set or
                (want and not self.bypass_attached)):
            return
        if not self._due(BYPASS_KEY):
            return
        try:
            self.bypass_attached, self.bypass_set = self.dp.bypass_apply(sorted(want))
        except Exception as exc:  # noqa: BLE001 - reported, retried; traffic stays as it is
            self._fail(BYPASS_KEY, "bypass", "socket bypass", exc, result)
            return
        self._ok(BYPASS_KEY, {"event": "bypass_applied", "cidrs": sorted(want),
                              "attached": self.bypass_attached}, result)

    def _opt_out(self, desired: DesiredState, invalid: DesiredState,
                 result: PassResult) -> None:
        """The configured no-bypass workloads (desired.NO_BYPASS_PORTS), once the programs
        are attached; an invalid pod keeps what it had."""
        want = bypass_opt_outs({u: e for u, e in desired.items() if u not in invalid})
        want = sorted(set(want) | {e for e in self.opt_outs or []
                                   if any(e[0] in ep.ips for ep in invalid.values())})
        if not self.bypass_attached or want == self.opt_outs:
            return
        try:
            self.dp.bypass_opt_out(want)
        except Exception as exc:  # noqa: BLE001 - reported, retried with the next pass
            self._fail(BYPASS_KEY, "bypass", "socket bypass opt-outs", exc, result)
            return
        self.opt_outs = want

    def _vm(self, desired: DesiredState, invalid: DesiredState, resync: bool,
            result: PassResult) -> None:
        wanted = {uid: ep for uid, ep in desired.items() if ep.vm and uid not in invalid}
        for uid, applied in list(self.vms.items()):
            if uid in invalid or uid in wanted or not self._due(uid):
                continue
            try:
                self._restore(applied)
            except Exception as exc:  # noqa: BLE001
                self._fail(uid, "vm_restore", applied.ident, exc, result)
                continue
            del self.vms[uid]
            self._ok(uid, {"event": "vm_restored", "uid": uid, **applied.as_dict()}, result)
        for uid, ep in wanted.items():
            assert ep.vm is not None
            applied = self.vms.get(uid)
            same = (applied is not None and applied.settings == ep.vm
                    and applied.requested == ep.netns)
            if (same and not resync and uid not in self.failures) or not self._due(uid):
                continue
            try:
                self._accelerate(uid, ep, applied, result)
            except Exception as exc:  # noqa: BLE001
                self._fail(uid, "vm_accelerate", ep.ident, exc, result)

    def _accelerate(self, uid: str, ep: Endpoint, applied: AppliedVm | None,
                    result: PassResult) -> None:
        assert ep.vm is not None
        netns = self.resolve(ep)
        ident = self.dp.netns_id(netns)
        if ident is None:
            raise NetnsUnknown(f"network namespace {netns} does not exist")
        if applied is not None and (applied.netns_id != ident or
                                    applied.settings.interface != ep.vm.interface):
            self._restore(applied)  # another namespace or interface: undo the old first
            del self.vms[uid]
        self.dp.vm_accelerate(netns, ep.vm)
        new = AppliedVm(ep.ident, ep.netns, netns, ident, self.dp.netns_cookie(netns), ep.vm)
        self.vms[uid] = new
        if new != applied or uid in self.failures:
            self._ok(uid, {"event": "vm_accelerated", "uid": uid, **new.as_dict()}, result)
        else:
            self.failures.pop(uid, None)

    def _fastpath(self, desired: DesiredState, invalid: DesiredState, resync: bool,
                  result: PassResult) -> None:
        wanted = {uid: ep for uid, ep in desired.items()
                  if self.fastpath and (ep.bypass or ep.vm) and uid not in invalid}
        for uid, (ident, device) in list(self.fastpaths.items()):
            key = FASTPATH + uid
            if uid in invalid or uid in wanted or not self._due(key):
                continue
            try:
                self.dp.fastpath_remove(device)
            except Exception as exc:  # noqa: BLE001
                self._fail(key, "fastpath_remove", ident, exc, result)
                continue
            del self.fastpaths[uid]
            self._ok(key, {"event": "fastpath_removed", "uid": uid, "ident": ident,
                           "device": device}, result)
        for uid, ep in wanted.items():
            key = FASTPATH + uid
            if (uid in self.fastpaths and not resync and key not in self.failures) or \
                    not self._due(key):
                continue
            try:
                device = self.dp.fastpath_add(self.resolve(ep), ep)
            except Exception as exc:  # noqa: BLE001
                self._fail(key, "fastpath_add", ep.ident, exc, result)
                continue
            old = self.fastpaths.get(uid)
            if old is not None and old[1] != device:  # another device now: off the old one
                self.dp.fastpath_remove(old[1])
            self.fastpaths[uid] = (ep.ident, device)
            if old != (ep.ident, device) or key in self.failures:
                self._ok(key, {"event": "fastpath_added", "uid": uid, "ident": ep.ident,
                               "device": device}, result)

    def _remote(self, desired: DesiredState, resync: bool, result: PassResult) -> None:
        want = desired.remote_pod_cidrs if self.fastpath and self.fastpaths else ()
        if (want == self.remote and not resync and REMOTE_KEY not in self.failures) or \
                not self._due(REMOTE_KEY) or not (want or self.remote or self.uplinks):
            return
        try:
            uplinks, unrouted = self.dp.fastpath_remote(list(want))
            for device in sorted(self.uplinks - set(uplinks)):
                self.dp.fastpath_remove(device)
                self.uplinks.discard(device)
        except Exception as exc:  # noqa: BLE001
            self._fail(REMOTE_KEY, "fastpath_remote", "remote pod CIDRs", exc, result)
            return
        changed = (want, set(uplinks)) != (self.remote, self.uplinks)
        self.remote, self.uplinks = want, set(uplinks)
        if unrouted:
            self._fail(REMOTE_KEY, "fastpath_remote", "remote pod CIDRs", LookupError(
                f"this node has no route to {', '.join(unrouted)} (yet?): frames for them "
                "take the CNI's path"), result)
        elif changed or REMOTE_KEY in self.failures:
            self._ok(REMOTE_KEY, {"event": "fastpath_remote", "cidrs": list(want),
                                  "uplinks": sorted(uplinks)}, result)

    def _restore(self, applied: AppliedVm) -> None:
        if applied.netns_id is not None and self.dp.netns_id(applied.netns) == applied.netns_id:
            self.dp.vm_restore(applied.netns, applied.settings.interface)
        elif applied.cookie is not None:
            self.dp.vm_forget(applied.cookie)  # its namespace is gone, its filters with it

    # --- adoption of what no endpoint claims ---------------------------------------
    def sweep(self, desired: DesiredState) -> list[str]:
        """Undo what is installed that no endpoint claims; return what was undone (fast path
        devices, VM datapath namespaces).

        Claimed: every applied VM's namespace, and whatever the resolver finds for the
        endpoints that want a VM but failed, or that are invalid (left untouched); every
        applied fast path device and uplink, and all of them while an endpoint's fast path
        or the remote set failed (it may claim one, not known before it succeeds)."""
        keep = {a.netns_id for a in self.vms.values()}
        for uid, ep in desired.items():
            if uid in self.vms or not (ep.vm or ep.error):
                continue
            try:
                keep.add(self.dp.netns_id(self.resolve(ep)))
            except Exception:  # noqa: BLE001, S112 - unresolvable: it claims nothing
                continue
        claimed = {device for _ident, device in self.fastpaths.values()} | self.uplinks
        fastpath_failed = any(k.startswith(FASTPATH) or k == REMOTE_KEY for k in self.failures)
        undone = []
        for device in self.dp.fastpath_installed():
            if device not in claimed and not fastpath_failed and self._undo_unclaimed(
                    "fastpath_remove", "fastpath_removed", "device", device,
                    self.dp.fastpath_remove, "removing an unclaimed fast path failed",
                    "removed an unclaimed fast path"):
                undone.append(device)
        for netns, ident in self.dp.vm_installed():
            if ident not in keep and self._undo_unclaimed(
                    "vm_restore", "vm_restored", "netns", netns,
                    lambda n: self.dp.vm_restore(n, "eth0"),
                    "restoring an unclaimed VM datapath failed",
                    "restored an unclaimed VM datapath"):
                undone.append(netns)
        return undone

    def _undo_unclaimed(self, op: str, event: str, field: str, name: str,
                        undo: Callable[[str], None], failed: str, done: str) -> bool:
        """undo(name) for the sweep, logged either way; True when it worked."""
        try:
            undo(name)
        except Exception as exc:  # noqa: BLE001
            self.on_error(op)
            log.error(failed, extra={"fields": {
                "event": "reconcile_error", "op": "sweep", field: name,
                "error": f"{type(exc).__name__}: {exc}"}})
            return False
        log.info(done, extra={"fields": {
            "event": event, field: name, "reason": "no endpoint claims it"}})
        return True

    # --- reporting -------------------------------------------------------------------
    def report(self, desired: DesiredState) -> dict[str, Any]:
        now = self.clock()
        return {
            "bypass": {"attached": self.bypass_attached, "cidrs": sorted(self.bypass_set),
                       "wanted": sorted(self.bypass_wanted),
                       "pods": sorted(ep.ident for ep in desired.values()
                                      if ep.bypass and not ep.error)},
            "vms": {uid: a.as_dict() for uid, a in sorted(self.vms.items())},
            "fastpath": {uid: {"ident": ident, "device": device}
                         for uid, (ident, device) in sorted(self.fastpaths.items())},
            "fastpath_remote": {"cidrs": list(self.remote), "uplinks": sorted(self.uplinks)},
            "invalid": {uid: {"ident": ep.ident, "error": ep.error}
                        for uid, ep in sorted(self.invalid.items())},
            "failures": {k: {"op": f.op, "ident": f.ident, "error": f.error,
                             "attempts": f.attempts,
                             "retry_in": round(max(0.0, f.next_try - now), 3)}
                         for k, f in sorted(self.failures.items())},
        }


def _in_child(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a fresh short-lived interpreter (spawn), its result back.

    For what compiles eBPF with bcc: importing bcc maps ~60 MB of LLVM and a compile takes
    the process to ~270 MB, and a process never gives its high-water mark back. What the
    compile makes is pinned in bpffs (and attached), so it outlives the child; the agent
    only ever opens pins, and stays small (`netaccel-lab bench node` reports its peak RSS)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _compile_fastpath_program() -> None:
    from node_helper import fastpath

    fastpath.compile_program()


def _compile_vm_program() -> None:
    from node_helper.vm import bpf

    bpf.program()  # the parent holds kernel.locked("vm")


class KernelDatapaths:
    """The real datapaths: node_helper.sockets and node_helper.vm (with a tap classifier).

    The eBPF compiles (the bypass's first enable, the VM program's first use) run in a
    short-lived child process (`_in_child`): the agent itself never loads bcc."""

    def __init__(self, is_tap: Callable[..., bool] | None = None):
        from node_helper.vm import is_real_tap

        self.is_tap = is_tap or is_real_tap

    def bypass_state(self) -> tuple[bool, set[str]]:
        from node_helper import sockets

        st = sockets.status()
        return bool(st["enabled"]), set(st["cidrs"]) if st["enabled"] else set()

    def bypass_apply(self, cidrs: list[str]) -> tuple[bool, set[str]]:
        from node_helper import sockets

        if sockets.status()["enabled"]:  # a set update in place: no compile
            st = sockets.enable(cidrs, allow_empty=True)
        else:
            st = _in_child(sockets.enable, cidrs, allow_empty=True)
        return bool(st["enabled"]), set(st["cidrs"])

    def bypass_opt_out(self, entries: list[tuple[str, int]]) -> None:
        from node_helper import sockets

        sockets.set_no_bypass(entries)

    def netns_id(self, netns: str) -> NetnsId | None:
        from node_helper import inventory, kernel

        try:
            return inventory.netns_id(kernel.netns_path(netns))
        except (OSError, ValueError):
            return None

    def netns_cookie(self, netns: str) -> int | None:
        from node_helper.vm import bpf

        try:
            return bpf.netns_cookie(netns)
        except OSError:
            return None

    def vm_accelerate(self, netns: str, settings: VmSettings) -> dict[str, Any]:
        from node_helper import kernel, vm
        from node_helper.vm import bpf

        if settings.datapath == "bpf" and not bpf.program_pinned():
            with kernel.locked("vm"):
                if not bpf.program_pinned():
                    _in_child(_compile_vm_program)
        return vm.accelerate(netns, settings.interface, datapath=settings.datapath,
                             checksum=settings.checksum, is_tap=self.is_tap, report=False)

    def vm_restore(self, netns: str, interface: str) -> None:
        from node_helper import vm

        vm.restore(netns, interface, is_tap=self.is_tap)

    def vm_forget(self, cookie: int) -> None:
        from node_helper import kernel
        from node_helper.vm import bpf

        with kernel.locked("vm"):
            if bpf.pinned():
                bpf.forget_netns(cookie)

    def vm_installed(self) -> list[tuple[str, NetnsId]]:
        from node_helper import inventory

        return [(v.netns, v.ident) for v in inventory.vm_installed()]

    def fastpath_add(self, netns: str, ep: Endpoint) -> str:
        """The endpoint's node-side veth (in this process's netns, the node's) on the fast
        path; returns its name. A VM: the launcher's pod veth, the guest's learned MAC."""
        from node_helper import fastpath
        from node_helper.vm.devices import find_devices

        if not fastpath.program_pinned():
            _in_child(_compile_fastpath_program)
        if ep.vm is None:
            device = fastpath.node_side(netns, "eth0")
            fastpath.add(None, device, netns, addresses=list(ep.ips) or None)
            return device
        devs = find_devices(netns, ep.vm.interface, is_tap=self.is_tap)
        device = fastpath.node_side(netns, devs.veth.name)
        fastpath.add(None, device, netns, vm=True, mac=fastpath.guest_mac(netns, devs.tap.name),
                     addresses=list(ep.ips))
        return device

    def fastpath_remove(self, device: str) -> None:
        from node_helper import fastpath

        fastpath.remove(None, device)

    def fastpath_installed(self) -> list[str]:
        from node_helper import fastpath

        return [e["device"] for e in fastpath.status(None)["endpoints"]]

    def fastpath_remote(self, cidrs: list[str]) -> tuple[list[str], list[str]]:
        """The remote set = `cidrs`, the program on the devices the node routes them through;
        returns (those devices, the networks with no route)."""
        from node_helper import fastpath

        routes, unrouted = fastpath.uplinks_for(None, cidrs)
        if cidrs and not fastpath.program_pinned():
            _in_child(_compile_fastpath_program)
        if fastpath.program_pinned():  # else nothing is loaded, so no remote set to clear
            fastpath.set_remote(cidrs)
        for device in routes:
            fastpath.add_uplink(None, device)
        return sorted(routes), unrouted


def summarize(desired: Iterable[Endpoint]) -> dict[str, int]:
    eps = list(desired)
    return {"endpoints": len(eps), "bypass": sum(1 for e in eps if e.bypass and not e.error),
            "vm": sum(1 for e in eps if e.vm and not e.error),
            "invalid": sum(1 for e in eps if e.error)}
