"""netaccel: the node helper's command line.

    netaccel doctor [--json]
    netaccel bypass on --cidr CIDR [--cidr CIDR ...] | off | status [--json] | guard
    netaccel vm accelerate|restore|status --netns NS [--interface IF] ...
    netaccel fastpath add|remove|uplink|remote|status|cleanup [--device DEV] [--netns NS] ...
    netaccel node run [--static FILE] [--kubernetes] [--node-name N] [--metrics-bind H:P]
    netaccel node status [--json] | cleanup [--json]

Exit codes: see node_helper.exitcodes (0 ok, 1 failed, 2 bad input, 3 missing feature).
The lab (testbed, benchmarks) has its own command, netaccel-lab.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node_helper import exitcodes


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def show(data: dict[str, Any], as_json: bool, indent: int = 0) -> None:
    """A status as JSON, or as an indented key/value listing for people."""
    if as_json:
        print_json(data)
        return
    width = max((len(k) for k in data), default=0)
    for key, value in data.items():
        if isinstance(value, dict) and value:
            print(f"{' ' * indent}{key}:")
            show(value, False, indent + 2)
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
        print_json([c.__dict__ for c in checks])
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            print(f"{mark} {c.name:16s} {c.detail}" + (f"\n     fix: {c.fix}" if not c.ok else ""))
    missing = any(c.required and not c.ok for c in checks)
    return exitcodes.MISSING_FEATURE if missing else exitcodes.OK


# --- bypass --------------------------------------------------------------------

def _valid_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid CIDR {text!r}: {exc}") from None


def cmd_bypass(args: argparse.Namespace) -> int:
    from node_helper import sockets

    if args.action == "on":
        if not args.cidr:
            raise ValueError("bypass on needs at least one --cidr (the pods' addresses); "
                             "on the lab's testbed, `netaccel-lab bypass on` fills them in")
        cidrs = args.cidr
        status = sockets.enable(cidrs, node_mem_limit_pages=args.node_mem_limit_pages,
                                rcv_floor_bytes=args.rcv_floor_bytes, policy=args.policy)
        print(f"socket bypass on for {', '.join(cidrs)}", file=sys.stderr)
        if args.json:
            print_json(status)
        return exitcodes.OK
    if args.action == "off":
        sockets.disable()
        print("socket bypass off: nothing of netaccel is attached", file=sys.stderr)
        return exitcodes.OK
    if args.action == "guard":
        return _guard()
    if args.action == "demote":
        return _guard(splice=False)
    show(sockets.status(), args.json)
    return exitcodes.OK


def _guard(splice: bool = True) -> int:
    """Until interrupted (the agent does both itself): demote qualified connections
    (node_helper.demote) and, with `splice`, reset splice-doomed ones."""
    import logging
    import threading

    from node_helper import demote, sockets, splice_guard

    if not sockets.status()["enabled"]:
        raise ValueError("the socket bypass is off: nothing to guard")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(("splice guard running: resets connections whose reader splices stranded bytes; "
           if splice else "") + "demoter running: moves one-way small-message streams to the "
          "kernel path (Ctrl-C to stop)", file=sys.stderr)
    stop = threading.Event()
    demoter = threading.Thread(target=demote.run, args=(stop,), name="demoter", daemon=True)
    demoter.start()
    try:
        if splice:
            splice_guard.run(stop)
        else:
            while not stop.wait(3600):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        demoter.join(2)
    return exitcodes.OK


# --- vm ------------------------------------------------------------------------

def cmd_vm(args: argparse.Namespace) -> int:
    from node_helper import vm

    if args.action == "accelerate":
        result = vm.accelerate(args.netns, args.interface, datapath=args.datapath,
                               checksum=args.checksum)
        print(f"{args.netns}/{args.interface}: {args.datapath} datapath, checksum "
              f"{args.checksum}", file=sys.stderr)
        if args.json:
            print_json(result)
        return exitcodes.OK
    if args.action == "restore":
        vm.restore(args.netns, args.interface)
        print(f"{args.netns}/{args.interface}: restored", file=sys.stderr)
        return exitcodes.OK
    show(vm.status(args.netns, args.interface), args.json)
    return exitcodes.OK


# --- fastpath ------------------------------------------------------------------

def cmd_fastpath(args: argparse.Namespace) -> int:
    from node_helper import fastpath

    node_ns = args.node_netns
    if args.action in ("add", "remove", "uplink") and not args.device:
        raise ValueError(f"fastpath {args.action} needs --device (the node-side device)")
    if args.action == "add":
        if args.vm and (not args.mac or not args.address):
            raise ValueError("fastpath add --vm needs the guest's --mac and --address")
        if not args.vm and not args.netns:
            raise ValueError("fastpath add needs --netns (the pod's; its facts are read there)")
        result = fastpath.add(node_ns, args.device, args.netns, ifname=args.interface,
                              mac=args.mac, addresses=args.address, vm=args.vm)
        print(f"{args.device}: on the node fast path ({', '.join(result['addresses'])})",
              file=sys.stderr)
    elif args.action == "uplink":
        result = fastpath.add_uplink(node_ns, args.device)
        print(f"{args.device}: frames from other nodes to local endpoints go straight in",
              file=sys.stderr)
    elif args.action == "remote":
        result = {"remote": fastpath.set_remote(args.cidr or [])}
    elif args.action == "remove":
        result = fastpath.remove(node_ns, args.device)
        print(f"{args.device}: back on the CNI's path", file=sys.stderr)
    elif args.action == "cleanup":
        result = {"removed": fastpath.cleanup(node_ns)}
        print("node fast path: nothing of netaccel is attached", file=sys.stderr)
    else:
        result = fastpath.status(node_ns)
    show(result, args.json)
    return exitcodes.OK


# --- node ----------------------------------------------------------------------

def _kubernetes(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Kubernetes source and the netns resolver (in-cluster credentials, else a
    kubeconfig: --kubeconfig or $KUBECONFIG). With --node-fastpath the source also watches
    the Nodes (the other nodes' pod CIDRs)."""
    from kubernetes import client, config

    from node_helper import netns_discovery
    from node_helper.source_kubernetes import KubernetesSource

    node_name = args.node_name or os.environ.get("NODE_NAME")
    if not node_name:
        raise ValueError("--kubernetes needs the node's name: --node-name or NODE_NAME "
                         "(the DaemonSet sets it from spec.nodeName)")
    try:
        if args.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_kube_config(config_file=args.kubeconfig)
        else:
            config.load_incluster_config()
    except config.ConfigException as exc:
        raise ValueError(f"no Kubernetes credentials ({exc}): run in the cluster (the "
                         "DaemonSet's service account) or pass --kubeconfig FILE") from None
    kubelet_root = Path(args.kubelet_root)

    def find_netns(ep: Any) -> str:
        return netns_discovery.find_netns(ep.uid, ep.ips, kubelet_root=kubelet_root)

    return KubernetesSource(node_name, client.ApiClient(),
                            watch_nodes=args.node_fastpath), find_netns


def cmd_node_run(args: argparse.Namespace) -> int:
    from node_helper import agent, metrics
    from node_helper.reconcile import netns_from_endpoint
    from node_helper.source_static import StaticSource

    agent.setup_logging()
    sources: list[Any] = []
    resolve = netns_from_endpoint
    if args.static:
        sources.append(StaticSource(args.static))
    if args.kubernetes:
        source, find_netns = _kubernetes(args)
        sources.append(source)

        def resolve(ep: Any) -> str:  # the source's own netns first (static entries)
            return ep.netns or find_netns(ep)
    if not sources:
        raise ValueError("node run needs a source of desired state: --static FILE and/or "
                         "--kubernetes")
    bind = None if args.metrics_bind in ("", "off") else metrics.parse_bind(args.metrics_bind)
    daemon = agent.Agent(sources, resolve=resolve, metrics_bind=bind,
                         per_vm_metrics=args.per_vm_metrics, resync_interval=args.resync,
                         node_fastpath=args.node_fastpath)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()  # SIGTERM (rolling update) and SIGINT: leave everything in place

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.run(stop)
    return exitcodes.OK


def cmd_node(args: argparse.Namespace) -> int:
    from node_helper import node

    if args.action == "run":
        return cmd_node_run(args)
    if args.action == "cleanup":
        done = node.cleanup()
        if args.json:
            print_json(done)
        else:
            print(f"bypass: {'removed' if done['bypass_was_enabled'] else 'was off'}; "
                  f"VM datapaths restored: {len(done['vms_restored'])}; pins removed: "
                  f"{len(done['pins_removed'])}", file=sys.stderr)
            for err in done["errors"]:
                print(f"error: {json.dumps(err)}", file=sys.stderr)
        return exitcodes.OK if done["ok"] else exitcodes.FAILED
    show(node.status(), args.json)
    return exitcodes.OK


# --- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netaccel", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check kernel and host requirements")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bypass", help="same-node pod socket bypass (sock_ops + sk_msg)")
    p.add_argument("action", choices=["on", "off", "status", "guard", "demote"],
                   help="guard: reset connections the splice guard cannot save and demote "
                   "one-way small-message streams (foreground); demote: only the latter")
    p.add_argument("--cidr", action="append", type=_valid_cidr,
                   help="on: an accelerated prefix, e.g. a pod's address/32 (repeatable)")
    p.add_argument("--node-mem-limit-pages", type=int, default=None,
                   help="on: TCP memory (pages) above which new data takes the kernel path "
                        "(default: half of net.ipv4.tcp_mem[0])")
    p.add_argument("--rcv-floor-bytes", type=int, default=None,
                   help="on: per-connection bound on unread redirected bytes is "
                        "max(receiver's rcvbuf, this) (default 32 MiB)")
    p.add_argument("--policy", choices=["default", "always"], default="default",
                   help="on: default: a direction streaming small messages one-way moves to "
                   "the kernel path (it coalesces them); always: every connection stays "
                   "bypassed")
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

    p = sub.add_parser("fastpath", help="node fast path: endpoint veth -> endpoint netns, "
                       "skipping the node's bridge, routing and netfilter (tc)")
    p.add_argument("action", choices=["add", "remove", "uplink", "remote", "status", "cleanup"],
                   help="add/remove an endpoint (--device); uplink: the device other nodes' "
                   "frames arrive on (VXLAN); remote: the other nodes' accelerated prefixes")
    p.add_argument("--device", help="the endpoint's node-side veth (or the uplink device)")
    p.add_argument("--netns", help="add: the endpoint's netns (a pod's, or a virt-launcher's)")
    p.add_argument("--node-netns", help="the node's netns (default: this process's)")
    p.add_argument("--interface", default="eth0", help="add: the pod's interface (eth0)")
    p.add_argument("--vm", action="store_true", help="add: the endpoint is a VM (give --mac, "
                   "--address: the guest's, as in the VMI's status)")
    p.add_argument("--mac", help="add --vm: the guest's MAC")
    p.add_argument("--address", action="append", help="add: the endpoint's addresses "
                   "(repeatable; a pod: default all of --interface's)")
    p.add_argument("--cidr", action="append", type=_valid_cidr,
                   help="remote: an accelerated prefix on another node (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fastpath)

    p = sub.add_parser("node", help="the node agent: run it, see and remove what it installed")
    p.add_argument("action", choices=["run", "status", "cleanup"])
    p.add_argument("--static", metavar="FILE",
                   help="run: desired state from a YAML file (node_helper.source_static)")
    p.add_argument("--kubernetes", action="store_true",
                   help="run: desired state from the API server (pods/VMIs of this node)")
    p.add_argument("--node-name", help="run --kubernetes: this node (default $NODE_NAME)")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="run --kubernetes: credentials outside a cluster (default: in-cluster "
                   "service account, else $KUBECONFIG)")
    p.add_argument("--kubelet-root", default="/var/lib/kubelet", metavar="DIR",
                   help="run --kubernetes: kubelet's root, for virt-launcher command sockets")
    p.add_argument("--metrics-bind", default="127.0.0.1:9464", metavar="HOST:PORT",
                   help="run: /metrics /healthz /readyz (default 127.0.0.1:9464; port 0: any "
                   "free port, logged; off: none)")
    p.add_argument("--per-vm-metrics", action="store_true",
                   help="run: VM datapath counters per VM (labels namespace, pod)")
    p.add_argument("--node-fastpath", action="store_true",
                   help="run: also put every opted-in pod and VM on the node fast path "
                   "(docs/fastpath.md: what the node's netfilter then sees)")
    p.add_argument("--resync", type=float, default=60.0, metavar="SECONDS",
                   help="run: apply everything again this often (idempotent; repairs drift)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_node)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exitcodes.run("netaccel", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
