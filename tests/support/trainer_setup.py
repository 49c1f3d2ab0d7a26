"""Build the Trainer that `train.run()` builds for a manifest, through the trainer's own setup functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_trainer(job_path: Path, callbacks: list[Any] | None = None) -> Any:
    """make_context, build_datasets, load_model, training_arguments, sft_trainer: the order of run()."""
    import torch

    from kubetune.manifest import load_job
    from kubetune_trainer import models as model_lib
    from kubetune_trainer.train import build_datasets, make_context, sft_trainer, training_arguments

    ctx = make_context(load_job(job_path), show_progress=False)
    spec = ctx.spec
    precision = model_lib.pick_precision(spec.training.precision, spec.method.type)
    model_dir = model_lib.resolve_model_dir(spec.model)
    tokenizer = model_lib.load_tokenizer(model_dir)
    train_set, eval_set, _, _ = build_datasets(ctx, tokenizer)
    torch.manual_seed(spec.training.seed)
    model = model_lib.load_model(spec, model_dir, precision)
    args = training_arguments(ctx, precision, ctx.work_dir / "checkpoints", spec.evaluation.every_steps)
    return sft_trainer(ctx, model, args, tokenizer, train_set, eval_set, callbacks or [])
