"""Fixtures for trainer tests: a tiny llama, its tokenizer, and a manifest writer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tiny_model import tiny_llama_dir

REPO = Path(__file__).resolve().parents[2]
PYDOC = REPO / "examples" / "data" / "pydoc_instructions.jsonl"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_llama_dir()


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from kubetune_trainer.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def make_job(tmp_path: Path, tiny_model: Path) -> Callable[..., Path]:
    """Write a FineTuneJob YAML for the tiny model; keyword arguments are merged into spec."""

    def make(name: str = "t", **spec_overrides: Any) -> Path:
        spec: dict[str, Any] = {
            "model": {"source": str(tiny_model)},
            "method": {"type": "lora"},
            "task": {"type": "instruction"},
            "datasets": [{"source": str(PYDOC), "maxExamples": 60}],
            "training": {"maxSteps": 3, "batchSizePerDevice": 4, "maxSeqLength": 96, "loggingSteps": 1,
                         "learningRate": 1e-3},
            "evaluation": {"numSamplePrompts": 1, "maxNewTokens": 4},
            "output": {"uri": str(tmp_path / f"out-{name}"), "exports": ["adapter"]},
            "tracking": {"tensorboard": False},
        }
        for key, value in spec_overrides.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
                    "spec": spec}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        return path

    return make
