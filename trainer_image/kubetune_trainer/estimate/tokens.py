"""Tokens of the training data, counted through the trainer's own pipeline (exact, or a scaled seeded sample)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

from kubetune.spec import FineTuneJob
from kubetune_trainer import preference_estimate

SAMPLE_ROWS = int(os.environ.get("KUBETUNE_ESTIMATE_SAMPLE_ROWS", "10000"))


def count_tokens(job: FineTuneJob, tokenizer: Any, sample_rows: int = SAMPLE_ROWS) -> dict[str, Any]:
    """Training and validation tokens through the trainer's own data pipeline."""
    from kubetune.storage import S3Options
    from kubetune_trainer import data as data_lib
    from kubetune_trainer import models as model_lib

    spec = job.spec
    if preference_estimate.is_preference(job):
        return preference_estimate.count_tokens(job, tokenizer, sample_rows)
    prepared = data_lib.prepare_rows(spec, model_lib.cache_root() / "data", S3Options.from_spec(spec.storage))

    def measure(rows: list[Any], packing: bool | None) -> dict[str, Any]:
        def tokenize(chosen: list[Any]) -> tuple[dict[str, int], list[int]]:
            sequences, stats = data_lib.tokenize_rows(chosen, tokenizer, spec, packing=packing)
            return (
                {
                    "sequences": stats["sequences"],
                    "tokens": stats["tokens"],
                    "trainableTokens": stats["trainableTokens"],
                    "truncatedRows": stats["truncated"],
                },
                [len(s.input_ids) for s in sequences],
            )

        return sampled_counts(rows, sample_rows, spec.training.seed, tokenize)

    return with_validation(measure(prepared.train, None), measure(prepared.validation, False))


def sampled_counts(
    rows: list[Any], limit: int, seed: int, tokenize: Callable[[list[Any]], tuple[dict[str, int], list[int]]]
) -> dict[str, Any]:
    """Counts of `rows` through `tokenize` (-> counts, sequence lengths): exact up to `limit` rows, else
    of a seeded sample of `limit` rows, scaled to all of them."""
    exact = len(rows) <= limit
    chosen = rows if exact else random.Random(seed).sample(rows, limit)
    counts, lengths = tokenize(chosen)
    scale = len(rows) / len(chosen)
    return {
        "method": "exact"
        if exact
        else f"sampled: {len(chosen)} of {len(rows)} rows tokenized, counts scaled x{scale:.2f}",
        "exact": exact,
        "rows": len(rows),
        **{name: round(value * scale) for name, value in counts.items()},
        "meanSequenceLength": round(sum(lengths) / len(lengths), 1),
        "longestSequence": max(lengths),  # of the sample when sampled
    }


def with_validation(train: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
    """The training counts with the validation set's under "validation"."""
    return {
        **train,
        "validation": {
            k: validation[k] for k in ("method", "rows", "sequences", "tokens", "trainableTokens")
        },
    }
