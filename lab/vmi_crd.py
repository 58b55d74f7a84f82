"""KubeVirt's VirtualMachineInstance CRD for the lab's API server, derived from KubeVirt's OpenAPI.

KubeVirt publishes its API as an OpenAPI v2 document (api/openapi-spec/swagger.json in
kubevirt/kubevirt). `structural_schema` turns one definition of it into a structural
openAPIV3Schema the API server accepts: `$ref`s inlined, and what CRD schemas forbid or treat
differently rewritten:

- `metadata` becomes `{type: object}` (the API server validates ObjectMeta itself);
- descriptions, `default`s and `x-kubernetes-*` list/map hints of the source are dropped
  (defaults would be applied on create; we want objects stored as the test wrote them);
- IntOrString, Quantity and inline `type: [string, number]` -> `x-kubernetes-int-or-string`;
  RawExtension / untyped objects -> `x-kubernetes-preserve-unknown-fields`;
- below `max_depth` nested levels (default: no limit: the whole VMI spec and status are
  inlined; KubeVirt's definitions have no recursion) an object keeps its type and
  preserves unknown fields.

The generated CRD is committed as kubevirt-vmi-crd.json next to this file (the tests and
`netaccel-lab bench node` do not depend on the KubeVirt checkout). Regenerate with:

    python -m lab.vmi_crd /path/to/kubevirt/api/openapi-spec/swagger.json \\
        > lab/kubevirt-vmi-crd.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CRD_FILE = Path(__file__).with_name("kubevirt-vmi-crd.json")
DEFINITION = "v1.VirtualMachineInstance"
_KEEP = ("type", "format", "enum", "required", "maxLength", "minLength", "maximum", "minimum",
         "pattern", "nullable")
_INT_OR_STRING = ("k8s.io.apimachinery.pkg.util.intstr.IntOrString",
                  "k8s.io.apimachinery.pkg.api.resource.Quantity")
_PRESERVE = ("k8s.io.apimachinery.pkg.runtime.RawExtension",)
_OBJECT_META = "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def structural_schema(definitions: dict[str, Any], name: str,
                      max_depth: int | None = None) -> dict[str, Any]:
    """The structural openAPIV3Schema of definition `name` (see the module docstring)."""

    def convert(node: dict[str, Any], depth: int, stack: tuple[str, ...]) -> dict[str, Any]:
        ref = node.get("$ref")
        if ref:
            target = ref.rsplit("/", 1)[-1]
            if target in _INT_OR_STRING:
                return {"x-kubernetes-int-or-string": True}
            if target in _PRESERVE:
                return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            if target == _OBJECT_META:
                return {"type": "object"}
            if target in stack:  # recursion: stop here
                return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            return convert(definitions[target], depth, (*stack, target))
        kind = node.get("type")
        if isinstance(kind, list):  # e.g. a port: ["string", "number"]
            if set(kind) <= {"string", "integer", "number"}:
                return {"x-kubernetes-int-or-string": True}
            return {"x-kubernetes-preserve-unknown-fields": True}
        out = {k: node[k] for k in _KEEP if k in node}
        if kind == "object" or "properties" in node or "additionalProperties" in node:
            out["type"] = "object"
            if max_depth is not None and depth >= max_depth:
                out.pop("required", None)
                out["x-kubernetes-preserve-unknown-fields"] = True
                return out
            props = node.get("properties")
            extra = node.get("additionalProperties")
            if props:
                out["properties"] = {k: convert(v, depth + 1, stack) for k, v in props.items()}
            elif isinstance(extra, dict):
                out["additionalProperties"] = convert(extra, depth + 1, stack)
            else:  # an untyped object (map[string]interface{} and the like)
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif kind == "array":
            out["items"] = convert(node.get("items") or {}, depth + 1, stack)
        elif kind is None:  # anything at all
            out = {"x-kubernetes-preserve-unknown-fields": True}
        return out

    schema = convert(definitions[name], 0, (name,))
    schema.pop("required", None)  # kubectl-style partial objects (status patches) stay valid
    return schema


def vmi_crd(swagger: dict[str, Any], max_depth: int | None = None) -> dict[str, Any]:
    """The VirtualMachineInstance CRD as KubeVirt installs it (kubevirt.io/v1, namespaced,
    status subresource), with the schema derived from `swagger`."""
    schema = structural_schema(swagger["definitions"], DEFINITION, max_depth)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "virtualmachineinstances.kubevirt.io",
                     "labels": {"app.kubernetes.io/component": "kubevirt"}},
        "spec": {
            "group": "kubevirt.io",
            "scope": "Namespaced",
            "names": {"plural": "virtualmachineinstances", "singular": "virtualmachineinstance",
                      "kind": "VirtualMachineInstance", "listKind": "VirtualMachineInstanceList",
                      "shortNames": ["vmi", "vmis"], "categories": ["all"]},
            "versions": [{"name": "v1", "served": True, "storage": True,
                          "subresources": {"status": {}},
                          "schema": {"openAPIV3Schema": schema}}],
        },
    }


def load() -> dict[str, Any]:
    """The committed CRD."""
    return json.loads(CRD_FILE.read_text())


if __name__ == "__main__":
    source = json.loads(Path(sys.argv[1]).read_text())
    json.dump(vmi_crd(source), sys.stdout, indent=None, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
