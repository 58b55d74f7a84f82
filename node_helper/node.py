"""`netaccel node status` and `netaccel node cleanup`: the node as a whole, from the kernel.

status   what is installed, read from the kernel (sockets.status(), every namespace's VM
         datapath filters via node_helper.inventory), joined with the agent's report file
         (agent.state_file(): which pod a namespace belongs to, invalid endpoints, failing
         operations). The kernel is the truth of what is installed and works with no agent
         running (after a kill -9, during a rolling update); the report adds what only the
         agent knows (pod identities, errors) and says how old it is.
cleanup  the uninstall path: socket bypass off (detach, unpin), every VM datapath of this
         instance restored (namespaces under /var/run/netns and of every /proc/<pid>), every
         pin under /sys/fs/bpf/<instance>/ removed, the report file removed. Idempotent.
         Run it with no agent running (an agent would install everything again).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from node_helper import inventory, kernel


def read_report() -> dict[str, Any] | None:
    from node_helper.agent import state_file

    try:
        report = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    pid = report.get("pid")
    report["agent_running"] = bool(pid) and Path(f"/proc/{pid}").exists()
    return report


def status() -> dict[str, Any]:
    from node_helper import fastpath, sockets, vm

    report = read_report() or {}
    by_id: dict[tuple[int, int], tuple[str, dict[str, Any]]] = {}
    for uid, row in (report.get("vms") or {}).items():
        with contextlib.suppress(OSError, ValueError):
            by_id[inventory.netns_id(kernel.netns_path(row["netns"]))] = (uid, row)
    vms = []
    for found in inventory.vm_installed():
        uid, row = by_id.get(found.ident, (None, {}))
        entry: dict[str, Any] = {"uid": uid, "namespace": row.get("namespace"),
                                 "name": row.get("name"), "netns": found.netns}
        try:
            st = vm.status(found.netns, row.get("interface", "eth0"))
            entry.update(datapath=st["datapath"], interface=st["interface"],
                         directions=st["directions"], offload=st["offload"],
                         launcher_current=st["launcher_current"])
        except Exception:  # noqa: BLE001 - not bridge-shaped any more: what the scan saw
            entry.update(datapath=sorted({str(d["datapath"]) for d in
                                          found.devices.values()}), devices=found.devices)
        vms.append(entry)
    bypass = sockets.status()
    return {
        "instance": kernel.instance(),
        "bypass": bypass,
        "fastpath": fastpath.status(None),
        "bypass_pods": (report.get("bypass") or {}).get("pods", []),
        "vms": vms,
        "agent": {k: report.get(k) for k in ("pid", "agent_running", "started", "updated",
                                              "metrics")} if report else None,
        "invalid": report.get("invalid", {}),
        "failures": report.get("failures", {}),
    }


def cleanup() -> dict[str, Any]:
    """Remove everything of this instance from the node; return what was done."""
    from node_helper import fastpath, sockets, vm
    from node_helper.agent import state_file
    from node_helper.vm import bpf

    done: dict[str, Any] = {"bypass_was_enabled": False, "vms_restored": [], "errors": [],
                            "pins_removed": []}
    done["bypass_was_enabled"] = bool(sockets.status()["enabled"])
    sockets.disable()
    done["fastpath_removed"] = [d["device"] for d in fastpath.cleanup(None)]
    fastpath.unpin_all()
    for found in inventory.vm_installed():
        try:
            vm.restore(found.netns)  # any shape: our filters go from every device
            if inventory.scan_netns(found.netns) is not None:  # filters off other links
                _remove_filters(found)
            done["vms_restored"].append(found.netns)
        except Exception as exc:  # noqa: BLE001 - go on with the others, report
            done["errors"].append({"netns": found.netns, "error": f"{type(exc).__name__}: "
                                                                   f"{exc}"})
    with kernel.locked("vm"):
        bpf.unpin_all()
    root = kernel.BPFFS / kernel.instance()
    if root.is_dir():
        for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
                done["pins_removed"].append(str(path))
        with contextlib.suppress(OSError):
            root.rmdir()
    with contextlib.suppress(FileNotFoundError):
        state_file().unlink()
    left = [v.netns for v in inventory.vm_installed()]
    if left:
        done["errors"].append({"left": left})
    done["ok"] = not done["errors"] and not sockets.attached_programs() and not root.exists()
    return done


def _remove_filters(found: inventory.InstalledVm) -> None:
    from node_helper.vm.api import _restore_device
    from node_helper.vm.devices import open_netns
    from node_helper.vm.plan import device_state, read_filters

    with open_netns(found.netns) as ns, kernel.locked("vm"):
        for link in inventory.device_links(found):
            filters, _ = read_filters(ns, link.index)
            if filters:
                _restore_device(ns, found.netns, link, device_state(filters))

