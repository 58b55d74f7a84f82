"""examples/vmi validate against KubeVirt's OpenAPI schema (strictly: no unknown fields)."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from hook_sidecar.settings import ANNOTATION_INTERFACES, ANNOTATION_OFFLOAD, settings_from_vmi

from .conftest import REPO

SWAGGER = Path(__file__).parent / "fixtures" / "kubevirt-openapi-swagger.json"  # see .SOURCE.md
EXAMPLES = REPO / "examples" / "vmi"
HOOK_KEYS = {"image", "imagePullPolicy", "command", "args", "configMap", "pvc"}
CONFIGMAP_KEYS = {"name", "key", "hookPath"}
PVC_KEYS = {"name", "volumePath", "sharedComputePath"}


def _strict(node: Any) -> Any:
    """Close every object schema that lists its properties (catches misspelt fields)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@cache
def validator() -> jsonschema.Draft4Validator:
    defs = _strict(json.loads(SWAGGER.read_text())["definitions"])
    schema = {"$ref": "#/definitions/v1.VirtualMachineInstance", "definitions": defs}
    return jsonschema.Draft4Validator(schema)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


#: every VMI in examples/vmi (ours and the other examples using the hook)
VMIS = [(p, i, d) for p in sorted(EXAMPLES.glob("*.yaml")) for i, d in enumerate(_docs(p))
        if d.get("kind") == "VirtualMachineInstance"]


def test_there_are_both_variants() -> None:
    assert {"vmi-hook-sidecar.yaml", "vmi-sidecar-shim.yaml"} <= {p.name for p, _, _ in VMIS}


@pytest.mark.parametrize(("path", "index", "vmi"), VMIS,
                         ids=[f"{p.name}#{i}" for p, i, _ in VMIS])
def test_vmi_validates_against_kubevirt_schema(path: Path, index: int,
                                               vmi: dict[str, Any]) -> None:
    errors = sorted(validator().iter_errors(vmi), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)

    sidecars = json.loads(vmi["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"])
    assert isinstance(sidecars, list) and sidecars
    for sidecar in sidecars:
        assert set(sidecar) <= HOOK_KEYS, set(sidecar) - HOOK_KEYS
        assert isinstance(sidecar["image"], str) and sidecar["image"]
        assert set(sidecar.get("configMap", {})) <= CONFIGMAP_KEYS
        assert set(sidecar.get("pvc", {})) <= PVC_KEYS
        assert all(isinstance(a, str) for a in sidecar.get("args", []))
    settings_from_vmi(vmi)  # our own annotations are valid for this VMI


def test_strict_schema_catches_a_misspelt_field() -> None:
    (vmi,) = _docs(EXAMPLES / "vmi-hook-sidecar.yaml")
    bad = copy.deepcopy(vmi)
    bad["spec"]["domain"]["devices"]["interfaces"][0]["modle"] = "virtio"
    assert any("modle" in e.message for e in validator().iter_errors(bad))


def test_shim_example_points_at_the_configmap() -> None:
    (vmi,) = _docs(EXAMPLES / "vmi-sidecar-shim.yaml")
    (sidecar,) = json.loads(vmi["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"])
    (cm,) = _docs(EXAMPLES / "netaccel-hook-shim-configmap.yaml")
    assert sidecar["configMap"]["name"] == cm["metadata"]["name"]
    assert sidecar["configMap"]["key"] in cm["data"]
    assert sidecar["configMap"]["hookPath"] == "/usr/bin/onDefineDomain"
    assert "sidecar-shim" in sidecar["image"]


def test_sidecar_example_uses_our_annotations() -> None:
    (vmi,) = _docs(EXAMPLES / "vmi-hook-sidecar.yaml")
    ann = vmi["metadata"]["annotations"]
    assert ann[ANNOTATION_OFFLOAD] == "off"
    names = {i["name"] for i in vmi["spec"]["domain"]["devices"]["interfaces"]}
    assert set(ann[ANNOTATION_INTERFACES].split(",")) <= names
