"""`kubetune estimate job.yaml`: tokens, steps, FLOPs, time, cost and per-GPU memory of a job, before it runs.

    kubetune estimate job.yaml [--gpu TYPE] [--gpus N] [--mfu X] [--gpu-table FILE] [--calibrate] [--json]

Everything comes from the job itself:

* tokens: the datasets go through the trainer's own pipeline (data.prepare_rows, then tokenize_rows
  with the model's tokenizer): exact when there are at most SAMPLE_ROWS training rows, otherwise a
  seeded random sample of rows is tokenized and the counts are scaled (the output says which);
* steps: the arithmetic of transformers' Trainer;
* parameters: from the model's config on the meta device (no weights are loaded or downloaded);
* FLOPs: 6·N·T for full fine-tuning, 4·N·T (+ 6·N_adapter·T) for LoRA/QLoRA, plus recomputation
  under gradient checkpointing and the evaluations;
* time and cost at a stated MFU for GPU types of a table (peak dense bf16 TFLOPS, memory, price),
  which --gpu-table overrides or extends;
* memory per GPU: weights, gradients, optimizer states (sharded by the strategy), activations
  (with and without gradient checkpointing), logits, and a fixed runtime allowance.

`--calibrate` runs a few real training steps of a reduced copy of the job on this machine, through
the same trainer path as `kubetune run`, and prints the predicted against the measured step time.
The formulas are explained in docs/estimate.md.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubetune.manifest import ManifestError, load_job
from kubetune.spec import EXIT_CONFIG_ERROR, FineTuneJob
from kubetune_trainer import preference_estimate
from kubetune_trainer.errors import ConfigError

GIB = 1024 ** 3
SAMPLE_ROWS = int(os.environ.get("KUBETUNE_ESTIMATE_SAMPLE_ROWS", "10000"))
DEFAULT_MFU = 0.35
QLORA_MFU_FACTOR = 0.6  # dequantizing 4-bit weights in every matmul: ~40% lower throughput than LoRA
RUNTIME_OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS/NCCL workspaces, allocator slack
FIT_FRACTION = 0.95  # warn when the estimate exceeds this share of the GPU's memory
TIGHT_FRACTION = 0.85

# Peak dense (no sparsity) bf16 tensor TFLOPS, memory as reported by the driver (GiB), and a
# representative on-demand price in USD per GPU-hour (2025 list prices of large clouds; they vary by
# provider, region and commitment: override them with --gpu-table).
GPU_TABLE: dict[str, dict[str, float]] = {
    "A10G": {"tflops": 70.0, "memoryGiB": 22.5, "pricePerHour": 1.01, "mfu": DEFAULT_MFU},
    "L4": {"tflops": 121.0, "memoryGiB": 22.5, "pricePerHour": 0.80, "mfu": DEFAULT_MFU},
    "L40S": {"tflops": 362.0, "memoryGiB": 45.0, "pricePerHour": 1.86, "mfu": DEFAULT_MFU},
    "A100-40GB": {"tflops": 312.0, "memoryGiB": 40.0, "pricePerHour": 2.75, "mfu": DEFAULT_MFU},
    "A100-80GB": {"tflops": 312.0, "memoryGiB": 80.0, "pricePerHour": 3.43, "mfu": DEFAULT_MFU},
    "H100-SXM": {"tflops": 989.0, "memoryGiB": 79.6, "pricePerHour": 6.88, "mfu": DEFAULT_MFU},
    "H200": {"tflops": 989.0, "memoryGiB": 140.4, "pricePerHour": 7.91, "mfu": DEFAULT_MFU},
    "B200": {"tflops": 2250.0, "memoryGiB": 179.0, "pricePerHour": 14.24, "mfu": 0.30},
}
# Substrings of torch.cuda.get_device_name() that identify a table entry (checked in order).
DEVICE_NAMES = [("B200", "B200"), ("H200", "H200"), ("H100", "H100-SXM"), ("A100-SXM4-80GB", "A100-80GB"),
                ("A100 80GB", "A100-80GB"), ("A100-PCIE-80GB", "A100-80GB"), ("A100", "A100-40GB"),
                ("L40S", "L40S"), ("L4", "L4"), ("A10G", "A10G")]


# ----------------------------------------------------------------------------- GPU table


def load_gpu_table(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, float]]:
    """The built-in table, with a YAML/JSON file's entries merged in (new types added, fields replaced).

    File format: {TYPE: {tflops: peak dense TFLOPS, memoryGiB: ..., pricePerHour: ..., mfu: ...}}.
    """
    table = {name: dict(entry) for name, entry in GPU_TABLE.items()}
    if path is None:
        return table
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--gpu-table {path}: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--gpu-table {path}: expected a mapping of GPU type to {{tflops, memoryGiB, "
                          "pricePerHour, mfu}")
    allowed = {"tflops", "memoryGiB", "pricePerHour", "mfu"}
    for name, fields in loaded.items():
        if not isinstance(fields, dict) or not set(fields) <= allowed:
            raise ConfigError(f"--gpu-table {path}: entry {name!r} must be a mapping with keys from "
                              f"{sorted(allowed)}")
        entry = table.setdefault(str(name), {"mfu": DEFAULT_MFU})
        for key, value in fields.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"--gpu-table {path}: {name}.{key} must be a non-negative number")
            entry[key] = float(value)
        missing = {"tflops", "memoryGiB", "pricePerHour"} - set(entry)
        if missing:
            raise ConfigError(f"--gpu-table {path}: new GPU type {name!r} needs {sorted(missing)}")
    return table


def _find_gpu(table: dict[str, dict[str, float]], name: str) -> str:
    for known in table:
        if known.lower() == name.lower():
            return known
    raise ConfigError(f"--gpu {name}: unknown GPU type; known: {', '.join(table)} (add others with --gpu-table)")


# ----------------------------------------------------------------------------- model


def _model_files_dir(job: FineTuneJob) -> str:
    """A local directory with the model's config and tokenizer; weights are not needed (nor fetched
    for hub ids and S3 prefixes where that can be avoided)."""
    from kubetune import storage
    from kubetune.spec import BUNDLED_PREFIX
    from kubetune.storage import S3Options
    from kubetune_trainer import models as model_lib

    spec = job.spec
    source = spec.model.source
    s3 = S3Options.from_spec(spec.storage)
    if source.startswith(BUNDLED_PREFIX) or Path(source).expanduser().exists():
        return model_lib.resolve_model_dir(spec.model, s3)
    small = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")
    if storage.is_s3(source):
        from kubetune.checkpoints import config_hash

        target = model_lib.cache_root() / "estimate" / config_hash({"s3": source})[:16]
        prefix = source.rstrip("/") + "/"
        found = 0
        for pattern in small:
            for uri in storage.expand(prefix + pattern, options=s3):
                storage.download_file(uri, target / uri[len(prefix):], options=s3)
                found += 1
        if not found:
            raise ConfigError(f"model.source {source}: no config.json or tokenizer files there")
        return str(target)
    hub_id = source[len("hf://"):] if source.startswith("hf://") else source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_id, revision=spec.model.revision, token=os.environ.get("HF_TOKEN"),
                                 allow_patterns=list(small))
    except Exception:  # noqa: BLE001 - the same advice as the trainer gives
        return model_lib.resolve_model_dir(spec.model, s3)  # raises the trainer's ConfigError


def model_facts(job: FineTuneJob, model_dir: str) -> dict[str, Any]:
    """Parameter counts and shapes from the config, on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = job.spec
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    text = config.get_text_config()
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    layers = int(text.num_hidden_layers)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    output = model.get_output_embeddings()
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    # Parameters in a matmul per token: every Linear, the output head included even when tied.
    matmul = sum(m.weight.numel() for _, m in linear)
    if output is not None and not any(m is output for _, m in linear):
        matmul += output.weight.numel()
    # What bitsandbytes quantizes for QLoRA: the Linear layers except the output head.
    quantizable = sum(m.weight.numel() for _, m in linear if m is not output)
    head = output.weight.numel() if output is not None else 0
    # The trainer computes logits only at learned positions when the model takes logits_to_keep.
    selective = "logits_to_keep" in inspect.signature(model.forward).parameters
    facts: dict[str, Any] = {
        "architecture": type(model).__name__,
        "parameters": total,
        "flopParameters": matmul,
        "quantizableParameters": quantizable,
        "headParameters": head,
        "selectiveLogits": selective,
        "layers": layers,
        "hidden": hidden,
        "intermediate": intermediate,
        "heads": heads,
        "kvHeads": kv_heads,
        "headDim": head_dim,
        "vocab": int(text.vocab_size),
        "tiedEmbeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "countedFrom": "config on the meta device (no weights loaded)",
    }
    facts.update(_trainable(spec, model, facts))
    return facts


def _trainable(spec: Any, model: Any, facts: dict[str, Any]) -> dict[str, Any]:
    """Trainable parameters of the method and, for adapters, the inputs an adapter's dropout copies."""
    if spec.method.type == "full":
        return {"trainableParameters": facts["parameters"], "adapterParameters": 0, "adapterInputsPerLayer": 0}
    from peft import LoraConfig, get_peft_model

    lora = spec.method.lora
    targets: Any = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias=lora.bias, modules_to_save=lora.modules_to_save or None, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"method.lora.targetModules {lora.target_modules}: {error}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" in n)
    inputs = sum(m.in_features for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and
                 hasattr(m, "in_features"))
    return {"trainableParameters": trainable, "adapterParameters": adapters,
            "adapterInputsPerLayer": inputs // max(1, facts["layers"])}


# ----------------------------------------------------------------------------- data


def count_tokens(job: FineTuneJob, tokenizer: Any, sample_rows: int = SAMPLE_ROWS) -> dict[str, Any]:
    """Training and validation tokens through the trainer's own data pipeline."""
    from kubetune.storage import S3Options
    from kubetune_trainer import data as data_lib
    from kubetune_trainer import models as model_lib

    spec = job.spec
    if preference_estimate.is_preference(job):
        return preference_estimate.count_tokens(job, tokenizer, sample_rows)
    prepared = data_lib.prepare_rows(spec, model_lib.cache_root() / "data", S3Options.from_spec(spec.storage))

    def measure(rows: list[Any], packing: bool | None) -> dict[str, Any]:
        exact = len(rows) <= sample_rows
        chosen = rows if exact else random.Random(spec.training.seed).sample(rows, sample_rows)
        sequences, stats = data_lib.tokenize_rows(chosen, tokenizer, spec, packing=packing)
        scale = len(rows) / len(chosen)
        lengths = [len(s.input_ids) for s in sequences]
        return {
            "method": "exact" if exact else f"sampled: {len(chosen)} of {len(rows)} rows tokenized, counts scaled "
                                            f"x{scale:.2f}",
            "exact": exact,
            "rows": len(rows),
            "sequences": round(stats["sequences"] * scale),
            "tokens": round(stats["tokens"] * scale),
            "trainableTokens": round(stats["trainableTokens"] * scale),
            "truncatedRows": round(stats["truncated"] * scale),
            "meanSequenceLength": round(sum(lengths) / len(lengths), 1),
            "longestSequence": max(lengths),  # of the sample when sampled
        }

    train = measure(prepared.train, None)
    validation = measure(prepared.validation, False)
    return {**train, "validation": {k: validation[k] for k in ("method", "rows", "sequences", "tokens",
                                                               "trainableTokens")}}


# ----------------------------------------------------------------------------- arithmetic


def plan_steps(sequences: int, batch_size: int, world_size: int, accumulation: int, epochs: float | None,
               max_steps: int | None) -> dict[str, Any]:
    """Optimizer steps as transformers' Trainer computes them.

    Each rank gets ceil(ceil(sequences / batch) / world) micro-batches per epoch (accelerate shards
    the batches evenly); an optimizer step takes `accumulation` of them (the last one of an epoch may
    take fewer); total = ceil(epochs x steps per epoch), or maxSteps when set.
    """
    batches = math.ceil(sequences / batch_size)
    per_rank = math.ceil(batches / world_size)
    per_epoch = max(1, math.ceil(per_rank / accumulation))
    total = max_steps if max_steps else math.ceil((epochs or 1.0) * per_epoch)
    return {"sequences": sequences, "batchSizePerDevice": batch_size, "worldSize": world_size,
            "gradientAccumulationSteps": accumulation, "globalBatchSize": batch_size * world_size * accumulation,
            "microBatchesPerRankPerEpoch": per_rank, "stepsPerEpoch": per_epoch,
            "epochs": round(total / per_epoch, 4), "maxSteps": max_steps, "totalSteps": total}


def training_flops(method: str, flop_parameters: int, adapter_parameters: int, tokens: float,
                   gradient_checkpointing: bool, eval_tokens: float = 0, *, head_parameters: int = 0,
                   head_tokens: float | None = None, eval_head_tokens: float | None = None) -> dict[str, Any]:
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
    return {"formula": formula, "perToken": (base + adapters + recompute) / t if t else 0,
            "base": base, "adapters": adapters, "model": base + adapters, "recompute": recompute,
            "evaluation": evaluation, "total": base + adapters + recompute + evaluation}


def bytes_per_parameter(method: str, precision: str, strategy: str, quant: Any = None) -> dict[str, float]:
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
        compute = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0}[quant.compute_dtype if quant else "bfloat16"]
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
    return {"frozen": frozen, "frozen4bit": four_bit, "weight": trainable_weight, "gradient": gradient,
            "optimizer": optimizer}


def activation_bytes(facts: dict[str, Any], batch: int, seq: int, act_bytes: float,
                     adapter_dropout: bool) -> dict[str, float]:
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
    per_token_layer = 7 * h + 2 * kv + 4 * i + (facts.get("adapterInputsPerLayer", 0) if adapter_dropout else 0)
    tokens = batch * seq
    full = tokens * layers * per_token_layer * act_bytes
    checkpointed = tokens * (layers * h + per_token_layer) * act_bytes
    logits = tokens * facts["vocab"] * (2 * act_bytes + 8)
    return {"perLayerPerToken": per_token_layer, "withoutCheckpointing": full, "withCheckpointing": checkpointed,
            "logits": logits}


def memory_per_gpu(facts: dict[str, Any], *, method: str, precision: str, strategy: str, world_size: int,
                   batch: int, seq: int, gradient_checkpointing: bool, quant: Any = None,
                   adapter_dropout: bool = False) -> dict[str, Any]:
    """Per-GPU memory in bytes: weights, gradients and optimizer states (sharded by the strategy when
    world_size > 1), activations and logits of one micro-batch, and a fixed runtime allowance."""
    per = bytes_per_parameter(method, precision, strategy, quant)
    total, trainable = facts["parameters"], facts["trainableParameters"]
    if method == "full":
        weights = total * per["weight"]
    elif method == "qlora":
        quantized = facts["quantizableParameters"]
        weights = quantized * per["frozen4bit"] + (total - quantized) * per["frozen"] + \
            facts["adapterParameters"] * per["weight"]
    else:
        weights = (total - facts["adapterParameters"]) * per["frozen"] + facts["adapterParameters"] * per["weight"]
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
            gathered = 2 * (total / max(1, facts["layers"])) * (per["weight"] if method == "full" else per["frozen"])
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
        "precision": precision, "strategy": strategy, "worldSize": world_size, "batchSizePerDevice": batch,
        "sequenceLength": seq, "gradientCheckpointing": gradient_checkpointing,
        "bytesPerParameter": per, "shardedBy": shard,
        "activationsPerLayerPerToken": acts["perLayerPerToken"],
        "activationsWithoutCheckpointingGiB": round(acts["withoutCheckpointing"] / GIB, 3),
        "activationsWithCheckpointingGiB": round(acts["withCheckpointing"] / GIB, 3),
        **{f"{k}GiB": round(v / GIB, 3) for k, v in parts.items()},
        "bytes": {k: int(v) for k, v in parts.items()},
        "totalBytes": int(total_bytes),
        "totalGiB": round(total_bytes / GIB, 3),
    }


def _fit(memory: dict[str, Any], gib: float) -> str:
    share = memory["totalGiB"] / gib
    return "no" if share > FIT_FRACTION else "tight" if share > TIGHT_FRACTION else "yes"


def _advice(memory: dict[str, Any], method: str) -> list[str]:
    advice = []
    if not memory["gradientCheckpointing"] and \
            memory["activationsWithoutCheckpointingGiB"] > 2 * memory["activationsWithCheckpointingGiB"]:
        advice.append(f"training.gradientCheckpointing: true (activations {memory['activationsGiB']} -> "
                      f"{memory['activationsWithCheckpointingGiB']} GiB)")
    if memory["activationsGiB"] + memory["logitsGiB"] > 0.3 * memory["totalGiB"] and memory["batchSizePerDevice"] > 1:
        advice.append("a smaller training.batchSizePerDevice with more gradientAccumulationSteps")
    if memory["shardedBy"]["weights"] == 1 and memory["weightsGiB"] + memory["optimizerGiB"] > 0.3 * memory["totalGiB"]:
        advice.append("resources.strategy deepspeed-zero3 or fsdp over more GPUs (shards weights, gradients and "
                      "optimizer states)")
    if method == "full":
        advice.append("method lora or qlora (no gradients or optimizer states for the base weights)")
    elif method == "lora":
        advice.append("method qlora (4-bit base weights)")
    return advice


# ----------------------------------------------------------------------------- estimate


def _evaluations(spec: Any, steps: int) -> int:
    """Baseline and final evaluation, plus one every evaluation.everySteps (the final one is reused
    when the last step was just evaluated)."""
    every = spec.evaluation.every_steps
    if not every:
        return 2
    periodic = steps // every
    return 1 + periodic + (0 if steps % every == 0 else 1)


def estimate(job: FineTuneJob | str | os.PathLike[str], gpu: str | None = None, gpus: int | None = None,
             mfu: float | None = None, gpu_table: str | os.PathLike[str] | dict | None = None, *,
             facts: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Estimate a job; returns a JSON-able dict (see the module docstring and docs/estimate.md).

    `facts` (model_facts) and `data` (count_tokens) can be given to skip loading the config and
    tokenizing the data.
    """
    from kubetune import distributed

    if not isinstance(job, FineTuneJob):
        job = load_job(job)
    spec = job.spec
    table = gpu_table if isinstance(gpu_table, dict) else load_gpu_table(gpu_table)
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be in (0, 1]")
    if facts is None or data is None:
        from kubetune_trainer import models as model_lib

        model_dir = _model_files_dir(job)
        facts = facts or model_facts(job, model_dir)
        data = data or count_tokens(job, model_lib.load_tokenizer(model_dir))
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be at least 1")
    world = gpus or distributed.world_size(spec)
    training = spec.training
    method = str(spec.method.type)
    steps = plan_steps(data["sequences"], training.batch_size_per_device, world,
                       training.gradient_accumulation_steps, training.epochs, training.max_steps)
    tokens = data["tokens"] * steps["totalSteps"] / steps["stepsPerEpoch"]
    checkpointing = True if training.gradient_checkpointing is None else training.gradient_checkpointing
    evaluations = _evaluations(spec, steps["totalSteps"])
    validation = data["validation"]
    eval_tokens = validation["tokens"] * evaluations
    head_tokens, eval_head_tokens = tokens, eval_tokens
    if facts.get("selectiveLogits") and not preference_estimate.is_preference(job):  # logits only where learned
        head_tokens = tokens * data["trainableTokens"] / data["tokens"]
        eval_head_tokens = evaluations * validation.get("trainableTokens", validation["tokens"])
    flops = training_flops(method, facts["flopParameters"], facts["adapterParameters"], tokens, checkpointing,
                           eval_tokens, head_parameters=facts.get("headParameters", 0), head_tokens=head_tokens,
                           eval_head_tokens=eval_head_tokens)
    precision = "bf16" if str(training.precision) == "auto" else str(training.precision)
    seq = min(training.max_seq_length, data["longestSequence"])  # the longest batch sets the peak
    lora = spec.method.lora
    memory = memory_per_gpu(facts, method=method, precision=precision, strategy=str(spec.resources.strategy),
                            world_size=world, seq=seq,
                            batch=training.batch_size_per_device * data.get("sequencesPerExample", 1),
                            gradient_checkpointing=checkpointing, quant=spec.method.quantization,
                            adapter_dropout=bool(lora and lora.dropout > 0))

    preference_assumptions: list[str] = []
    if preference_estimate.is_preference(job):
        flops, preference_assumptions = preference_estimate.reference_costs(
            job, facts, data, tokens, flops, facts["parameters"] * memory["bytesPerParameter"]["weight"])
    names = [_find_gpu(table, gpu)] if gpu else list(table)
    rows = []
    for name in names:
        entry = table[name]
        used_mfu = mfu if mfu is not None else entry.get("mfu", DEFAULT_MFU) * (
            QLORA_MFU_FACTOR if method == "qlora" else 1.0)
        seconds = flops["total"] / (world * entry["tflops"] * 1e12 * used_mfu) if entry["tflops"] else float("inf")
        hours = seconds / 3600
        rows.append({"gpu": name, "count": world, "peakTflops": entry["tflops"], "mfu": round(used_mfu, 4),
                     "hours": round(hours, 4), "gpuHours": round(hours * world, 4),
                     "pricePerGpuHour": entry["pricePerHour"], "cost": round(hours * world * entry["pricePerHour"], 2),
                     "memoryGiB": entry["memoryGiB"], "fits": _fit(memory, entry["memoryGiB"])})

    warnings = []
    if spec.resources.gpus_per_node == 0 and not gpus:
        warnings.append("the job trains on CPU (resources.gpusPerNode 0); the GPU figures show what "
                        f"{world} GPU(s) would do")
    bad = [r["gpu"] for r in rows if r["fits"] == "no"]
    if bad:
        warnings.append(f"does not fit in GPU memory: needs ~{memory['totalGiB']:.1f} GiB per GPU on "
                        f"{', '.join(bad)}; consider " + "; ".join(_advice(memory, method)))
    tight = [r["gpu"] for r in rows if r["fits"] == "tight"]
    if tight:
        warnings.append(f"tight on {', '.join(tight)} (~{memory['totalGiB']:.1f} GiB of "
                        f"{min(table[t]['memoryGiB'] for t in tight)} GiB): fragmentation may still run out")
    if not data["exact"]:
        warnings.append(f"token counts are estimated from a sample ({data['method']})")
    assumptions = [
        f"FLOPs {flops['formula']} with N = {facts['flopParameters']:,} parameters in matmuls (every Linear, the "
        "output head included even when tied) and T = tokens trained (non-padding; attention's s^2 term and "
        "padding are not counted)"
        + (f"; the output head ({facts.get('headParameters', 0):,} of N) only multiplies the learned tokens "
           f"({round(head_tokens):,}): the trainer computes logits only where a label is learned"
           if facts.get("selectiveLogits") and not preference_estimate.is_preference(job) else ""),
        "LoRA/QLoRA: forward 2N + backward through activations 2N, no weight gradients for frozen weights",
        f"gradient checkpointing {'on' if checkpointing else 'off'}"
        + (" (default on GPUs): +2N per token to recompute the forward" if training.gradient_checkpointing is None
           else ""),
        f"precision {precision}" + (" (auto on a bf16-capable GPU)" if str(training.precision) == "auto" else ""),
        f"time = total FLOPs / (GPUs x peak dense TFLOPS x MFU); MFU {DEFAULT_MFU} by default"
        + (f", x{QLORA_MFU_FACTOR} for QLoRA (4-bit dequantization)" if method == "qlora" else "")
        + "; model loading, checkpoint uploads and sample generation are not included",
        f"activations for the longest batch: {training.batch_size_per_device} x {seq} tokens",
        *preference_assumptions,
    ]
    return {
        "job": job.metadata.name,
        "model": {"source": spec.model.source, **facts},
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


# ----------------------------------------------------------------------------- calibration


def measure_peak_flops(device: str = "cpu", dtype: Any = None, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a large square matmul on this device (a practical peak)."""
    import torch

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    torch.mm(a, b)
    sync()
    count, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0:
            sync()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return 2 * size ** 3 * count / elapsed


def _device_table_entry(table: dict[str, dict[str, float]], device_name: str) -> str | None:
    for needle, name in DEVICE_NAMES:
        if needle.lower() in device_name.lower() and name in table:
            return name
    return None


def _reduced_job(job: FineTuneJob, output: Path, measured_steps: int) -> dict[str, Any]:
    """The job with few steps, little data, no periodic evaluation, checkpoints, exports or trackers."""
    manifest = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec = manifest["spec"]
    training = spec.setdefault("training", {})
    total = measured_steps + 1  # the first step (warm-up, allocations) is not measured
    training.update({"maxSteps": total, "loggingSteps": total})
    training.pop("epochs", None)
    training.pop("earlyStopping", None)
    batch = training.get("batchSizePerDevice", 4) * training.get("gradientAccumulationSteps", 1)
    needed = batch * total * 2 + 16
    for dataset in spec["datasets"]:
        dataset["maxExamples"] = min(dataset.get("maxExamples", needed), needed)
    validation = spec.setdefault("validation", {})
    validation["maxExamples"] = min(validation.get("maxExamples", 4), 4)
    spec["evaluation"] = {**spec.get("evaluation", {}), "samplePrompts": [], "numSamplePrompts": 0}
    spec["evaluation"].pop("everySteps", None)
    spec["checkpoint"] = {"keepLast": 1}
    spec["tracking"] = {"tensorboard": False}
    spec["output"] = {"uri": str(output), "exports": ["adapter"] if spec.get("method", {}).get("type", "lora")
                      != "full" else []}
    spec["resources"] = {**spec.get("resources", {}), "nodes": 1}
    manifest["metadata"] = {"name": job.metadata.name}
    return manifest


def calibrate(job: FineTuneJob, result: dict[str, Any], mfu: float | None = None, steps: int = 3,
              gpu_table: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Train a reduced copy of the job for a few steps here; compare predicted and measured step time."""
    import torch
    import transformers.trainer as hf_trainer
    import yaml
    from transformers import TrainerCallback

    from kubetune_trainer.__main__ import run_trainer
    from kubetune_trainer.models import pick_precision

    table = gpu_table or GPU_TABLE
    on_gpu = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def _mark(self, state: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks = []
            self._mark(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark(state)

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="kubetune-calibrate-") as tmp:
        manifest = _reduced_job(job, Path(tmp) / "out", steps)
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(manifest))
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        hf_trainer.DEFAULT_CALLBACKS.append(timer)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report (--json)
                code, summary = run_trainer(str(path), resume="never", show_progress=False)
        finally:
            hf_trainer.DEFAULT_CALLBACKS.remove(timer)
        peak_memory = torch.cuda.max_memory_allocated() if on_gpu else None
    if code != 0 or summary is None:
        raise ConfigError(f"calibration: the reduced training run failed (exit code {code}); see the log above")
    marks = timer.marks[1:]  # from the end of the first (warm-up) step
    if len(marks) < 2:
        raise ConfigError("calibration: too few steps were timed")
    measured = (marks[-1][0] - marks[0][0]) / (len(marks) - 1)
    tokens_per_step = (marks[-1][1] - marks[0][1]) / (len(marks) - 1)

    spec = job.spec
    precision = pick_precision(str(spec.training.precision))
    checkpointing = spec.training.gradient_checkpointing
    if checkpointing is None:
        checkpointing = on_gpu
    facts = result["model"]
    data = result["data"]
    learned = data["trainableTokens"] / data["tokens"] if facts.get("selectiveLogits") else 1.0
    per_token = training_flops(result["method"], facts["flopParameters"], facts["adapterParameters"], 1,
                               checkpointing, head_parameters=facts.get("headParameters", 0),
                               head_tokens=learned)["perToken"]
    flops_per_step = per_token * tokens_per_step
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    measured_peak = measure_peak_flops("cuda" if on_gpu else "cpu",
                                       torch.float32 if precision == "fp32" else torch.bfloat16)
    entry = _device_table_entry(table, device_name) if on_gpu else None
    peak = table[entry]["tflops"] * 1e12 if entry else measured_peak
    used_mfu = mfu if mfu is not None else (table[entry].get("mfu", DEFAULT_MFU) if entry else DEFAULT_MFU)
    predicted = flops_per_step / (peak * used_mfu)
    calibration: dict[str, Any] = {
        "device": device_name,
        "tableEntry": entry,
        "precision": precision,
        "gradientCheckpointing": checkpointing,
        "peakFlopsSource": f"table ({entry})" if entry else f"measured {'bf16' if on_gpu else 'fp32'} matmul",
        "peakTflops": round(peak / 1e12, 4),
        "measuredMatmulTflops": round(measured_peak / 1e12, 4),
        "mfu": used_mfu,
        "stepsTimed": len(marks) - 1,
        "tokensPerStep": round(tokens_per_step, 1),
        "flopsPerStep": flops_per_step,
        "predictedStepSeconds": round(predicted, 6),
        "measuredStepSeconds": round(measured, 6),
        "measuredOverPredicted": round(measured / predicted, 3) if predicted else None,
        "impliedMfu": round(flops_per_step / (measured * peak), 5) if measured > 0 else None,
        "note": "the reduced job keeps the model, method, batch size, sequence length and precision; the first "
                "step is not timed. Use impliedMfu with --mfu to correct the estimate for this kind of device.",
    }
    if peak_memory is not None:
        calibration["measuredPeakMemoryGiB"] = round(peak_memory / GIB, 3)
    return calibration


# ----------------------------------------------------------------------------- output


def _human(number: float) -> str:
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= size:
            return f"{number / size:.2f}{unit}"
    return f"{number:.0f}"


def _duration(hours: float) -> str:
    if not math.isfinite(hours):
        return "-"
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} d"


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report."""
    model, data, steps, flops, memory = (result[k] for k in ("model", "data", "steps", "flops", "memory"))
    lines = [
        f"Estimate for {result['job']}: {result['method']} on {model['source']} ({model['architecture']})",
        "",
        f"  parameters        {model['parameters']:,} total, {model['trainableParameters']:,} trainable, "
        f"{model['flopParameters']:,} in matmuls  [{model['countedFrom']}]",
        f"  data              {data['rows']:,} training rows -> {data['sequences']:,} sequences, "
        f"{data['tokens']:,} tokens ({data['trainableTokens']:,} learned)  [{data['method']}]",
        f"                    validation {data['validation']['rows']:,} rows, {data['validation']['tokens']:,} tokens; "
        f"mean sequence {data['meanSequenceLength']} tokens, longest {data['longestSequence']}",
        f"  steps             {steps['totalSteps']:,} = {steps['stepsPerEpoch']:,}/epoch x {steps['epochs']:g} epochs  "
        f"(global batch {steps['globalBatchSize']} = {steps['batchSizePerDevice']} per device x "
        f"{steps['worldSize']} x {steps['gradientAccumulationSteps']} accumulation)",
        f"  tokens trained    {result['tokensTrained']:,}",
        f"  training FLOPs    {_human(flops['total'])}FLOP = {flops['formula']} {_human(flops['model'])}"
        + (f" + recompute {_human(flops['recompute'])}" if flops["recompute"] else "")
        + f" + evaluation {_human(flops['evaluation'])}",
        "",
        f"  memory per GPU    {memory['totalGiB']:.2f} GiB  ({memory['precision']}, {memory['strategy']} over "
        f"{memory['worldSize']}, gradient checkpointing {'on' if memory['gradientCheckpointing'] else 'off'})",
        f"    weights {memory['weightsGiB']:.2f}  gradients {memory['gradientsGiB']:.2f}  optimizer "
        f"{memory['optimizerGiB']:.2f}  gathered layers {memory['gatheredLayersGiB']:.2f}",
        f"    activations {memory['activationsGiB']:.2f} (without checkpointing "
        f"{memory['activationsWithoutCheckpointingGiB']:.2f}, with {memory['activationsWithCheckpointingGiB']:.2f})"
        f"  logits {memory['logitsGiB']:.2f}  runtime {memory['runtimeGiB']:.2f}",
        "",
        f"  {'GPU':<11} {'count':>5} {'TFLOPS':>7} {'MFU':>5} {'time':>10} {'GPU-hours':>10} {'$/GPU-h':>8} "
        f"{'cost $':>10} {'memory':>8} {'fits':>5}",
    ]
    for row in result["gpus"]:
        lines.append(f"  {row['gpu']:<11} {row['count']:>5} {row['peakTflops']:>7g} {row['mfu']:>5.2f} "
                     f"{_duration(row['hours']):>10} {row['gpuHours']:>10.2f} {row['pricePerGpuHour']:>8.2f} "
                     f"{row['cost']:>10,.2f} {row['memoryGiB']:>6g}Gi {row['fits']:>5}")
    calibration = result.get("calibration")
    if calibration:
        lines += [
            "",
            f"  calibration on {calibration['device']} ({calibration['precision']}, {calibration['stepsTimed']} "
            f"steps timed, {calibration['tokensPerStep']:g} tokens/step):",
            f"    predicted {calibration['predictedStepSeconds']:.4f} s/step at MFU {calibration['mfu']} of "
            f"{calibration['peakTflops']:g} TFLOPS [{calibration['peakFlopsSource']}]",
            f"    measured  {calibration['measuredStepSeconds']:.4f} s/step  (x{calibration['measuredOverPredicted']} "
            f"the prediction; implied MFU {calibration['impliedMfu']})",
        ]
        if "measuredPeakMemoryGiB" in calibration:
            lines.append(f"    peak GPU memory allocated {calibration['measuredPeakMemoryGiB']:.2f} GiB")
    if result["warnings"]:
        lines += [""] + [f"  warning: {w}" for w in result["warnings"]]
    lines += ["", "  assumptions:"] + [f"    - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def format_gpu_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'GPU':<11} {'TFLOPS':>7} {'memory GiB':>10} {'$/GPU-h':>8} {'MFU':>5}"]
    for name, entry in table.items():
        lines.append(f"{name:<11} {entry['tflops']:>7g} {entry['memoryGiB']:>10g} {entry['pricePerHour']:>8.2f} "
                     f"{entry.get('mfu', DEFAULT_MFU):>5.2f}")
    return "\n".join(lines)


EXIT_UNAVAILABLE = 4  # as `kubetune`: storage, network or credentials


def _config_dir(path: str) -> str:
    """A directory holding config.json, from a config.json file or a model directory."""
    given = Path(path).expanduser()
    if given.is_dir() and (given / "config.json").is_file():
        return str(given)
    if given.is_file():
        import shutil

        directory = Path(tempfile.mkdtemp(prefix="kubetune-estimate-"))
        shutil.copyfile(given, directory / "config.json")
        return str(directory)
    raise ConfigError(f"--model-config {path}: no such config.json file or directory holding one")


def given_tokens(job: FineTuneJob, tokens: int, sequences: int | None = None) -> dict[str, Any]:
    """`count_tokens`' result from a given token count (the data need not be reachable)."""
    if tokens < 1 or (sequences is not None and sequences < 1):
        raise ConfigError("--tokens and --sequences must be positive")
    spec = job.spec
    seq_len = spec.training.max_seq_length
    sequences = sequences or max(1, -(-tokens // seq_len))
    fraction = spec.validation.fraction or 0.0
    val_tokens = round(tokens * fraction) if spec.validation.datasets is None else round(tokens * 0.05)
    val_sequences = max(1, round(sequences * (fraction or 0.05)))
    method = "given (--tokens): not counted from the data"
    return {"method": method, "exact": False, "rows": sequences, "sequences": sequences, "tokens": tokens,
            "trainableTokens": tokens, "truncatedRows": 0, "meanSequenceLength": round(tokens / sequences, 1),
            "longestSequence": min(seq_len, max(1, -(-tokens // sequences))),
            "validation": {"method": method, "rows": val_sequences, "sequences": val_sequences,
                           "tokens": val_tokens, "trainableTokens": val_tokens}}


def main(args: Any) -> int:
    """`kubetune estimate` (args: manifest, gpu, gpus, mfu, gpu_table, calibrate, json; list_gpus if the
    CLI defines it: print the GPU table and stop)."""
    if getattr(args, "list_gpus", False):
        try:
            table = load_gpu_table(getattr(args, "gpu_table", None))
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        print(json.dumps(table, indent=2) if getattr(args, "json", False) else format_gpu_table(table))
        return 0
    try:
        job = load_job(args.manifest)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from kubetune.storage import StorageError

    try:
        table = load_gpu_table(getattr(args, "gpu_table", None))
        with contextlib.redirect_stdout(sys.stderr):  # model/tokenizer loading chatter stays off stdout
            facts = data = None
            if getattr(args, "model_config", None):
                facts = model_facts(job, _config_dir(args.model_config))
            if getattr(args, "tokens", None) is not None:
                data = given_tokens(job, args.tokens, getattr(args, "sequences", None))
            result = estimate(job, gpu=getattr(args, "gpu", None), gpus=getattr(args, "gpus", None),
                              mfu=getattr(args, "mfu", None), gpu_table=table, facts=facts, data=data)
        if getattr(args, "calibrate", False):
            result["calibration"] = calibrate(job, result, mfu=getattr(args, "mfu", None), gpu_table=table)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StorageError as error:
        print(f"error: {error}\n(to estimate without access to the model or the data, pass --model-config "
              "with the model's config.json and --tokens with the training tokens per epoch)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_report(result))
    return 0
