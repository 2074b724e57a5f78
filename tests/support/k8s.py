"""Render deploy/k8s with `kubectl kustomize` and validate every object offline, in strict mode.

Built-in kinds are validated by kubernetes-validate against the schemas of Kubernetes K8S_VERSION.
Custom resources are validated against the openAPIV3Schema of their CRDs as shipped in data/k8s-crds
(see its README for sources and versions), made strict the way the API server's field validation is:
a field a schema does not declare is an error unless the schema preserves unknown fields. Their
metadata is validated against the Kubernetes ObjectMeta schema. CEL rules (x-kubernetes-validations)
are not evaluated: that needs an API server.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "data" / "k8s-crds"
K8S_VERSION = "1.37.0"  # the newest Kubernetes release kubernetes-validate 1.37 knows


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed: run `make system-deps`")
    return path


def render(path: Path) -> list[dict]:
    p = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"kubectl kustomize {path} failed:\n{p.stderr}"
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 structural schema that rejects undeclared object fields."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for key in ("properties", "patternProperties"):
                for child in node.get(key, {}).values():
                    walk(child)
            for key in ("items", "additionalProperties", "not"):
                walk(node.get(key))
            for key in ("allOf", "anyOf", "oneOf"):
                for child in node.get(key, []):
                    walk(child)
    walk(s)
    return s


class Validator:
    def __init__(self, crd_dir: Path = CRD_DIR, version: str = K8S_VERSION):
        self.version = version
        self.crds: dict[tuple[str, str], tuple[jsonschema.protocols.Validator, str]] = {}
        for f in sorted(crd_dir.glob("*.yaml")):
            crd = yaml.safe_load(f.read_text())
            kubernetes_validate.validate(crd, version, strict=True)  # the CRD itself is a valid object
            spec = crd["spec"]
            bundle = next((v for k, v in crd["metadata"].get("annotations", {}).items()
                           if k.endswith(("/bundle-version", "/version")) and "kubebuilder" not in k), "?")
            for v in spec["versions"]:
                if v.get("served"):
                    schema = strict(v["schema"]["openAPIV3Schema"])
                    key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
                    self.crds[key] = (jsonschema.Draft202012Validator(schema), f"{f.name} {bundle}")
        defs_dir = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
        defs = json.loads((defs_dir / "_definitions.json").read_text())
        registry = Resource.from_contents(defs) @ Registry()
        meta_ref = {"$ref": defs["$id"] + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
        self.object_meta = jsonschema.Draft202012Validator(meta_ref, registry=registry)

    def validate(self, obj: dict) -> str:
        """What `obj` was validated against; raises jsonschema.ValidationError (or SchemaNotFoundError)."""
        crd = self.crds.get((obj.get("apiVersion"), obj.get("kind")))
        if crd is None:
            return "Kubernetes " + kubernetes_validate.validate(obj, self.version, strict=True)
        schema, source = crd
        schema.validate(obj)
        self.object_meta.validate(obj.get("metadata", {}))
        return source
