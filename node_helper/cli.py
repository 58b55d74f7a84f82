"""netaccel: the node helper's command line.

    netaccel doctor [--json]
    netaccel testbed up [--pods N] [--vms M] | down [--all] | status [--json]
    netaccel bypass on [--cidr CIDR ...] | off | status [--json]
    netaccel vm accelerate|restore|status --netns NS [--interface IF] ...
    netaccel bench pods|vm [--quick] [--json FILE] [--plot FILE.png]

Exit codes: 0 success, 1 the operation failed (message on stderr), 2 bad usage or input,
3 a required kernel/host feature is missing.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node_helper import bench as bench_mod
from node_helper import kernel
from node_helper import testbed as testbed_mod

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING = 0, 1, 2, 3


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _show(data: dict[str, Any], as_json: bool, indent: int = 0) -> None:
    """A status as JSON, or as an indented key/value listing for people."""
    if as_json:
        _print_json(data)
        return
    width = max((len(k) for k in data), default=0)
    for key, value in data.items():
        if isinstance(value, dict) and value:
            print(f"{' ' * indent}{key}:")
            _show(value, False, indent + 2)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{' ' * indent}{key}:")
            for item in value:
                print(f"{' ' * (indent + 2)}- " + json.dumps(item, default=str))
        else:
            print(f"{' ' * indent}{key:{width}s}  {value}")


# --- doctor ------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from node_helper import doctor

    checks = doctor.run_checks()
    if args.json:
        _print_json([c.__dict__ for c in checks])
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            print(f"{mark} {c.name:14s} {c.detail}" + (f"\n     fix: {c.fix}" if not c.ok else ""))
    return EXIT_MISSING if any(c.required and not c.ok for c in checks) else EXIT_OK


# --- testbed -----------------------------------------------------------------

def cmd_testbed(args: argparse.Namespace) -> int:
    if args.action == "up":
        bed = testbed_mod.Testbed.create(pods=args.pods, vms=args.vms, guest=args.guest)
        print(f"testbed {bed.number} up: {len(bed.pods)} pods, {len(bed.vms)} VMs "
              f"({args.guest} guests)", file=sys.stderr)
        print(bed.to_json())
        return EXIT_OK
    if args.action == "down":
        if args.all:
            numbers = testbed_mod.destroy_all()
        else:
            numbers = [testbed_mod.Testbed.find(args.number).number]
            testbed_mod.destroy_number(numbers[0])
        print(f"removed testbed(s): {numbers or 'none'}", file=sys.stderr)
        return EXIT_OK
    bed = testbed_mod.Testbed.find(args.number)
    if args.json:
        print(bed.to_json())
    else:
        print(f"testbed {bed.number} (node netns {bed.node_netns})")
        for p in bed.pods:
            print(f"  pod {p.name:6s} netns {p.netns:14s} {p.ipv4:16s} {p.ipv6}")
        for v in bed.vms:
            print(f"  vm  {v.name:6s} launcher {v.launcher_netns:12s} guest "
                  f"{v.guest_netns or v.guest_kind:14s} {v.ipv4}")
    return EXIT_OK


# --- bypass --------------------------------------------------------------------

def _valid_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid CIDR {text!r}: {exc}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_bypass(args: argparse.Namespace) -> int:
    from node_helper import sockets

    if args.action == "on":
        cidrs = args.cidr or testbed_mod.Testbed.find(args.testbed).pod_cidrs()
        status = sockets.enable(cidrs)
        print(f"socket bypass on for {', '.join(cidrs)}", file=sys.stderr)
        if args.json:
            _print_json(status)
        return EXIT_OK
    if args.action == "off":
        sockets.disable()
        print("socket bypass off: nothing of netaccel is attached", file=sys.stderr)
        return EXIT_OK
    _show(sockets.status(), args.json)
    return EXIT_OK


# --- vm ------------------------------------------------------------------------

def cmd_vm(args: argparse.Namespace) -> int:
    from node_helper import vm_mirror

    if args.action == "accelerate":
        result = vm_mirror.accelerate(args.netns, args.interface, datapath=args.datapath,
                                      checksum=args.checksum)
        print(f"{args.netns}/{args.interface}: {args.datapath} datapath, checksum "
              f"{args.checksum}", file=sys.stderr)
        if args.json:
            _print_json(result)
        return EXIT_OK
    if args.action == "restore":
        vm_mirror.restore(args.netns, args.interface)
        print(f"{args.netns}/{args.interface}: restored", file=sys.stderr)
        return EXIT_OK
    _show(vm_mirror.status(args.netns, args.interface), args.json)
    return EXIT_OK


# --- bench ---------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from node_helper import bench

    sizes = bench.QUICK_SIZES if args.quick else bench.FULL_SIZES
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    meta = bench.machine_meta() | {"bench": args.target, "seconds_per_point": seconds}
    meta["rounds"] = args.rounds
    run, title, labels = {
        "pods": (bench.bench_pods, "same-node pods: kernel TCP path vs socket bypass (qperf)",
                 ("kernel TCP path (baseline)", "socket bypass")),
        "vm": (bench.bench_vm, "VM guest -> pod: in-pod bridge vs tc redirect variants (qperf)",
               ("in-pod bridge (baseline)", "accelerated")),
    }[args.target]
    meta["cpu_idle"] = {
        "policy": args.cpu_idle,
        "cpu_dma_latency_0us_for": [t for t in ("tcp_lat", "tcp_bw", "udp_lat", "udp_bw")
                                    if bench.keep_awake_for(t, args.cpu_idle)],
    }
    rows = run(sizes, seconds, rounds=args.rounds, cpu_idle=args.cpu_idle)
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(rows, Path(args.json), meta)
        print(f"JSON rows written to {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(rows, Path(args.plot), title, *labels)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return EXIT_OK


# --- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netaccel", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check kernel and host requirements")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("testbed", help="the simulated node made of network namespaces")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--vms", type=int, default=0)
    p.add_argument("--guest", choices=["netns", "qemu"], default="netns")
    p.add_argument("--number", type=int, help="status/down: which testbed (when several)")
    p.add_argument("--all", action="store_true", help="down: remove every testbed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("bypass", help="same-node pod socket bypass (sock_ops + sk_msg)")
    p.add_argument("action", choices=["on", "off", "status"])
    p.add_argument("--cidr", action="append", type=_valid_cidr,
                   help="accelerated prefix (repeatable); default: the testbed's pod addresses")
    p.add_argument("--testbed", type=int, help="on: which testbed's pods (when several)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bypass)

    p = sub.add_parser("vm", help="VM datapath: tc redirect tap <-> pod veth around the bridge")
    p.add_argument("action", choices=["accelerate", "restore", "status"])
    p.add_argument("--netns", required=True, help="the virt-launcher pod's network namespace")
    p.add_argument("--interface", default="eth0", help="pod interface name (eth0, pod<hash>)")
    p.add_argument("--datapath", choices=["mirror", "bpf"], default="bpf",
                   help="bpf (default): cls_bpf with bpf_redirect_peer, measured fastest; "
                   "mirror: u32 + mirred, no compiler or kernel headers needed")
    p.add_argument("--checksum", choices=["off", "keep"], default="keep",
                   help="turn rx/tx checksum offload off on tap and veth (default: keep; "
                   "off costs TCP >= 4 KiB about a quarter of its throughput)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vm)

    p = sub.add_parser("bench", help="qperf benchmarks on the testbed, side by side")
    p.add_argument("target", choices=["pods", "vm"])
    p.add_argument("--quick", action="store_true", help="64 B, 1 KiB, 16 KiB at 2 s a point")
    p.add_argument("--seconds", type=float, help="seconds per point (default 3, quick 2)")
    p.add_argument("--rounds", type=_positive_int, default=1,
                   help="alternating rounds per point; figures are their median (default 1)")
    p.add_argument("--cpu-idle", choices=bench_mod.CPU_IDLE_POLICIES, default="auto",
                   help="hold a 0 us cpu_dma_latency PM QoS request: for latency tests only "
                   "(auto), always (awake) or never (idle); see bench.cpus_kept_awake")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `netaccel ... | head` ends quietly
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except kernel.KernelFeatureError as exc:
        print(f"netaccel: missing requirement: {exc}", file=sys.stderr)
        return EXIT_MISSING
    except (ValueError, testbed_mod.TestbedError, FileNotFoundError) as exc:
        print(f"netaccel: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("netaccel: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback, for operators
        print(f"netaccel: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
