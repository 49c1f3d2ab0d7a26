"""The int8 and onnx exports (listed in exports.EXPORTERS).

    int8  dynamic int8 quantization of every Linear layer of the merged model (weights int8 per output
          channel, activations quantized on the fly), saved as a state dict plus config and tokenizer.
          Reload it with `load_int8(directory)`. Its held-out perplexity is measured against the fp32
          merged model and reported.
    onnx  the merged model as ONNX (input_ids, attention_mask -> logits; dynamic batch and sequence
          axes; no KV cache), checked against PyTorch with ONNX Runtime on two input shapes.

Both start from the same fp32 CPU copy of the merged model; only rank 0 does the work (a sharded full
fine-tune is first gathered by every rank through trainer.save_model, as the merged export does).

Backends for int8: `torch.ao.quantization.quantize_dynamic` (fbgemm/x86 or qnnpack kernels) while
torch still ships it (it is deprecated in favour of torchao; kept here because it needs no extra
package and runs the int8 matmuls natively); if it is gone, a plain-PyTorch weight-only int8 Linear
(`Int8WeightOnlyLinear`, int8 weights with per-channel scales, dequantized in the matmul). The backend
is written to `int8_config.json`, and `load_int8` rebuilds the model with the same one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from kubetune_trainer.data import IGNORE_INDEX, pad_batch
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.evaluation import perplexity
from kubetune_trainer.merge import is_peft, local_model_loading, merged_model
from kubetune_trainer.models import unwrap_model

INT8_WEIGHTS = "model_int8.pt"
INT8_CONFIG = "int8_config.json"
ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-3  # max |logits(ORT) - logits(PyTorch)| in fp32
# Sequences of the held-out set used to compare int8 with fp32 perplexity (the int8 model runs on CPU).
EVAL_SEQUENCES = int(os.environ.get("KUBETUNE_EXPORT_EVAL_SEQUENCES", "64"))


class ExportError(ConfigError):
    """An export that cannot be produced faithfully (retrying the job would not help)."""


# ----------------------------------------------------------------------------- the source model


def fp32_merged_model(
    trainer: Any, base_model_dir: str, spec: Any, adapter_dir: Path, ctx: Any, kind: str
) -> Any:
    """A private fp32 CPU copy of the merged model in eval mode on rank 0; None on other ranks.

    LoRA/QLoRA: merged_model() builds a fresh model (base reloaded, adapter merged). Full fine-tuning:
    the trained weights are saved and reloaded on CPU in fp32, so the trainer's model (maybe on a GPU,
    maybe sharded) is never modified or duplicated in GPU memory; under DeepSpeed or FSDP every rank
    takes part in trainer.save_model, which gathers the shards.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if is_peft(trainer.model):
        if not ctx.is_main:
            return None
        model = merged_model(trainer, base_model_dir, spec, adapter_dir)
    else:
        source = ctx.work_dir / "exports" / f".{kind}-source"
        sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(
            trainer, "is_fsdp_enabled", False
        )
        if sharded and ctx.world_size > 1:
            trainer.save_model(str(source))  # a collective: every rank gathers its shard
        elif ctx.is_main:
            unwrap_model(trainer.model).save_pretrained(str(source), safe_serialization=True)
        if not ctx.is_main:
            return None
        try:
            with local_model_loading():
                model = AutoModelForCausalLM.from_pretrained(
                    str(source), dtype=torch.float32, trust_remote_code=spec.model.trust_remote_code
                )
        finally:
            shutil.rmtree(source, ignore_errors=True)
    model = model.to(device="cpu", dtype=torch.float32)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def save_plain_config(model: Any, target: Path) -> None:
    """The model's config in `target`, without the quantization settings of a (dequantized) QLoRA base."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(target)


def _logits(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits


def eval_loss(
    model: Any, eval_set: Any, max_sequences: int = EVAL_SEQUENCES, batch_size: int = 4, pad_token_id: int = 0
) -> tuple[float, int]:
    """Mean held-out loss per target token (labels != -100, shifted as in causal LM training).

    Returns (loss, sequences used). Token-weighted, so it can differ slightly from the Trainer's
    eval_loss (a mean of per-batch means); both fp32 and int8 are measured with this same function.
    """
    import torch

    count = min(len(eval_set), max_sequences)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            rows = eval_set[start : min(start + batch_size, count)]
            batch = pad_batch(
                [
                    {"input_ids": ids, "labels": labs}
                    for ids, labs in zip(rows["input_ids"], rows["labels"], strict=True)
                ],
                pad_token_id,
            )
            input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            logits = _logits(model, input_ids, mask).float()
            shifted = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(loss)
            tokens += int((shifted != IGNORE_INDEX).sum())
    if tokens == 0:
        return float("nan"), count
    return total / tokens, count


def tensor_bytes(state_dict: dict[str, Any]) -> int:
    """Bytes of the distinct tensors of a state dict (tied weights counted once)."""
    import torch

    seen: set[tuple[int, Any]] = set()  # (storage pointer, offset: an int or a SymInt)
    total = 0
    for value in state_dict.values():
        if not isinstance(value, torch.Tensor):
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += value.numel() * value.element_size()
    return total


# ----------------------------------------------------------------------------- int8


_WEIGHT_ONLY_LINEAR: Any = None


def weight_only_linear_class() -> Any:
    """Int8WeightOnlyLinear: int8 weights with per-output-channel fp32 scales (symmetric), fp32 compute.
    Defined on first use so that importing this module does not import torch."""
    global _WEIGHT_ONLY_LINEAR
    if _WEIGHT_ONLY_LINEAR is not None:
        return _WEIGHT_ONLY_LINEAR
    import torch

    class Int8WeightOnlyLinear(torch.nn.Module):
        weight_int8: torch.Tensor  # buffers (declared for type checkers; register_buffer makes them)
        weight_scale: torch.Tensor
        bias: Any  # a buffer, or None

        def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32))
            self.register_buffer("bias", torch.zeros(out_features) if bias else None)

        @classmethod
        def from_linear(cls, linear: Any) -> Any:
            module = cls(linear.in_features, linear.out_features, linear.bias is not None)
            weight = linear.weight.detach().float()
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
            module.weight_int8.copy_(torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
            module.weight_scale.copy_(scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach().float())
            return module

        def forward(self, x: Any) -> Any:
            weight = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)
            return torch.nn.functional.linear(x, weight, self.bias)

    _WEIGHT_ONLY_LINEAR = Int8WeightOnlyLinear
    return Int8WeightOnlyLinear


def _ao_quantize_dynamic() -> Any:
    """torch.ao.quantization.quantize_dynamic when this torch still has it, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic, per_channel_dynamic_qconfig


def int8_module_names(model: Any) -> list[str]:
    """Linear layers to quantize: all of them, except an output head tied to the input embeddings
    (quantizing it would store a second, int8 copy of the embedding matrix and cut the tie)."""
    import torch

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        if tied and module is output:
            continue
        names.append(name)
    return names


def quantize_int8(model: Any, names: list[str], backend: str | None = None) -> tuple[Any, str]:
    """A quantized copy of `model` (the input is not modified); returns (model, backend used)."""
    ao = _ao_quantize_dynamic()
    if backend is None:
        backend = "torch.ao.quantize_dynamic" if ao is not None else "weight-only"
    if backend == "torch.ao.quantize_dynamic":
        if ao is None:
            raise ExportError(
                "this int8 export was made with torch.ao.quantization.quantize_dynamic, which this "
                "torch no longer has; re-export it with this torch (weight-only backend)"
            )
        quantize_dynamic, qconfig = ao
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation notices
            quantized = quantize_dynamic(model, {name: qconfig for name in names}, dtype=torch.qint8)
        return quantized, backend
    if backend != "weight-only":
        raise ExportError(f"unknown int8 backend {backend!r}")
    cls = weight_only_linear_class()
    quantized = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        setattr(parent, child, cls.from_linear(getattr(parent, child)))
    return quantized, backend


def load_int8(directory: str | Path) -> Any:
    """Rebuild an int8 export: the model from its config (fp32, no weights loaded), the same
    quantization of the same Linear layers, then the saved int8 state dict. CPU inference only.

        model = load_int8("runs/my-job/exports/int8")
        logits = model(input_ids=ids, attention_mask=mask).logits
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    info = json.loads((directory / INT8_CONFIG).read_text())
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    quantized, _ = quantize_int8(model, info["modules"], backend=info["backend"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(directory / info["weights"], map_location="cpu", weights_only=True)
        quantized.load_state_dict(state, strict=True)
    quantized.eval()
    return quantized


def export_int8(
    trainer: Any,
    target: Path,
    base_model_dir: str,
    spec: Any,
    tokenizer: Any,
    adapter_dir: Path,
    eval_set: Any = None,
    ctx: Any = None,
    **_: Any,
) -> dict[str, Any]:
    """int8 weights + config + tokenizer; details compare size and held-out perplexity with fp32."""
    import torch

    model = fp32_merged_model(trainer, base_model_dir, spec, adapter_dir, ctx, "int8")
    if model is None:
        return {}
    target.mkdir(parents=True, exist_ok=True)
    names = int8_module_names(model)
    quantized, backend = quantize_int8(model, names)
    quantized.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(quantized.state_dict(), target / INT8_WEIGHTS)
    save_plain_config(model, target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / INT8_CONFIG).write_text(
        json.dumps(
            {
                "format": "kubetune-int8",
                "version": 1,
                "backend": backend,
                "weightDtype": "qint8",
                "scheme": "per-output-channel symmetric weights"
                + (", dynamic per-tensor activations" if backend != "weight-only" else ""),
                "modules": names,
                "weights": INT8_WEIGHTS,
                "loader": "from kubetune_trainer.export_formats import load_int8; model = load_int8(directory)",
            },
            indent=2,
        )
        + "\n"
    )
    fp32_bytes = tensor_bytes(model.state_dict())
    int8_bytes = (target / INT8_WEIGHTS).stat().st_size
    details: dict[str, Any] = {
        "int8Backend": backend,
        "int8QuantizedLinearLayers": len(names),
        "fp32WeightsBytes": fp32_bytes,
        "int8WeightsBytes": int8_bytes,
        "int8SizeRatio": round(int8_bytes / fp32_bytes, 4) if fp32_bytes else None,
    }
    if eval_set is not None and len(eval_set):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        fp32_loss, used = eval_loss(model, eval_set, pad_token_id=pad)
        int8_loss = eval_loss(quantized, eval_set, pad_token_id=pad)[0]
        fp32_ppl, int8_ppl = perplexity(fp32_loss), perplexity(int8_loss)
        change = round(int8_ppl - fp32_ppl, 4) if fp32_ppl is not None and int8_ppl is not None else None
        details.update(
            {
                "fp32Perplexity": fp32_ppl,
                "int8Perplexity": int8_ppl,
                "int8PerplexityChange": change,
                "int8PerplexityChangePercent": (
                    round(100 * change / fp32_ppl, 3) if change is not None and fp32_ppl is not None else None
                ),
                "int8EvalSequences": used,
            }
        )
    return details


# ----------------------------------------------------------------------------- onnx


def _logits_module(model: Any) -> Any:
    """(input_ids, attention_mask) -> logits, no cache: the signature of the ONNX graph."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return _logits(self.inner, input_ids, attention_mask)

    return LogitsOnly(model).eval()


def onnx_sample_inputs(vocab_size: int, seed: int = 0) -> list[tuple[Any, Any]]:
    """Two shapes that differ from the export example (and from each other) in batch and sequence;
    the second has right padding in its last row."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    samples = []
    for batch, length in ((1, 5), (3, 17)):
        ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, length - 4 :] = 0
        samples.append((ids, mask))
    return samples


def onnx_parity(path: Path, module: Any, vocab_size: int) -> float:
    """Max |logits| difference between ONNX Runtime (CPU) and PyTorch over the sample inputs."""
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.inference_mode():
        for ids, mask in onnx_sample_inputs(vocab_size):
            expected = module(ids, mask).float().numpy()
            (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            if got.shape != expected.shape:
                raise ExportError(
                    f"onnx export: logits shape {got.shape} != PyTorch {expected.shape} for inputs "
                    f"{tuple(ids.shape)}"
                )
            worst = max(worst, float(np.max(np.abs(got.astype(np.float32) - expected))))
    return worst


def _export_onnx_graph(module: Any, path: Path, vocab_size: int) -> None:
    """torch.onnx.export with the dynamo exporter (torch.export), dynamic batch and sequence axes."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (2, 8), generator=generator)  # not 0/1: those sizes would specialize
    mask = torch.ones_like(ids)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (ids, mask),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            verbose=False,
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    # Weights go into a side file (model.onnx.data) only past the 2 GB protobuf limit.
    program.save(str(path))


def export_onnx(
    trainer: Any,
    target: Path,
    base_model_dir: str,
    spec: Any,
    tokenizer: Any,
    adapter_dir: Path,
    ctx: Any = None,
    **_: Any,
) -> dict[str, Any]:
    """model.onnx (+ config and tokenizer), verified with ONNX Runtime; fails if parity is off."""
    import onnx

    model = fp32_merged_model(trainer, base_model_dir, spec, adapter_dir, ctx, "onnx")
    if model is None:
        return {}
    target.mkdir(parents=True, exist_ok=True)
    module = _logits_module(model)
    vocab_size = int(model.config.get_text_config().vocab_size)
    path = target / ONNX_FILE
    try:
        _export_onnx_graph(module, path, vocab_size)
    except Exception as error:  # noqa: BLE001 - any exporter failure becomes one clear message
        raise ExportError(
            f"onnx export: torch.onnx.export failed for {type(model).__name__}: "
            f"{type(error).__name__}: {str(error)[:500]}"
        ) from error
    tolerance = float(os.environ.get("KUBETUNE_ONNX_TOLERANCE", ONNX_TOLERANCE))
    diff = onnx_parity(path, module, vocab_size)
    if not diff <= tolerance:
        raise ExportError(
            f"onnx export: ONNX Runtime logits differ from PyTorch by up to {diff:.3g} (tolerance "
            f"{tolerance:g}); the exported graph does not compute what the model does"
        )
    graph = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    save_plain_config(model, target)
    tokenizer.save_pretrained(target)
    return {"onnxMaxAbsDiff": float(f"{diff:.3g}"), "tolerance": tolerance, "opset": opset}
