"""`kubetune estimate` for preference tasks: pairs, the reference model's compute and memory.

A training example of DPO and ORPO is a pair: its chosen and rejected sequences (prompt +
completion each) go through the model in one batch of 2·b sequences; KTO's b completions come
with b mismatched KL completions, also 2·b sequences. The reference model:

- LoRA/QLoRA (dpo, kto): the base with the adapter disabled, one forward per training sequence
  (2·N·T FLOPs more, no memory beyond the base weights already loaded);
- full fine-tuning (dpo, kto): reference log-probabilities precomputed once before training, one
  forward over the training and held-out data (2·N·T_data), and no frozen copy in memory (a frozen
  copy would cost N x bytes per weight more for the whole run);
- orpo: none.
"""

from __future__ import annotations

from typing import Any

from kubetune.spec import FineTuneJob, MethodType, PreferenceObjective


def is_preference(job: FineTuneJob) -> bool:
    """Whether the job is a preference task."""
    return job.spec.task.type == "preference"


def count_tokens(job: FineTuneJob, tokenizer: Any, sample_rows: int) -> dict[str, Any]:
    """Examples and tokens through the trainer's own pipeline (preference_data), in count_tokens' shape:
    `sequences` counts training examples (pairs, or unpaired completions for kto)."""
    from kubetune.storage import S3Options
    from kubetune_trainer import data as data_lib
    from kubetune_trainer import models as model_lib
    from kubetune_trainer import preference_data
    from kubetune_trainer.estimate.tokens import sampled_counts, with_validation

    spec = job.spec
    unpaired = (
        spec.task.preference is not None and spec.task.preference.objective == PreferenceObjective.kto.value
    )
    prepared = data_lib.prepare_rows(spec, model_lib.cache_root() / "data", S3Options.from_spec(spec.storage))

    def measure(rows: list[Any], training: bool = True) -> dict[str, Any]:
        def tokenize(chosen: list[Any]) -> tuple[dict[str, int], list[int]]:
            examples, stats = preference_data.tokenize_rows(
                chosen, tokenizer, spec, unpaired, training=training
            )
            completions = [
                [e[k] for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in e] for e in examples
            ]
            lengths = [
                len(e["prompt_ids"]) + len(c) for e, cs in zip(examples, completions, strict=True) for c in cs
            ]
            return (
                {
                    "sequences": len(examples),
                    "tokens": stats["tokens"],
                    "trainableTokens": sum(len(c) for cs in completions for c in cs),
                    "truncatedRows": stats["promptTruncated"] + stats["completionTruncated"],
                },
                lengths,
            )

        return {**sampled_counts(rows, sample_rows, spec.training.seed, tokenize), "sequencesPerExample": 2}

    return with_validation(measure(prepared.train), measure(prepared.validation, training=False))


def reference_costs(
    job: FineTuneJob,
    facts: dict[str, Any],
    data: dict[str, Any],
    tokens: float,
    flops: dict[str, Any],
    weight_bytes: float,
) -> tuple[dict[str, Any], list[str]]:
    """FLOPs of the reference forwards added to `flops`, and the assumptions that explain them."""
    spec = job.spec
    preference = spec.task.preference
    objective = preference.objective if preference else PreferenceObjective.dpo.value
    n = facts["flopParameters"]
    if objective == PreferenceObjective.orpo.value:
        reference, text = 0.0, "orpo: no reference model (reference-free), no extra forward or memory"
    elif spec.method.type == MethodType.full.value:
        data_tokens = data["tokens"] + data["validation"]["tokens"]
        reference = 2.0 * n * data_tokens
        text = (
            f"{objective} with full fine-tuning: reference log-probabilities precomputed once, one forward over "
            f"the data (2·N·{data_tokens:,} tokens); no frozen copy in memory (a copy would need "
            f"{weight_bytes / 2**30:.2f} GiB more per GPU)"
        )
    else:
        reference = 2.0 * n * tokens
        text = (
            f"{objective} with {spec.method.type}: the reference is the base with the adapter disabled, one "
            "more forward per trained token (2·N·T), no extra memory"
        )
    out = {**flops, "reference": reference, "total": flops["total"] + reference}
    pairs = (
        "a pair's chosen and rejected sequences"
        if objective != PreferenceObjective.kto.value
        else "each completion and its KL completion"
    )
    return out, [
        text,
        f"preference batches hold 2 sequences per example ({pairs}): activations for "
        f"2 x {spec.training.batch_size_per_device} sequences",
    ]
