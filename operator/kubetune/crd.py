"""The FineTuneJob CustomResourceDefinition, generated from the pydantic models in kubetune.spec.

`python -m kubetune.crd > crds/finetunejobs.kubetune.io.yaml` writes it. The OpenAPI schema is
the pydantic JSON schema made structural: `$ref`s inlined, `Optional[...]` turned into a plain
optional field, `exclusiveMinimum: 0` into `minimum: 0` + `exclusiveMinimum: true`, free-form
dicts marked `x-kubernetes-preserve-unknown-fields`. Descriptions, defaults, enums and bounds are
kept. The cross-field checks of the pydantic validators are repeated as CEL rules
(`x-kubernetes-validations`) so the API server rejects what `kubetune validate` rejects, with a
message that names the field. Immutability (transition rules with `oldSelf`) is CRD-only.

Size bounds: CEL rules are rejected by the API server when their estimated worst-case cost is too
high, and unbounded strings and lists are costed as if they filled the 3 MiB request limit. Every
string and list of the spec has a bound in the models (kubetune.spec sets them all, so `kubetune
validate` enforces the same ones); the status, written by kubetune itself, gets
:data:`MAX_LENGTHS` and :data:`MAX_ITEMS` here (the tenant policy the defaults). Rules that a field's type carries
(`spec.Rule`: URIs, quantities, names) and the cross-field rules a model declares beside its pydantic
validator (`spec.ModelRule`) come with the models' JSON schema; a map's key rules become
`self.all(k, ...)`. Only the transition rules (:data:`VALIDATION_RULES`) are written here.
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.policy import TenantPolicy
from kubetune.spec import (
    API_GROUP,
    API_VERSION,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_LENGTH,
    GENERATE_NAME_PATTERN,
    GENERATED_SUFFIX,
    KIND,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    PLURAL,
    SHORT_NAMES,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

CRD_NAME = f"{PLURAL}.{API_GROUP}"
CATEGORIES = ["kubetune"]

# bounds of what kubetune writes itself (the status) and of the tenant policy's lists: the spec's defaults
# (DEFAULT_MAX_LENGTH, DEFAULT_MAX_ITEMS), or these
MAX_LENGTHS: dict[str, int] = {
    "status.message": 32768,
    "status.conditions[].message": 32768,
    "status.checkpoint.uri": 4096,
    "status.artifacts[].uri": 4096,
}
MAX_ITEMS: dict[str, int] = {"status.conditions": 32, "status.artifacts": 256}

# Fields of spec that may never change after creation (a resumed run must train the same thing).
IMMUTABLE_FIELDS = [
    "model",
    "method",
    "task",
    "datasets",
    "validation",
    "cleaning",
    "training",
    "checkpoint",
    "evaluation",
    "output",
    "storage",
    "tracking",
]
# Fields that may change only while the job is suspended (or in the same update that suspends it).
SUSPENDED_ONLY_FIELDS = ["resources", "scheduling"]


def _rule(rule: str, message: str, field_path: str, reason: str) -> dict[str, Any]:
    return {"rule": rule, "message": message, "fieldPath": field_path, "reason": reason}


# CRD-only rules by schema path (relative to the CR root): transition rules (updates only), which have no
# pydantic twin because `kubetune validate` sees one manifest. The cross-field checks the pydantic
# validators make are declared on their models (`spec.ModelRule`) and come with the models' JSON schema.
VALIDATION_RULES: dict[str, list[dict[str, Any]]] = {
    "spec": [
        # what a resumed run depends on never changes
        *[
            _rule(
                f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
                f"spec.{f} is immutable: create a new FineTuneJob to train something else",
                f".{f}",
                "FieldValueForbidden",
            )
            for f in IMMUTABLE_FIELDS
        ],
        *[
            _rule(
                f"self.suspend || oldSelf.suspend || (has(self.{f}) == has(oldSelf.{f}) && "
                f"(!has(self.{f}) || self.{f} == oldSelf.{f}))",
                f"spec.{f} can only change while the job is suspended (set spec.suspend: true first)",
                f".{f}",
                "FieldValueForbidden",
            )
            for f in SUSPENDED_ONLY_FIELDS
        ],
        _rule(
            "!has(self.resources) || !has(oldSelf.resources) || "
            "self.resources.strategy == oldSelf.resources.strategy",
            "spec.resources.strategy is immutable: checkpoints of one strategy do not resume in another",
            ".resources.strategy",
            "FieldValueForbidden",
        ),
    ],
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {
        "name": "Method",
        "type": "string",
        "jsonPath": ".spec.method.type",
        "description": "full, lora or qlora.",
    },
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "description": "Base model."},
    {
        "name": "Adapter",
        "type": "string",
        "jsonPath": ".spec.model.adapter",
        "priority": 1,
        "description": "The earlier job's adapter merged into the base model before training (model.adapter).",
    },
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of the planned optimizer steps done.",
    },
    {
        "name": "Step",
        "type": "integer",
        "jsonPath": ".status.progress.step",
        "priority": 1,
        "description": "Optimizer steps done.",
    },
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.progress.loss",
        "description": "Latest training loss.",
    },
    {
        "name": "ETA",
        "type": "integer",
        "jsonPath": ".status.progress.etaSeconds",
        "description": "Estimated seconds to finish training.",
    },
    {
        "name": "Reward-Acc",
        "type": "number",
        "jsonPath": ".status.metrics.finalRewardAccuracy",
        "description": "Preference tasks: held-out reward accuracy after training.",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "priority": 1,
        "description": "Counted restarts of the worker group.",
    },
    {
        "name": "Nodes",
        "type": "integer",
        "jsonPath": ".spec.resources.nodes",
        "priority": 1,
        "description": "Worker pods.",
    },
    {
        "name": "GPUs",
        "type": "integer",
        "jsonPath": ".spec.resources.gpusPerNode",
        "priority": 1,
        "description": "GPUs per worker pod.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class SchemaError(ValueError):
    """The pydantic schema has a construct that cannot be made structural."""


def _deref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref` (siblings such as description and default win over the target's)."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return _deref(target, defs)


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str, *, spec: bool) -> dict[str, Any]:
    node = _deref(node, defs)
    nullable = False
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        nullable = len(branches) < len(node["anyOf"])
        if len(branches) != 1:
            raise SchemaError(f"{path}: anyOf with {len(branches)} non-null branches is not structural")
        merged = _deref(branches[0], defs)
        merged.update({k: v for k, v in node.items() if k != "anyOf"})
        node = merged
    out: dict[str, Any] = {}
    kind = node.get("type")
    if "const" in node:
        out["type"] = kind or "string"
        out["enum"] = [node["const"]]
    elif kind:
        out["type"] = kind
    if "description" in node:
        out["description"] = node["description"]
    if node.get("x-kubernetes-int-or-string"):  # a quantity: 16 or "16Gi"
        out["x-kubernetes-int-or-string"] = True
    if "enum" in node:
        out["type"] = out.get("type", "string")
        out["enum"] = list(node["enum"])
    for key in (
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "maxProperties",
        "pattern",
        "format",
    ):
        if key in node:
            out[key] = node[key]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            out[bound] = node[key]
            out[key] = True
    if out.get("type") == "string" and "enum" not in out and "maxLength" not in out:
        if path.startswith("spec"):
            raise SchemaError(f"{path}: a string without max_length (bound it in kubetune.spec)")
        out["maxLength"] = MAX_LENGTHS.get(path, DEFAULT_MAX_LENGTH)
    if kind == "array":
        out["items"] = _structural(node.get("items", {}), defs, path + "[]", spec=spec)
        if "maxItems" not in out:
            if path.startswith("spec"):
                raise SchemaError(f"{path}: a list without max_length (bound it in kubetune.spec)")
            out["maxItems"] = MAX_ITEMS.get(path, DEFAULT_MAX_ITEMS)
    elif kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if (
            not extra and len(node.get("patternProperties") or {}) == 1
        ):  # dict[ConstrainedKey, V]: keys by CEL
            extra = next(iter(node["patternProperties"].values()))
        if props:
            out["properties"] = {}
            for name, sub in props.items():
                child = _structural(sub, defs, f"{path}.{name}", spec=spec)
                if "description" not in child:
                    raise SchemaError(f"{path}.{name}: every field needs a description")
                out["properties"][name] = child
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict) and extra:
            value = _structural(extra, defs, path + "{}", spec=spec)
            if value.get("type") in (None, "object") and "properties" not in value:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out["additionalProperties"] = value
        else:  # a free-form dict (dict[str, Any]): core/v1 objects such as affinity or tolerations
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif not kind and "enum" not in out and not out.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"{path}: no type")
    if "default" in node and node["default"] is not None:
        out["default"] = node["default"]
    elif (
        spec
        and not nullable
        and kind == "object"
        and out.get("properties")
        and not out.get("required")
        and not path.endswith("[]")
    ):
        # default_factory sub-objects: `{}` lets the API server fill their nested defaults
        out["default"] = {}
    rules = (
        copy.deepcopy(node.get("x-kubernetes-validations", []))
        + _key_rules(node)
        + copy.deepcopy(VALIDATION_RULES.get(path, []))
    )
    if rules:
        # model rules in the order Kubernetes documents the keys (pydantic sorts a schema's keys)
        out["x-kubernetes-validations"] = [
            {k: r[k] for k in _RULE_KEYS if k in r} if "fieldPath" in r else r for r in rules
        ]
    return out


_RULE_KEYS = ("rule", "message", "fieldPath", "reason")  # as Kubernetes documents them (pydantic sorts keys)


def _key_rules(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A map's key type's rules (`dict[LabelKey, ...]`: pydantic's propertyNames) as rules on every key."""
    out = []
    for rule in (node.get("propertyNames") or {}).get("x-kubernetes-validations", []):
        on_key = re.sub(r"\bself\b", "k", rule["rule"])
        out.append(
            {"rule": f"self.all(k, {on_key})", "message": "keys " + rule["message"], "reason": rule["reason"]}
        )
    return out


def _strip_default_for_required(schema: dict[str, Any]) -> None:
    """A property listed in `required` must not carry a default (it would never apply)."""
    for name in schema.get("required", []):
        schema.get("properties", {}).get(name, {}).pop("default", None)
    for sub in schema.get("properties", {}).values():
        _strip_default_for_required(sub)
    if "items" in schema:
        _strip_default_for_required(schema["items"])


def model_schema(model: type[BaseModel], path: str, *, spec: bool) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    schema = _structural(raw, defs, path, spec=spec)
    _strip_default_for_required(schema)
    return schema


def status_schema() -> dict[str, Any]:
    """Schema of .status; conditions are a map keyed by type."""
    schema = model_schema(FineTuneJobStatus, "status", spec=False)
    schema.pop("default", None)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"].setdefault("description", "A Kubernetes-style condition.")
    return schema


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the v1alpha1 version."""
    spec = model_schema(FineTuneJobSpec, "spec", spec=True)
    spec.pop("default", None)
    schema: dict[str, Any] = {
        "type": "object",
        "description": "FineTuneJob fine-tunes a large language model (full, LoRA or QLoRA) on one or more "
        "worker pods and exports the result to object storage.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion defines the versioned schema of this "
                "representation of an object: kubetune.io/v1alpha1.",
            },
            "kind": {
                "type": "string",
                "description": "Kind is the REST resource this object represents: FineTuneJob.",
            },
            # the API server allows nothing here but constraints on name and generateName
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": MAX_NAME_LENGTH,
                        "pattern": NAME_PATTERN,
                        "description": f"A DNS-1035 label of at most {MAX_NAME_LENGTH} characters (lowercase letters, "
                        "digits and '-', starting with a letter): it names the worker Service and pods.",
                    },
                    "generateName": {
                        "type": "string",
                        "maxLength": MAX_NAME_LENGTH - GENERATED_SUFFIX,
                        "pattern": GENERATE_NAME_PATTERN,
                        "description": "A prefix the API server completes with 5 characters into the name.",
                    },
                },
            },
            "spec": spec,
            "status": status_schema(),
        },
    }
    return schema


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


POLICY_KIND = "FineTuneJobPolicy"
POLICY_PLURAL = "finetunejobpolicies"
POLICY_CRD_NAME = f"{POLICY_PLURAL}.{API_GROUP}"


def policy_crd() -> dict[str, Any]:
    """The FineTuneJobPolicy CRD: the parameter object of the chart's ValidatingAdmissionPolicy.

    Cluster-scoped; its spec is `policy.TenantPolicy`, the same model the operator enforces."""
    spec = model_schema(TenantPolicy, "policy", spec=True)
    spec.pop("default", None)
    spec["description"] = TenantPolicy.__doc__.split("\n\n")[0].strip() if TenantPolicy.__doc__ else ""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": POLICY_CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": POLICY_KIND,
                "listKind": f"{POLICY_KIND}List",
                "plural": POLICY_PLURAL,
                "singular": POLICY_KIND.lower(),
                "categories": list(CATEGORIES),
            },
            "scope": "Cluster",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "FineTuneJobPolicy: what tenants may choose in FineTuneJobs (the parameters "
                            "of kubetune's admission policy; the operator enforces the same rules).",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1."},
                                "kind": {"type": "string", "description": "FineTuneJobPolicy."},
                                "metadata": {"type": "object"},
                                "spec": spec,
                            },
                        }
                    },
                }
            ],
        },
    }


def _dump(obj: dict[str, Any], source: str) -> str:
    header = f"# Generated by `python -m kubetune.crd` from operator/kubetune/{source}. Do not edit.\n"
    return header + yaml.safe_dump(
        obj, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True
    )


def render_yaml() -> str:
    """The CRD as the YAML committed in crds/finetunejobs.kubetune.io.yaml."""
    return _dump(crd(), "spec.py")


def render_policy_yaml() -> str:
    """The FineTuneJobPolicy CRD as committed in crds/finetunejobpolicies.kubetune.io.yaml."""
    return _dump(policy_crd(), "policy.py")


def main(argv: list[str] | None = None) -> int:
    """Print the FineTuneJob CRD YAML (or, with --policy, the FineTuneJobPolicy CRD) to stdout."""
    args = sys.argv[1:] if argv is None else argv
    sys.stdout.write(render_policy_yaml() if "--policy" in args else render_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
