"""The FineTuneJob spec: examples validate, bad manifests are rejected with the field named."""

from __future__ import annotations

import subprocess
import sys
import time
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
        "spec": {
            "model": {"source": "bundled://smollm2-135m-instruct"},
            "task": {"type": "instruction"},
            "datasets": [{"source": "data.jsonl"}],
        },
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
    assert (
        "Error" not in text and "pydantic" not in text and "spec: " not in text
    )  # no class names, no doubling
    assert all(len(p) < 400 for p in caught.value.problems), caught.value.problems
    assert LONG_KEY[:40] not in text  # a pasted secret is never printed back whole


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
    with pytest.raises(
        ManifestError, match=r"spec.datasets\[0\].format: a completion task takes text datasets"
    ):
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
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", str(good)], capture_output=True, text=True
    )
    assert result.returncode == 0 and "valid FineTuneJob 'demo'" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(mutate("spec.training.learningRate", -1)))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 3
    assert "spec.training.learningRate" in result.stderr


# ----- loading: encodings, YAML dialect, duplicate keys, alias bombs, several documents


def _load_bytes(tmp_path: Path, data: bytes) -> ManifestError:
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    with pytest.raises(ManifestError) as caught:
        load_job(path)
    return caught.value


GOOD_YAML = yaml.safe_dump(base(), sort_keys=False)


@pytest.mark.parametrize(
    "data,expected",
    [
        (GOOD_YAML.encode("utf-16"), "UTF-16 text; save it as UTF-8"),
        (GOOD_YAML.encode("utf-16-le"), "save it as UTF-8"),
        (
            GOOD_YAML.replace("demo", "démo").encode("latin-1"),
            ":4: invalid FineTuneJob:\n  - not UTF-8 text (byte 0xe9)",
        ),
        (b"\x7fELF\x02\x01\x01" + bytes(100), "binary"),
        (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "compressed"),
    ],
    ids=["utf16-bom", "utf16-no-bom", "latin1", "binary", "gzip"],
)
def test_unreadable_encodings_are_named(tmp_path: Path, data: bytes, expected: str) -> None:
    assert expected in str(_load_bytes(tmp_path, data))


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_YAML.encode())
    assert load_job(path).metadata.name == "demo"


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    text = GOOD_YAML + "spec:\n  model: {source: x/y}\n"
    error = _load_bytes(tmp_path, text.encode())
    assert "duplicate key 'spec' (first on line" in str(error)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    start = time.monotonic()
    error = _load_bytes(tmp_path, ("\n".join(lines) + "\n").encode())
    assert "aliases expand to more than" in str(error) and time.monotonic() - start < 5


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    assert "not valid YAML" in str(_load_bytes(tmp_path, b"a: &a [*a]\n"))


def test_oversized_manifest_is_refused(tmp_path: Path) -> None:
    assert "larger than 1 MiB" in str(_load_bytes(tmp_path, GOOD_YAML.encode() + b"#" * (2 << 20)))


def test_yaml_is_read_as_kubectl_reads_it(tmp_path: Path) -> None:
    """1e9 is a number and 2024-01-01 a string for kubectl; PyYAML's defaults differ."""
    doc = base()
    doc["spec"]["resources"] = {"memory": "1e9"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc).replace("'1e9'", "1e9"))
    with pytest.raises(
        ManifestError, match="spec.resources.memory: Input should be a valid string, got a number"
    ):
        load_job(path)
    path.write_text(
        GOOD_YAML.replace(
            "source: bundled://smollm2-135m-instruct", "source: org/model\n    revision: 2024-01-01"
        )
    )
    assert load_job(path).spec.model.revision == "2024-01-01"


def test_several_documents_name_the_wrong_one(tmp_path: Path) -> None:
    bad = mutate("spec.training.learningRate", -1)
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n" + yaml.safe_dump(bad))
    with pytest.raises(ManifestError, match=r"\(document 2 of 2\): invalid FineTuneJob"):
        load_job(path)
    path.write_text(GOOD_YAML + "---\n" + GOOD_YAML)
    with pytest.raises(ManifestError, match=r"found 2 \(documents 1: 'FineTuneJob', 2: 'FineTuneJob'\)"):
        load_job(path)
    path.write_text("---\n- a\n---\nkind: Secret\n")
    with pytest.raises(ManifestError, match="documents 1: not a mapping, 2: 'Secret'"):
        load_job(path)


def test_merge_keys_work_as_in_kubectl(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(GOOD_YAML + "  training:\n    <<: {learningRate: 0.001, maxSteps: 5}\n    maxSteps: 7\n")
    training = load_job(path).spec.training
    assert training.learning_rate == 0.001 and training.max_steps == 7
