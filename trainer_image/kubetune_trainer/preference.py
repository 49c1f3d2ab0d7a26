"""The preference-tuning recipe: DPO, KTO and ORPO with TRL's trainers, the rest as for SFT.

    run()
      1. where things go, resume point                       (train.py: the same checkpoint store)
      2. data: read, check, clean, split, mix                  (data.py) -> tokenize pairs (preference_data.py)
      3. model with the method (full, LoRA, QLoRA)             (models.py)
      4. TRL's DPOTrainer / KTOTrainer / ORPOTrainer with our callbacks and seeded sampler
      5. held-out pairs before and after (reward accuracy, margin, log-probabilities), samples, train
      6. exports and the summary, written last                 (exports.py)

The reference model. LoRA/QLoRA: the base with the adapter disabled (TRL's behaviour with a PEFT
model and no ref_model; no second copy in memory). Full fine-tuning: the reference
log-probabilities of every training and held-out pair are precomputed once before training
(`precompute_ref_log_probs`), so no frozen copy of the weights stays in memory: it costs one
forward pass over the data, and the memory of one model instead of two (`kubetune estimate`
counts it). ORPO has no reference model.

Held-out evaluation measures, with the model before training as the reference (exact for LoRA,
whose fresh adapter is the identity, and for full fine-tuning): reward accuracy (share of pairs whose
implicit reward beta * (log p - log p_ref) of the chosen completion beats the rejected one's; 0
before training by definition), the mean reward margin, chosen and rejected log-probabilities, and
the preference accuracy: the share of pairs where the model gives the chosen completion a higher
mean per-token log-probability than the rejected one (meaningful before training too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kubetune.spec import MethodType, PreferenceObjective
from kubetune_trainer import data as data_lib
from kubetune_trainer import models as model_lib
from kubetune_trainer import preference_data
from kubetune_trainer.evaluation import SampleGenerator, perplexity
from kubetune_trainer.train import (
    RunContext,
    attach_trainer,
    checkpoint_prefix,
    finish_run,
    output_and_resume_point,
    recipe_callbacks,
    run_summary,
    seeded_sampler,
    train_until_done,
    training_arguments,
    write_outputs,
)

HELD_OUT_BATCH = 4


def objective_of(ctx: RunContext) -> str:
    """dpo, kto or orpo."""
    preference = ctx.spec.task.preference
    return preference.objective if preference else PreferenceObjective.dpo.value


def _config(ctx: RunContext, precision: str, checkpoint_dir: Path, eval_steps: int | None) -> Any:
    """TRL's config for the objective, from the same mapping of the spec as SFT's TrainingArguments."""
    preference = ctx.spec.task.preference
    assert preference is not None
    objective = objective_of(ctx)
    full = ctx.spec.method.type == MethodType.full.value
    training = ctx.spec.training
    gradient_checkpointing = training.gradient_checkpointing
    if gradient_checkpointing is None:
        import torch

        gradient_checkpointing = torch.cuda.is_available()
    common: dict[str, Any] = {
        "beta": preference.beta,
        "max_length": training.max_seq_length,
        "disable_dropout": True,
        "gradient_checkpointing": gradient_checkpointing,
    }
    if objective == PreferenceObjective.dpo.value:
        from trl import DPOConfig

        return training_arguments(
            ctx,
            precision,
            checkpoint_dir,
            eval_steps,
            DPOConfig,
            **common,
            loss_type=[preference.loss_type or "sigmoid"],
            precompute_ref_log_probs=full,
            pad_to_multiple_of=None,
        )
    if objective == PreferenceObjective.kto.value:
        from trl import KTOConfig

        args = training_arguments(
            ctx,
            precision,
            checkpoint_dir,
            eval_steps,
            KTOConfig,
            **common,
            desirable_weight=preference.desirable_weight or 1.0,
            undesirable_weight=preference.undesirable_weight or 1.0,
            precompute_ref_log_probs=full,
            pad_to_multiple_of=None,
        )
        # KTO's KL term pairs each example with its batch neighbours' completions (KL_completion_ids, made
        # in batch-sized chunks of the mixture, already shuffled by seed): batches must keep that order.
        args.train_sampling_strategy = "sequential"
        return args
    from trl.experimental.orpo import ORPOConfig

    return training_arguments(ctx, precision, checkpoint_dir, eval_steps, ORPOConfig, **common)


def make_trainer(ctx: RunContext, seed: int, **kwargs: Any) -> Any:
    """TRL's trainer for the objective, fed our tokenized columns, with a data order that depends only on
    (seed, epoch) (so a resumed run sees the batches an uninterrupted one would; see train.make_trainer)."""
    import torch
    import trl

    objective = objective_of(ctx)
    Base: type[Any]
    if objective == PreferenceObjective.dpo.value:
        Base = trl.DPOTrainer
    elif objective == PreferenceObjective.kto.value:
        Base = trl.KTOTrainer
    else:
        from trl.experimental import orpo

        Base = orpo.ORPOTrainer

    class KubetunePreferenceTrainer(Base):
        save_seconds = 0.0

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset  # already tokenized and truncated by preference_data (with counts)

        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
            return orpo_columns(feature)  # ORPO tokenizes in its constructor: hand it our tokens

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            started = time.perf_counter()
            with checkpoint_prefix():
                super()._save_checkpoint(model, trial)
            self.save_seconds += time.perf_counter() - started

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy == "sequential":
                return torch.utils.data.SequentialSampler(dataset)
            return seeded_sampler(
                seed,
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                example_lengths(dataset),
            )

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            if (
                "input_ids" not in inputs and "chosen_attention_mask" in inputs
            ):  # ORPO's batches: count tokens
                mask = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
                self.state.num_input_tokens_seen += int(self.accelerator.gather(mask.reshape(1)).sum())
            return super().training_step(model, inputs, *args, **kwargs)

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            return None  # exports.py writes the model cards

    trainer = KubetunePreferenceTrainer(**kwargs)
    peft_config = getattr(trainer.model, "peft_config", None)
    if isinstance(peft_config, dict) and "ref" in peft_config:
        # TRL copies a PEFT model's adapter as the reference; a fresh adapter is the identity, so the
        # base with the adapter disabled is the same reference without the copy (and without a second
        # adapter in every checkpoint and export).
        model: Any = trainer.model
        model.delete_adapter("ref")
    return trainer


def example_lengths(dataset: Any) -> list[int]:
    """Tokens of each example (prompt + longest completion), for length-grouped batches."""
    columns = dataset.column_names
    prompts = dataset["prompt_ids"] if "prompt_ids" in columns else dataset["prompt_input_ids"]
    if "chosen_ids" in columns:
        return [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(prompts, dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        ]
    if "completion_ids" in columns:
        return [len(p) + len(c) for p, c in zip(prompts, dataset["completion_ids"], strict=True)]
    return [
        max(len(c), len(r))
        for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"], strict=True)
    ]


def orpo_columns(feature: dict[str, Any]) -> dict[str, Any]:
    """The columns ORPO's collator reads, from prompt_ids/chosen_ids/rejected_ids."""
    from kubetune_trainer.data import IGNORE_INDEX

    prompt = list(feature["prompt_ids"])
    out: dict[str, Any] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + list(feature[f"{side}_ids"])
    return out


def _dataset(examples: list[dict[str, Any]], objective: str, batch_size: int) -> Any:
    from datasets import Dataset

    if objective == PreferenceObjective.kto.value:  # as TRL: each completion's neighbour in its batch
        completions = [e["completion_ids"] for e in examples]
        shifted = []
        for start in range(0, len(completions), batch_size):
            chunk = completions[start : start + batch_size]
            shifted += [chunk[-1], *chunk[:-1]]
        examples = [{**e, "KL_completion_ids": kl} for e, kl in zip(examples, shifted, strict=True)]
    return Dataset.from_list(examples)


# ---------------------------------------------------------------- held-out pairs


def pair_logps(model: Any, pairs: list[dict[str, Any]], pad_token_id: int) -> list[dict[str, float]]:
    """Summed and mean log-probabilities of each pair's chosen and rejected completion under `model`."""
    import torch

    unwrapped = getattr(model, "module", model)
    was_training = unwrapped.training
    unwrapped.eval()
    device = next(unwrapped.parameters()).device
    sequences = [(p["prompt_ids"], p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")]
    scores: list[tuple[float, int]] = []
    for start in range(0, len(sequences), 2 * HELD_OUT_BATCH):
        batch = sequences[start : start + 2 * HELD_OUT_BATCH]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        target = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (prompt, completion) in enumerate(batch):
            length = len(prompt) + len(completion)
            ids[row, :length] = torch.tensor(prompt + completion)
            mask[row, :length] = 1
            target[row, len(prompt) : length] = True
        with torch.no_grad():
            logits = unwrapped(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token = torch.gather(logprobs, 2, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        chosen = target[:, 1:].to(device)
        sums = (token * chosen).sum(dim=1)
        counts = chosen.sum(dim=1)
        scores += [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist(), strict=True)]
    if was_training:
        unwrapped.train()
    return [
        {
            "chosen": scores[2 * i][0],
            "rejected": scores[2 * i + 1][0],
            "chosenMean": scores[2 * i][0] / max(1, scores[2 * i][1]),
            "rejectedMean": scores[2 * i + 1][0] / max(1, scores[2 * i + 1][1]),
        }
        for i in range(len(pairs))
    ]


def pair_metrics(
    logps: list[dict[str, float]], reference: list[dict[str, float]], beta: float
) -> dict[str, Any]:
    """Reward accuracy and margin against the reference, log-probabilities and preference accuracy."""
    count = max(1, len(logps))
    chosen_rewards = [beta * (a["chosen"] - r["chosen"]) for a, r in zip(logps, reference, strict=True)]
    rejected_rewards = [beta * (a["rejected"] - r["rejected"]) for a, r in zip(logps, reference, strict=True)]
    return {
        "pairs": len(logps),
        "rewardAccuracy": round(
            sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)) / count, 4
        ),
        "rewardMargin": round(
            sum(c - r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)) / count, 4
        ),
        "chosenRewards": round(sum(chosen_rewards) / count, 4),
        "rejectedRewards": round(sum(rejected_rewards) / count, 4),
        "chosenLogps": round(sum(p["chosen"] for p in logps) / count, 4),
        "rejectedLogps": round(sum(p["rejected"] for p in logps) / count, 4),
        "preferenceAccuracy": round(sum(p["chosenMean"] > p["rejectedMean"] for p in logps) / count, 4),
    }


class PreferenceSamples(SampleGenerator):
    """Sample generations for the held-out prompts of preference rows."""

    def _prompt_of(self, row: data_lib.Row) -> str:
        if row.format not in preference_data.FORMATS:
            return super()._prompt_of(row)
        completion = row.content.get("chosen", row.content.get("completion"))
        prompt, _ = preference_data._render(
            self.tokenizer, row.content["prompt"], completion, self.ctx.spec.task.template, row.origin
        )
        return prompt


class HeldOutEvaluator:
    """Before/after figures on held-out pairs; the 'before' log-probabilities are the reference."""

    def __init__(
        self,
        ctx: RunContext,
        pairs: list[dict[str, Any]],
        chosen_set: Any,
        pad_token_id: int,
        samples: PreferenceSamples,
    ):
        self.ctx, self.pairs, self.chosen_set, self.pad = ctx, pairs, chosen_set, pad_token_id
        self.samples = samples
        preference = ctx.spec.task.preference
        self.beta = preference.beta if preference else 0.1

    def measure(self, model: Any, trainer: Any, reference: list[dict[str, float]] | None) -> dict[str, Any]:
        """Held-out objective loss (TRL's evaluate), pair figures, held-out loss of chosen completions, samples."""
        from kubetune_trainer.export_formats import eval_loss

        started = time.perf_counter()
        metrics = trainer.evaluate(metric_key_prefix="eval")
        logps = pair_logps(model, self.pairs, self.pad) if self.pairs else []
        chosen_loss, _ = eval_loss(getattr(model, "module", model), self.chosen_set, pad_token_id=self.pad)
        result: dict[str, Any] = {
            "objective_loss": metrics.get("eval_loss"),
            "eval_loss": chosen_loss,
            "perplexity": perplexity(chosen_loss),
            "logps": logps,
            "pairs": pair_metrics(logps, reference or logps, self.beta) if logps else None,
            "samples": self.samples.generate(model),
        }
        model.train()
        result["seconds"] = time.perf_counter() - started
        return result


def baseline_text(ctx: RunContext, result: dict[str, Any]) -> str:
    """The baseline line of a preference run: the held-out pairs the model already prefers, the objective's
    held-out loss, and the held-out loss of the chosen completions (next-token, with its perplexity)."""
    from kubetune.cluster import format_number

    parts = []
    pairs = result.get("pairs")
    if pairs:
        parts.append(
            f"held-out pairs ({pairs['pairs']}): preference accuracy {pairs['preferenceAccuracy']:.3f} "
            "(chosen likelier per token than rejected)"
        )
    parts.append(f"held-out {objective_of(ctx).upper()} loss {format_number(result['objective_loss'])}")
    parts.append(
        f"chosen completions: held-out loss {format_number(result['eval_loss'])} (perplexity "
        f"{format_number(result['perplexity'], '{:.2f}')})"
    )
    return f"baseline: {'; '.join(parts)} on {ctx.job.metadata.name}"


def _baseline_callback(ctx: RunContext, evaluator: HeldOutEvaluator, resumed: Path | None) -> Any:
    from transformers import TrainerCallback

    class PreferenceBaseline(TrainerCallback):
        """Measured once training has set up (as BaselineEvaluator); carried by checkpoints for resumes."""

        def __init__(self) -> None:
            self.trainer: Any = None
            self.result: dict[str, Any] | None = None
            self.seconds = 0.0
            if resumed is not None and resumed.exists():
                self.result = json.loads(resumed.read_text())

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.result is None:
                self.result = evaluator.measure(self.trainer.model, self.trainer, None)
                self.seconds = self.result["seconds"]
                if ctx.is_main and ctx.show_progress:
                    print(baseline_text(ctx, self.result), flush=True)
            (ctx.work_dir / "baseline.json").write_text(json.dumps(self.result))

    return PreferenceBaseline()


# ---------------------------------------------------------------- the recipe


def run(ctx: RunContext) -> dict[str, Any]:
    """Preference-tune, evaluate and export as the spec says; returns the run summary (also written last)."""
    import torch

    from kubetune_trainer import callbacks as cb

    spec = ctx.spec
    objective = objective_of(ctx)
    started = time.time()
    # ---- 1. where things go
    expected_hash, store, resume_from = output_and_resume_point(ctx)

    # ---- 2. data and 3. model
    precision = model_lib.pick_precision(spec.training.precision, spec.method.type)
    prepared = data_lib.prepare_rows(spec, model_lib.cache_root() / "data", ctx.s3)
    model_dir = model_lib.resolve_model_dir(spec.model, ctx.s3)
    tokenizer = model_lib.load_tokenizer(model_dir)
    unpaired = objective == PreferenceObjective.kto.value
    train_examples, train_stats = preference_data.tokenize_rows(prepared.train, tokenizer, spec, unpaired)
    eval_examples, eval_stats = preference_data.tokenize_rows(
        prepared.validation, tokenizer, spec, unpaired, training=False
    )
    paired_rows = [r for r in prepared.validation if "chosen" in r.content]
    pairs = (
        preference_data.tokenize_rows(paired_rows, tokenizer, spec, False, training=False)[0]
        if paired_rows
        else []
    )
    from datasets import Dataset

    chosen_set = Dataset.from_list(preference_data.sft_view(pairs or eval_examples))
    batch = spec.training.batch_size_per_device
    train_set, eval_set = (
        _dataset(train_examples, objective, batch),
        _dataset(eval_examples, objective, batch),
    )
    data_report = {
        "datasets": [r.as_dict() for r in prepared.reports],
        "validationDatasets": [r.as_dict() for r in prepared.validation_reports],
        "mixture": prepared.mixture,
        "mixtureWeightsCount": "examples",
        "train": train_stats,
        "validation": eval_stats,
        "heldOutPairs": len(pairs),
    }
    torch.manual_seed(spec.training.seed)
    model = model_lib.load_model(spec, model_dir, precision)

    # ---- 4. the Trainer
    eval_steps = spec.evaluation.every_steps
    args = _config(ctx, precision, ctx.work_dir / "checkpoints", eval_steps)
    reporter = cb.ProgressReporter(ctx)
    publisher = cb.CheckpointPublisher(ctx, store, expected_hash, reporter)
    samples = PreferenceSamples(ctx, tokenizer, prepared.validation)
    evaluator = HeldOutEvaluator(ctx, pairs, chosen_set, tokenizer.pad_token_id, samples)
    baseline_cb = _baseline_callback(
        ctx, evaluator, Path(resume_from) / "kubetune_baseline.json" if resume_from else None
    )
    callbacks = recipe_callbacks(ctx, baseline_cb, reporter, publisher)
    trainer = make_trainer(
        ctx,
        spec.training.seed,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    attach_trainer(ctx, trainer, reporter, baseline_cb)

    # ---- 5. held-out pairs before (at train begin), train, after
    train_result = train_until_done(ctx, trainer, publisher, store, resume_from)
    if train_result is None:
        return {"preempted": True, "step": trainer.state.global_step}
    baseline = baseline_cb.result
    final = evaluator.measure(trainer.model, trainer, baseline["logps"])
    before = pair_metrics(baseline["logps"], baseline["logps"], evaluator.beta) if baseline["logps"] else None

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
        eval_set=chosen_set,
    )
    after = final["pairs"]
    metrics: dict[str, Any] = {
        "baselineEvalLoss": baseline["eval_loss"],  # held-out loss of the chosen completions
        "baselinePerplexity": baseline["perplexity"],
        "finalEvalLoss": final["eval_loss"],
        "finalPerplexity": final["perplexity"],
        "baselineObjectiveLoss": baseline["objective_loss"],
        "finalObjectiveLoss": final["objective_loss"],
    }
    if before and after:
        metrics.update(
            {
                "heldOutPairs": after["pairs"],
                "baselinePreferenceAccuracy": before["preferenceAccuracy"],
                "finalPreferenceAccuracy": after["preferenceAccuracy"],
                "finalRewardAccuracy": after["rewardAccuracy"],
                "finalRewardMargin": after["rewardMargin"],
                "finalChosenRewards": after["chosenRewards"],
                "finalRejectedRewards": after["rejectedRewards"],
                "baselineChosenLogps": before["chosenLogps"],
                "baselineRejectedLogps": before["rejectedLogps"],
                "finalChosenLogps": after["chosenLogps"],
                "finalRejectedLogps": after["rejectedLogps"],
            }
        )
    summary = run_summary(
        ctx,
        model,
        trainer,
        train_result,
        started=started,
        expected_hash=expected_hash,
        precision=precision,
        baseline_seconds=baseline_cb.seconds,
        publisher=publisher,
        reporter=reporter,
        store=store,
        resume_from=resume_from,
        artifacts=artifacts,
        data_report=data_report,
        metrics=metrics,
    )
    summary.update(
        {
            "objective": objective,
            "reference": (
                "none (orpo)"
                if objective == PreferenceObjective.orpo.value
                else "precomputed log-probabilities"
                if spec.method.type == MethodType.full.value
                else "base with the adapter disabled"
            ),
            "preference": {"before": before, "after": after},
        }
    )
    finish_run(ctx, reporter, summary)
    return summary
