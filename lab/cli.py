"""netaccel-lab: the lab's command line (testbed, benchmarks).

    netaccel-lab testbed up [--pods N] [--vms M] [--guest netns|qemu] [--kubelet-root DIR]
                            [--cgroup-driver systemd|cgroupfs] [--mesh] [--nodes 2] | status | down
    netaccel-lab testbed join --number K1 --peer K2 | unjoin --number K
                                                 two testbeds as a two-node cluster (VXLAN)
    netaccel-lab bypass on|off [--number K]      the agent's socket bypass for a testbed's pods
    netaccel-lab bench pods|vm|mesh [--quick] [--rounds R] [--policy always|default (pods, mesh)]
    netaccel-lab bench node-path [--quick] [--tcp] [--rounds R]   node kernel path vs node fast path
                                    [--json FILE] [--plot FILE.png]
    netaccel-lab bench node [--quick] [--pods N] [--vms M] [--json FILE]   the agent at scale

Exit codes as `netaccel` (node_helper.exitcodes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lab import bench, mesh, multinode, testbed
from node_helper import exitcodes
from node_helper.cli import print_json


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --- testbed -----------------------------------------------------------------

def cmd_testbed(args: argparse.Namespace) -> int:
    if args.action in ("join", "unjoin") or (args.action == "up" and args.nodes == 2):
        return cmd_testbed_cluster(args)
    if args.action == "up":
        bed = testbed.Testbed.create(pods=args.pods, vms=args.vms, guest=args.guest,
                                     kubelet_root=args.kubelet_root,
                                     cgroup_driver=args.cgroup_driver, mesh=args.mesh)
        print(f"testbed {bed.number} up: {len(bed.pods)} pods"
              f"{' with sidecars (mesh)' if args.mesh else ''}, {len(bed.vms)} VMs "
              f"({args.guest} guests)", file=sys.stderr)
        print(bed.to_json())
        return exitcodes.OK
    if args.action == "down":
        if args.all:
            numbers = testbed.destroy_all()
        else:
            numbers = [testbed.Testbed.find(args.number).number]
            multinode.unjoin_number(numbers[0])  # the peer testbed is left as it was
            testbed.destroy_number(numbers[0])
        print(f"removed testbed(s): {numbers or 'none'}", file=sys.stderr)
        return exitcodes.OK
    bed = testbed.Testbed.find(args.number)
    cluster = multinode.find(bed.number)
    if args.json:
        print(bed.to_json() if cluster is None else
              json.dumps(bed.status() | {"cluster": cluster.status()}, indent=2))
    else:
        print(f"testbed {bed.number} (node netns {bed.node_netns})")
        if cluster is not None:
            me, peer = cluster.nodes
            print(f"  joined to testbed {peer.number}: {me.vxlan} {me.overlay4} "
                  f"{me.overlay6} over {me.wire} {me.underlay} -> {peer.underlay}")
        for p in bed.pods:
            sidecar = ""
            if p.mesh:
                sidecar = f"  sidecar pid {p.sidecar_pid}" if p.sidecar_pid else \
                    "  sidecar NOT RUNNING"
            print(f"  pod {p.name:6s} netns {p.netns:14s} {p.ipv4:16s} {p.ipv6}{sidecar}")
        for v in bed.vms:
            print(f"  vm  {v.name:6s} launcher {v.launcher_netns:12s} guest "
                  f"{v.guest_netns or v.guest_kind:14s} {v.ipv4}")
    return exitcodes.OK


def cmd_testbed_cluster(args: argparse.Namespace) -> int:
    """up --nodes 2, join, unjoin: two testbeds as a two-node cluster (lab/multinode.py)."""
    if args.action == "unjoin":
        number = testbed.Testbed.find(args.number).number
        done = multinode.unjoin_number(number)
        print(f"testbed {number} {'unjoined' if done else 'was not joined'}", file=sys.stderr)
        return exitcodes.OK
    if args.action == "join":
        if args.number is None or args.peer is None:
            raise testbed.TestbedError("join needs --number K1 --peer K2")
        beds = [testbed.Testbed.find(args.number), testbed.Testbed.find(args.peer)]
        cluster = multinode.join(*beds)
    else:
        beds = []
        try:
            for _ in range(2):
                beds.append(testbed.Testbed.create(
                    pods=args.pods, vms=args.vms, guest=args.guest,
                    kubelet_root=args.kubelet_root, cgroup_driver=args.cgroup_driver,
                    mesh=args.mesh))
            cluster = multinode.join(*beds)
        except BaseException:
            for bed in beds:
                bed.destroy()
            raise
    print(f"testbeds {beds[0].number} and {beds[1].number} joined (VXLAN, VNI "
          f"{cluster.vni}, MTU {cluster.mtu})", file=sys.stderr)
    print(json.dumps({"testbeds": [bed.status() for bed in beds],
                      "cluster": cluster.status()}, indent=2))
    return exitcodes.OK


# --- the agent's socket bypass for a testbed ------------------------------------

def cmd_bypass(args: argparse.Namespace) -> int:
    from node_helper import sockets

    if args.action == "on":
        cidrs = testbed.Testbed.find(args.number).pod_cidrs()
        status = sockets.enable(cidrs)
        print(f"socket bypass on for {', '.join(cidrs)}", file=sys.stderr)
        if args.json:
            print_json(status)
        return exitcodes.OK
    sockets.disable()
    print("socket bypass off: nothing of netaccel is attached", file=sys.stderr)
    return exitcodes.OK


# --- bench ---------------------------------------------------------------------

def cmd_bench_node(args: argparse.Namespace) -> int:
    pods = args.pods or (bench.QUICK_NODE_PODS if args.quick else bench.NODE_PODS)
    vms = args.vms if args.vms is not None else (bench.QUICK_NODE_VMS if args.quick
                                                 else bench.NODE_VMS)
    result = bench.bench_node(pods, vms, keep_logs=Path(args.agent_log) if args.agent_log
                              else None)
    print(bench.format_node_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON written to {args.json}", file=sys.stderr)
    return exitcodes.OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "node":
        return cmd_bench_node(args)
    sizes = bench.QUICK_SIZES if args.quick else bench.FULL_SIZES
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    meta = bench.machine_meta() | {"bench": args.target, "seconds_per_point": seconds}
    if args.rounds is None:
        args.rounds = 3 if args.target == "node-path" else 1
    meta["rounds"] = args.rounds
    run, title, labels = {
        "pods": (bench.bench_pods, "same-node pods: kernel TCP path vs socket bypass (qperf)",
                 ("kernel TCP path (baseline)", "socket bypass")),
        "vm": (bench.bench_vm, "VM guest -> pod: in-pod bridge vs tc redirect variants (qperf)",
               ("in-pod bridge (baseline)", "accelerated")),
        "mesh": (bench.bench_mesh, "meshed pods, app -> sidecar -> sidecar -> app (qperf)",
                 ("mesh, kernel path (baseline)", "mesh + socket bypass",
                  "same pods, no mesh (floor)")),
        "node-path": (bench.bench_node_path, "two-node testbed: node kernel path vs node fast "
                      "path (qperf)", ("node kernel path (baseline)", "node fast path")),
    }[args.target]
    if args.target == "mesh":
        meta["mesh"] = mesh.describe()
    meta["cpu_idle"] = {
        "policy": args.cpu_idle,
        "cpu_dma_latency_0us_for": [t for t in ("tcp_lat", "tcp_bw", "udp_lat", "udp_bw")
                                    if bench.keep_awake_for(t, args.cpu_idle)],
    }
    extra = {}
    if args.target in ("pods", "mesh"):
        meta["bypass_policy"] = bench.policy_meta(args.policy)
        extra["policy"] = args.policy
    elif args.policy != "default":
        raise ValueError("--policy is the socket bypass's: it applies to `bench pods|mesh` only")
    if args.target == "node-path" and args.tcp:
        extra["tests"] = ("udp_lat", "udp_bw", "tcp_lat", "tcp_bw")
    rows = run(sizes, seconds, rounds=args.rounds, cpu_idle=args.cpu_idle, **extra)
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(rows, Path(args.json), meta)
        print(f"JSON rows written to {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(rows, Path(args.plot), title, *labels)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return exitcodes.OK


# --- parser --------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netaccel-lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("testbed", help="the simulated node made of network namespaces")
    p.add_argument("action", choices=["up", "down", "status", "join", "unjoin"])
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--vms", type=int, default=0)
    p.add_argument("--guest", choices=testbed.GUESTS, default="netns")
    p.add_argument("--kubelet-root", metavar="DIR",
                   help="up: lay pods out as kubelet does (UIDs, cgroups, launcher sockets)")
    p.add_argument("--cgroup-driver", choices=testbed.CGROUP_DRIVERS, default="systemd")
    p.add_argument("--mesh", action="store_true",
                   help="up: every pod gets an Istio-style sidecar (HAProxy as UID 1337, "
                   "Istio's redirect rules; IPv4 only), see docs/mesh.md")
    p.add_argument("--nodes", type=int, choices=[1, 2], default=1,
                   help="up: 2 = two testbeds joined as a two-node cluster (docs/multinode.md)")
    p.add_argument("--number", type=int,
                   help="status/down/join/unjoin: which testbed (when several)")
    p.add_argument("--peer", type=int, help="join: the testbed to join --number to")
    p.add_argument("--all", action="store_true", help="down: remove every testbed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_testbed)
    p = sub.add_parser("bench", help="qperf benchmarks on the testbed, side by side; node: "
                       "the agent programming many pods and VMs from a real API server")
    p.add_argument("target", choices=["pods", "vm", "mesh", "node", "node-path"])
    p.add_argument("--quick", action="store_true", help="64 B, 1 KiB, 16 KiB at 2 s a point "
                   f"(node: {bench.QUICK_NODE_PODS} pods, {bench.QUICK_NODE_VMS} VMs)")
    p.add_argument("--pods", type=_positive_int,
                   help=f"node: pods (default {bench.NODE_PODS}, at most {testbed.MAX_PODS})")
    p.add_argument("--vms", type=int,
                   help=f"node: VMs (default {bench.NODE_VMS}, at most {testbed.MAX_VMS})")
    p.add_argument("--agent-log", metavar="FILE", help="node: keep the agent's log here")
    p.add_argument("--seconds", type=float, help="seconds per point (default 3, quick 2)")
    p.add_argument("--rounds", type=_positive_int, default=None,
                   help="alternating rounds per point; figures are their median (default 1; "
                   "node-path 3)")
    p.add_argument("--policy", choices=["default", "always"], default="default",
                   help="pods, mesh: the bypass's demotion policy: default (one-way small-message "
                   "streams move to the kernel path) or always (never demote)")
    p.add_argument("--tcp", action="store_true", help="node-path: TCP tests too (default UDP)")
    p.add_argument("--cpu-idle", choices=bench.CPU_IDLE_POLICIES, default="auto",
                   help="hold a 0 us cpu_dma_latency PM QoS request: for latency tests only "
                   "(auto), always (awake) or never (idle); see bench.cpus_kept_awake")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bypass", help="the socket bypass for a testbed's pod addresses")
    p.add_argument("action", choices=["on", "off"])
    p.add_argument("--number", type=int, help="on: which testbed (when several are up)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bypass)
    return parser


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: object) -> None:
    if os.getpid() != _MAIN_PID:  # a forked helper (pyroute2's netns worker): die as before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `kill` (SIGTERM) unwinds like Ctrl-C: a benchmark or `testbed up` takes down the
    # testbeds, sidecars and pins it made instead of leaving them behind.
    signal.signal(signal.SIGTERM, _interrupt)
    return exitcodes.run("netaccel-lab", args.func, args,
                         failures=(testbed.TestbedError, bench.BenchError, mesh.MeshError))


if __name__ == "__main__":
    sys.exit(main())
