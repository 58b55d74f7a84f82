"""Bad input over gRPC: a clear INVALID_ARGUMENT, the server keeps serving, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from hook_sidecar.server import HookServer

from .conftest import Client, domain, vmi_json

BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
]>
<domain type='kvm'><name>&e;</name></domain>
"""
SINGLE = domain("single")
TWENTY_MB = SINGLE.replace(b"<devices>", b"<devices><!--" + b"x" * (20 * 1000 * 1000)
                           + b"-->")

CASES = {
    "truncated": (SINGLE[: len(SINGLE) // 2], vmi_json(), "not well-formed (truncated?)"),
    "non-utf8": (SINGLE.replace(b"default_testvmi", b"d\xe9faut"), vmi_json(),
                 "not valid UTF-8: byte 0xe9 at offset"),
    "latin1-declared": (b"<?xml version='1.0' encoding='ISO-8859-1'?>\n" + SINGLE, vmi_json(),
                        "declares encoding 'ISO-8859-1'; only UTF-8"),
    "entity-bomb": (BOMB, vmi_json(), "DOCTYPE or entity declaration"),
    "doctype": (b'<!DOCTYPE domain SYSTEM "file:///etc/passwd">\n' + SINGLE, vmi_json(),
                "DOCTYPE or entity declaration"),
    "20MB": (TWENTY_MB, vmi_json(), f"domain XML is {len(TWENTY_MB)} bytes, more than the limit of "
             "16777216 bytes (16 MiB)"),
    "not-a-domain": (b"<network/>", vmi_json(), "root element is <network>, expected <domain>"),
    "empty-xml": (b"", vmi_json(), "domain XML is empty"),
    "malformed-vmi": (SINGLE, b'{"metadata": ', "VMI JSON is malformed"),
    "unknown-annotation-value": (
        SINGLE, vmi_json({"netaccel.kubevirt.io/checksum-offload": "disabled"}),
        "checksum-offload='disabled' is not allowed; use one of: off, host-off, guest-off, on"),
    "nonexistent-interface": (
        SINGLE, vmi_json({"netaccel.kubevirt.io/interfaces": "default,green"}),
        "names interface 'green', which the VMI does not have"),
    "non-virtio-interface": (
        domain("mixed"), vmi_json({"netaccel.kubevirt.io/interfaces": "legacy"}),
        "'legacy', which has model 'e1000', not virtio"),
    "sriov-interface": (
        domain("mixed"), vmi_json({"netaccel.kubevirt.io/interfaces": "vf"}, ifaces=["default"])
        .replace(b'"name": "default"', b'"name": "vf"'),
        "interface 'vf' is an SR-IOV interface (type='hostdev'), not virtio"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_clearly_and_serving_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    xml, vmi, words = CASES[case]
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    server = HookServer(tmp_path / "hooks" / "netaccel.sock")
    server.start()
    try:
        client = Client(server.path)
        with pytest.raises(grpc.RpcError) as err:
            client.define(xml, vmi)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in err.value.details()
        if case != "malformed-vmi":
            assert "VMI default/testvmi:" in err.value.details()
        assert client.info().name == "netaccel"
        assert client.define(SINGLE, vmi_json()) != SINGLE  # and real work still happens
        assert os.listdir(server.path.parent) == ["netaccel.sock"]
        assert os.listdir(workdir) == []
    finally:
        server.stop(0.5)


def test_beyond_grpc_limit_is_resource_exhausted(hook_server: tuple[HookServer, Client]) -> None:
    client = hook_server[1]
    with pytest.raises(grpc.RpcError) as err:
        client.define(b"<domain>" + b" " * (40 * 1024 * 1024) + b"</domain>", vmi_json())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()
    assert client.info().name == "netaccel"
