"""estimate(): a job in, its tokens, steps, FLOPs, time, cost and per-GPU memory out."""

from __future__ import annotations

import os
from typing import Any

from kubetune.manifest import load_job
from kubetune.spec import FineTuneJob
from kubetune_trainer import preference_estimate
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.estimate.arithmetic import (
    fit_label,
    memory_advice,
    memory_per_gpu,
    plan_steps,
    training_flops,
)
from kubetune_trainer.estimate.gpus import DEFAULT_MFU, QLORA_MFU_FACTOR, find_gpu, load_gpu_table
from kubetune_trainer.estimate.model_facts import model_facts, model_files_dir
from kubetune_trainer.estimate.tokens import count_tokens


def evaluation_count(spec: Any, steps: int) -> int:
    """Baseline and final evaluation, plus one every evaluation.everySteps (the final one is reused
    when the last step was just evaluated)."""
    every = spec.evaluation.every_steps
    if not every:
        return 2
    periodic = steps // every
    return 1 + periodic + (0 if steps % every == 0 else 1)


def estimate(
    job: FineTuneJob | str | os.PathLike[str],
    gpu: str | None = None,
    gpus: int | None = None,
    mfu: float | None = None,
    gpu_table: str | os.PathLike[str] | dict | None = None,
    *,
    facts: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Estimate a job; returns a JSON-able dict (see the module docstring and docs/estimate.md).

    `facts` (model_facts) and `data` (count_tokens) can be given to skip loading the config and
    tokenizing the data.
    """
    from kubetune import distributed

    if not isinstance(job, FineTuneJob):
        job = load_job(os.fspath(job))
    spec = job.spec
    table = gpu_table if isinstance(gpu_table, dict) else load_gpu_table(gpu_table)
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be in (0, 1]")
    if facts is None or data is None:
        from kubetune_trainer import models as model_lib

        model_dir = model_files_dir(job)
        facts = facts or model_facts(job, model_dir)
        data = data or count_tokens(job, model_lib.load_tokenizer(model_dir))
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be at least 1")
    world = gpus or distributed.world_size(spec)
    training = spec.training
    method = str(spec.method.type)
    steps = plan_steps(
        data["sequences"],
        training.batch_size_per_device,
        world,
        training.gradient_accumulation_steps,
        training.epochs,
        training.max_steps,
    )
    tokens = data["tokens"] * steps["totalSteps"] / steps["stepsPerEpoch"]
    checkpointing = True if training.gradient_checkpointing is None else training.gradient_checkpointing
    evaluations = evaluation_count(spec, steps["totalSteps"])
    validation = data["validation"]
    eval_tokens = validation["tokens"] * evaluations
    head_tokens, eval_head_tokens = tokens, eval_tokens
    if facts.get("selectiveLogits") and not preference_estimate.is_preference(
        job
    ):  # logits only where learned
        head_tokens = tokens * data["trainableTokens"] / data["tokens"]
        eval_head_tokens = evaluations * validation.get("trainableTokens", validation["tokens"])
    flops = training_flops(
        method,
        facts["flopParameters"],
        facts["adapterParameters"],
        tokens,
        checkpointing,
        eval_tokens,
        head_parameters=facts.get("headParameters", 0),
        head_tokens=head_tokens,
        eval_head_tokens=eval_head_tokens,
    )
    precision = "bf16" if str(training.precision) == "auto" else str(training.precision)
    seq = min(training.max_seq_length, data["longestSequence"])  # the longest batch sets the peak
    lora = spec.method.lora
    memory = memory_per_gpu(
        facts,
        method=method,
        precision=precision,
        strategy=str(spec.resources.strategy),
        world_size=world,
        seq=seq,
        batch=training.batch_size_per_device * data.get("sequencesPerExample", 1),
        gradient_checkpointing=checkpointing,
        quant=spec.method.quantization,
        adapter_dropout=bool(lora and lora.dropout > 0),
    )

    preference_assumptions: list[str] = []
    if preference_estimate.is_preference(job):
        flops, preference_assumptions = preference_estimate.reference_costs(
            job, facts, data, tokens, flops, facts["parameters"] * memory["bytesPerParameter"]["weight"]
        )
    names = [find_gpu(table, gpu)] if gpu else list(table)
    rows: list[dict[str, Any]] = []
    for name in names:
        entry = table[name]
        used_mfu = (
            mfu
            if mfu is not None
            else entry.get("mfu", DEFAULT_MFU) * (QLORA_MFU_FACTOR if method == "qlora" else 1.0)
        )
        seconds = (
            flops["total"] / (world * entry["tflops"] * 1e12 * used_mfu) if entry["tflops"] else float("inf")
        )
        hours = seconds / 3600
        rows.append(
            {
                "gpu": name,
                "count": world,
                "peakTflops": entry["tflops"],
                "mfu": round(used_mfu, 4),
                "hours": round(hours, 4),
                "gpuHours": round(hours * world, 4),
                "pricePerGpuHour": entry["pricePerHour"],
                "cost": round(hours * world * entry["pricePerHour"], 2),
                "memoryGiB": entry["memoryGiB"],
                "fits": fit_label(memory, entry["memoryGiB"]),
            }
        )

    warnings = []
    if spec.resources.gpus_per_node == 0 and not gpus:
        warnings.append(
            "the job trains on CPU (resources.gpusPerNode 0); the GPU figures show what "
            f"{world} GPU(s) would do"
        )
    bad = [r["gpu"] for r in rows if r["fits"] == "no"]
    if bad:
        warnings.append(
            f"does not fit in GPU memory: needs ~{memory['totalGiB']:.1f} GiB per GPU on "
            f"{', '.join(bad)}; consider " + "; ".join(memory_advice(memory, method))
        )
    tight = [r["gpu"] for r in rows if r["fits"] == "tight"]
    if tight:
        warnings.append(
            f"tight on {', '.join(tight)} (~{memory['totalGiB']:.1f} GiB of "
            f"{min(table[t]['memoryGiB'] for t in tight)} GiB): fragmentation may still run out"
        )
    if not data["exact"]:
        warnings.append(f"token counts are estimated from a sample ({data['method']})")
    assumptions = [
        f"FLOPs {flops['formula']} with N = {facts['flopParameters']:,} parameters in matmuls (every Linear, the "
        "output head included even when tied) and T = tokens trained (non-padding; attention's s^2 term and "
        "padding are not counted)"
        + (
            f"; the output head ({facts.get('headParameters', 0):,} of N) only multiplies the learned tokens "
            f"({round(head_tokens):,}): the trainer computes logits only where a label is learned"
            if facts.get("selectiveLogits") and not preference_estimate.is_preference(job)
            else ""
        ),
        "LoRA/QLoRA: forward 2N + backward through activations 2N, no weight gradients for frozen weights",
        f"gradient checkpointing {'on' if checkpointing else 'off'}"
        + (
            " (default on GPUs): +2N per token to recompute the forward"
            if training.gradient_checkpointing is None
            else ""
        ),
        f"precision {precision}"
        + (" (auto on a bf16-capable GPU)" if str(training.precision) == "auto" else ""),
        f"time = total FLOPs / (GPUs x peak dense TFLOPS x MFU); MFU {DEFAULT_MFU} by default"
        + (f", x{QLORA_MFU_FACTOR} for QLoRA (4-bit dequantization)" if method == "qlora" else "")
        + "; model loading, checkpoint uploads and sample generation are not included",
        f"activations for the longest batch: {training.batch_size_per_device} x {seq} tokens",
        *preference_assumptions,
    ]
    if spec.model.adapter:
        assumptions.append(
            f"model.adapter {spec.model.adapter} is merged into the base before training (the same shapes: "
            "it does not change the FLOPs or the memory); the merge itself, once per node, is not included"
        )
    return {
        "job": job.metadata.name,
        "model": {"source": spec.model.source, "adapter": spec.model.adapter, **facts},
        "method": method,
        "data": data,
        "steps": steps,
        "tokensTrained": round(tokens),
        "flops": flops,
        "memory": memory,
        "gpus": rows,
        "warnings": warnings,
        "assumptions": assumptions,
    }
