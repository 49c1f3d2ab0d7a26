"""The FineTuneJob spec: examples validate, bad manifests are rejected with the field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.manifest import ManifestError, load_job, parse_job

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


BAD = [
    ("spec.trainng", {"epochs": 1}, "spec.trainng: unknown field"),
    ("spec.training.learningRate", -1, "spec.training.learningRate: Input should be greater than 0"),
    ("spec.training.precision", "fp8", "spec.training.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    ("spec.training.scheduler", "warp", "spec.training.scheduler"),
    ("spec.training.batchSizePerDevice", "four", "spec.training.batchSizePerDevice"),
    ("spec.method", {"type": "qlora"}, "method.type qlora requires method.quantization"),
    ("spec.method", {"type": "lora", "quantization": {"bits": 4}}, "only valid with method.type qlora"),
    ("spec.method", {"type": "full", "lora": {"r": 8}}, "method.lora is only valid with method.type lora"),
    ("spec.datasets", [], "spec.datasets: List should have at least 1 item"),
    ("spec.datasets.0.weight", 0, "spec.datasets[0].weight: Input should be greater than 0"),
    ("spec.datasets.0.fileType", "xlsx", "spec.datasets[0].fileType"),
    ("spec.model.source", "bundled://gpt-5", "unknown bundled model 'gpt-5'"),
    ("spec.model", {}, "spec.model.source: required field is missing"),
    ("spec.task.type", "rlhf", "spec.task.type: Input should be 'instruction', 'chat' or 'completion'"),
    ("metadata.name", "Bad_Name", "metadata.name: String should match pattern"),
    ("apiVersion", "kubetune.io/v2", "apiVersion: Input should be 'kubetune.io/v1alpha1'"),
    ("spec.resources.nodes", 0, "spec.resources.nodes: Input should be greater than or equal to 1"),
    ("spec.output.exports", ["adapter", "gguf"], "spec.output.exports[1]"),
    ("spec.validation", {"fraction": 0.1, "datasets": [{"source": "v.jsonl"}]}, "give either fraction or datasets"),
    ("spec.lora", {"r": 8}, "spec.lora: unknown field"),
]


@pytest.mark.parametrize("path,value,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_names_the_field(path: str, value, expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_job(mutate(path, value))
    assert expected in str(caught.value), str(caught.value)


def test_warmup_steps_and_ratio_exclusive() -> None:
    doc = base()
    doc["spec"]["training"] = {"warmupSteps": 10, "warmupRatio": 0.1}
    with pytest.raises(ManifestError, match="warmupSteps or warmupRatio"):
        parse_job(doc)


def test_completion_task_needs_text_datasets() -> None:
    doc = base()
    doc["spec"]["task"] = {"type": "completion"}
    doc["spec"]["datasets"] = [{"source": "a.jsonl", "format": "alpaca"}]
    with pytest.raises(ManifestError, match=r"datasets\[0\].format: a completion task takes text datasets"):
        parse_job(doc)


def test_full_method_cannot_export_adapter() -> None:
    doc = base()
    doc["spec"]["method"] = {"type": "full"}
    assert parse_job(doc).spec.output.exports == ["merged"]  # the default follows the method
    doc["spec"]["output"] = {"exports": ["adapter"]}
    with pytest.raises(ManifestError, match="'adapter' needs method lora or qlora"):
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
