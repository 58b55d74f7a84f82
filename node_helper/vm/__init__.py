"""VM datapath: move a KubeVirt VM's frames straight between its tap and the pod veth.

In KubeVirt's bridge binding the launcher pod's netns holds a bridge `k6t-<name>` with two
ports: the VM's tap and the renamed pod veth `<name>-nic`. tc ingress handling on both ports
redirects every frame to the other port, skipping the bridge, except what is meant for the
launcher itself (DHCP/DHCPv6, frames to the bridge's MAC, ARP/NS for the bridge's addresses),
which continues to the bridge. Two datapaths apply the same rules: "bpf" (default; one
program per node, bpf/tc_redirect.c, configured per device) and "mirror" (u32 + mirred, no
compiler needed). Optionally (checksum="off") rx/tx checksum offload is turned off on both
ports; the default is "keep" (see docs/results/README.md for the measurements).

    devices  finding bridge/tap/veth, the launcher's MAC and addresses
    plan     the per-device state record, our tc filters, the per-device plan
    mirror   the u32/mirred datapath        bpf      the pinned cls_bpf datapath
    offload  checksum features              status   the status report
    api      accelerate / restore / status (re-exported here)
"""

from node_helper.vm.api import accelerate, find_devices, restore, status
from node_helper.vm.devices import (
    Devices,
    IsTap,
    Link,
    VmDatapathError,
    VmLimitError,
    VmShapeError,
    bridge_name,
    is_real_tap,
    redirect_peer_possible,
)
from node_helper.vm.plan import CHECKSUM_FEATURES, CHECKSUM_MODES, DATAPATHS

__all__ = [
    "CHECKSUM_FEATURES", "CHECKSUM_MODES", "DATAPATHS", "Devices", "IsTap", "Link",
    "VmDatapathError", "VmLimitError", "VmShapeError", "accelerate", "bridge_name",
    "find_devices", "is_real_tap", "redirect_peer_possible", "restore", "status",
]
