"""The testbed's service mesh: an Istio-style sidecar (HAProxy) in a pod's netns.

Per meshed pod (docs/mesh.md says what of Istio this reproduces and what not):

- Istio's sidecar redirection rules (istio-iptables, REDIRECT mode) in the pod's netns,
  loaded with iptables-nft-restore: outbound TCP -> 127.0.0.1:15001 except the proxy's own
  UID 1337 and loopback destinations; inbound TCP -> 15006 except the proxy's own ports.
  IPv4 only: see IPV6_NOTE.
- HAProxy from Debian running as UID/GID 1337 in the pod's netns, in master-worker mode in
  the foreground (so its log goes to a file), with its config, pid file and log in
  MESH_DIR/<pod netns>/ (the folder belongs to 1337: HAProxy writes the pid file there).
    outbound  bind 127.0.0.1:15001, `server 0.0.0.0:0`: HAProxy connects to the connection's
              original destination (SO_ORIGINAL_DST of the REDIRECTed connection).
    inbound   bind 0.0.0.0:15006, `server 0.0.0.0:0 source 127.0.0.6`: the original
              destination (SO_ORIGINAL_DST works for the PREROUTING REDIRECT too: the pod's
              address and the port the peer asked for), from 127.0.0.6 as Istio's inbound
              passthrough does.
    health    bind 0.0.0.0:15021, HTTP GET /healthz/ready -> 200 (Istio's readiness port;
              excluded from the inbound redirect).

Everything lives in the pod's netns and MESH_DIR: removing the netns kills the proxy (its
processes are in it) and drops the rules; `remove_all(number)` removes the folders.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from node_helper.kernel import netns_argv

MESH_DIR = Path("/run/netaccel-lab/mesh")
PROXY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HEALTH_PORT = 15021
EXCLUDED_INBOUND_PORTS = (15008, 15090, 15021, 15020)  # Istio's: HBONE, stats, health, agent
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"
IPV6_NOTE = (
    "IPv6 is not meshed: HAProxy 2.6 reads SO_ORIGINAL_DST for IPv4 only (it never asks for "
    "IP6T_SO_ORIGINAL_DST), so a REDIRECTed IPv6 connection's destination is the redirect "
    "port itself; checked here: the outbound proxy connected to [::1]:15001, i.e. to itself, "
    "in a loop. No ip6tables rules are installed; IPv6 between pods takes the plain path."
)

# Istio's rules (istio-iptables, REDIRECT mode, no include/exclude lists, no GID rules: the
# proxy runs with GID 1337 too, so the UID rules cover it).
RULES = """*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
{excluded}
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inbound}
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {outbound}
-A ISTIO_OUTPUT -s {passthrough}/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
""".format(
    excluded="\n".join(f"-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"
                       for p in EXCLUDED_INBOUND_PORTS),
    inbound=INBOUND_PORT, outbound=OUTBOUND_PORT, passthrough=INBOUND_PASSTHROUGH_SOURCE,
    uid=PROXY_UID,
)
# An empty nat table: what `redirect(netns, False)` leaves (the "no mesh" reference).
NO_RULES = "*nat\nCOMMIT\n"

# The IPv6 half (ipv6_sidecar): the same rules for ip6tables, with ::1 and ::6 (Istio's IPv6
# inbound passthrough source) in place of 127.0.0.1 and 127.0.0.6.
INBOUND_PASSTHROUGH_SOURCE6 = "::6"
RULES6 = (RULES.replace(f"-s {INBOUND_PASSTHROUGH_SOURCE}/32",
                        f"-s {INBOUND_PASSTHROUGH_SOURCE6}/128")
          .replace("127.0.0.1/32", "::1/128"))

# One line per proxied connection in haproxy.log (parse_log): the accepted connection
# (client -> local address), the connection HAProxy made (source -> server), bytes, state.
LOG_FORMAT = "conn %ft %ci:%cp>%fi:%fp %bi:%bp>%si:%sp bytes=%B term=%ts"

# One thread: the project's machines have 2 vCPUs, and a request crosses two proxies
# (Istio's default concurrency is 2).
HAPROXY_CFG = f"""global
  nbthread 1
  log stderr format raw local0
defaults
  mode tcp
  log global
  log-format "{LOG_FORMAT}"
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend outbound
  bind 127.0.0.1:{OUTBOUND_PORT}
  default_backend original_dst
backend original_dst
  server original_dst 0.0.0.0:0
frontend inbound
  bind 0.0.0.0:{INBOUND_PORT}
  default_backend inbound_passthrough
backend inbound_passthrough
  server inbound_passthrough 0.0.0.0:0 source {INBOUND_PASSTHROUGH_SOURCE}
frontend health
  mode http
  bind 0.0.0.0:{HEALTH_PORT}
  monitor-uri /healthz/ready
"""


# The proxies this process started, by netns: reaped when stopped (no zombies left behind).
_children: dict[str, subprocess.Popen] = {}


class MeshError(RuntimeError):
    """A sidecar could not be set up; the message says why."""


def pod_dir(netns: str) -> Path:
    """The sidecar's folder: haproxy.cfg, haproxy.pid (written by HAProxy), haproxy.log."""
    return MESH_DIR / netns


def is_meshed(netns: str) -> bool:
    """Whether the pod got a sidecar (its folder exists; the proxy may have died since)."""
    return (pod_dir(netns) / "haproxy.cfg").exists()


def proxy_pid(netns: str) -> int:
    """The running HAProxy master's pid, or 0 when the sidecar is not running."""
    try:
        pid = int((pod_dir(netns) / "haproxy.pid").read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return 0
    return pid if comm == "haproxy" and _state(pid) not in ("Z", "X") else 0


def redirect(netns: str, on: bool = True) -> None:
    """Load Istio's redirection rules into the pod's netns (on), or empty its nat table."""
    proc = subprocess.run(netns_argv(netns, ["iptables-nft-restore"]),
                          input=RULES if on else NO_RULES, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MeshError(f"iptables-nft-restore in {netns} exited {proc.returncode}: "
                        f"{proc.stderr.strip()} (is the iptables package installed?)")


def start_proxy(netns: str, timeout: float = 10.0) -> int:
    """Write the sidecar's folder and start HAProxy as UID 1337 in the netns; return its pid
    once it listens on the outbound, inbound and health ports."""
    from lab.testbed import popen_in, wait_for_port

    if shutil.which("haproxy") is None:
        raise MeshError("haproxy is not installed (apt-get install haproxy; scripts/setup.sh)")
    d = pod_dir(netns)
    d.mkdir(parents=True, exist_ok=True)
    os.chown(d, PROXY_UID, PROXY_UID)
    cfg = d / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG)
    pidfile = d / "haproxy.pid"
    pidfile.unlink(missing_ok=True)
    with open(d / "haproxy.log", "ab") as log:
        proc = popen_in(netns, ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
                                "--clear-groups", "haproxy", "-W", "-db", "-f", str(cfg),
                                "-p", str(pidfile)],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,
                        # HAProxy returns to its starting folder after reading the config:
                        # as UID 1337 it may not enter the caller's (a clone under a
                        # `mktemp -d` folder, mode 700, failed), so start in its own.
                        cwd=d)
    _children[netns] = proc
    deadline = time.monotonic() + timeout
    while not proxy_pid(netns):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (d / "haproxy.log").read_text(errors="replace")[-500:]
            raise MeshError(f"HAProxy did not start in {netns}: {tail.strip()}")
        time.sleep(0.02)
    for port in (OUTBOUND_PORT, INBOUND_PORT, HEALTH_PORT):
        wait_for_port(netns, port, timeout)
    return proxy_pid(netns)


def stop_proxy(netns: str, timeout: float = 5.0) -> None:
    """Kill the pod's HAProxy (master and workers); the rules and the folder stay, so the
    pod is left "meshed without a proxy". Quiet when it is not running."""
    from pyroute2 import netns as pr_netns

    pid = proxy_pid(netns)
    pids = {pid} if pid else set()
    for p in pr_netns.ns_pids().get(netns, []):  # its workers, and any strays
        with contextlib.suppress(OSError):
            if Path(f"/proc/{p}/comm").read_text().strip() == "haproxy":
                pids.add(p)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    child = _children.pop(netns, None)
    if child is not None:
        with contextlib.suppress(OSError):
            child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in pids):
        if time.monotonic() > deadline:
            raise MeshError(f"HAProxy in {netns} still runs after SIGKILL: {sorted(pids)}")
        time.sleep(0.02)
    (pod_dir(netns) / "haproxy.pid").unlink(missing_ok=True)


@contextlib.contextmanager
def ipv6_sidecar(netns: str, timeout: float = 10.0) -> Iterator[int]:
    """The pod's IPv6 sidecar while the block runs: Istio's rules for ip6tables, ::6 on lo,
    and lab/odproxy.py (HAProxy 2.6 cannot: IPV6_NOTE) as UID 1337; yields its pid. Afterwards
    the proxy is killed and reaped, the rules and the address removed."""
    from pyroute2 import NetNS

    from lab.testbed import popen_in

    def restore(text: str) -> None:
        proc = subprocess.run(netns_argv(netns, ["ip6tables-nft-restore"]), input=text,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise MeshError(f"ip6tables-nft-restore in {netns} exited {proc.returncode}: "
                            f"{proc.stderr.strip()} (is the iptables package installed?)")

    with NetNS(netns) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.addr("replace", index=lo, address=INBOUND_PASSTHROUGH_SOURCE6, prefixlen=128)
    proc = None
    try:
        restore(RULES6)
        # It drops to UID 1337 itself, after its imports (the clone may sit in a folder
        # 1337 cannot enter).
        proc = popen_in(netns, [sys.executable, "-m", "lab.odproxy", "--uid", str(PROXY_UID),
                                "--source", INBOUND_PASSTHROUGH_SOURCE6],
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                        cwd=Path(__file__).parents[1], start_new_session=True)
        ready = select.select([proc.stdout], [], [], timeout)[0]
        if not ready or proc.stdout.readline().strip() != "ready":
            raise MeshError(f"the IPv6 sidecar (lab/odproxy.py) did not start in {netns}")
        yield proc.pid
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout)
        with contextlib.suppress(MeshError):
            restore(NO_RULES)
        with contextlib.suppress(Exception), NetNS(netns) as ns:
            ns.addr("del", index=ns.link_lookup(ifname="lo")[0],
                    address=INBOUND_PASSTHROUGH_SOURCE6, prefixlen=128)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def mesh_pod(netns: str) -> int:
    """Sidecar for one pod: rules, then the proxy; return the proxy's pid."""
    redirect(netns, True)
    return start_proxy(netns)


_LOG_RE = re.compile(r"^conn (\S+) (\S+):(\d+)>(\S+):(\d+) (\S+):(\d+)>(\S+):(\d+) "
                     r"bytes=(\d+) term=(\S+)$")


def parse_log(netns: str) -> list[dict[str, Any]]:
    """The sidecar's proxied connections so far (HAProxy logs one when it closes), oldest
    first: {"frontend": "outbound"|"inbound", "client": (ip, port), "local": (ip, port),
    "source": (ip, port), "server": (ip, port), "bytes": int, "term": str}. `local` is the
    accepted connection's original destination (SO_ORIGINAL_DST), `source` -> `server` the
    connection the proxy made."""
    try:
        text = (pod_dir(netns) / "haproxy.log").read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        if m := _LOG_RE.match(line):
            g = m.groups()
            out.append({"frontend": g[0], "client": (g[1], int(g[2])),
                        "local": (g[3], int(g[4])), "source": (g[5], int(g[6])),
                        "server": (g[7], int(g[8])), "bytes": int(g[9]), "term": g[10]})
    return out


def describe() -> dict[str, object]:
    """What the sidecars are, for a benchmark's JSON meta."""
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    return {"proxy": version.splitlines()[0] if version else "haproxy (unknown version)",
            "nbthread": 1, "uid": PROXY_UID, "redirect": "istio-iptables REDIRECT (iptables-nft)",
            "outbound_port": OUTBOUND_PORT, "inbound_port": INBOUND_PORT,
            "inbound_source": INBOUND_PASSTHROUGH_SOURCE, "ipv6": False}


def remove_all(prefix: str) -> None:
    """Kill the proxies whose folders start with `prefix` (e.g. "na7-"), wait until they are
    gone, and remove the folders (the rules go with the netns)."""
    if not MESH_DIR.is_dir():
        return
    try:
        for d in MESH_DIR.glob(f"{prefix}*"):
            stop_proxy(d.name)
    finally:
        for d in MESH_DIR.glob(f"{prefix}*"):
            shutil.rmtree(d, ignore_errors=True)
