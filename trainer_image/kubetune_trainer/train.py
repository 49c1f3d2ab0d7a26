"""The training recipe: one FineTuneJob spec in, a fine-tuned model and a run summary out.

Read it top to bottom, like a torchtune recipe:

    run()
      1. where things go: output (local or s3://), a local work dir, the checkpoint store
      2. data: read, check, clean, split, mix, tokenize            (data.py)
      3. model: resolve the source, load with the method            (models.py)
      4. a transformers Trainer with our callbacks                  (callbacks.py)
      5. baseline evaluation and samples, train (resuming from the latest complete checkpoint),
         final evaluation and samples
      6. exports, then the run summary, written last                (exports.py)

The same code runs as one process (`kubetune run`) and as every rank under torchrun in a pod.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.checkpoints import STEP_PREFIX, CheckpointStore, config_hash, step_name
from kubetune.spec import FineTuneJob, FineTuneJobSpec
from kubetune.storage import S3Options
from kubetune_trainer import data as data_lib
from kubetune_trainer import models as model_lib
from kubetune_trainer import safe_loading
from kubetune_trainer.data import IGNORE_INDEX
from kubetune_trainer.errors import ConfigError

SUMMARY_NAME = "summary.json"


@dataclass
class RunContext:
    """Where this run reads and writes, and which process it is."""

    job: FineTuneJob
    output_uri: str  # local directory or s3://bucket/prefix
    work_dir: Path  # local: checkpoints are written here first (== output for local runs)
    rank: int = 0
    world_size: int = 1
    deepspeed_config: dict[str, Any] | None = None
    resume: str = "auto"  # auto | latest | never
    show_progress: bool = True
    s3: S3Options | None = None  # endpoint, TLS and addressing for every s3:// location of the job

    @property
    def spec(self) -> FineTuneJobSpec:
        return self.job.spec

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def output_is_s3(self) -> bool:
        return storage.is_s3(self.output_uri)

    def output_path(self, relative: str) -> str:
        """URI of a file under the output."""
        return self.output_uri.rstrip("/") + "/" + relative


def training_config_hash(spec: FineTuneJobSpec) -> str:
    """Hash of what decides the training trajectory; a checkpoint only resumes a run with the same hash."""
    relevant = spec.model_dump(
        mode="json", include={"model", "method", "task", "datasets", "validation", "cleaning", "training"}
    )
    relevant["model"].pop("credentials_secret_ref", None)
    return config_hash(relevant)


def make_context(
    job: FineTuneJob,
    output: str | None = None,
    deepspeed_config: dict | None = None,
    resume: str = "auto",
    show_progress: bool = True,
) -> RunContext:
    """Decide the output and work directories and read the rank from torchrun's environment."""
    output_uri = output or job.spec.output.uri or f"runs/{job.metadata.name}"
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if storage.is_s3(output_uri):
        base = Path(os.environ.get("KUBETUNE_WORKDIR", model_lib.cache_root() / "work"))
        work_dir = base / config_hash({"output": output_uri})[:16]
    else:
        output_uri = str(Path(output_uri).expanduser().resolve())
        work_dir = Path(output_uri)
    work_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(
        job=job,
        output_uri=output_uri,
        work_dir=work_dir,
        rank=rank,
        world_size=world_size,
        deepspeed_config=deepspeed_config,
        resume=resume,
        show_progress=show_progress,
        s3=S3Options.from_spec(job.spec.storage),
    )


def find_resume_checkpoint(ctx: RunContext, store: CheckpointStore, expected_hash: str) -> str | None:
    """The local path of the latest complete checkpoint to resume from, or None to start fresh."""
    if ctx.resume == "never":
        return None
    latest = store.latest()
    if latest is None:
        if ctx.resume == "latest":
            print(f"[kubetune] no complete checkpoint under {ctx.output_uri}; starting from the beginning")
        return None
    manifest = latest.manifest
    if manifest.get("configHash") not in (None, expected_hash):
        raise ConfigError(
            f"output {ctx.output_uri} holds checkpoints of a different training configuration "
            f"(hash {manifest.get('configHash')} != {expected_hash}); use a new output.uri, or delete the old "
            "checkpoints to start over"
        )
    local = ctx.work_dir / "checkpoints" / step_name(latest.step)
    path = store.fetch(latest.step, local)
    # Whoever can write the output wrote these files: nothing in them may be unpickled beyond
    # tensors and a few allowlisted classes (safe_loading.py). Every rank checks, before any collective.
    safe_loading.verify_checkpoint(path, label=latest.uri)
    print(f"[kubetune] resuming from complete checkpoint step {latest.step} ({latest.uri})")
    return str(path)


def build_datasets(
    ctx: RunContext, tokenizer: Any, prepared: data_lib.PreparedData | None = None
) -> tuple[Any, Any, dict[str, Any], list[data_lib.Row]]:
    """Read (unless `prepared` is given), clean, split, mix and tokenize; returns (train, eval, data report,
    validation rows)."""
    from datasets import Dataset

    if prepared is None:
        prepared = data_lib.prepare_rows(ctx.spec, model_lib.cache_root() / "data", ctx.s3)
    train_sequences, train_stats = data_lib.tokenize_rows(prepared.train, tokenizer, ctx.spec)
    eval_sequences, eval_stats = data_lib.tokenize_rows(
        prepared.validation, tokenizer, ctx.spec, packing=False
    )

    def to_dataset(sequences: list[data_lib.TokenizedExample]) -> Any:
        from kubetune_trainer.packing import dataset_columns

        return Dataset.from_dict(dataset_columns(sequences))

    report = {
        "datasets": [r.as_dict() for r in prepared.reports],
        "validationDatasets": [r.as_dict() for r in prepared.validation_reports],
        "mixture": prepared.mixture,
        "mixtureWeightsCount": "examples",
        "train": train_stats,
        "validation": eval_stats,
    }
    return to_dataset(train_sequences), to_dataset(eval_sequences), report, prepared.validation


def training_arguments(
    ctx: RunContext,
    precision: str,
    checkpoint_dir: Path,
    eval_steps: int | None,
    args_class: type | None = None,
    **extra: Any,
) -> Any:
    """Map the spec onto transformers' TrainingArguments (or a subclass such as TRL's DPOConfig, with `extra`)."""
    import torch
    from transformers import TrainingArguments

    training = ctx.spec.training
    on_gpu = torch.cuda.is_available()
    gradient_checkpointing = training.gradient_checkpointing
    if gradient_checkpointing is None:
        gradient_checkpointing = on_gpu
    warmup: float = 0
    if training.warmup_steps is not None:
        warmup = training.warmup_steps
    elif training.warmup_ratio is not None:
        warmup = training.warmup_ratio
    save_steps = ctx.spec.checkpoint.every_steps
    early = training.early_stopping
    if early is not None and eval_steps is None:
        raise ConfigError(
            "training.earlyStopping needs evaluation.everySteps (the plateau is measured there)"
        )
    if early is not None and eval_steps is not None:  # (eval_steps is set with early stopping: checked above)
        save_steps = save_steps or eval_steps
        if save_steps % eval_steps:
            raise ConfigError(
                f"training.earlyStopping: checkpoint.everySteps ({save_steps}) must be a multiple of "
                f"evaluation.everySteps ({eval_steps}) so the best evaluation has a checkpoint"
            )
    strategy = ctx.spec.resources.strategy
    fsdp_kwargs: dict[str, Any] = {}
    if strategy == "fsdp" and ctx.world_size > 1:
        from kubetune.distributed import fsdp_options

        fsdp_kwargs = fsdp_options(ctx.spec)
    return (args_class or TrainingArguments)(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=training.batch_size_per_device,
        per_device_eval_batch_size=training.batch_size_per_device,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        num_train_epochs=training.epochs or 1.0,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.scheduler,
        warmup_steps=warmup,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_gpu,
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,  # (transformers' default; unused without checkpoints)
        load_best_model_at_end=early is not None,
        metric_for_best_model=early.metric if early else None,
        greater_is_better=False if early else None,
        report_to=[],  # trackers are added as callbacks by tracking.callbacks_for()
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="random",  # replaced by SeededSampler (see make_trainer)
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        deepspeed=ctx.deepspeed_config,
        ddp_backend="gloo" if (not on_gpu and ctx.world_size > 1) else None,
        ddp_find_unused_parameters=False if ctx.world_size > 1 else None,
        optim="adamw_torch_fused",  # one kernel for all parameters (CPU and GPU); 4x less time than the loop
        save_only_model=False,
        **fsdp_kwargs,
        **extra,
    )


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (possibly wrapped) causal LM can compute logits for selected positions only."""
    import inspect

    forward = getattr(base_model(model), "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def selected_logits_inputs(model: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The model's inputs for a loss over learned tokens only, and the targets of the kept logits.

    - logits_to_keep: a (batch, length) boolean mask of the positions whose next token is learned
      (transformers flattens the kept hidden states to (tokens, hidden) before the output head); for
      models whose forward may not take a mask (remote code), the positions learned in any row.
    - the attention mask is dropped when the batch is right-padded: under causal attention a real
      token never attends to the padding after it, so its output is the same without the mask, and
      SDPA takes its causal path (half the score blocks, no materialized mask).
    - a packed batch (position_ids) on attention.CPU_ATTENTION gets its segment boundaries
      (`cu_seq_lens_q`): attention then runs on each example alone.
    """
    import torch

    from kubetune_trainer.attention import CPU_ATTENTION, segment_boundaries

    labels = inputs["labels"]
    next_labels = labels[:, 1:]
    learned = torch.nn.functional.pad(next_labels != IGNORE_INDEX, (0, 1))  # position t predicts t+1
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    mask = inputs.get("attention_mask")
    if mask is not None and "position_ids" not in inputs and is_right_padded(mask):
        del model_inputs["attention_mask"]
    if "position_ids" in inputs and base_model(model).config._attn_implementation == CPU_ATTENTION:
        model_inputs["cu_seq_lens_q"] = segment_boundaries(inputs["position_ids"])
    if takes_logits_mask(model) and learned.any():
        model_inputs["logits_to_keep"] = learned
        return model_inputs, labels[:, 1:][learned[:, :-1]]
    positions = learned.any(dim=0).nonzero().squeeze(-1)
    if positions.numel() == 0:
        positions = torch.zeros(1, dtype=torch.long, device=labels.device)
    model_inputs["logits_to_keep"] = positions
    return model_inputs, torch.nn.functional.pad(next_labels, (0, 1), value=IGNORE_INDEX)[:, positions]


def is_right_padded(attention_mask: Any) -> bool:
    """Whether every row of the mask is ones then zeros (padding only at the end)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def base_model(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed and PEFT wrappers."""
    inner = model_lib.unwrap_model(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def takes_logits_mask(model: Any) -> bool:
    """Whether the causal LM is a transformers model (its forward slices hidden states with
    transformers' slice_logits_to_keep, which takes a boolean (batch, length) mask)."""
    return type(base_model(model)).__module__.startswith("transformers.models.")


# checkpoints are <output>/checkpoints/step-N (kubetune.checkpoints.step_name), not checkpoint-N
CHECKPOINT_PREFIX = STEP_PREFIX.rstrip("-")


@contextmanager
def checkpoint_prefix(prefix: str = CHECKPOINT_PREFIX) -> Iterator[None]:
    """Within the block, transformers' Trainer names checkpoint directories `<prefix>-N`.

    Labelled monkeypatch: transformers (5.x) has no argument or hook for the checkpoint directory
    name; Trainer._save_checkpoint reads the module global transformers.trainer.PREFIX_CHECKPOINT_DIR.
    It is rebound only around our _save_checkpoint call (see make_trainer) and always restored, so
    nothing else in the process sees it changed.
    """
    import transformers.trainer

    saved = transformers.trainer.PREFIX_CHECKPOINT_DIR
    transformers.trainer.PREFIX_CHECKPOINT_DIR = prefix
    try:
        yield
    finally:
        transformers.trainer.PREFIX_CHECKPOINT_DIR = saved


def seeded_sampler(seed: int, batch_size: int, lengths: list[int], *, group_by_length: bool = True) -> Any:
    """A sampler whose order depends only on (seed, epoch): length-grouped batches (transformers'
    LengthGroupedSampler with our generator) or, without grouping, a seeded permutation.

    transformers' own draws from the global RNG, whose state at the start of an epoch differs between a
    fresh run and a resumed one; with this one a run resumed after a crash sees exactly the batches an
    uninterrupted run would (and every rank agrees on them)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededSampler(LengthGroupedSampler):
        def __init__(self) -> None:
            super().__init__(batch_size, lengths=lengths)
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):  # noqa: ANN204
            generator = torch.Generator().manual_seed(seed * 1000 + self.epoch)
            if not group_by_length:
                return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
            self.generator = generator
            return super().__iter__()

    return SeededSampler()


def make_trainer(seed: int, group_by_length: bool, **kwargs: Any) -> Any:
    """A transformers Trainer whose data order depends only on (seed, epoch).

    transformers' LengthGroupedSampler draws from the global RNG, whose state at the start of an
    epoch differs between a fresh run and a resumed one; with our sampler a run resumed after a
    crash sees exactly the batches an uninterrupted run would (and every rank agrees on them).
    Batches are grouped by length (less padding, more useful tokens per second) unless packing.
    """
    import torch
    from transformers import Trainer

    class KubetuneTrainer(Trainer):
        save_seconds = 0.0  # time spent writing checkpoint files (training waits for it)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            started = time.perf_counter()
            with checkpoint_prefix():
                super()._save_checkpoint(model, trial)
            self.save_seconds += time.perf_counter() - started

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(ids) for ids in dataset["input_ids"]]
            return seeded_sampler(
                seed,
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths,
                group_by_length=group_by_length,
            )

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            """Next-token loss computing logits only for the tokens whose next token is learned.

            With prompt masking and padding most positions carry no label; projecting them onto the
            vocabulary (the largest matmul of a small model) and through the softmax is wasted work.
            The loss is the same sum over learned tokens, normalized like transformers does (by the
            tokens of the whole accumulated batch when known). See selected_logits_inputs for what
            reaches the model.
            """
            if not accepts_logits_to_keep(model):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            model_inputs, target = selected_logits_inputs(model, inputs)
            outputs = model(**model_inputs)
            logits = outputs.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
            else:
                loss = loss / (target != IGNORE_INDEX).sum().clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return KubetuneTrainer(**kwargs)


def sft_trainer(
    ctx: RunContext,
    model: Any,
    args: Any,
    tokenizer: Any,
    train_set: Any,
    eval_set: Any,
    callbacks: list[Any],
) -> Any:
    """The SFT recipe's Trainer (make_trainer) for the spec: its seed, length-grouped batches unless
    packing, and the data collator of packing.py (exact packing or padding); on CPU, attention.py's
    attention (per packed example, fp32 for bf16 activations)."""
    import torch

    from kubetune_trainer.attention import use_cpu_attention
    from kubetune_trainer.packing import data_collator

    spec = ctx.spec
    if not torch.cuda.is_available():
        use_cpu_attention(base_model(model))
    return make_trainer(
        seed=spec.training.seed,
        group_by_length=not spec.training.packing,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=data_collator(spec, tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
        compute_metrics=None,
    )


def run(ctx: RunContext) -> dict[str, Any]:
    """Train, evaluate and export as the spec says; returns the run summary (also written last)."""
    import torch

    from kubetune_trainer import callbacks as cb
    from kubetune_trainer.evaluation import SampleGenerator, perplexity

    spec = ctx.spec
    if spec.task.type == "preference":  # DPO, KTO, ORPO with TRL's trainers: the same steps in preference.py
        from kubetune_trainer import preference

        return preference.run(ctx)
    started = time.time()
    # ---- 1. where things go
    expected_hash, store, resume_from = output_and_resume_point(ctx)

    # ---- 2. data and 3. model
    precision = model_lib.pick_precision(spec.training.precision, spec.method.type)
    # every row is read and checked before the model is fetched: bad data fails fast (exit 3)
    prepared = data_lib.prepare_rows(spec, model_lib.cache_root() / "data", ctx.s3)
    model_dir = model_lib.resolve_model_dir(spec.model, ctx.s3)
    tokenizer = model_lib.load_tokenizer(model_dir)
    train_set, eval_set, data_report, validation_rows = build_datasets(ctx, tokenizer, prepared)
    torch.manual_seed(spec.training.seed)
    model = model_lib.load_model(spec, model_dir, precision)

    # ---- 4. the Trainer
    eval_steps = spec.evaluation.every_steps
    checkpoint_dir = ctx.work_dir / "checkpoints"
    args = training_arguments(ctx, precision, checkpoint_dir, eval_steps)
    reporter = cb.ProgressReporter(ctx)
    publisher = cb.CheckpointPublisher(ctx, store, expected_hash, reporter)
    samples = SampleGenerator(ctx, tokenizer, validation_rows)
    baseline_file = Path(resume_from) / "kubetune_baseline.json" if resume_from else None
    baseline_eval = cb.BaselineEvaluator(ctx, samples, baseline_file)
    callbacks = recipe_callbacks(ctx, baseline_eval, reporter, publisher)
    trainer = sft_trainer(ctx, model, args, tokenizer, train_set, eval_set, callbacks)
    attach_trainer(ctx, trainer, reporter, baseline_eval)

    # ---- 5. evaluate (BaselineEvaluator, once training has set up), train, evaluate
    train_result = train_until_done(ctx, trainer, publisher, store, resume_from)
    if train_result is None:
        return {"preempted": True, "step": trainer.state.global_step}
    baseline_seconds, baseline = baseline_eval.seconds, baseline_eval.result
    assert baseline is not None  # the BaselineEvaluator callback set it as training began
    last_eval = [h for h in trainer.state.log_history if "eval_loss" in h]
    if (
        last_eval
        and last_eval[-1].get("step") == trainer.state.global_step
        and not trainer.args.load_best_model_at_end
    ):
        final_metrics = {"eval_loss": last_eval[-1]["eval_loss"]}  # just evaluated at this very step
    else:
        final_metrics = trainer.evaluate(metric_key_prefix="eval")
    final = {
        "eval_loss": final_metrics["eval_loss"],
        "perplexity": perplexity(final_metrics["eval_loss"]),
        "samples": samples.generate(trainer.model),
    }

    # ---- 6. exports and the summary (written last)
    artifacts = write_outputs(
        ctx,
        trainer,
        tokenizer,
        model_dir,
        samples=samples,
        reporter=reporter,
        data_report=data_report,
        baseline=baseline,
        final=final,
        eval_set=eval_set,
    )
    summary = run_summary(
        ctx,
        model,
        trainer,
        train_result,
        started=started,
        expected_hash=expected_hash,
        precision=precision,
        baseline_seconds=baseline_seconds,
        publisher=publisher,
        reporter=reporter,
        store=store,
        resume_from=resume_from,
        artifacts=artifacts,
        data_report=data_report,
        metrics={
            "baselineEvalLoss": baseline["eval_loss"],
            "baselinePerplexity": baseline["perplexity"],
            "finalEvalLoss": final["eval_loss"],
            "finalPerplexity": final["perplexity"],
        },
    )
    finish_run(ctx, reporter, summary)
    return summary


# ---------------------------------------------------------------- steps every recipe takes (SFT, preference)


def output_and_resume_point(ctx: RunContext) -> tuple[str, CheckpointStore, str | None]:
    """The training config hash, the checkpoint store and the checkpoint to resume from (None: a fresh
    run, whose stale summary and metrics are removed first: a stale summary would mark it finished)."""
    expected_hash = training_config_hash(ctx.spec)
    store = CheckpointStore(ctx.output_uri, ctx.s3)
    resume_from = find_resume_checkpoint(ctx, store, expected_hash)
    if ctx.is_main and not resume_from:
        storage.delete(ctx.output_path(SUMMARY_NAME), options=ctx.s3)
        (ctx.work_dir / "metrics.jsonl").unlink(missing_ok=True)
    return expected_hash, store, resume_from


def recipe_callbacks(ctx: RunContext, baseline: Any, reporter: Any, publisher: Any) -> list[Any]:
    """The callbacks of a run, in order: the baseline evaluation, progress, checkpoint publishing,
    preemption, Prometheus /metrics (rank 0, when KUBETUNE_METRICS_PORT is set), early stopping."""
    from kubetune_trainer import callbacks as cb
    from kubetune_trainer.metrics import MetricsCallback

    callbacks = [baseline, reporter, publisher, cb.PreemptionHandler(ctx), MetricsCallback(ctx)]
    early = ctx.spec.training.early_stopping
    if early is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=early.patience, early_stopping_threshold=early.min_delta
            )
        )
    return callbacks


def attach_trainer(ctx: RunContext, trainer: Any, reporter: Any, baseline: Any) -> None:
    """Give the callbacks that need it the trainer; our reporter prints instead of transformers'
    PrinterCallback; add the trackers."""
    from transformers.trainer_callback import PrinterCallback

    reporter.trainer = baseline.trainer = trainer
    trainer.remove_callback(PrinterCallback)
    for callback in tracking_callbacks(ctx):
        trainer.add_callback(callback)


def train_until_done(
    ctx: RunContext, trainer: Any, publisher: Any, store: CheckpointStore, resume_from: str | None
) -> Any:
    """trainer.train() (every checkpoint load in there, the resume and the best model at the end, is
    weights-only), then wait for the checkpoint uploads; None when preempted (SIGTERM)."""
    from kubetune_trainer import callbacks as cb

    with safe_loading.weights_only_loading(
        deepspeed=ctx.deepspeed_config is not None, checkpoint=resume_from
    ):
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    publisher.wait()
    if cb.PreemptionHandler.requested:
        store.wait()
        return None
    return train_result


def write_outputs(
    ctx: RunContext,
    trainer: Any,
    tokenizer: Any,
    model_dir: str,
    *,
    samples: Any,
    reporter: Any,
    data_report: dict[str, Any],
    baseline: dict[str, Any],
    final: dict[str, Any],
    eval_set: Any,
) -> list[dict[str, Any]]:
    """Rank 0 writes the sample generations before/after and the loss plot; then the exports
    (exports.export_all, every rank takes part). Returns the exported artifacts."""
    from kubetune_trainer import exports as export_lib

    if ctx.is_main:
        samples.write(ctx, baseline["samples"], final["samples"])
        reporter.write_loss_plot()
    return export_lib.export_all(
        ctx,
        trainer,
        tokenizer,
        model_dir,
        data_report=data_report,
        baseline=baseline,
        final=final,
        eval_set=eval_set,
    )


def run_summary(
    ctx: RunContext,
    model: Any,
    trainer: Any,
    train_result: Any,
    *,
    started: float,
    expected_hash: str,
    precision: str,
    baseline_seconds: float,
    publisher: Any,
    reporter: Any,
    store: CheckpointStore,
    resume_from: str | None,
    artifacts: list[dict[str, Any]],
    data_report: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Wait for the checkpoint uploads, prune old checkpoints (rank 0) and build the RunSummary."""
    spec = ctx.spec
    store.wait()
    if ctx.is_main:
        store.prune(spec.checkpoint.keep_last, protect=_best_step(trainer))
    latest = store.latest()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "RunSummary",
        "job": ctx.job.metadata.name,
        "status": "Succeeded",
        "configHash": expected_hash,
        "method": spec.method.type,
        "task": spec.task.type,
        "model": spec.model.source,
        "adapter": spec.model.adapter,
        "precision": precision,
        "modelInfo": model_info(model),
        "worldSize": ctx.world_size,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "trainLoss": train_result.training_loss,
        "firstLoss": losses[0] if losses else None,
        "lastLoss": losses[-1] if losses else None,
        "trainSeconds": round(train_result.metrics.get("train_runtime", 0.0) - baseline_seconds, 3),
        "checkpointBlockedSeconds": round(trainer.save_seconds + publisher.blocked_seconds, 3),
        "trainedTokens": int(trainer.state.num_input_tokens_seen or 0),
        "tokensPerSecond": reporter.mean_tokens_per_second(),
        "durationSeconds": round(time.time() - started, 2),
        "resumedFrom": resume_from and Path(resume_from).name,
        "earlyStopped": bool(spec.training.early_stopping)
        and trainer.state.global_step < trainer.state.max_steps,
        "bestStep": getattr(trainer.state, "best_global_step", None),
        "metrics": metrics,
        "data": data_report,
        "checkpoint": {"step": latest.step, "uri": latest.uri} if latest else None,
        "artifacts": artifacts,
        "output": ctx.output_uri,
    }


def finish_run(ctx: RunContext, reporter: Any, summary: dict[str, Any]) -> None:
    """Rank 0: the last progress report, summary.json (written last: it marks the run finished), the
    trackers' final figures."""
    if ctx.is_main:
        reporter.finish(summary)
        write_summary(ctx, summary)
        from kubetune_trainer import tracking

        tracking.finish_runs(summary)


def model_info(model: Any) -> dict[str, int]:
    """Parameter counts and how many linear layers are 4-bit (QLoRA)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    linear4bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    return {"parameters": total, "trainableParameters": trainable, "linear4bitLayers": linear4bit}


def tracking_callbacks(ctx: RunContext) -> list[Any]:
    """TensorBoard (default), Weights & Biases and MLflow callbacks, on rank 0 only."""
    if not ctx.is_main:
        return []
    settings = ctx.spec.tracking
    callbacks: list[Any] = []
    if settings.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(
            TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(ctx.work_dir / "tensorboard")))
        )
    from kubetune_trainer import tracking

    callbacks += tracking.callbacks_for(ctx)  # Weights & Biases, MLflow
    return callbacks


def _best_step(trainer: Any) -> set[int]:
    best = getattr(trainer.state, "best_global_step", None)
    return {best} if best else set()


def write_summary(ctx: RunContext, summary: dict[str, Any]) -> None:
    """Write summary.json last: its presence means the run finished."""
    text = json.dumps(summary, indent=2, default=str)
    local = ctx.work_dir / SUMMARY_NAME
    tmp = local.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(local)
    if ctx.output_is_s3:
        storage.upload_file(local, ctx.output_path(SUMMARY_NAME), options=ctx.s3)
