"""Every training knob of the spec reaches training.

Each test builds the run from a FineTuneJob manifest through the trainer's own setup functions
(make_context, build_datasets, load_model, training_arguments, make_trainer) and inspects the live
objects or the effect of a few real steps on a tiny llama: dropping a field on its way from the spec
to training makes the test fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.manifest import load_job
from kubetune_trainer import models as model_lib
from kubetune_trainer.__main__ import run_trainer
from tests.support.trainer_fixtures import REPO, write_jsonl
from tests.support.trainer_setup import build_trainer

DATA = REPO / "examples" / "data"


# ---------------------------------------------------------------- LoRA


def lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_lora_fields_reach_the_wrapped_modules(make_job) -> None:
    path = make_job(
        "lora-knobs",
        method={
            "type": "lora",
            "lora": {
                "r": 3,
                "alpha": 12,
                "dropout": 0.25,
                "targetModules": ["q_proj", "v_proj"],
                "bias": "all",
                "modulesToSave": ["lm_head"],
            },
        },
    )
    model = build_trainer(path).model
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (3, 12, 0.25, "all")
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert set(config.modules_to_save) >= {"lm_head"}
    wrapped = lora_layers(model)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == {"q_proj", "v_proj"}
    assert len(wrapped) == 2 * 2  # two layers
    for layer in wrapped.values():
        assert layer.r["default"] == 3 and layer.scaling["default"] == 12 / 3
        assert layer.lora_A["default"].weight.shape[0] == 3
        assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout)
        assert layer.lora_dropout["default"].p == 0.25
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # modulesToSave: a trainable full copy of the output head
    assert any("lm_head" in name and "modules_to_save" in name for name in trainable)
    assert all("lora_" in name or "modules_to_save" in name or name.endswith("bias") for name in trainable)


def test_lora_all_linear_and_defaults(make_job) -> None:
    path = make_job(
        "lora-all",
        method={
            "type": "lora",
            "lora": {"r": 5, "alpha": 5, "dropout": 0.0, "targetModules": ["all-linear"]},
        },
    )
    model = build_trainer(path).model
    config = model.peft_config["default"]
    assert config.bias == "none" and not config.modules_to_save
    wrapped = lora_layers(model)
    kinds = {name.rsplit(".", 1)[-1] for name in wrapped}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(wrapped) == 7 * 2
    for layer in wrapped.values():
        assert layer.r["default"] == 5 and layer.scaling["default"] == 1.0
        assert not isinstance(layer.lora_dropout["default"], torch.nn.Dropout)  # dropout 0: Identity
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)  # the head and biases stay frozen


# ---------------------------------------------------------------- QLoRA


@pytest.mark.parametrize(
    ("quant_type", "double", "compute"), [("nf4", True, "float32"), ("fp4", False, "bfloat16")]
)
def test_qlora_fields_reach_the_4bit_layers(make_job, quant_type: str, double: bool, compute: str) -> None:
    import bitsandbytes as bnb

    path = make_job(
        f"qlora-{quant_type}",
        method={
            "type": "qlora",
            "quantization": {"bits": 4, "type": quant_type, "doubleQuant": double, "computeDtype": compute},
        },
    )
    model = build_trainer(path).model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * 2  # every linear layer of the two blocks, not the head
    for layer in layers:
        state = layer.weight.quant_state
        assert layer.weight.quant_type == quant_type and state.quant_type == quant_type
        assert state.nested is double  # double quantization: the absmax constants are quantized too
        assert layer.compute_dtype == getattr(torch, compute)


# ---------------------------------------------------------------- schedule


def schedule(trainer: Any, steps: int) -> list[float]:
    """The learning rate the optimizer uses at each of the first `steps` steps."""
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("scheduler", "warmup", "expected"),
    [
        (
            "cosine",
            {"warmupSteps": 2},
            lambda k: k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / 6)),
        ),
        (
            "linear",
            {"warmupRatio": 0.25},  # 0.25 * 8 steps = 2 warmup steps
            lambda k: k / 2 if k < 2 else (8 - k) / 6,
        ),
        ("constant_with_warmup", {"warmupSteps": 3}, lambda k: min(1.0, k / 3)),
        ("constant", {}, lambda k: 1.0),
    ],
)
def test_scheduler_and_warmup_give_the_learning_rate_at_each_step(
    make_job, scheduler: str, warmup: dict, expected: Any
) -> None:
    path = make_job(
        f"sched-{scheduler.replace('_', '-')}",
        training={"maxSteps": 8, "learningRate": 3e-3, "scheduler": scheduler, **warmup},
    )
    rates = schedule(build_trainer(path), 8)
    assert rates == pytest.approx([3e-3 * expected(k) for k in range(8)], rel=1e-6, abs=1e-12)


def test_weight_decay_applies_to_weights_not_norms_or_biases(make_job) -> None:
    path = make_job(
        "decay", method={"type": "full"}, training={"weightDecay": 0.125}, output={"exports": ["merged"]}
    )
    trainer = build_trainer(path)
    trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = {
        names[id(p)]
        for g in trainer.optimizer.param_groups
        if g["weight_decay"] == 0.125
        for p in g["params"]
    }
    free = {
        names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]
    }
    assert decayed and free and decayed | free == set(names.values())
    assert all(n.endswith("proj.weight") or "embed_tokens" in n for n in decayed), decayed
    assert all("norm" in n for n in free), free


class GradientProbe:
    """A callback recording, before each optimizer step (after clipping), the gradients of the model."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.forwards = 0

    def hook(self, model: Any) -> None:
        model.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        probe = self

        class Recorder(TrainerCallback):
            def on_pre_optimizer_step(
                self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
            ) -> None:
                probe.grads.append(
                    {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                )

        return Recorder()


def norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))


def test_gradient_accumulation_steps_and_loss_normalisation(make_job) -> None:
    """2 micro-batches of 2 accumulate to the gradient of one batch of 4 (token-weighted, not batch-averaged)."""
    lora = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["all-linear"]}}
    probes = {}
    for accumulation, batch in ((2, 2), (1, 4)):
        probe = GradientProbe()
        path = make_job(
            f"accum-{accumulation}",
            method=lora,
            training={
                "maxSteps": 2,
                "batchSizePerDevice": batch,
                "gradientAccumulationSteps": accumulation,
                "maxGradNorm": 0.0,
                "loggingSteps": 1,
                "precision": "fp32",  # equal up to fp32 rounding (auto is bf16 on CPUs with native bf16)
            },
        )
        trainer = build_trainer(path, callbacks=[probe.callback()])
        probe.hook(trainer.model)
        trainer.train()
        assert trainer.state.global_step == 2
        assert probe.forwards == 2 * accumulation  # micro-batches per optimizer step
        assert len(probe.grads) == 2
        probes[accumulation] = probe
    accumulated, single = probes[2].grads[0], probes[1].grads[0]
    assert accumulated.keys() == single.keys() and norm(single) > 0
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-4, atol=1e-7, msg=name)


def test_max_grad_norm_clips_the_gradient(make_job) -> None:
    probe = GradientProbe()
    path = make_job(
        "clip",
        method={"type": "full"},
        training={"maxSteps": 2, "maxGradNorm": 0.001},
        output={"exports": ["merged"]},
    )
    trainer = build_trainer(path, callbacks=[probe.callback()])
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged and all(g > 0.01 for g in logged)  # the norm before clipping
    assert [norm(g) for g in probe.grads] == pytest.approx(
        [0.001, 0.001], rel=1e-3
    )  # the norm the optimizer sees


def losses(make_job, name: str, seed: int) -> list[float]:
    """The logged training losses of a whole run (`kubetune run`'s code path)."""
    path = make_job(
        name,
        training={"maxSteps": 3, "seed": seed, "loggingSteps": 1},
        method={"type": "lora", "lora": {"r": 4, "dropout": 0.1}},
    )
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0
    lines = (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def test_seed_decides_the_run(make_job) -> None:
    """Same seed, same losses (data order, adapter init, dropout); another seed, other losses."""
    first = losses(make_job, "seed-a", 7)
    assert len(first) == 3
    assert losses(make_job, "seed-b", 7) == first
    assert losses(make_job, "seed-c", 8) != first


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_is_the_dtype_the_forward_runs_in(make_job, precision: str, dtype: torch.dtype) -> None:
    path = make_job(f"precision-{precision}", training={"maxSteps": 1, "precision": precision})
    trainer = build_trainer(path)
    seen: list[torch.dtype] = []
    base = trainer.model.get_base_model()
    base.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.train()
    assert seen and set(seen) == {dtype}
    assert base.model.layers[0].mlp.down_proj.base_layer.weight.dtype == dtype


# ---------------------------------------------------------------- mixtures


def test_weighted_mixture_end_to_end(make_job, tmp_path: Path) -> None:
    """Two datasets weighted 3:1: the examples each contributes, counted in the summary and in the data."""
    first = write_jsonl(
        tmp_path / "first.jsonl",
        [{"instruction": f"Say the number {i}.", "output": f"{i}"} for i in range(30)],
    )
    second = write_jsonl(
        tmp_path / "second.jsonl",
        [{"instruction": f"Spell the word w{i}.", "output": " ".join(f"w{i}")} for i in range(30)],
    )
    path = make_job(
        "mixture",
        datasets=[{"source": str(first), "weight": 3}, {"source": str(second), "weight": 1}],
        validation={"fraction": 0.1},
        training={"maxSteps": 2},
    )
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0
    mixture = {Path(m["source"]).name: m for m in summary["data"]["mixture"]}
    assert mixture["first.jsonl"]["rows"] == mixture["second.jsonl"]["rows"] == 27  # 3 of 30 held out
    assert (
        mixture["first.jsonl"]["examples"] == 41 and mixture["second.jsonl"]["examples"] == 13
    )  # 54 * 3/4, 1/4
    assert summary["data"]["train"]["rows"] == 54
    # the training rows themselves come from each file in those numbers
    from kubetune_trainer.data import prepare_rows

    prepared = prepare_rows(load_job(path).spec, model_lib.cache_root() / "data")
    origins = [row.origin.rsplit(":", 1)[0] for row in prepared.train]
    assert (origins.count(str(first)), origins.count(str(second))) == (41, 13)
    assert (
        json.loads((Path(summary["output"]) / "summary.json").read_text())["data"]["mixture"]
        == summary["data"]["mixture"]
    )
