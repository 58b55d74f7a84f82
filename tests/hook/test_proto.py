"""The committed generated modules match the .proto files, which match the facts note."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from hook_sidecar.proto import (
    api_info_pb2,
    api_v1alpha1_pb2,
    api_v1alpha2_pb2,
    api_v1alpha3_pb2,
    generate,
)

from .conftest import REPO


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "hook_sidecar.proto.generate", "--out", str(tmp_path)],
                   check=True, cwd=REPO, capture_output=True)
    fresh = sorted((tmp_path / "hook_sidecar" / "proto").glob("*_pb2*.py"))
    committed_names = sorted(p.name for p in generate.PROTO_DIR.glob("*_pb2*.py"))
    assert [p.name for p in fresh] == committed_names
    assert len(fresh) == 8
    for path in fresh:
        committed = REPO / "hook_sidecar" / "proto" / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale: regenerate"


def _fields(message: object) -> list[tuple[str, int, int, bool]]:
    desc = message.DESCRIPTOR  # type: ignore[attr-defined]
    return [(f.name, f.number, f.type, f.is_repeated) for f in desc.fields]


def test_info_wire_format() -> None:
    assert api_info_pb2.DESCRIPTOR.package == "kubevirt.hooks.info"
    svc = api_info_pb2.DESCRIPTOR.services_by_name["Info"]
    assert [(m.name, m.input_type.name, m.output_type.name) for m in svc.methods] == [
        ("Info", "InfoParams", "InfoResult")]
    assert _fields(api_info_pb2.InfoParams) == []
    assert _fields(api_info_pb2.InfoResult) == [
        ("name", 1, F.TYPE_STRING, False), ("hookPoints", 3, F.TYPE_MESSAGE, True),
        ("versions", 4, F.TYPE_STRING, True)]
    assert _fields(api_info_pb2.HookPoint) == [("name", 1, F.TYPE_STRING, False),
                                               ("priority", 2, F.TYPE_INT32, False)]


@pytest.mark.parametrize(("pb2", "methods"), [
    (api_v1alpha1_pb2, ["OnDefineDomain"]),
    (api_v1alpha2_pb2, ["OnDefineDomain", "PreCloudInitIso"]),
    (api_v1alpha3_pb2, ["OnDefineDomain", "PreCloudInitIso", "Shutdown"]),
])
def test_callbacks_wire_format(pb2: object, methods: list[str]) -> None:
    fd = pb2.DESCRIPTOR  # type: ignore[attr-defined]
    version = fd.name.rsplit("_", 1)[-1].removesuffix(".proto")
    assert fd.package == f"kubevirt.hooks.{version}"
    svc = fd.services_by_name["Callbacks"]
    assert [m.name for m in svc.methods] == methods
    for m in svc.methods:
        assert (m.input_type.name, m.output_type.name) == (f"{m.name}Params", f"{m.name}Result")
    B = F.TYPE_BYTES  # noqa: N806
    assert _fields(pb2.OnDefineDomainParams) == [("domainXML", 1, B, False), ("vmi", 2, B, False)]
    assert _fields(pb2.OnDefineDomainResult) == [("domainXML", 1, B, False)]
    if "PreCloudInitIso" in methods:
        assert _fields(pb2.PreCloudInitIsoParams) == [
            ("cloudInitNoCloudSource", 1, B, False), ("vmi", 2, B, False),
            ("cloudInitData", 3, B, False)]
        assert _fields(pb2.PreCloudInitIsoResult) == [
            ("cloudInitNoCloudSource", 1, B, False), ("cloudInitData", 3, B, False)]
    if "Shutdown" in methods:
        assert _fields(pb2.ShutdownParams) == _fields(pb2.ShutdownResult) == []


def test_file_names_are_distinct_and_imports_package_relative() -> None:
    names = {m.DESCRIPTOR.name for m in (api_info_pb2, api_v1alpha1_pb2, api_v1alpha2_pb2,
                                         api_v1alpha3_pb2)}
    assert len(names) == 4
    for path in (REPO / "hook_sidecar" / "proto").glob("*_pb2_grpc.py"):
        imports = [ln for ln in path.read_text().splitlines() if ln.startswith(("import ",
                                                                               "from "))]
        assert all(ln in ("import grpc", "import warnings") or
                   ln.startswith("from hook_sidecar.proto import ") or
                   ln.startswith("from grpc") for ln in imports), imports
