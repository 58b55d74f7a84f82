"""Find a pod's network namespace on this node from its UID, whatever the CNI.

Two ways in, both confirmed by finding one of the pod's addresses inside the namespace:

- virt-launcher pods: the launcher's command socket (what virt-handler uses),
  <kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/sockets/launcher-sock;
  connect, SO_PEERCRED gives virt-launcher's pid, /proc/<pid>/ns/net its netns;
- any pod: kubelet's pod cgroup under the cgroup v2 root, for both cgroup drivers:
      cgroupfs  kubepods[/burstable|/besteffort]/pod<uid>/<container id>
      systemd   kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_>.slice/
                    {cri-containerd,crio,docker}-<id>.scope
  (uid_ is the UID with "-" as "_"); a process of the pod's cgroup -> /proc/<pid>/ns/net.
  CRI-O's crio-conmon-<id>.scope (conmon runs in the node's netns) is skipped. When none
  of those paths exists, the tree is searched (a few levels deep) for a cgroup named
  after the pod, so a kubelet --cgroup-root prefix is found too.

`find_netns` returns "/proc/<pid>/ns/net" or raises NetnsNotFound saying what it tried; the
reconciler retries later (a pod that just got its address may not have its processes yet).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from node_helper import kernel

KUBELET_ROOT = Path("/var/lib/kubelet")
LAUNCHER_SOCK = Path("volumes/kubernetes.io~empty-dir/sockets/launcher-sock")
QOS_CLASSES = ("", "burstable", "besteffort")  # "" is Guaranteed: straight under kubepods
RUNTIME_PREFIXES = ("cri-containerd-", "crio-", "docker-")
_SEARCH_DEPTH = 5


class NetnsNotFound(RuntimeError):
    """No network namespace holding one of the pod's addresses was found; says what was
    tried."""


def launcher_socket(uid: str, kubelet_root: Path = KUBELET_ROOT) -> Path:
    return Path(kubelet_root) / "pods" / uid / LAUNCHER_SOCK


def peer_pid(path: Path, timeout: float = 2.0) -> int:
    """The pid of the process listening on Unix socket `path` (SO_PEERCRED)."""
    # /var/lib/kubelet/pods/<uid>/volumes/... is longer than sun_path's 108 bytes (virt-handler
    # mounts the pods dir at /pods); connect through an O_PATH fd of the folder instead.
    folder = os.open(Path(path).parent, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(f"/proc/self/fd/{folder}/{Path(path).name}")
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    finally:
        os.close(folder)
    pid, _uid, _gid = struct.unpack("3i", creds)
    if pid <= 0:  # the listener is in another pid namespace than ours
        raise OSError(f"SO_PEERCRED gave pid {pid}: the agent must run in the host pid "
                      "namespace (hostPID: true)")
    return pid


def pod_cgroup_candidates(uid: str, cgroup_root: Path) -> list[Path]:
    """kubelet's pod cgroup paths for `uid` under both drivers and every QoS class."""
    under = uid.replace("-", "_")
    paths = []
    for qos in QOS_CLASSES:
        paths.append(cgroup_root / "kubepods" / qos / f"pod{uid}" if qos
                     else cgroup_root / "kubepods" / f"pod{uid}")
        if qos:
            paths.append(cgroup_root / "kubepods.slice" / f"kubepods-{qos}.slice"
                         / f"kubepods-{qos}-pod{under}.slice")
        else:
            paths.append(cgroup_root / "kubepods.slice" / f"kubepods-pod{under}.slice")
    return paths


def _names_for(uid: str) -> tuple[str, str]:
    return f"pod{uid}", f"pod{uid.replace('-', '_')}.slice"


def search_pod_cgroups(uid: str, cgroup_root: Path, depth: int = _SEARCH_DEPTH) -> list[Path]:
    """Cgroups named after the pod anywhere `depth` levels below cgroup_root."""
    plain, slice_suffix = _names_for(uid)
    found: list[Path] = []

    def walk(d: Path, level: int) -> None:
        if level > depth:
            return
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                continue
            if e.name == plain or e.name.endswith(slice_suffix):
                found.append(Path(e.path))
            else:
                walk(Path(e.path), level + 1)

    walk(cgroup_root, 0)
    return found


def cgroup_pids(pod_cgroup: Path) -> list[int]:
    """Processes of a pod cgroup: its containers' (conmon's left out), then its own."""
    pids: list[int] = []
    dirs = [d for d in sorted(pod_cgroup.iterdir()) if d.is_dir()
            and not d.name.startswith("crio-conmon-")] if pod_cgroup.is_dir() else []
    for d in [*dirs, pod_cgroup]:
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (d / "cgroup.procs").read_text().split()]
    return pids


def netns_addresses(path: str) -> set[str]:
    """Every address on every interface inside the netns at `path`."""
    from pyroute2 import IPRoute

    with kernel.in_netns(path):
        ipr = IPRoute()  # its netlink socket stays in that netns
    try:
        return {str(ipaddress.ip_address(a.get("IFA_ADDRESS"))) for a in ipr.get_addr()
                if a.get("IFA_ADDRESS")}
    finally:
        ipr.close()


def _ns_id(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def find_netns(uid: str, ips: Iterable[str], *, kubelet_root: Path = KUBELET_ROOT,
               cgroup_root: Path | None = None) -> str:
    """The network namespace of pod `uid` as "/proc/<pid>/ns/net" (see the module docstring).

    `ips` are the pod's addresses (status.podIPs); one of them must be inside. `cgroup_root`
    defaults to kernel.cgroup2_root(). NetnsNotFound says what was tried.
    """
    want = {str(ipaddress.ip_address(ip)) for ip in ips}
    if not want:
        raise NetnsNotFound(f"pod {uid}: no addresses to confirm a network namespace with")
    tried: list[str] = []
    host = _ns_id(1)
    checked: set[tuple[int, int]] = set()

    def confirm(pid: int, how: str) -> str | None:
        ident = _ns_id(pid)
        if ident is None:
            tried.append(f"{how}: pid {pid} is gone")
            return None
        if ident == host:  # hostNetwork pods and node daemons (conmon): never the node's
            tried.append(f"{how}: the node's own network namespace")
            return None
        if ident in checked:
            return None
        checked.add(ident)
        path = f"/proc/{pid}/ns/net"
        try:
            have = netns_addresses(path)
        except OSError as exc:
            tried.append(f"{how}: {path}: {exc}")
            return None
        if want & have:
            return path
        tried.append(f"{how}: {path} has none of {', '.join(sorted(want))}")
        return None

    sock = launcher_socket(uid, kubelet_root)
    if sock.exists():
        try:
            pid = peer_pid(sock)
        except OSError as exc:
            tried.append(f"launcher socket {sock}: {exc}")
        else:
            if found := confirm(pid, f"launcher socket {sock} (pid {pid})"):
                return found
    else:
        tried.append(f"no launcher socket at {sock}")

    root = Path(cgroup_root) if cgroup_root is not None else kernel.cgroup2_root()
    cgroups = [p for p in pod_cgroup_candidates(uid, root) if p.is_dir()]
    if not cgroups:
        cgroups = search_pod_cgroups(uid, root)
    if not cgroups:
        tried.append(f"no kubelet cgroup for pod {uid} under {root} (cgroupfs or systemd "
                     "driver, any QoS class)")
    for cg in cgroups:
        pids = cgroup_pids(cg)
        if not pids:
            tried.append(f"cgroup {cg}: no processes")
        for pid in pids:
            if found := confirm(pid, f"cgroup {cg} (pid {pid})"):
                return found
    raise NetnsNotFound(f"pod {uid}: no network namespace with its address; tried: "
                        + "; ".join(tried))
