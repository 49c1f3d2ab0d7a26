"""Merging a trained LoRA/QLoRA adapter into its base model, for the exports that need plain weights
and for a job that starts from an earlier job's adapter (`model.adapter`).

`merged_model()` is what the merged, int8 and onnx exports start from; `local_model_loading()` lets
rank 0 load a model for an export while DeepSpeed ZeRO-3 is active on every rank;
`save_base_with_adapter()` writes model.source with model.adapter merged in (model_cache.merged_base
caches it), after checking that the adapter was trained on that model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import ConfigError
from kubetune_trainer.models import unwrap_model

ADAPTER_CONFIG = "adapter_config.json"
# the files that make an adapter (what its cache key hashes); model cards and manifests do not count
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")


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


def save_base_with_adapter(
    base_dir: str, adapter_dir: Path, target: Path, *, adapter: str, source: str, trust_remote_code: bool
) -> None:
    """Load `base_dir` in float32, apply the PEFT adapter in `adapter_dir`, merge, and save the plain model
    (float32 safetensors, as the merged export) with the base's tokenizer into `target`.

    The adapter must fit the base: every module it adapts must exist there with the shapes it was trained
    on, and every module its config targets must get its weights. Otherwise a ConfigError names
    model.adapter (`adapter`) and model.source (`source`), the locations as the spec gives them."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"model.adapter {adapter}: no {ADAPTER_CONFIG} there; expected a PEFT adapter directory, such as "
            "the adapter export of an earlier job (<output>/exports/adapter). A merged export is a whole "
            "model: give it as model.source instead"
        )
    mismatch = f"model.adapter {adapter} does not fit model.source {source} (trained on another model?)"
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, OSError) as error:
        raise ConfigError(f"model.adapter {adapter}: unreadable {ADAPTER_CONFIG}: {error}") from None
    config.inference_mode = True
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    try:
        model = PeftModel(base, config)  # injects the adapter's modules: fails when a target is missing
        loaded = model.load_adapter(str(adapter_dir), "default")  # fails on a shape mismatch
    except (ValueError, RuntimeError, KeyError) as error:
        raise ConfigError(f"{mismatch}: {_first_line(error)}") from None
    unexpected = list(loaded.unexpected_keys)  # (the load's state dict holds the adapter's tensors only)
    if loaded.missing_keys or unexpected:
        keys = loaded.missing_keys or unexpected
        what = "has no weights for" if loaded.missing_keys else "has weights for modules the model lacks:"
        raise ConfigError(f"{mismatch}: the adapter {what} {len(keys)} parameters, such as {keys[0]}")
    uncovered = _modules_without_adapter(model, config)
    if uncovered:
        raise ConfigError(
            f"{mismatch}: the adapter has no weights for {len(uncovered)} of model.source's modules of the kinds "
            f"it adapts, such as {uncovered[0]} (a model with other layers)"
        )
    model.merge_and_unload().save_pretrained(str(target), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code).save_pretrained(str(target))


def _modules_without_adapter(model: Any, config: Any) -> list[str]:
    """Linear modules of the base named like those the adapter adapts (q_proj, ...) that it does not adapt.

    PEFT saves an all-linear adapter's targets as the module paths of the model it was trained on, so on
    a deeper model it would load into the first layers and leave the rest alone without a word. An
    adapter restricted to some layers on purpose (layers_to_transform) is taken as it is."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    if getattr(config, "layers_to_transform", None) is not None:
        return []
    modules = list(model.get_base_model().named_modules())
    adapted = {name.rsplit(".", 1)[-1] for name, module in modules if isinstance(module, BaseTunerLayer)}
    inside = tuple(f"{name}." for name, module in modules if isinstance(module, BaseTunerLayer))
    return [
        name
        for name, module in modules
        if isinstance(module, torch.nn.Linear)
        and not isinstance(module, BaseTunerLayer)
        and name.rsplit(".", 1)[-1] in adapted
        and not name.startswith(inside)
    ]


def _first_line(error: BaseException, limit: int = 400) -> str:
    """The first meaningful line of an error (torch lists every mismatched tensor)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next(
        (line for line in lines if "size mismatch" in line), lines[0] if lines else type(error).__name__
    )
    return detail if len(detail) <= limit else detail[:limit] + "..."
