"""The formulas: optimizer steps, training FLOPs, bytes per parameter, activations, memory per GPU."""

from __future__ import annotations

import math
from typing import Any

GIB = 1024**3
RUNTIME_OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS/NCCL workspaces, allocator slack
FIT_FRACTION = 0.95  # warn when the estimate exceeds this share of the GPU's memory
TIGHT_FRACTION = 0.85


def plan_steps(
    sequences: int,
    batch_size: int,
    world_size: int,
    accumulation: int,
    epochs: float | None,
    max_steps: int | None,
) -> dict[str, Any]:
    """Optimizer steps as transformers' Trainer computes them.

    Each rank gets ceil(ceil(sequences / batch) / world) micro-batches per epoch (accelerate shards
    the batches evenly); an optimizer step takes `accumulation` of them (the last one of an epoch may
    take fewer); total = ceil(epochs x steps per epoch), or maxSteps when set.
    """
    batches = math.ceil(sequences / batch_size)
    per_rank = math.ceil(batches / world_size)
    per_epoch = max(1, math.ceil(per_rank / accumulation))
    total = max_steps if max_steps else math.ceil((epochs or 1.0) * per_epoch)
    return {
        "sequences": sequences,
        "batchSizePerDevice": batch_size,
        "worldSize": world_size,
        "gradientAccumulationSteps": accumulation,
        "globalBatchSize": batch_size * world_size * accumulation,
        "microBatchesPerRankPerEpoch": per_rank,
        "stepsPerEpoch": per_epoch,
        "epochs": round(total / per_epoch, 4),
        "maxSteps": max_steps,
        "totalSteps": total,
    }


def training_flops(
    method: str,
    flop_parameters: int,
    adapter_parameters: int,
    tokens: float,
    gradient_checkpointing: bool,
    eval_tokens: float = 0,
    *,
    head_parameters: int = 0,
    head_tokens: float | None = None,
    eval_head_tokens: float | None = None,
) -> dict[str, Any]:
    """FLOPs of training on `tokens` tokens (and of `eval_tokens` forward-only evaluation tokens).

    full:       6·N·T  (forward 2N, backward 4N: gradients of activations 2N and of weights 2N)
    lora/qlora: 4·N·T  (forward 2N, backward through activations 2N; frozen weights get no gradient)
                + 6·N_adapter·T for the adapters themselves
    gradient checkpointing recomputes the decoder layers' forward: + 2·(N - N_head + N_adapter)·T
    evaluation: 2·N per token

    The output head (`head_parameters` of the N) multiplies only the positions whose logits are
    computed: `head_tokens` of the T (default all of them; this trainer computes logits only where a
    label is learned), `eval_head_tokens` of the evaluation tokens.
    """
    n, a, t, head = flop_parameters, adapter_parameters, tokens, head_parameters
    head_t = t if head_tokens is None else head_tokens
    head_e = eval_tokens if eval_head_tokens is None else eval_head_tokens
    k = 6 if method == "full" else 4
    base = k * (n - head) * t + k * head * head_t
    adapters = 0 if method == "full" else 6 * a * t
    recompute = 2 * (n - head + a) * t if gradient_checkpointing else 0
    evaluation = 2 * (n - head) * eval_tokens + 2 * head * head_e
    formula = "6·N·T" if method == "full" else "4·N·T + 6·N_adapter·T"
    return {
        "formula": formula,
        "perToken": (base + adapters + recompute) / t if t else 0,
        "base": base,
        "adapters": adapters,
        "model": base + adapters,
        "recompute": recompute,
        "evaluation": evaluation,
        "total": base + adapters + recompute + evaluation,
    }


def bytes_per_parameter(method: str, precision: str, strategy: str, quant: Any = None) -> dict[str, Any]:
    """Bytes per parameter of frozen weights and, per trainable parameter, of weights, gradients and
    optimizer states, as this trainer holds them.

    Weights are loaded in bf16 for bf16, in fp32 for fp32 and for fp16 (fp16 is autocast over fp32
    weights). torch AdamW keeps m and v in the parameter's dtype; PEFT keeps adapters in fp32.
    DeepSpeed ZeRO with bf16/fp16 holds 16-bit weights and gradients and an fp32 master copy with
    fp32 m and v (12 bytes). QLoRA: frozen Linear weights take 4 bits plus their quantization
    constants (fp32 absmax per 64 weights, or 8-bit absmax + fp32 per 256 blocks with double quant).
    """
    weight = {"bf16": 2.0, "fp16": 4.0, "fp32": 4.0}[precision]
    sixteen = precision in ("bf16", "fp16")
    deepspeed = strategy.startswith("deepspeed")
    frozen = weight
    four_bit = None
    if method == "qlora":
        compute = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0}[
            quant.compute_dtype if quant else "bfloat16"
        ]
        double = quant.double_quant if quant else True
        four_bit = (4 + (8 / 64 + 32 / (64 * 256) if double else 32 / 64)) / 8
        frozen = compute
    if deepspeed and sixteen:
        trainable_weight, gradient, optimizer = 2.0, 2.0, 12.0
        if method != "full":
            frozen = 2.0 if method == "lora" else frozen
    elif method == "full":
        trainable_weight, gradient, optimizer = weight, weight, 2 * weight
    else:
        trainable_weight, gradient, optimizer = 4.0, 4.0, 8.0
    return {
        "frozen": frozen,
        "frozen4bit": four_bit,
        "weight": trainable_weight,
        "gradient": gradient,
        "optimizer": optimizer,
    }


def activation_bytes(
    facts: dict[str, Any], batch: int, seq: int, act_bytes: float, adapter_dropout: bool
) -> dict[str, float]:
    """Activation memory of one micro-batch (b sequences of s tokens), in bytes.

    Per layer and token a decoder layer keeps for backward about 7h + 2·h_kv + 4·i values (the two
    norm inputs and outputs, q, k and v, the attention output and the o_proj input, and the MLP's
    gate, up, activation and product); SDPA/flash attention keeps no s x s scores. LoRA dropout
    (dropout > 0) keeps one more copy of each adapted layer's input. Gradient checkpointing keeps
    only each layer's input (h per token) plus one layer's activations while it is recomputed.
    The logits add b·s·V·(2a + 8) bytes at the loss: logits and their gradient in the compute dtype,
    fp32 log-probabilities and their gradient.
    """
    h, i, layers = facts["hidden"], facts["intermediate"], facts["layers"]
    kv = facts["kvHeads"] * facts["headDim"]
    per_token_layer = (
        7 * h + 2 * kv + 4 * i + (facts.get("adapterInputsPerLayer", 0) if adapter_dropout else 0)
    )
    tokens = batch * seq
    full = tokens * layers * per_token_layer * act_bytes
    checkpointed = tokens * (layers * h + per_token_layer) * act_bytes
    logits = tokens * facts["vocab"] * (2 * act_bytes + 8)
    return {
        "perLayerPerToken": per_token_layer,
        "withoutCheckpointing": full,
        "withCheckpointing": checkpointed,
        "logits": logits,
    }


def memory_per_gpu(
    facts: dict[str, Any],
    *,
    method: str,
    precision: str,
    strategy: str,
    world_size: int,
    batch: int,
    seq: int,
    gradient_checkpointing: bool,
    quant: Any = None,
    adapter_dropout: bool = False,
) -> dict[str, Any]:
    """Per-GPU memory in bytes: weights, gradients and optimizer states (sharded by the strategy when
    world_size > 1), activations and logits of one micro-batch, and a fixed runtime allowance."""
    per = bytes_per_parameter(method, precision, strategy, quant)
    total, trainable = facts["parameters"], facts["trainableParameters"]
    if method == "full":
        weights = total * per["weight"]
    elif method == "qlora":
        quantized = facts["quantizableParameters"]
        weights = (
            quantized * per["frozen4bit"]
            + (total - quantized) * per["frozen"]
            + facts["adapterParameters"] * per["weight"]
        )
    else:
        weights = (total - facts["adapterParameters"]) * per["frozen"] + facts["adapterParameters"] * per[
            "weight"
        ]
    gradients = trainable * per["gradient"]
    optimizer = trainable * per["optimizer"]
    shard = {"weights": 1, "gradients": 1, "optimizer": 1}
    gathered = 0.0
    if world_size > 1:
        if strategy in ("deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3", "fsdp"):
            shard["optimizer"] = world_size
        if strategy in ("deepspeed-zero2", "deepspeed-zero3", "fsdp"):
            shard["gradients"] = world_size
        if strategy in ("deepspeed-zero3", "fsdp"):
            shard["weights"] = world_size
            # two decoder layers gathered at a time (the current one and the prefetched next one)
            gathered = (
                2 * (total / max(1, facts["layers"])) * (per["weight"] if method == "full" else per["frozen"])
            )
    act_dtype = 4.0 if precision == "fp32" else 2.0
    if method == "qlora" and quant is not None and quant.compute_dtype == "float32":
        act_dtype = 4.0
    acts = activation_bytes(facts, batch, seq, act_dtype, adapter_dropout)
    activations = acts["withCheckpointing"] if gradient_checkpointing else acts["withoutCheckpointing"]
    parts = {
        "weights": weights / shard["weights"],
        "gradients": gradients / shard["gradients"],
        "optimizer": optimizer / shard["optimizer"],
        "gatheredLayers": gathered,
        "activations": activations,
        "logits": acts["logits"],
        "runtime": RUNTIME_OVERHEAD_GIB * GIB,
    }
    total_bytes = sum(parts.values())
    return {
        "precision": precision,
        "strategy": strategy,
        "worldSize": world_size,
        "batchSizePerDevice": batch,
        "sequenceLength": seq,
        "gradientCheckpointing": gradient_checkpointing,
        "bytesPerParameter": per,
        "shardedBy": shard,
        "activationsPerLayerPerToken": acts["perLayerPerToken"],
        "activationsWithoutCheckpointingGiB": round(acts["withoutCheckpointing"] / GIB, 3),
        "activationsWithCheckpointingGiB": round(acts["withCheckpointing"] / GIB, 3),
        **{f"{k}GiB": round(v / GIB, 3) for k, v in parts.items()},
        "bytes": {k: int(v) for k, v in parts.items()},
        "totalBytes": int(total_bytes),
        "totalGiB": round(total_bytes / GIB, 3),
    }


def fit_label(memory: dict[str, Any], gib: float) -> str:
    share = memory["totalGiB"] / gib
    return "no" if share > FIT_FRACTION else "tight" if share > TIGHT_FRACTION else "yes"


def memory_advice(memory: dict[str, Any], method: str) -> list[str]:
    advice = []
    if (
        not memory["gradientCheckpointing"]
        and memory["activationsWithoutCheckpointingGiB"] > 2 * memory["activationsWithCheckpointingGiB"]
    ):
        advice.append(
            f"training.gradientCheckpointing: true (activations {memory['activationsGiB']} -> "
            f"{memory['activationsWithCheckpointingGiB']} GiB)"
        )
    if (
        memory["activationsGiB"] + memory["logitsGiB"] > 0.3 * memory["totalGiB"]
        and memory["batchSizePerDevice"] > 1
    ):
        advice.append("a smaller training.batchSizePerDevice with more gradientAccumulationSteps")
    if (
        memory["shardedBy"]["weights"] == 1
        and memory["weightsGiB"] + memory["optimizerGiB"] > 0.3 * memory["totalGiB"]
    ):
        advice.append(
            "resources.strategy deepspeed-zero3 or fsdp over more GPUs (shards weights, gradients and "
            "optimizer states)"
        )
    if method == "full":
        advice.append("method lora or qlora (no gradients or optimizer states for the base weights)")
    elif method == "lora":
        advice.append("method qlora (4-bit base weights)")
    return advice
