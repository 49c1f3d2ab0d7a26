"""A tiny llama built from a config (fast tests), with the bundled SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import shutil
from pathlib import Path

from kubetune_trainer.models import bundled_model_dir, cache_root


def tiny_llama_dir(hidden: int = 64, layers: int = 2) -> Path:
    """Build (once) and return a directory with a randomly initialized tiny llama and a real tokenizer."""
    target = cache_root() / "test-models" / f"tiny-llama-h{hidden}-l{layers}"
    if (target / ".complete").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smollm = bundled_model_dir("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (target / ".complete").write_text("ok")
    return target
