"""Fixtures for trainer tests: a tiny llama, its tokenizer, and a manifest writer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tiny_model import tiny_llama_dir
from tests.support.waiting import wait_for, while_running

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


def write_job(directory: Path, model_dir: Path, name: str = "t", **spec_overrides: Any) -> Path:
    """Write `directory`/<name>.yaml, a FineTuneJob for `model_dir` (LoRA SFT on the pydoc instructions, 3
    steps, output `directory`/out-<name>); keyword arguments are merged into spec (dicts one level deep)."""
    spec: dict[str, Any] = {
        "model": {"source": str(model_dir)},
        "method": {"type": "lora"},
        "task": {"type": "instruction"},
        "datasets": [{"source": str(PYDOC), "maxExamples": 60}],
        "training": {
            "maxSteps": 3,
            "batchSizePerDevice": 4,
            "maxSeqLength": 96,
            "loggingSteps": 1,
            "learningRate": 1e-3,
        },
        "evaluation": {"numSamplePrompts": 1, "maxNewTokens": 4},
        "output": {"uri": str(directory / f"out-{name}"), "exports": ["adapter"]},
        "tracking": {"tensorboard": False},
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.fixture
def make_job(tmp_path: Path, tiny_model: Path) -> Callable[..., Path]:
    """Write a FineTuneJob YAML for the tiny model (write_job in tmp_path); keyword arguments are merged
    into spec."""

    def make(name: str = "t", **spec_overrides: Any) -> Path:
        return write_job(tmp_path, tiny_model, name, **spec_overrides)

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def two_ranks(
    job: Path, *trainer_args: str, torchrun_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """The trainer on `job` as two ranks on this machine (torchrun --standalone, ENV, 15 minutes at
    most); `trainer_args` go to the trainer, `torchrun_args` to torchrun. The caller checks the result."""
    command = torchrun(
        "--standalone",
        "--nproc-per-node",
        "2",
        *torchrun_args,
        "-m",
        "kubetune_trainer",
        "--config",
        str(job),
        *trainer_args,
    )
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)


def start(path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def progress_step(output: Path) -> int:
    try:
        return json.loads((output / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def kill_after_checkpoint(
    job: Path, output: Path, checkpoint: int, step: int, what: str, interval: float = 0.2
) -> int:
    """Start the trainer on `job` and SIGKILL it once checkpoint step-`checkpoint` in `output` is
    complete and it has reached step `step` (`what` names that wait); no summary may be written.
    Returns the step it had reached when killed."""
    process = start(job)
    wait_for(
        while_running(
            process,
            lambda: (
                (output / "checkpoints" / f"step-{checkpoint}" / "manifest.json").exists()
                and progress_step(output) >= step
            ),
        ),
        300,
        what,
        interval=interval,
    )
    killed_at = progress_step(output)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / "summary.json").exists()
    return killed_at
