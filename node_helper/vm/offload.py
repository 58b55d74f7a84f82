"""Checksum offload features of the two ports (ethtool, inside the launcher netns)."""

from __future__ import annotations

from typing import Any

from node_helper.kernel import in_netns
from node_helper.vm.plan import CHECKSUM_FEATURES

Features = dict[str, dict[str, dict[str, bool]]]


def _ethtool() -> Any:
    from pyroute2.ethtool import Ethtool

    return Ethtool()


def checksum_features(netns: str, ifnames: list[str]) -> Features:
    """{ifname: {feature: {"on": bool, "changeable": bool}}} for CHECKSUM_FEATURES."""
    out: Features = {}
    with in_netns(netns):
        et = _ethtool()
        try:
            for ifname in ifnames:
                feats = et.get_features(ifname).features
                out[ifname] = {
                    name: {"on": bool(f.enable), "changeable": bool(f.available)}
                    for name in CHECKSUM_FEATURES if (f := feats.get(name)) is not None
                }
        finally:
            et.close()
    return out


def set_features(netns: str, ifname: str, names: tuple[str, ...], on: bool) -> None:
    if not names:
        return
    with in_netns(netns):
        et = _ethtool()
        try:
            feats = et.get_features(ifname)
            for name in names:
                feats.features[name].enable = on
            et.set_features(ifname, feats)
        finally:
            et.close()
