"""What the estimate needs to know of the model: parameters and shapes from its config on the meta device."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from kubetune.spec import FineTuneJob
from kubetune_trainer.errors import ConfigError


def model_files_dir(job: FineTuneJob) -> str:
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
        return model_lib.resolve_source_dir(spec.model, s3)
    small = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")
    if storage.is_s3(source):
        from kubetune.checkpoints import config_hash

        target = model_lib.cache_root() / "estimate" / config_hash({"s3": source})[:16]
        prefix = source.rstrip("/") + "/"
        found = 0
        for pattern in small:
            for uri in storage.expand(prefix + pattern, options=s3):
                storage.download_file(uri, target / uri[len(prefix) :], options=s3)
                found += 1
        if not found:
            raise ConfigError(f"model.source {source}: no config.json or tokenizer files there")
        return str(target)
    hub_id = source[len("hf://") :] if source.startswith("hf://") else source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            hub_id, revision=spec.model.revision, token=os.environ.get("HF_TOKEN"), allow_patterns=list(small)
        )
    except Exception:  # noqa: BLE001 - the same advice as the trainer gives
        return model_lib.resolve_source_dir(spec.model, s3)  # raises the trainer's ConfigError


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
    facts.update(trainable_parameters(spec, model, facts))
    return facts


def trainable_parameters(spec: Any, model: Any, facts: dict[str, Any]) -> dict[str, Any]:
    """Trainable parameters of the method and, for adapters, the inputs an adapter's dropout copies."""
    if spec.method.type == "full":
        return {
            "trainableParameters": facts["parameters"],
            "adapterParameters": 0,
            "adapterInputsPerLayer": 0,
        }
    from peft import LoraConfig, get_peft_model

    lora = spec.method.lora
    targets: Any = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"method.lora.targetModules {lora.target_modules}: {error}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" in n)
    inputs = sum(
        m.in_features
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "in_features")
    )
    return {
        "trainableParameters": trainable,
        "adapterParameters": adapters,
        "adapterInputsPerLayer": inputs // max(1, facts["layers"]),
    }
