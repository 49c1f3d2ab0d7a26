"""Tokens of the training data, counted through the trainer's own pipeline (exact, or a scaled seeded sample)."""

from __future__ import annotations

import os
import random
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
        exact = len(rows) <= sample_rows
        chosen = rows if exact else random.Random(spec.training.seed).sample(rows, sample_rows)
        sequences, stats = data_lib.tokenize_rows(chosen, tokenizer, spec, packing=packing)
        scale = len(rows) / len(chosen)
        lengths = [len(s.input_ids) for s in sequences]
        return {
            "method": "exact" if exact else f"sampled: {len(chosen)} of {len(rows)} rows tokenized, counts scaled "
                                            f"x{scale:.2f}",
            "exact": exact,
            "rows": len(rows),
            "sequences": round(stats["sequences"] * scale),
            "tokens": round(stats["tokens"] * scale),
            "trainableTokens": round(stats["trainableTokens"] * scale),
            "truncatedRows": round(stats["truncated"] * scale),
            "meanSequenceLength": round(sum(lengths) / len(lengths), 1),
            "longestSequence": max(lengths),  # of the sample when sampled
        }

    train = measure(prepared.train, None)
    validation = measure(prepared.validation, False)
    return {**train, "validation": {k: validation[k] for k in ("method", "rows", "sequences", "tokens",
                                                               "trainableTokens")}}
