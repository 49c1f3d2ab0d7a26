"""Merging a trained LoRA/QLoRA adapter into its base model, for the exports that need plain weights.

`merged_model()` is what the merged, int8 and onnx exports start from; `local_model_loading()` lets
rank 0 load a model for an export while DeepSpeed ZeRO-3 is active on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune_trainer.models import unwrap_model


def is_peft(model: Any) -> bool:
    """Whether the (possibly wrapped) model is a PEFT model (an adapter on a base)."""
    return hasattr(unwrap_model(model), "peft_config")


@contextmanager
def local_model_loading() -> Iterator[None]:
    """Load a model in this process alone, even while DeepSpeed ZeRO-3 is active.

    Under ZeRO-3 transformers partitions every model it builds across the ranks (a collective); a
    model loaded for an export on rank 0 must not be, or rank 0 waits forever for the others.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    # Labelled global state: transformers keeps the active DeepSpeed config in a module-level weak
    # reference and offers only unset_hf_deepspeed_config() (no getter/setter pair), so the reference
    # is saved and put back here, and nowhere else.
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def merged_model(trainer: Any, base_model_dir: str, spec: Any, adapter_dir: Path) -> Any:
    """A plain transformers model with the adapter merged in (never into 4-bit weights).

    For full fine-tuning (no adapter) the trainer's own model, unwrapped.
    """
    if not is_peft(trainer.model):
        return unwrap_model(trainer.model)
    with local_model_loading():
        return merge_adapter(base_model_dir, spec, adapter_dir)


def merge_adapter(base_model_dir: str, spec: Any, adapter_dir: Path) -> Any:
    """Load the base from `base_model_dir`, apply the adapter saved in `adapter_dir`, merge and unload."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if spec.method.quantization is not None:
        # QLoRA: the adapter was trained against the 4-bit weights. Load them the same way, dequantize
        # to the compute dtype, then merge, so the merged model computes what was trained (and is
        # never merged back into 4-bit weights).
        from kubetune_trainer.models import quantization_config

        dtype = getattr(torch, spec.method.quantization.compute_dtype)
        base = AutoModelForCausalLM.from_pretrained(
            base_model_dir, quantization_config=quantization_config(spec), dtype=dtype
        )
        base = base.dequantize().to(dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
