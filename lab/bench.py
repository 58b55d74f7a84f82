"""Benchmarks: qperf between testbed pods (and VMs), kernel path vs accelerated, side by side.

Every point is measured in one run with the variants alternating (ABBA order across sizes),
so slow drift of a shared machine hits both sides alike. Results are rows of
{"test", "msg_size", "unit", "baseline", "accelerated", "floor", "ratio"} (ratio =
accelerated / baseline), printed as a table, written as JSON and plotted as a PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from lab import testbed as tb_mod
from lab.testbed import Testbed, popen_in, run_in, wait_for_port

FULL_SIZES = [1, 4, 16, 64, 256, 1024, 4096, 16384]  # qperf -oo msg_size:1:16K:*4
QUICK_SIZES = [64, 1024, 16384]
QPERF_PORT = 19765
NATIVE_DIR = Path(__file__).parent / "native"
CACHE_DIR = Path("/var/cache/netaccel")
UNITS = {"tcp_lat": "us", "udp_lat": "us", "tcp_bw": "MB/s", "udp_bw": "MB/s"}


class BenchError(RuntimeError):
    """A benchmark could not run; the message says why."""


@dataclass
class Row:
    """One benchmark point."""

    test: str
    msg_size: int
    unit: str
    baseline: float
    accelerated: float
    floor: float | None
    ratio: float
    variant: str | None = None
    scenario: str | None = None  # bench node-path: which endpoints (vm-vm, pod-pod-remote, ...)
    spread: dict[str, list[float]] | None = None  # per variant: [min, max] over the rounds

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("variant", "scenario", "spread")}


# --- measuring -------------------------------------------------------------

_QPERF_VALUE = re.compile(r"^\s*(latency|bw|recv_bw)\s*=\s*([\d.]+)\s*(\S+)", re.M)
_SCALE = {
    "ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6,  # -> microseconds
    "bytes/sec": 1e-6, "KB/sec": 1e-3, "MB/sec": 1.0, "GB/sec": 1e3,  # -> MB/s (10^6)
}


def parse_qperf(test: str, output: str) -> float:
    """Extract the figure of one qperf test (-vu output) in us or MB/s."""
    found = {m.group(1): (float(m.group(2)), m.group(3)) for m in _QPERF_VALUE.finditer(output)}
    key = "latency" if test.endswith("_lat") else ("recv_bw" if "recv_bw" in found else "bw")
    if key not in found:
        raise BenchError(f"qperf printed no {key} for {test}: {output.strip()[-300:]!r}")
    value, unit = found[key]
    if unit not in _SCALE:
        raise BenchError(f"qperf printed an unknown unit {unit!r} for {test}")
    return value * _SCALE[unit]


def run_qperf(client_netns: str, server_ip: str, test: str, size: int, seconds: float) -> float:
    """One qperf test from inside `client_netns` against a server already listening."""
    argv = ["qperf", server_ip, "-t", str(seconds), "-m", str(size), "-vu", test]
    result = run_in(client_netns, argv, timeout=seconds * 4 + 30, check=False)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {(result.stderr or result.stdout).strip()}")
    return parse_qperf(test, result.stdout)


@contextmanager
def qperf_server(netns: str) -> Iterator[None]:
    """A qperf server listening inside `netns` for the duration of the block."""
    proc = popen_in(netns, ["qperf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(netns, QPERF_PORT)
        yield
    finally:
        proc.kill()
        proc.wait()


def unix_floor_tool() -> Path:
    """Compile (once, cached by source hash) the native AF_UNIX floor tool; return its path."""
    source = NATIVE_DIR / "unix_floor.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = CACHE_DIR / f"unix_floor-{digest}"
    if not binary.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        proc = subprocess.run(["gcc", "-O2", "-o", str(tmp), str(source)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"cannot compile {source} (is gcc installed?): {proc.stderr}")
        tmp.rename(binary)
    return binary


def run_unix_floor(test: str, size: int, seconds: float) -> float:
    """AF_UNIX socketpair figure at the same size: one-way us, or MB/s."""
    mode = "lat" if test.endswith("_lat") else "bw"
    out = subprocess.run([str(unix_floor_tool()), mode, str(size), str(seconds)],
                         capture_output=True, text=True, timeout=seconds * 4 + 30, check=True)
    data = json.loads(out.stdout)
    return data["latency_us"] if mode == "lat" else data["bytes_per_sec"] / 1e6


CPU_IDLE_POLICIES = ("auto", "awake", "idle")


def keep_awake_for(test: str, policy: str) -> bool:
    """Whether `test` runs with CPUs kept awake: always, never, or (auto) for latency tests."""
    return policy == "awake" or (policy == "auto" and test.endswith("_lat"))


@contextmanager
def cpus_kept_awake(enabled: bool = True) -> Iterator[bool]:
    """Hold a PM QoS request of 0 us CPU wake-up latency (/dev/cpu_dma_latency) for the block.

    On a VM (like this project's machines: cpuidle-haltpoll with polling off) an idle vCPU
    halts, and waking it through the hypervisor costs 10-20 us: a ping-pong benchmark then
    measures the hypervisor, not the datapath (measured: qperf tcp_lat 64 B 30 us idle,
    7.8 us with this request). It is what tuned's latency-performance profile and cyclictest
    do. Bulk transfers are another matter: polling vCPUs slowed the bypass here (16 KiB
    tcp_bw 3.5 -> 1.9 GB/s) while speeding up the kernel path (0.6 -> 1.6 GB/s), so the
    default "auto" policy keeps CPUs awake for latency tests only, as the latency- and
    throughput-performance profiles would. Yields whether the request is in force.
    """
    fd = None
    if enabled:
        try:
            fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
            os.write(fd, struct.pack("=i", 0))
        except OSError:
            fd = None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


# --- orchestration ---------------------------------------------------------

ProgressFn = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def testbed_for(pods: int, vms: int = 0, mesh: bool = False) -> Iterator[Testbed]:
    """Use the testbed that is up if it has enough pods/VMs, else build one and remove it after.

    With `mesh` the pods used must be meshed with their sidecars running, without it they must
    not be meshed (a benchmark of the plain path must not cross proxies).

    The yields stay outside the `try`: an error of the caller's block must reach the caller,
    not be taken for "no testbed is up" (which made contextlib report "generator didn't stop
    after throw()" instead of the error)."""
    found: Testbed | None = None
    try:
        found = Testbed.find()
    except tb_mod.TestbedError:
        pass
    if found is not None and len(found.pods) >= pods \
            and len([v for v in found.vms if v.guest_netns]) >= vms \
            and all(p.mesh == mesh and (p.sidecar_pid or not mesh) for p in found.pods[:pods]):
        yield found
        return
    with Testbed.create(pods=pods, vms=vms, mesh=mesh) as bed:
        yield bed


def alternate(variants: Sequence[str], index: int) -> list[str]:
    """ABBA order: even points run the variants forwards, odd points backwards."""
    return list(variants) if index % 2 == 0 else list(reversed(variants))


def measure_samples(variants: Sequence[str], apply: Callable[[str], None],
                    measure: Callable[[str], float], index: int,
                    rounds: int) -> dict[str, list[float]]:
    """Measure every variant `rounds` times, alternating (ABBA); every sample of each."""
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in alternate(variants, index + r):
            apply(variant)
            samples[variant].append(measure(variant))
    return samples


def measure_point(variants: Sequence[str], apply: Callable[[str], None],
                  measure: Callable[[str], float], index: int, rounds: int) -> dict[str, float]:
    """measure_samples, each variant's median."""
    samples = measure_samples(variants, apply, measure, index, rounds)
    return {v: statistics.median(values) for v, values in samples.items()}


def floor_row(test: str, size: int, fig: dict[str, float], labels: tuple[str, str, str],
              step: str, progress: ProgressFn) -> Row:
    """The Row of a point measured as baseline, accelerated and floor; its progress line
    names the three variants with `labels`."""
    row = Row(test, size, UNITS[test], fig["baseline"], fig["accelerated"], fig["floor"],
              fig["accelerated"] / fig["baseline"])
    progress(f"{step} {test:7s} {human_size(size):>6s}  " + "  ".join(
        f"{label} {value:9.2f}" for label, value in zip(
            labels, (row.baseline, row.accelerated, row.floor), strict=True))
        + f" {row.unit}  ratio {row.ratio:.2f}x")
    return row


@contextmanager
def demoter_running(policy: str) -> Iterator[None]:
    """The bypass's demoter (node_helper.demote) in a thread while the block runs, as the agent
    runs it on a node; none for policy "always" (nothing is ever demoted)."""
    import threading

    from node_helper import demote

    stop = threading.Event()
    demoter = threading.Thread(target=demote.run, args=(stop,), name="demoter", daemon=True)
    if policy != "always":
        demoter.start()
    try:
        yield
    finally:
        stop.set()
        if demoter.is_alive():
            demoter.join(5)


def bench_pods(sizes: Iterable[int] = FULL_SIZES, seconds: float = 3.0,
               tests: Sequence[str] = ("tcp_lat", "tcp_bw"), rounds: int = 1,
               cpu_idle: str = "auto", progress: ProgressFn = stderr_progress,
               policy: str = "default") -> list[Row]:
    """qperf between two testbed pods: kernel path vs socket bypass, plus the AF_UNIX floor.

    With rounds > 1 every figure is the median of that many alternating measurements.
    `policy` is the bypass's demotion policy (node_helper.sockets.POLICIES); with "default"
    the demoter runs in a thread for the whole benchmark, as the agent runs it on a node."""
    from node_helper import sockets

    points = [(t, s) for s in sizes for t in tests]
    rows: list[Row] = []
    with testbed_for(pods=2) as bed, qperf_server(bed.pods[1].netns), demoter_running(policy):
        client, server, cidrs = bed.pods[0], bed.pods[1], bed.pod_cidrs()

        def apply(variant: str) -> None:
            if variant == "accelerated":
                sockets.enable(cidrs, policy=policy)
            else:
                sockets.disable()

        try:
            for n, (test, size) in enumerate(points, 1):
                def measure(variant: str, test: str = test, size: int = size) -> float:
                    if variant == "floor":
                        return run_unix_floor(test, size, seconds)
                    return run_qperf(client.netns, server.ipv4, test, size, seconds)

                with cpus_kept_awake(keep_awake_for(test, cpu_idle)):
                    fig = measure_point(("baseline", "accelerated", "floor"), apply, measure,
                                        n, rounds)
                rows.append(floor_row(test, size, fig, ("kernel", "bypass", "floor"),
                                      f"[{n}/{len(points)}]", progress))
        finally:
            sockets.disable()
    return rows


MESH_VARIANTS = ("baseline", "accelerated", "floor")


def bench_mesh(sizes: Iterable[int] = FULL_SIZES, seconds: float = 3.0,
               tests: Sequence[str] = ("tcp_lat", "tcp_bw"), rounds: int = 1,
               cpu_idle: str = "auto", progress: ProgressFn = stderr_progress,
               policy: str = "default") -> list[Row]:
    """qperf from an app in one meshed pod to an app in another, through both sidecars.

    Variants, alternating (ABBA) on the same two pods in one run:
      baseline     the mesh on the kernel path (Istio's rules, both HAProxy sidecars)
      accelerated  the mesh with the socket bypass on for the pods' addresses
      floor        the same pods without the mesh: rules removed, the proxies idle, kernel path
    qperf's control connection (19765) and its data connection (a port the server picks and
    tells the client) are both REDIRECTed: every outbound TCP port is (docs/mesh.md).
    With rounds > 1 every figure is the median of that many alternating measurements; the
    demotion `policy` and its demoter as in bench_pods."""
    from node_helper import sockets

    points = [(t, s) for s in sizes for t in tests]
    rows: list[Row] = []
    with testbed_for(pods=2, mesh=True) as bed, qperf_server(bed.pods[1].netns), \
            demoter_running(policy):
        client, server, cidrs = bed.pods[0], bed.pods[1], bed.pod_cidrs()

        def apply(variant: str) -> None:
            bed.mesh_redirect(variant != "floor")
            if variant == "accelerated":
                sockets.enable(cidrs, policy=policy)
            else:
                sockets.disable()

        try:
            for n, (test, size) in enumerate(points, 1):
                def measure(variant: str, test: str = test, size: int = size) -> float:
                    try:
                        return run_qperf(client.netns, server.ipv4, test, size, seconds)
                    except BenchError as exc:  # seen once in ~100 runs, retried once, said
                        progress(f"  {variant} {test} {human_size(size)}: {exc}; retrying once")
                        return run_qperf(client.netns, server.ipv4, test, size, seconds)

                with cpus_kept_awake(keep_awake_for(test, cpu_idle)):
                    fig = measure_point(MESH_VARIANTS, apply, measure, n, rounds)
                rows.append(floor_row(test, size, fig, ("mesh", "mesh+bypass", "no mesh"),
                                      f"[{n}/{len(points)}]", progress))
        finally:
            try:
                sockets.disable()
            finally:
                bed.mesh_redirect(True)
    return rows


def policy_meta(policy: str) -> dict[str, Any]:
    """The demotion policy and its thresholds, for a result's meta."""
    from node_helper import sockets

    return sockets.policy_of(sockets.demote_config(policy))


VM_VARIANTS = ("bridge", "mirror", "mirror+csum-off", "bpf")
_VM_SETTINGS = {
    "mirror": ("mirror", "keep"),
    "mirror+csum-off": ("mirror", "off"),
    "bpf": ("bpf", "keep"),
}


def bench_vm(sizes: Iterable[int] = FULL_SIZES, seconds: float = 3.0,
             tests: Sequence[str] = ("udp_lat", "udp_bw", "tcp_lat", "tcp_bw"),
             variants: Sequence[str] = VM_VARIANTS, rounds: int = 1, cpu_idle: str = "auto",
             progress: ProgressFn = stderr_progress) -> list[Row]:
    """qperf from a testbed VM's guest to a pod: bridge vs each accelerated variant.

    With rounds > 1 every figure is the median of that many alternating measurements."""
    from lab.testbed import is_tap
    from node_helper import vm as vm_api

    points = [(t, s) for s in sizes for t in tests]
    rows: list[Row] = []
    with testbed_for(pods=1, vms=1) as bed, qperf_server(bed.pods[0].netns):
        vm = next(v for v in bed.vms if v.guest_netns)
        server = bed.pods[0]

        def apply(variant: str) -> None:
            if variant == "bridge":
                vm_api.restore(vm.launcher_netns, is_tap=is_tap)
            else:
                datapath, checksum = _VM_SETTINGS[variant]
                vm_api.accelerate(vm.launcher_netns, datapath=datapath, checksum=checksum,
                                     is_tap=is_tap)

        try:
            for n, (test, size) in enumerate(points, 1):
                def measure(_variant: str, test: str = test, size: int = size) -> float:
                    return run_qperf(vm.guest_netns, server.ipv4, test, size, seconds)

                with cpus_kept_awake(keep_awake_for(test, cpu_idle)):
                    fig = measure_point(variants, apply, measure, n, rounds)
                base = fig["bridge"]
                rows += [Row(test, size, UNITS[test], base, fig[v], None, fig[v] / base, v)
                         for v in variants if v != "bridge"]
                progress(f"[{n}/{len(points)}] {test:7s} {human_size(size):>6s}  " + "  ".join(
                    f"{v} {fig[v]:.2f}" for v in variants) + f" {UNITS[test]}")
        finally:
            vm_api.restore(vm.launcher_netns, is_tap=is_tap)
    return rows


NODE_PATH_SCENARIOS = ("vm-vm", "vm-pod", "pod-pod", "pod-pod-remote")
NODE_PATH_VARIANTS = ("kernel", "fastpath")


def bench_node_path(sizes: Iterable[int] = FULL_SIZES, seconds: float = 3.0,
                    tests: Sequence[str] = ("udp_lat", "udp_bw"), rounds: int = 3,
                    scenarios: Sequence[str] = NODE_PATH_SCENARIOS, cpu_idle: str = "auto",
                    progress: ProgressFn = stderr_progress) -> list[Row]:
    """qperf between endpoints of a two-node testbed: the node's kernel path vs the node fast
    path (docs/fastpath.md), alternating in one run.

    Node a: pods 0 and 1, VMs 0 and 1 (netns guests, the VM datapath "bpf" on in both
    variants, as netaccel does today); node b: pod 0; joined by lab/multinode (VXLAN). Both
    nodes carry the CNI stand-in's rules (lab/cni: conntrack on) in both variants. Scenarios:
    vm-vm (a.vm0 -> a.vm1), vm-pod (a.vm0 -> a.pod0), pod-pod (a.pod1 -> a.pod0),
    pod-pod-remote (a.pod1 -> b.pod0). Each node runs its own agent instance
    (multinode.as_node). Every figure is the median of `rounds`, with the spread."""
    from lab import cni, multinode
    from lab.testbed import is_tap
    from node_helper import fastpath
    from node_helper import vm as vm_api

    points = [(sc, t, s) for sc in scenarios for s in sizes for t in tests]
    rows: list[Row] = []
    with Testbed.create(pods=2, vms=2) as a, Testbed.create(pods=1) as b, \
            multinode.joined(a, b) as cluster:
        ends = {"vm-vm": (a.vms[0].guest_netns, a.vms[1].guest_netns, a.vms[1].ipv4),
                "vm-pod": (a.vms[0].guest_netns, a.pods[0].netns, a.pods[0].ipv4),
                "pod-pod": (a.pods[1].netns, a.pods[0].netns, a.pods[0].ipv4),
                "pod-pod-remote": (a.pods[1].netns, b.pods[0].netns, b.pods[0].ipv4)}
        for bed in (a, b):
            cni.load(bed.node_netns)
        for vm in a.vms:
            vm_api.accelerate(vm.launcher_netns, datapath="bpf", is_tap=is_tap)

        def apply(variant: str) -> None:
            for bed, peer in ((a, b), (b, a)):
                if variant == "fastpath":
                    multinode.fastpath_node(bed, peer, cluster)
                else:
                    with multinode.as_node(bed.number):
                        fastpath.cleanup(bed.node_netns, keep_pins=True)

        servers = ExitStack()
        try:
            for netns in {e[1] for e in ends.values()}:
                servers.enter_context(qperf_server(netns))
            for n, (scenario, test, size) in enumerate(points, 1):
                client, _server, ip = ends[scenario]

                def measure(_variant: str, test: str = test, size: int = size,
                            client: str = client, ip: str = ip) -> float:
                    return run_qperf(client, ip, test, size, seconds)

                with cpus_kept_awake(keep_awake_for(test, cpu_idle)):
                    samples = measure_samples(NODE_PATH_VARIANTS, apply, measure, n, rounds)
                fig = {v: statistics.median(x) for v, x in samples.items()}
                rows.append(Row(test, size, UNITS[test], fig["kernel"], fig["fastpath"], None,
                                fig["fastpath"] / fig["kernel"], scenario=scenario,
                                spread={v: [min(x), max(x)] for v, x in samples.items()}))
                progress(f"[{n}/{len(points)}] {scenario:14s} {test:7s} "
                         f"{human_size(size):>6s}  kernel {fig['kernel']:9.2f}  fast path "
                         f"{fig['fastpath']:9.2f} {UNITS[test]}  ratio {rows[-1].ratio:.2f}x")
        finally:
            servers.close()
            for bed in (a, b):
                with multinode.as_node(bed.number):
                    fastpath.cleanup(bed.node_netns)
                    fastpath.unpin_all()
            for vm in a.vms:
                vm_api.restore(vm.launcher_netns, is_tap=is_tap)
    return rows


# --- reporting -------------------------------------------------------------

def human_size(size: int) -> str:
    return f"{size // 1024}K" if size >= 1024 and size % 1024 == 0 else f"{size}B"


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table; one line per point, ratios and distance to the floor."""
    has_floor = any(r.floor is not None for r in rows)
    has_variant = any(r.variant for r in rows)
    has_scenario = any(r.scenario for r in rows)
    head = (["scenario"] if has_scenario else []) + ["test", "size"] + (
        ["variant"] if has_variant else []) + [
        "unit", "baseline", "accelerated"] + (["floor"] if has_floor else []) + ["ratio"] + (
        ["vs floor"] if has_floor else [])
    lines = [head]
    for r in rows:
        line = ([r.scenario or ""] if has_scenario else []) + [r.test, human_size(r.msg_size)] + (
            [r.variant or ""] if has_variant else []) + [
            r.unit, f"{r.baseline:.2f}", f"{r.accelerated:.2f}"]
        if has_floor:
            line.append(f"{r.floor:.2f}" if r.floor is not None else "")
        line.append(f"{r.ratio:.2f}x")
        if has_floor:
            line.append(f"{r.accelerated / r.floor:.2f}x" if r.floor else "")
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i > 1 + has_scenario else cell.ljust(w) for i, (cell, w) in
                  enumerate(zip(row, widths, strict=True)))
        for row in lines
    )


def write_json(rows: Sequence[Row], path: Path | TextIO, meta: dict[str, Any]) -> None:
    doc = {"meta": meta, "rows": [r.as_json() for r in rows]}
    text = json.dumps(doc, indent=2)
    if isinstance(path, Path):
        path.write_text(text + "\n")
    else:
        path.write(text + "\n")


def plot(rows: Sequence[Row], path: Path, title: str,
         baseline_label: str = "kernel path (baseline)",
         accelerated_label: str = "accelerated", floor_label: str = "AF_UNIX floor") -> None:
    """One panel per test: absolute figures against message size (log x), two per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = list(dict.fromkeys((r.scenario + " " if r.scenario else "") + r.test for r in rows))
    ncols = min(2, len(tests))
    nrows = -(-len(tests) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(tests):]:
        ax.set_visible(False)
    for ax, test in zip(axes.flat, tests, strict=False):
        sel = [r for r in rows if (r.scenario + " " if r.scenario else "") + r.test == test]
        sizes = sorted({r.msg_size for r in sel})
        first = {r.msg_size: r for r in sel}
        ax.plot(sizes, [first[s].baseline for s in sizes], "o-", label=baseline_label)
        for variant in dict.fromkeys(r.variant for r in sel):
            pts = {r.msg_size: r for r in sel if r.variant == variant}
            ax.plot(sizes, [pts[s].accelerated for s in sizes], "s-",
                    label=variant or accelerated_label)
        if any(r.floor is not None for r in sel):
            ax.plot(sizes, [first[s].floor for s in sizes], "^--", label=floor_label)
        ax.set_xscale("log", base=2)
        if test.endswith("_bw"):
            ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(sel[0].unit)
        ax.set_title(test)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_meta() -> dict[str, Any]:
    """Context for a JSON result: when, where, how loaded."""
    import platform

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }


# --- the node agent at scale: `netaccel-lab bench node` ------------------------------------

NODE_PODS, NODE_VMS = 200, 100
QUICK_NODE_PODS, QUICK_NODE_VMS = 20, 10
REPO = Path(__file__).resolve().parents[1]
RBAC_FILE = REPO / "deploy" / "rbac.yaml"  # in a checkout; else the admin identity is used


def _vm_hwm_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a live process in KiB; (0, 0) when it is gone."""
    found = {"VmHWM": 0, "VmRSS": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1])
    except OSError:
        pass
    return found["VmHWM"], found["VmRSS"]


def _parallel(calls: Sequence[Callable[[], Any]], workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(c) for c in calls]:
            future.result()


class _NodeAgent:
    """`netaccel node run --kubernetes` as a subprocess of its own instance; its report file
    (/run/<instance>-agent.json, written after every pass) says what it has applied."""

    def __init__(self, env: dict[str, str], argv: list[str], log: Path):
        self.env, self.log = env, log
        self.report_file = Path("/run") / f"{env['NETACCEL_INSTANCE']}-agent.json"
        self.out = log.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "node_helper.cli", *argv],
                                     stdout=self.out, stderr=self.out, env=env, cwd=REPO)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the agent exited with {self.proc.returncode}; its log "
                             f"({self.log}):\n{self.log.read_text()[-3000:]}")

    def report(self) -> dict[str, Any]:
        try:
            return json.loads(self.report_file.read_text())
        except (OSError, ValueError):
            return {}

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait(self, check: Callable[[dict[str, Any]], bool], timeout: float, what: str,
             poll: float = 0.01) -> float:
        """Poll the report until `check` holds; the monotonic time it first did."""
        deadline = time.monotonic() + timeout
        while True:
            if check(self.report()):
                return time.monotonic()
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(f"the agent did not get {what} within {timeout:.0f} s; last "
                                 f"report: {json.dumps(self.report())[:1500]}")
            time.sleep(poll)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: leaves everything in place, like SIGTERM
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def _netaccel_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-m", "node_helper.cli", *args, "--json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if res.returncode != 0:
        raise BenchError(f"netaccel {' '.join(args)} exited {res.returncode}: "
                         f"{(res.stderr or res.stdout)[-2000:]}")
    return json.loads(res.stdout)


def bench_node(pods: int = NODE_PODS, vms: int = NODE_VMS, workers: int = 8,
               keep_logs: Path | None = None,
               progress: ProgressFn = stderr_progress) -> dict[str, Any]:
    """The agent (`netaccel node run --kubernetes`) at scale against a real API server.

    A testbed of `pods` pods and `vms` VMs (guest "none": a real tun/tap each, as the agent's
    own tap classifier wants) laid out as kubelet does, with the UIDs of Pod objects created
    first without addresses (scheduled, sandboxes starting). The agent runs, with the
    identity of deploy/rbac.yaml, and has synced (nothing to do). Then every pod and launcher
    gets its address at once (kubelet's status patches, `workers` in parallel) in a namespace
    that opts in: measured from the first patch until the agent's report says the bypass set
    holds every pod address and every VM is accelerated (then checked in the kernel), the
    agent's peak RSS (VmHWM), and the time to undo it all (every Pod and VMI deleted, until
    the bypass set is empty and no VM datapath is left). The agent runs under an instance of
    its own (NETACCEL_INSTANCE) and everything goes afterwards, also on failure.
    """
    import secrets
    import shutil
    import tempfile

    import yaml

    from lab import apiserver as api_mod
    from lab import kube, vmi_crd
    from node_helper.desired import ACCELERATE

    try:
        kube_apiserver, etcd = api_mod.find_binaries()
    except api_mod.APIServerError as exc:
        raise BenchError(f"{exc} (scripts/build-kube-apiserver.sh; a cold build needs Go)") \
            from None
    instance = f"nb{os.getpid() % 10**8}"
    env = dict(os.environ, NETACCEL_INSTANCE=instance)
    work = Path(tempfile.mkdtemp(prefix="netaccel-bench-node-"))
    result: dict[str, Any] = {"conditions": {
        "pods": pods, "vms": vms, "instance": instance, "api_writers": workers,
        "kube_apiserver": str(kube_apiserver), "etcd": str(etcd),
        "vm_datapath": "bpf", "vm_checksum": "keep", "opt_in": "namespace label"}}
    agent: _NodeAgent | None = None
    bed: Testbed | None = None
    try:
        with api_mod.running_apiserver(kube_apiserver=kube_apiserver, etcd=etcd) as api, \
                kube.api_client(api.url, api.ca_file, api.token) as admin:
            api.install_crd(vmi_crd.load())
            cluster = kube.Cluster(admin)
            if RBAC_FILE.is_file():
                docs = [d for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d]
                kube.apply_rbac(admin, docs)
                sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
                token = kube.service_account_token(admin, sa["namespace"], sa["name"])
                result["conditions"]["identity"] = f"ServiceAccount {sa['namespace']}/" \
                    f"{sa['name']} (deploy/rbac.yaml)"
            else:
                token = api.token
                result["conditions"]["identity"] = "admin (no deploy/rbac.yaml found)"
            kubeconfig = kube.write_kubeconfig(work / "kubeconfig", api.url, api.ca_file, token)
            node = f"bench-{secrets.token_hex(4)}"
            ns = cluster.namespace(f"bench-{secrets.token_hex(4)}", {ACCELERATE: "true"})

            start = time.monotonic()
            progress(f"creating {pods} Pods and {vms} VMIs + launcher Pods (no addresses yet)")
            uids: dict[str, str] = {}

            def make_pod(i: int) -> None:
                uids[f"pod{i}"] = cluster.pod(ns, f"pod{i}", node)

            def make_vm(j: int) -> None:
                vmi_uid = cluster.vmi(ns, f"vm{j}", node)
                uids[f"vm{j}"] = cluster.launcher(ns, f"vm{j}", vmi_uid, node, (),
                                                  name=f"virt-launcher-vm{j}")[1]

            _parallel([lambda i=i: make_pod(i) for i in range(pods)]
                      + [lambda j=j: make_vm(j) for j in range(vms)], workers)
            progress(f"  {time.monotonic() - start:.1f} s; building the testbed (kubelet "
                     "layout with those UIDs)")
            start = time.monotonic()
            bed = Testbed.create(pods=pods, vms=vms, guest="none",
                                 kubelet_root=work / "kubelet", uids=uids)
            result["conditions"]["testbed_build_seconds"] = round(time.monotonic() - start, 2)
            progress(f"  testbed {bed.number} in {time.monotonic() - start:.1f} s; starting the "
                     "agent")
            agent = _NodeAgent(env, [
                "node", "run", "--kubernetes", "--node-name", node, "--kubeconfig",
                str(kubeconfig), "--kubelet-root", str(bed.kubelet_root),
                "--metrics-bind", f"127.0.0.1:{api_mod.free_port()}"], work / "agent.log")
            pid = agent.proc.pid
            agent.wait(lambda r: r.get("pid") == pid, 60, "its first pass", poll=0.05)

            want_cidrs = sorted(bed.pod_cidrs())
            patches = [lambda p=p: cluster.set_ips(ns, p.name, [p.ipv4, p.ipv6])
                       for p in bed.pods]
            patches += [lambda v=v: cluster.set_ips(ns, f"virt-launcher-{v.name}", [v.ipv4])
                        for v in bed.vms]
            progress(f"all {pods} pods and {vms} VMs get their addresses at once")
            t0 = time.monotonic()
            _parallel(patches, workers)
            t_api = time.monotonic()

            def programmed(r: dict[str, Any]) -> bool:
                bypass = r.get("bypass") or {}
                return bypass.get("cidrs") == want_cidrs and len(r.get("vms") or {}) == vms

            t_done = agent.wait(programmed, 600, "everything programmed")
            hwm, rss = _vm_hwm_kib(agent.proc.pid)
            result["program"] = {"seconds": round(t_done - t0, 3),
                                 "api_writes_seconds": round(t_api - t0, 3),
                                 "after_last_write_seconds": round(t_done - t_api, 3)}
            progress(f"  programmed in {t_done - t0:.2f} s (API writes took {t_api - t0:.2f} s)")
            status = _netaccel_json(env, "node", "status")  # the kernel's word, not the report
            result["program"]["kernel_check"] = {
                "bypass_cidrs": len(status["bypass"]["cidrs"]),
                "bypass_matches": status["bypass"]["cidrs"] == want_cidrs,
                "vm_datapaths": sum(1 for v in status["vms"] if v.get("datapath") == "bpf")}
            result["program"]["profile"] = _agent_profile(agent.records(), t0, t_done)

            progress(f"deleting every Pod and VMI ({pods + 2 * vms} objects)")
            deletes = [lambda p=p: cluster.delete_pod(ns, p.name) for p in bed.pods]
            deletes += [lambda v=v: cluster.delete_pod(ns, f"virt-launcher-{v.name}")
                        for v in bed.vms]
            deletes += [lambda v=v: cluster.delete_vmi(ns, v.name) for v in bed.vms]
            t1 = time.monotonic()
            _parallel(deletes, workers)
            t_api = time.monotonic()
            t_undone = agent.wait(lambda r: (r.get("bypass") or {}).get("cidrs") == []
                                  and r.get("vms") == {}, 600, "everything undone")
            result["undo"] = {"seconds": round(t_undone - t1, 3),
                              "api_writes_seconds": round(t_api - t1, 3)}
            progress(f"  undone in {t_undone - t1:.2f} s")
            hwm, rss = max(hwm, _vm_hwm_kib(agent.proc.pid)[0]), _vm_hwm_kib(agent.proc.pid)[1]
            result["rss"] = {"peak_mib": round(hwm / 1024, 1), "end_mib": round(rss / 1024, 1)}
            status = _netaccel_json(env, "node", "status")
            result["undo"]["kernel_check"] = {"bypass_cidrs": len(status["bypass"]["cidrs"]),
                                              "vm_datapaths": len(status["vms"])}
            result["conditions"]["apiserver_rss_mib"] = {
                k: round(v / 2**20) for k, v in api.rss_bytes().items()}
            agent.stop()
    finally:
        if agent is not None:
            agent.stop()
            if keep_logs is not None:
                shutil.copy(agent.log, keep_logs)
        try:
            done = _netaccel_json(env, "node", "cleanup")
            result["cleanup_ok"] = done.get("ok")
        finally:
            if bed is not None:
                bed.destroy()
            shutil.rmtree(work, ignore_errors=True)
            for part in ("bypass", "vm"):  # the instance's lock files
                Path(f"/run/{instance}-{part}.lock").unlink(missing_ok=True)
    result["conditions"].update(machine_meta())
    return result


def _agent_profile(records: Sequence[dict[str, Any]], t0: float, t_done: float
                   ) -> dict[str, Any]:
    """Where the agent's time went, from its log: the first and last change of each kind."""
    from datetime import datetime

    stamps: dict[str, list[float]] = {}
    for r in records:
        if r.get("event") in ("bypass_applied", "vm_accelerated", "reconcile_error"):
            ts = datetime.fromisoformat(r["ts"]).timestamp()
            stamps.setdefault(r["event"], []).append(ts)
    out: dict[str, Any] = {}
    for event, ts in stamps.items():
        out[event] = {"count": len(ts), "span_seconds": round(max(ts) - min(ts), 3)}
    return out


def format_node_table(result: dict[str, Any]) -> str:
    c = result["conditions"]
    rows = [
        ("pods / VMs", f"{c['pods']} / {c['vms']}"),
        ("program (first status patch -> all programmed)",
         f"{result['program']['seconds']:.2f} s"),
        ("  of which API writes", f"{result['program']['api_writes_seconds']:.2f} s"),
        ("  after the last write", f"{result['program']['after_last_write_seconds']:.2f} s"),
        ("agent RSS peak (VmHWM)", f"{result['rss']['peak_mib']:.1f} MiB"),
        ("undo (first delete -> nothing applied)", f"{result['undo']['seconds']:.2f} s"),
        ("kernel after program: bypass cidrs / bpf VMs",
         f"{result['program']['kernel_check']['bypass_cidrs']} / "
         f"{result['program']['kernel_check']['vm_datapaths']}"),
        ("kernel after undo: bypass cidrs / VMs",
         f"{result['undo']['kernel_check']['bypass_cidrs']} / "
         f"{result['undo']['kernel_check']['vm_datapaths']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:{width}s}  {v}" for k, v in rows)
