"""Exports listed in spec.output.exports, each with a model card and a digest.

    adapter  PEFT adapter (lora/qlora)
    merged   adapter merged into the base (a QLoRA base is dequantized to the compute dtype first),
             loadable by plain transformers without peft; for full fine-tuning, the trained model
    int8     dynamic int8 quantization of the Linear layers of the merged model
    onnx     the merged model as ONNX with dynamic batch and sequence axes, checked with ONNX Runtime

Every export is a directory under `<output>/exports/<kind>/`. Its digest is the sha256 of its
`manifest.json` (which lists each file's sha256 and size), so one digest pins every byte.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.checkpoints import sha256_file, write_manifest
from kubetune.spec import ExportKind
from kubetune_trainer.export_formats import export_int8, export_onnx
from kubetune_trainer.merge import is_peft, merged_model

ExportFn = Callable[..., dict[str, Any]]


def export_adapter(trainer: Any, target: Path, **_: Any) -> dict[str, Any]:
    """The PEFT adapter as trained (trainer.save_model gathers it under DeepSpeed/FSDP)."""
    trainer.save_model(str(target))
    return {}


def export_merged(
    trainer: Any, target: Path, base_model_dir: str, spec: Any, tokenizer: Any, adapter_dir: Path, **_: Any
) -> dict[str, Any]:
    """Merged weights (safetensors) + tokenizer + generation config."""
    if not is_peft(trainer.model):
        trainer.save_model(str(target))  # full fine-tuning: every rank takes part (ZeRO-3/FSDP gather)
    elif trainer.is_world_process_zero():
        merged_model(trainer, base_model_dir, spec, adapter_dir).save_pretrained(
            str(target), safe_serialization=True
        )
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(target))
    return {}


# Every kind of spec.output.exports and the function that writes it (tests check none is missing).
EXPORTERS: dict[ExportKind, ExportFn] = {
    ExportKind.adapter: export_adapter,
    ExportKind.merged: export_merged,
    ExportKind.int8: export_int8,
    ExportKind.onnx: export_onnx,
}


def model_card(
    ctx: Any,
    kind: str,
    data_report: dict[str, Any],
    baseline: dict[str, Any],
    final: dict[str, Any],
    details: dict[str, Any],
) -> str:
    """README.md beside each export: base model, data with hashes, method, hyperparameters, metrics."""
    spec = ctx.spec
    lines = [
        f"# {ctx.job.metadata.name} ({kind})",
        "",
        f"Fine-tuned with kubetune from `{spec.model.source}`"
        + (f" with the adapter `{spec.model.adapter}` merged in" if spec.model.adapter else "")
        + ".",
        "",
        "## Method",
        "",
        f"- method: {spec.method.type}",
    ]
    if spec.method.lora:
        lora = spec.method.lora
        lines.append(
            f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
            f"target modules={', '.join(lora.target_modules)}"
        )
    if spec.method.quantization:
        quant = spec.method.quantization
        lines.append(
            f"- 4-bit base: {quant.type}, double quantization={quant.double_quant}, "
            f"compute dtype={quant.compute_dtype}"
        )
    if spec.model.adapter and kind == ExportKind.adapter.value:
        lines.append(
            f"- this adapter applies to `{spec.model.source}` with `{spec.model.adapter}` merged in (the model it "
            "was trained on), not to the base alone; the merged export holds all three"
        )
    lines += ["", "## Data", ""]
    for report in data_report["datasets"]:
        files = ", ".join(
            f"`{Path(f).name}` sha256:{report.get('hashes', {}).get(f, '?')[:16]}" for f in report["files"]
        )
        lines.append(f"- {report['source']}: {report['kept']} rows kept of {report['read']} read ({files})")
    lines += [
        "",
        "## Hyperparameters",
        "",
        "```json",
        json.dumps(spec.training.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2),
        "```",
        "",
        "## Metrics",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    preference = spec.task.preference
    if (
        preference is not None
    ):  # the objective's loss and the held-out pairs; the next-token loss is the chosen's
        lines.append(
            f"| held-out {str(preference.objective).upper()} loss | {_number(baseline.get('objective_loss'), 4)} "
            f"| {_number(final.get('objective_loss'), 4)} |"
        )
        before, after = baseline.get("pairs") or {}, final.get("pairs") or {}
        for key, label in (
            ("rewardAccuracy", "held-out reward accuracy"),
            ("rewardMargin", "held-out reward margin"),
            ("preferenceAccuracy", "held-out preference accuracy"),
        ):
            if key in after:
                lines.append(f"| {label} | {_number(before.get(key), 4)} | {_number(after.get(key), 4)} |")
    of = " of the chosen completions" if preference is not None else ""
    lines += [
        f"| held-out loss{of} | {baseline['eval_loss']:.4f} | {final['eval_loss']:.4f} |",
        f"| held-out perplexity{of} | {_number(baseline['perplexity'])} | {_number(final['perplexity'])} |",
    ]
    for key, value in details.items():
        lines.append(f"| {key} | | {value} |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def export_all(
    ctx: Any,
    trainer: Any,
    tokenizer: Any,
    base_model_dir: str,
    data_report: dict[str, Any],
    baseline: dict[str, Any],
    final: dict[str, Any],
    eval_set: Any = None,
) -> list[dict[str, Any]]:
    """Run every requested export, write model cards and manifests, upload, and list the artifacts."""
    spec = ctx.spec
    kinds = list(spec.output.exports)
    exports_dir = ctx.work_dir / "exports"
    adapter_dir = exports_dir / "adapter"
    artifacts: list[dict[str, Any]] = []
    # Adapter weights are the input of every other export of a LoRA run: save them even if unlisted.
    needs_adapter = is_peft(trainer.model)
    ordered = (["adapter"] if needs_adapter else []) + [k for k in kinds if k != "adapter"]
    for kind in ordered:
        target = exports_dir / kind
        if ctx.is_main and target.exists():
            shutil.rmtree(target)
        details = EXPORTERS[ExportKind(kind)](
            trainer=trainer,
            target=target,
            base_model_dir=base_model_dir,
            spec=spec,
            tokenizer=tokenizer,
            adapter_dir=adapter_dir,
            eval_set=eval_set,
            ctx=ctx,
        )
        trainer.accelerator.wait_for_everyone()  # later exports read what this one wrote
        if not ctx.is_main or kind not in kinds:
            continue
        (target / "README.md").write_text(model_card(ctx, kind, data_report, baseline, final, details or {}))
        manifest = write_manifest(
            target, step=trainer.state.global_step, config_hash="", extra={"kind": kind}
        )
        digest = sha256_file(target / "manifest.json")
        size = sum(entry["size"] for entry in manifest["files"])
        uri = str(target)
        if ctx.output_is_s3:
            uri = ctx.output_path(f"exports/{kind}")
            storage.upload_tree(target, uri, options=ctx.s3)
        artifacts.append({"kind": kind, "uri": uri, "sha256": digest, "sizeBytes": size, **(details or {})})
    if ctx.is_main:
        for name in ("samples", "loss.png", "metrics.jsonl"):
            path = ctx.work_dir / name
            if not path.exists():
                continue
            uri = str(path)
            if ctx.output_is_s3:
                uri = ctx.output_path(name)
                (storage.upload_tree if path.is_dir() else storage.upload_file)(path, uri, options=ctx.s3)
            if path.is_file():
                artifacts.append(
                    {
                        "kind": {"loss.png": "loss-plot", "metrics.jsonl": "metrics"}[name],
                        "uri": uri,
                        "sha256": sha256_file(path),
                        "sizeBytes": path.stat().st_size,
                    }
                )
    return artifacts
