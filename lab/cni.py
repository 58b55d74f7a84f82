"""The CNI stand-in's netfilter rules in a testbed node's netns.

A node of a real cluster has rules that use conntrack (kube-proxy's, or the CNI's own
NetworkPolicy), so its conntrack table sees every forwarded flow. The testbed's node has no
rules at all; `load(node_netns)` gives it the typical shape: a forward chain that first jumps
to a policy chain (empty; tests add drop rules to it), then accepts established flows, then
the rest, counting the TCP and UDP packets of both (ND and the like are not counted); and a
bridge-family table counting the TCP and UDP frames that enter the node's bridge from any
port (what the bridge forwards or routes, and learns its source MACs from). The
node fast path (docs/fastpath.md) relies on that conntrack table: without it, no flow would
ever take the fast path.
"""

from __future__ import annotations

import subprocess

from node_helper.kernel import netns_argv

TABLE = "cni"
POLICY_CHAIN = "netpol"
RULES = f"""
table bridge {TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority 0;
        meta l4proto {{ tcp, udp }} counter name cnt_bridged
    }}
    counter cnt_bridged {{
    }}
}}
table inet {TABLE} {{
    chain forward {{
        type filter hook forward priority 0;
        jump {POLICY_CHAIN}
        meta l4proto {{ tcp, udp }} ct state established,related counter name cnt_est accept
        meta l4proto {{ tcp, udp }} counter name cnt_other accept
    }}
    chain {POLICY_CHAIN} {{
    }}
    counter cnt_est {{
    }}
    counter cnt_other {{
    }}
}}
"""


class CniRulesError(RuntimeError):
    """nft refused the rules; the message has its error."""


def nft(node_netns: str, text: str) -> None:
    """Apply an nft script inside the namespace."""
    proc = subprocess.run(netns_argv(node_netns, ["nft", "-f", "-"]), input=text,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise CniRulesError(f"nft in {node_netns}: {proc.stderr.strip()} "
                            "(is the nftables package installed?)")


def load(node_netns: str) -> None:
    """Load the rules (replacing an earlier copy)."""
    nft(node_netns, _DELETE + RULES)


def unload(node_netns: str) -> None:
    nft(node_netns, _DELETE)


_DELETE = "".join(f"table {family} {TABLE}\ndelete table {family} {TABLE}\n"
                  for family in ("inet", "bridge"))


def counter(node_netns: str, name: str, family: str = "inet") -> int:
    """Packets of one of the rules' named counters."""
    proc = subprocess.run(netns_argv(node_netns, ["nft", "list", "counter", family, TABLE,
                                                  name]),
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.split("packets")[1].split()[0])


def bridged(node_netns: str) -> int:
    """TCP and UDP frames that entered the node's bridge from one of its ports."""
    return counter(node_netns, "cnt_bridged", "bridge")


def forwarded(node_netns: str) -> int:
    """TCP and UDP packets that crossed the node's forward hook (both counters)."""
    return counter(node_netns, "cnt_est") + counter(node_netns, "cnt_other")
