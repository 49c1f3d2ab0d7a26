"""The CRD is generated from the spec models: the committed file is current and complete."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune import crd
from kubetune.manifest import ManifestError, parse_job
from kubetune.spec import MAX_DATASETS, FineTuneJobSpec, FineTuneJobStatus, JobModel, model_rules
from tests.manifest_cases import INVALID

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"


def _walk(schema: dict, path: str):
    """Yield (path, schema) for every property, item and map value."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], path + "{}")


def _schema() -> dict:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_current() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubetune.crd"], capture_output=True, text=True, check=True
    ).stdout
    assert CRD_FILE.read_text() == out, (
        "regenerate: python -m kubetune.crd > crds/finetunejobs.kubetune.io.yaml"
    )


def test_identity() -> None:
    obj = yaml.safe_load(CRD_FILE.read_text())
    assert obj["metadata"]["name"] == "finetunejobs.kubetune.io"
    spec = obj["spec"]
    assert spec["scope"] == "Namespaced" and spec["group"] == "kubetune.io"
    assert spec["names"]["shortNames"] == ["ftj"] and spec["names"]["categories"] == ["kubetune"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Method"] == ".spec.method.type"
    assert columns["Model"] == ".spec.model.source" and columns["Progress"] == ".status.progress.percent"
    assert (
        columns["Adapter"] == ".spec.model.adapter"
        and columns["Reward-Acc"] == ".status.metrics.finalRewardAccuracy"
    )
    assert columns["Loss"] == ".status.progress.loss" and columns["ETA"] == ".status.progress.etaSeconds"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_every_property_has_a_description() -> None:
    schema = _schema()

    def needs(path: str, node: dict) -> bool:  # properties, and list items that are objects
        return not path.endswith("{}") and (not path.endswith("[]") or "properties" in node)

    missing = [
        p
        for part in ("spec", "status")
        for p, s in _walk(schema["properties"][part], part)
        if needs(p, s) and not s.get("description")
    ]
    for name in ("apiVersion", "kind"):
        assert schema["properties"][name]["description"]
    assert not missing, missing


def test_schema_is_structural() -> None:
    """No $ref/anyOf/allOf/oneOf/title/additionalProperties:false; every node typed or free-form."""
    for path, node in _walk(_schema(), ""):
        for bad in ("$ref", "anyOf", "allOf", "oneOf", "title", "const", "$defs"):
            assert bad not in node, f"{path}: {bad}"
        assert node.get("additionalProperties") is not False, path
        assert (
            "type" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or node.get("x-kubernetes-int-or-string")
        ), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") == "string" and "enum" not in node and path not in (".apiVersion", ".kind"):
            assert "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path


def test_fields_match_the_models() -> None:
    spec = _schema()["properties"]["spec"]
    assert set(spec["properties"]) == {f.alias or n for n, f in FineTuneJobSpec.model_fields.items()}
    assert set(spec["required"]) == {"model", "task", "datasets"}
    status = _schema()["properties"]["status"]
    assert set(status["properties"]) == {f.alias or n for n, f in FineTuneJobStatus.model_fields.items()}


def test_conversions() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    method = spec["method"]
    assert method["default"] == {} and method["properties"]["type"]["enum"] == ["full", "lora", "qlora"]
    assert method["properties"]["type"]["default"] == "lora"
    lora = method["properties"]["lora"]
    assert "default" not in lora  # Optional[...] = None: plain optional, no default
    assert lora["properties"]["dropout"] == {
        **lora["properties"]["dropout"],
        "minimum": 0,
        "maximum": 1,
        "exclusiveMaximum": True,
    }
    assert method["properties"]["quantization"]["properties"]["bits"]["enum"] == [4]
    weight = spec["datasets"]["items"]["properties"]["weight"]
    assert weight["minimum"] == 0 and weight["exclusiveMinimum"] is True
    assert spec["datasets"]["minItems"] == 1
    assert spec["resources"]["properties"]["nodes"]["minimum"] == 1
    assert spec["resources"]["properties"]["nodeSelector"]["additionalProperties"]["type"] == "string"
    assert spec["resources"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    toleration = spec["resources"]["properties"]["tolerations"]["items"]
    assert toleration["properties"]["operator"]["enum"] == ["Exists", "Equal"]  # typed as core/v1 has it
    assert len(toleration["x-kubernetes-validations"]) == 3
    cpu = spec["resources"]["properties"]["cpu"]  # a quantity: 16 or "500m", as core/v1 takes it
    assert (
        cpu["x-kubernetes-int-or-string"] is True
        and "self.matches(" in cpu["x-kubernetes-validations"][0]["rule"]
    )
    assert spec["model"]["properties"]["revision"]["type"] == "string"
    assert "nullable" not in spec["model"]["properties"]["revision"]
    conditions = _schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == [
        "type"
    ]


def test_bounds_come_from_the_models() -> None:
    """Every spec string and list is bounded in kubetune.spec, so validate enforces what the CRD does."""
    spec = _schema()["properties"]["spec"]
    assert spec["properties"]["datasets"]["maxItems"] == MAX_DATASETS
    for path, node in _walk(spec, "spec"):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "integer" and "enum" not in node:
            assert "maximum" in node, path


def test_cel_rules_present() -> None:
    spec = _schema()["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("self.model == oldSelf.model" in r for r in rules)
    assert any("self.suspend || oldSelf.suspend" in r and "self.resources" in r for r in rules)
    assert any("'completion'" in r for r in rules)
    assert any("'adapter' in self.output.exports" in r for r in rules)
    method_rules = [r["rule"] for r in spec["properties"]["method"]["x-kubernetes-validations"]]
    assert len(method_rules) == 3
    assert spec["properties"]["training"]["x-kubernetes-validations"][0]["fieldPath"] == ".warmupRatio"
    assert spec["properties"]["validation"]["x-kubernetes-validations"]
    for _, node in _walk(_schema(), ""):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"] and rule["reason"] in {
                "FieldValueInvalid",
                "FieldValueForbidden",
                "FieldValueRequired",
                "FieldValueDuplicate",
            }
    name = _schema()["properties"]["metadata"]["properties"]["name"]
    assert name["maxLength"] == crd.MAX_NAME_LENGTH and name["pattern"].startswith("^[a-z]")


def _job_models() -> list[type]:
    found, todo = [], [JobModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def test_cel_rules_and_pydantic_validators_share_one_declaration() -> None:
    """Every CEL rule comes from kubetune.spec (a `Rule` type or a model's `ModelRule`, which its pydantic
    validator raises), except the CRD-only transition rules; every ModelRule reaches the CRD and is
    exercised by a bad manifest of tests/manifest_cases.py that pydantic refuses at the rule's field with
    the rule's message (test_operator_cluster sends the same manifests to the API server)."""
    assert all("oldSelf" in r["rule"] for rules in crd.VALIDATION_RULES.values() for r in rules)
    declared = {(r.cel, r.message): r for model in _job_models() for r in model_rules(model)}
    assert len(declared) >= 16  # the models declare them (none lost in a refactoring)
    found: dict[tuple[str, str], str] = {}
    for path, node in _walk(_schema()["properties"]["spec"], "spec"):
        for rule in node.get("x-kubernetes-validations", []):
            if "fieldPath" in rule and "oldSelf" not in rule["rule"]:
                assert (rule["rule"], rule["message"]) in declared, (path, rule)
                found[rule["rule"], rule["message"]] = path + rule["fieldPath"]
    assert set(found) == set(declared)
    for key, location in found.items():
        field = re.compile(re.escape(location).replace(r"\[\]", r"\[\d+\]"))
        problems = []
        for case in (c for c in INVALID if c.field and field.fullmatch(c.field)):
            with pytest.raises(ManifestError) as caught:
                parse_job(case.manifest())
            problems += [p for p in caught.value.problems if p.startswith(case.field)]
        assert any(declared[key].message in p for p in problems), (location, declared[key].message, problems)
