"""Every `kubetune` subcommand runs once; expected errors are one line and a documented exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.cli import EXIT_UNAVAILABLE, build_parser
from kubetune.crd import render_yaml
from kubetune.spec import EXIT_CONFIG_ERROR

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def kubetune(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def subcommands() -> list[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]  # noqa: SLF001 - argparse has no API
    return sorted(action.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_has_help(command: str) -> None:
    result = kubetune(command, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: kubetune" in result.stdout and "Traceback" not in result.stderr


def test_crd() -> None:
    result = kubetune("crd", timeout=60)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout == render_yaml() and yaml.safe_load(result.stdout)["kind"] == "CustomResourceDefinition"
    )


def test_schema() -> None:
    result = kubetune("schema", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "spec" in json.loads(result.stdout)["properties"]


def test_validate_every_example() -> None:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        result = kubetune("validate", str(path), timeout=60)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["validate", "run", "estimate"])
def test_bad_manifest_is_one_message_and_exit_3(tmp_path: Path, command: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes("kind: FineTuneJob\nspec: {x: 1}\n".encode("utf-16"))
    result = kubetune(command, str(path), timeout=120)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    assert "Traceback" not in result.stderr and "UTF-16" in result.stderr
    result = kubetune(command, str(tmp_path / "missing.yaml"), timeout=120)
    assert result.returncode == EXIT_CONFIG_ERROR and "Traceback" not in result.stderr, result.stderr


def test_estimate_list_gpus() -> None:
    result = kubetune("estimate", "--list-gpus", timeout=60)
    assert result.returncode == 0 and "H100" in result.stdout, result.stderr


def test_estimate_without_credentials_is_one_message() -> None:
    """The example's model and data are in S3 and there are no credentials here."""
    result = kubetune("estimate", str(REPO / "examples" / "qlora-gpu.yaml"), timeout=120)
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert "Traceback" not in result.stderr and "credentials" in result.stderr
    assert "--model-config" in result.stderr  # and how to estimate anyway


@pytest.mark.slow  # a `kubetune` subprocess that imports the trainer
def test_estimate_from_overrides_needs_no_access(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    result = kubetune(
        "estimate",
        str(REPO / "examples" / "qlora-gpu.yaml"),
        "--model-config",
        str(config),
        "--tokens",
        "1000000",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"]["tokens"] == 1000000 and "given" in report["data"]["method"]


@pytest.mark.slow  # a `kubetune` subprocess that imports the trainer
def test_run_with_bad_data_exits_3_before_the_model_and_leaves_no_directories(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bad-data"},
        "spec": {
            "model": {"source": "org/not-downloaded"},
            "task": {"type": "instruction"},
            "datasets": [{"source": str(data)}],
            "output": {"uri": str(tmp_path / "out" / "run")},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = kubetune("run", str(path), "--quiet")
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    assert f"{data}:2: not UTF-8 text" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a `kubetune` subprocess that imports the trainer
def test_run_without_storage_credentials_is_one_message(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(4))
    )
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "no-creds"},
        "spec": {
            "model": {"source": "s3://models/some-model/"},
            "task": {"type": "instruction"},
            "datasets": [{"source": str(data)}],
            "output": {"uri": str(tmp_path / "out")},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = kubetune("run", str(path), "--quiet")
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    assert "credentials" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
