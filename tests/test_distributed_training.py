"""Distributed strategies and memory savers, trained for real on CPU.

FSDP (2 ranks, gloo) and DeepSpeed ZeRO-1 (CPU accelerator, torch AdamW) run through
`kubetune run --nproc 2`, the command line a user types; the exported model reloads with plain
transformers and carries the trained weights. Gradient checkpointing keeps fewer activations for the
backward pass (the layers are recomputed) and gives the losses of the run without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.trainer_setup import build_trainer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kubetune_run(job: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(job), "--quiet", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    assert trained.keys() == base.keys()
    return {name for name in base if not torch.equal(trained[name], base[name])}


@pytest.mark.parametrize(
    ("strategy", "method"),
    [
        ("fsdp", {"type": "full"}),
        ("fsdp", {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}}),
        ("deepspeed-zero1", {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}}),
    ],
)
def test_kubetune_run_nproc_2_trains_and_exports(
    make_job, tiny_model: Path, strategy: str, method: dict[str, Any]
) -> None:
    name = f"{strategy}-{method['type']}"
    job = make_job(
        name,
        method=method,
        resources={"nodes": 1, "gpusPerNode": 0, "strategy": strategy},
        training={"maxSteps": 3, "batchSizePerDevice": 2, "learningRate": 1e-2},
        output={"exports": ["merged"] if method["type"] == "full" else ["adapter", "merged"]},
    )
    result = kubetune_run(job, "--nproc", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Finished {name}: 3 steps" in result.stdout
    output = job.parent / f"out-{name}"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["worldSize"] == 2 and summary["steps"] == 3
    assert summary["metrics"]["finalEvalLoss"] < summary["metrics"]["baselineEvalLoss"]
    # the merged export reloads with plain transformers and holds the trained weights
    base = weights(tiny_model)
    trained = weights(output / "exports" / "merged")
    moved = changed(trained, base)
    if method["type"] == "full":
        assert len(moved) == len(base)  # every tensor trained and gathered from both shards
    else:
        assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved), moved
        assert (output / "exports" / "adapter" / "adapter_model.safetensors").exists()


class SavedForBackward:
    """Bytes of activations autograd keeps for the backward pass (checkpointed layers keep only their inputs)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor


@pytest.mark.parametrize("method", [{"type": "full"}, {"type": "lora", "lora": {"r": 4, "dropout": 0.0}}])
def test_gradient_checkpointing_saves_activations_and_gives_the_same_losses(
    make_job, method: dict[str, Any]
) -> None:
    runs = {}
    for checkpointing in (False, True):
        job = make_job(
            f"ckpt-{method['type']}-{str(checkpointing).lower()}",
            method=method,
            training={"maxSteps": 3, "gradientCheckpointing": checkpointing, "loggingSteps": 1},
            output={"exports": ["merged"]},
        )
        trainer = build_trainer(job)
        saved = SavedForBackward()
        with saved.hooks:
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[checkpointing] = (losses, saved.bytes, trainer.model.is_gradient_checkpointing)
    (plain, plain_bytes, plain_flag), (ckpt, ckpt_bytes, ckpt_flag) = runs[False], runs[True]
    assert (plain_flag, ckpt_flag) == (False, True)
    # the output head's logits dominate on this tiny model; what the two layers keep is ~6% of the total
    assert ckpt_bytes < 0.97 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert len(plain) == 3 and ckpt == pytest.approx(plain, abs=1e-5)
