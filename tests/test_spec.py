"""The FineTuneJob spec: examples validate, bad manifests are rejected with the field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.manifest import ManifestError, load_job, parse_job
from tests.manifest_cases import INVALID, LONG_KEY, VALID

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def base() -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {"model": {"source": "bundled://smollm2-135m-instruct"}, "task": {"type": "instruction"},
                 "datasets": [{"source": "data.jsonl"}]},
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate(path: Path) -> None:
    job = load_job(path)
    assert job.metadata.name


def test_defaults_filled() -> None:
    job = parse_job(base())
    assert job.spec.method.type == "lora" and job.spec.method.lora.r == 16
    assert job.spec.training.epochs == 1.0 and job.spec.training.precision == "auto"
    assert job.spec.validation.fraction == 0.05
    assert job.spec.output.exports == ["adapter"]


def mutate(path: str, value) -> dict:
    doc = base()
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
    last = keys[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def names(problems: list[str], field: str) -> bool:
    """Whether one of the problems is about `field` (or a field inside it)."""
    return any(p.startswith((f"{field}:", f"{field}[", f"{field}.")) for p in problems)


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_case_is_refused_naming_the_field(case) -> None:
    """The shared cases (tests/manifest_cases.py); test_operator_cluster runs them through the API server."""
    with pytest.raises(ManifestError) as caught:
        parse_job(case.manifest())
    assert names(caught.value.problems, case.field), caught.value.problems
    text = str(caught.value)
    assert "Error" not in text and "pydantic" not in text and "spec: " not in text  # no class names, no doubling
    assert all(len(p) < 400 for p in caught.value.problems), caught.value.problems
    assert LONG_KEY[:60] not in text  # a pasted secret is never printed back whole


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_valid_case_is_accepted(case) -> None:
    parse_job(case.manifest())


def test_warmup_steps_and_ratio_exclusive() -> None:
    doc = base()
    doc["spec"]["training"] = {"warmupSteps": 10, "warmupRatio": 0.1}
    with pytest.raises(ManifestError, match="warmupSteps or warmupRatio"):
        parse_job(doc)


def test_completion_task_needs_text_datasets() -> None:
    doc = base()
    doc["spec"]["task"] = {"type": "completion"}
    doc["spec"]["datasets"] = [{"source": "a.jsonl", "format": "alpaca"}]
    with pytest.raises(ManifestError, match=r"spec.datasets\[0\].format: a completion task takes text datasets"):
        parse_job(doc)


def test_full_method_cannot_export_adapter() -> None:
    doc = base()
    doc["spec"]["method"] = {"type": "full"}
    assert parse_job(doc).spec.output.exports == ["merged"]  # the default follows the method
    doc["spec"]["output"] = {"exports": ["adapter"]}
    with pytest.raises(ManifestError, match=r"spec.output.exports: 'adapter' needs method lora or qlora"):
        parse_job(doc)


def test_every_problem_is_listed(tmp_path: Path) -> None:
    doc = base()
    doc["spec"]["training"] = {"learningRate": 0, "batchSizePerDevice": 0}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as caught:
        load_job(path)
    assert len(caught.value.problems) == 2
    assert str(path) in str(caught.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec: {model: [\n")
    with pytest.raises(ManifestError, match=rf"{path}:\d+"):
        load_job(path)


def test_validate_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "validate", str(good)], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "valid FineTuneJob 'demo'" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(mutate("spec.training.learningRate", -1)))
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "validate", str(bad)], capture_output=True,
                            text=True)
    assert result.returncode == 3
    assert "spec.training.learningRate" in result.stderr
