"""`kubetune estimate`: hand-checked arithmetic (FLOPs, steps, parameters, memory per ZeRO stage),
agreement with a real run, the fit warning, the GPU table override, and the CLI with --calibrate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.manifest import load_job
from kubetune_trainer.__main__ import run_trainer
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.estimate import (
    GIB,
    activation_bytes,
    count_tokens,
    estimate,
    load_gpu_table,
    memory_per_gpu,
    model_facts,
    plan_steps,
    training_flops,
)

# ------------------------------------------------------------------ pure arithmetic


def test_flops_are_6nt_for_full_and_4nt_for_adapters() -> None:
    n, t, adapters = 1_000_000, 2_000, 5_000
    full = training_flops("full", n, 0, t, gradient_checkpointing=False)
    assert full["model"] == full["total"] == 6 * n * t and full["recompute"] == 0
    lora = training_flops("lora", n, adapters, t, gradient_checkpointing=False)
    assert lora["base"] == 4 * n * t and lora["adapters"] == 6 * adapters * t
    assert lora["total"] == 4 * n * t + 6 * adapters * t
    assert training_flops("qlora", n, adapters, t, False)["total"] == lora["total"]
    # gradient checkpointing recomputes the forward once; evaluation is forward only
    checkpointed = training_flops("full", n, 0, t, gradient_checkpointing=True, eval_tokens=300)
    assert checkpointed["recompute"] == 2 * n * t and checkpointed["evaluation"] == 2 * n * 300
    assert checkpointed["total"] == 8 * n * t + 2 * n * 300 and checkpointed["perToken"] == 8 * n
    # the output head multiplies only the positions whose logits are computed, and is not recomputed
    head = 200_000
    selective = training_flops(
        "full", n, 0, t, True, 300, head_parameters=head, head_tokens=500, eval_head_tokens=100
    )
    assert selective["base"] == 6 * (n - head) * t + 6 * head * 500
    assert selective["recompute"] == 2 * (n - head) * t
    assert selective["evaluation"] == 2 * (n - head) * 300 + 2 * head * 100
    lora_head = training_flops("lora", n, adapters, t, False, head_parameters=head, head_tokens=500)
    assert lora_head["model"] == 4 * (n - head) * t + 4 * head * 500 + 6 * adapters * t


def test_steps_follow_the_trainer_arithmetic() -> None:
    # 1000 sequences, 4 per device, 2 ranks: 250 batches -> 125 per rank; 4 per step -> 32 steps/epoch
    plan = plan_steps(1000, batch_size=4, world_size=2, accumulation=4, epochs=3, max_steps=None)
    assert (plan["microBatchesPerRankPerEpoch"], plan["stepsPerEpoch"], plan["totalSteps"]) == (125, 32, 96)
    assert plan["globalBatchSize"] == 32
    assert plan_steps(1000, 4, 2, 4, 0.5, None)["totalSteps"] == 16
    assert plan_steps(1000, 4, 2, 4, 3, 10)["totalSteps"] == 10  # maxSteps wins
    assert plan_steps(57, 4, 1, 1, 1, None)["totalSteps"] == 15
    assert plan_steps(3, 4, 8, 16, 1, None)["totalSteps"] == 1  # never less than one step per epoch


def test_activation_formula_by_hand() -> None:
    facts = {"hidden": 64, "intermediate": 128, "kvHeads": 2, "headDim": 16, "layers": 2, "vocab": 100}
    acts = activation_bytes(facts, batch=2, seq=10, act_bytes=2, adapter_dropout=False)
    per_layer = 7 * 64 + 2 * 32 + 4 * 128  # = 1024 values per token and layer
    assert acts["perLayerPerToken"] == per_layer == 1024
    assert acts["withoutCheckpointing"] == 20 * 2 * per_layer * 2
    assert acts["withCheckpointing"] == 20 * (2 * 64 + per_layer) * 2
    assert acts["logits"] == 20 * 100 * (2 * 2 + 8)
    dropout = activation_bytes({**facts, "adapterInputsPerLayer": 128}, 2, 10, 2, adapter_dropout=True)
    assert dropout["perLayerPerToken"] == 1024 + 128


BILLION = {
    "parameters": 1_000_000_000,
    "trainableParameters": 1_000_000_000,
    "adapterParameters": 0,
    "quantizableParameters": 900_000_000,
    "layers": 10,
    "hidden": 1000,
    "intermediate": 4000,
    "kvHeads": 10,
    "headDim": 100,
    "vocab": 1000,
    "adapterInputsPerLayer": 0,
}


def _memory(
    facts: dict[str, Any], method: str, strategy: str, world_size: int, **extra: Any
) -> dict[str, Any]:
    """memory_per_gpu in bf16 for one sequence of 10 tokens with gradient checkpointing."""
    return memory_per_gpu(
        facts,
        method=method,
        precision="bf16",
        strategy=strategy,
        world_size=world_size,
        batch=1,
        seq=10,
        gradient_checkpointing=True,
        **extra,
    )


@pytest.mark.parametrize(
    ("strategy", "weights", "gradients", "optimizer", "gathered"),
    [
        # full fine-tuning in bf16 on 8 GPUs; torch AdamW keeps m and v in bf16 (4 bytes/param), DeepSpeed
        # keeps an fp32 master copy plus fp32 m and v (12 bytes/param)
        ("ddp", 2e9, 2e9, 4e9, 0),
        ("deepspeed-zero1", 2e9, 2e9, 12e9 / 8, 0),
        ("deepspeed-zero2", 2e9, 2e9 / 8, 12e9 / 8, 0),
        ("deepspeed-zero3", 2e9 / 8, 2e9 / 8, 12e9 / 8, 2 * 1e8 * 2),
        ("fsdp", 2e9 / 8, 2e9 / 8, 4e9 / 8, 2 * 1e8 * 2),
    ],
)
def test_memory_is_sharded_by_the_strategy(
    strategy: str, weights: float, gradients: float, optimizer: float, gathered: float
) -> None:
    memory = _memory(BILLION, "full", strategy, 8)
    parts = memory["bytes"]
    assert (parts["weights"], parts["gradients"], parts["optimizer"], parts["gatheredLayers"]) == (
        int(weights),
        int(gradients),
        int(optimizer),
        int(gathered),
    )
    assert parts["runtime"] == GIB
    assert memory["totalBytes"] == sum(parts.values())


def test_memory_of_adapters_and_4bit_bases() -> None:
    lora_facts = {**BILLION, "trainableParameters": 1_000_000, "adapterParameters": 1_000_000}
    lora = _memory(lora_facts, "lora", "ddp", 1)["bytes"]
    # frozen base in bf16; adapters in fp32 with fp32 gradients and AdamW m, v
    assert lora["weights"] == 999_000_000 * 2 + 1_000_000 * 4
    assert (lora["gradients"], lora["optimizer"]) == (4_000_000, 8_000_000)

    class Quant:
        compute_dtype, double_quant = "bfloat16", True

    qlora = _memory(lora_facts, "qlora", "ddp", 1, quant=Quant())["bytes"]
    four_bit = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit weights + double-quantized absmax constants
    assert qlora["weights"] == int(900_000_000 * four_bit + 100_000_000 * 2 + 1_000_000 * 4)
    # zero3 on one GPU does not shard anything (the trainer uses DeepSpeed only when WORLD_SIZE > 1)
    single = _memory(BILLION, "full", "deepspeed-zero3", 1)
    assert single["shardedBy"] == {"weights": 1, "gradients": 1, "optimizer": 1}


# ------------------------------------------------------------------ the tiny llama, by hand


def _tiny_job(make_job, name: str = "est", **overrides: Any) -> Any:
    training = {
        "epochs": 1,
        "maxSteps": None,
        "batchSizePerDevice": 4,
        "maxSeqLength": 96,
        "gradientCheckpointing": False,
        **overrides.pop("training", {}),
    }
    return make_job(name, training=training, **overrides)


def test_parameters_of_the_tiny_llama_by_hand(make_job, tiny_model: Path) -> None:
    # vocab 49152, hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads, tied embeddings
    embeddings = 49152 * 64
    linear_per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
    full = model_facts(
        load_job(make_job("full", method={"type": "full"}, output={"exports": ["merged"]})), str(tiny_model)
    )
    assert full["parameters"] == embeddings + 2 * (linear_per_layer + 2 * 64) + 64
    assert full["flopParameters"] == 2 * linear_per_layer + embeddings  # the tied head still multiplies
    assert full["trainableParameters"] == full["parameters"] and full["tiedEmbeddings"]
    assert full["headParameters"] == embeddings and full["selectiveLogits"]
    qv = model_facts(
        load_job(
            make_job("qv", method={"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}})
        ),
        str(tiny_model),
    )
    assert qv["trainableParameters"] == qv["adapterParameters"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    every = model_facts(load_job(make_job("all", method={"type": "lora", "lora": {"r": 4}})), str(tiny_model))
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert every["adapterParameters"] == 2 * per_layer
    assert every["adapterInputsPerLayer"] == 64 * 6 + 128


@pytest.mark.slow  # loads the model and runs the estimator CLI (calibration trains)
def test_estimate_matches_a_real_run(make_job) -> None:
    """Steps and tokens predicted from the data pipeline are what the trainer then does."""
    path = _tiny_job(make_job, "real", method={"type": "full"}, output={"exports": ["merged"]})
    result = estimate(path, gpu="A100-80GB")
    data, flops = result["data"], result["flops"]
    assert data["exact"] and data["method"] == "exact"
    n, head, t = result["model"]["flopParameters"], result["model"]["headParameters"], result["tokensTrained"]
    assert t == data["tokens"]  # one epoch
    # 6·N·T, the output head counting only the learned tokens (the trainer computes no other logits)
    assert flops["model"] == 6 * (n - head) * t + 6 * head * data["trainableTokens"]
    assert flops["recompute"] == 0  # gradientCheckpointing: false
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0
    assert summary["steps"] == result["steps"]["totalSteps"] == 15
    assert summary["trainedTokens"] == data["tokens"]
    assert summary["modelInfo"]["parameters"] == result["model"]["parameters"]


def test_sampled_token_counts_are_scaled(make_job, tokenizer: Any) -> None:
    job = load_job(_tiny_job(make_job, "sample"))
    exact = count_tokens(job, tokenizer)
    sampled = count_tokens(job, tokenizer, sample_rows=20)
    assert exact["exact"] and not sampled["exact"]
    assert sampled["method"].startswith("sampled: 20 of 57 rows")
    assert sampled["sequences"] == exact["sequences"] == 57
    assert sampled["tokens"] == pytest.approx(exact["tokens"], rel=0.35)


def _facts_7b() -> dict[str, Any]:
    return {
        "architecture": "LlamaForCausalLM",
        "parameters": 6_738_415_616,
        "flopParameters": 6_607_343_616,
        "quantizableParameters": 6_476_005_376,
        "trainableParameters": 6_738_415_616,
        "adapterParameters": 0,
        "adapterInputsPerLayer": 0,
        "layers": 32,
        "hidden": 4096,
        "intermediate": 11008,
        "heads": 32,
        "kvHeads": 32,
        "headDim": 128,
        "vocab": 32000,
        "tiedEmbeddings": False,
        "countedFrom": "test",
    }


def _data(tokens: int = 10_000_000, sequences: int = 20_000) -> dict[str, Any]:
    return {
        "method": "exact",
        "exact": True,
        "rows": sequences,
        "sequences": sequences,
        "tokens": tokens,
        "trainableTokens": tokens // 2,
        "truncatedRows": 0,
        "meanSequenceLength": tokens / sequences,
        "longestSequence": 1024,
        "validation": {"method": "exact", "rows": 100, "sequences": 100, "tokens": 50_000},
    }


def test_a_warning_when_it_does_not_fit(make_job) -> None:
    path = _tiny_job(
        make_job,
        "big",
        method={"type": "full"},
        output={"exports": ["merged"]},
        training={"maxSeqLength": 1024},
    )
    result = estimate(path, gpu="A10G", facts=_facts_7b(), data=_data())
    (row,) = result["gpus"]
    assert row["gpu"] == "A10G" and row["fits"] == "no"
    assert any("does not fit in GPU memory" in w and "A10G" in w for w in result["warnings"])
    assert result["memory"]["totalGiB"] > 60  # 7B x (2 + 2 + 4) bytes alone is ~50 GiB
    # sharded over 8 H200s with ZeRO-3 it fits
    path = _tiny_job(
        make_job,
        "big3",
        method={"type": "full"},
        output={"exports": ["merged"]},
        resources={"gpusPerNode": 8, "strategy": "deepspeed-zero3"},
        training={"maxSeqLength": 1024},
    )
    sharded = estimate(path, gpu="H200", facts=_facts_7b(), data=_data())
    assert sharded["gpus"][0]["fits"] == "yes" and sharded["gpus"][0]["count"] == 8
    assert not any("does not fit" in w for w in sharded["warnings"])


def test_time_and_cost_at_the_stated_mfu(make_job) -> None:
    path = _tiny_job(make_job, "cost", method={"type": "full"}, output={"exports": ["merged"]})
    result = estimate(path, gpu="H100-SXM", gpus=4, mfu=0.5, facts=_facts_7b(), data=_data())
    (row,) = result["gpus"]
    seconds = result["flops"]["total"] / (4 * 989e12 * 0.5)
    assert row["hours"] == pytest.approx(seconds / 3600, rel=1e-3)
    assert row["cost"] == pytest.approx(seconds / 3600 * 4 * 6.88, abs=0.01)
    assert result["steps"]["worldSize"] == 4
    assert estimate(path, facts=_facts_7b(), data=_data())["gpus"][0]["gpu"] == "A10G"  # every type listed


def test_gpu_table_can_be_overridden(make_job, tmp_path: Path) -> None:
    table_file = tmp_path / "gpus.yaml"
    table_file.write_text(
        "MI300X: {tflops: 1307, memoryGiB: 192, pricePerHour: 4.0, mfu: 0.3}\nA10G: {pricePerHour: 0.5}\n"
    )
    table = load_gpu_table(table_file)
    assert table["MI300X"]["tflops"] == 1307 and table["A10G"] == {**table["A10G"], "pricePerHour": 0.5}
    path = _tiny_job(make_job, "table", method={"type": "full"}, output={"exports": ["merged"]})
    result = estimate(path, gpu="mi300x", gpu_table=str(table_file), facts=_facts_7b(), data=_data())
    assert result["gpus"][0]["gpu"] == "MI300X" and result["gpus"][0]["mfu"] == 0.3
    with pytest.raises(ConfigError, match="unknown GPU type"):
        estimate(path, gpu="TPUv5", facts=_facts_7b(), data=_data())
    table_file.write_text("X1: {tflops: 10}\n")
    with pytest.raises(ConfigError, match="needs"):
        load_gpu_table(table_file)


# ------------------------------------------------------------------ the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "estimate", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # loads the model and runs the estimator CLI (calibration trains)
def test_cli_prints_a_table(make_job) -> None:
    path = _tiny_job(make_job, "cli")
    result = _cli(str(path), "--gpu", "L4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in (
        "Estimate for cli: lora",
        "training FLOPs",
        "memory per GPU",
        "L4",
        "[exact]",
        "steps             15",
    ):
        assert text in out, out


@pytest.mark.slow  # loads the model and runs the estimator CLI (calibration trains)
def test_cli_json_with_calibration(make_job) -> None:
    path = _tiny_job(make_job, "calib", training={"batchSizePerDevice": 2})
    result = _cli(str(path), "--json", "--calibrate", "--gpus", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is only the JSON: training logs went to stderr
    assert report["steps"]["worldSize"] == 2 and len(report["gpus"]) >= 8
    calibration = report["calibration"]
    assert calibration["stepsTimed"] == 3 and calibration["tokensPerStep"] > 0
    assert calibration["predictedStepSeconds"] > 0 and calibration["measuredStepSeconds"] > 0
    assert calibration["measuredOverPredicted"] == pytest.approx(
        calibration["measuredStepSeconds"] / calibration["predictedStepSeconds"], rel=1e-2
    )
    assert 0 < calibration["impliedMfu"]
    assert calibration["device"] == "cpu" or calibration["tableEntry"]


@pytest.mark.slow  # loads the model and runs the estimator CLI (calibration trains)
def test_cli_errors_are_config_errors(make_job, tmp_path: Path) -> None:
    path = _tiny_job(make_job, "err")
    assert _cli(str(path), "--gpu", "Voodoo2").returncode == 3
    missing = tmp_path / "missing.yaml"
    assert _cli(str(missing)).returncode == 3
