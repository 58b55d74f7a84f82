"""``netaccel-hook``: serve | edit | bench | shim-script.

Exit codes: 0 success; 1 bad input (edit) or a failed call (bench); 2 usage error;
3 cannot serve (socket in use, cannot listen).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_CANNOT_SERVE = 0, 1, 2, 3
DEFAULT_SOCKET = "/var/run/kubevirt-hooks/netaccel.sock"
ALL_VERSIONS = ("v1alpha1", "v1alpha2", "v1alpha3")


def _versions(values: list[str] | None) -> list[str]:
    """``--version`` may repeat and take comma lists; default: all versions."""
    if not values:
        return list(ALL_VERSIONS)
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    bad = [v for v in out if v not in ALL_VERSIONS]
    if bad:
        raise SystemExit(f"netaccel-hook: unknown version(s) {', '.join(bad)}; "
                         f"supported: {', '.join(ALL_VERSIONS)}")
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from hook_sidecar import server  # grpc only where it is needed

    try:
        versions = _versions(args.version)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if server.serve(args.socket, versions) == 0 else EXIT_CANNOT_SERVE


def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def cmd_edit(args: argparse.Namespace) -> int:
    from hook_sidecar.domain import edit_domain
    from hook_sidecar.errors import HookInputError

    try:
        out = edit_domain(_read(args.domain), _read(args.vmi))
    except HookInputError as exc:
        print(f"netaccel-hook edit: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"netaccel-hook edit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output:
        Path(args.output).write_bytes(out)
    else:
        sys.stdout.buffer.write(out)
    return EXIT_OK


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"hook server did not come up on {path}")
        time.sleep(0.005)


def _percentile(sorted_ms: list[float], q: float) -> float:
    idx = min(len(sorted_ms) - 1, max(0, round(q / 100 * len(sorted_ms)) - 1))
    return sorted_ms[idx]


def cmd_bench(args: argparse.Namespace) -> int:
    import grpc

    from hook_sidecar.proto import api_info_pb2, api_info_pb2_grpc
    from hook_sidecar.proto import api_v1alpha3_pb2 as pb2
    from hook_sidecar.proto import api_v1alpha3_pb2_grpc as pb2_grpc
    from hook_sidecar.sample import sample_domain, sample_vmi_json

    domain, vmi = sample_domain(args.interfaces), sample_vmi_json(args.interfaces)
    request = pb2.OnDefineDomainParams(domainXML=domain, vmi=vmi)
    tmp = tempfile.TemporaryDirectory(prefix="netaccel-bench-")
    proc = None
    result: dict[str, object] = {"calls": args.calls, "interfaces": args.interfaces,
                                 "domain_bytes": len(domain), "new_connection_per_call":
                                 not args.reuse_channel}
    try:
        if args.socket:
            sock = Path(args.socket)
        else:
            sock = Path(tmp.name) / "netaccel.sock"
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "hook_sidecar.cli", "serve",
                                     "--socket", str(sock), "--log-level", "warning"])
            _wait_for_socket(sock, proc)
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                api_info_pb2_grpc.InfoStub(ch).Info(api_info_pb2.InfoParams(), timeout=1,
                                                    wait_for_ready=True)
            result["cold_start_to_info_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        target = f"unix:{sock}"
        shared = grpc.insecure_channel(target) if args.reuse_channel else None
        times: list[float] = []
        for _ in range(args.calls):
            t = time.perf_counter()
            ch = shared or grpc.insecure_channel(target)
            try:
                pb2_grpc.CallbacksStub(ch).OnDefineDomain(request, timeout=60)
            finally:
                if shared is None:
                    ch.close()
            times.append((time.perf_counter() - t) * 1000)
        if shared is not None:
            shared.close()
        if proc is not None:
            with grpc.insecure_channel(target) as ch:
                pb2_grpc.CallbacksStub(ch).Shutdown(pb2.ShutdownParams(), timeout=5)
            result["server_exit_code"] = proc.wait(10)
    except (grpc.RpcError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"netaccel-hook bench: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        tmp.cleanup()
    times.sort()
    mode = "one channel for all calls" if args.reuse_channel else "new connection per call"
    result.update(p50_ms=round(statistics.median(times), 3),
                  p99_ms=round(_percentile(times, 99), 3), max_ms=round(times[-1], 3),
                  mean_ms=round(statistics.fmean(times), 3), goal_p99_ms=20.0)
    print(f"OnDefineDomain x{args.calls}, {args.interfaces} interfaces "
          f"({len(domain)} B), {mode}: p50 {result['p50_ms']:.2f} ms  "
          f"p99 {result['p99_ms']:.2f} ms  "
          f"max {result['max_ms']:.2f} ms (goal p99 < 20 ms)")
    if "cold_start_to_info_ms" in result:
        print(f"cold start (spawn -> first Info answered): {result['cold_start_to_info_ms']} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return EXIT_OK


def cmd_shim_script(args: argparse.Namespace) -> int:
    from hook_sidecar import shim

    text = shim.configmap(args.configmap, args.namespace) if args.configmap else shim.bundle()
    if args.output:
        Path(args.output).write_text(text)
        if not args.configmap:
            os.chmod(args.output, 0o755)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netaccel-hook", description=(
        "KubeVirt hook sidecar: turns virtio-net checksum offload off in the domain XML"))
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the KubeVirt hook gRPC API on a Unix socket")
    s.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    s.add_argument("--version", action="append", metavar="VERSION",
                   help="callback version(s) to offer (repeat or comma list; default all: "
                        f"{','.join(ALL_VERSIONS)})")
    s.add_argument("--log-level", default=argparse.SUPPRESS,
                   choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("edit", help="run the domain edit offline and print the new XML")
    e.add_argument("--vmi", required=True, help="VMI JSON file ('-' for stdin)")
    e.add_argument("--domain", required=True, help="domain XML file ('-' for stdin)")
    e.add_argument("--output", "-o", help="write here instead of stdout")
    e.set_defaults(func=cmd_edit)

    b = sub.add_parser("bench", help="OnDefineDomain through a real socket: p50/p99/max")
    b.add_argument("--calls", type=int, default=1000)
    b.add_argument("--interfaces", type=int, default=32)
    b.add_argument("--json", help="also write the figures as JSON here")
    b.add_argument("--socket", help="use a running server instead of starting one")
    b.add_argument("--reuse-channel", action="store_true",
                   help="one gRPC channel for all calls (virt-launcher dials per call)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("shim-script", help="print the single-file onDefineDomain script for "
                                           "KubeVirt's sidecar-shim (or a ConfigMap with it)")
    m.add_argument("--configmap", metavar="NAME", help="wrap it in a ConfigMap of this name")
    m.add_argument("--namespace", help="ConfigMap namespace")
    m.add_argument("--output", "-o", help="write here instead of stdout")
    m.set_defaults(func=cmd_shim_script)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if getattr(args, "command", None) == "bench" and args.calls < 1:
        print("netaccel-hook bench: --calls must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
