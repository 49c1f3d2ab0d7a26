"""`kubetune estimate job.yaml`: the command (arguments, exit codes, JSON or the report)."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubetune.manifest import ManifestError, load_job
from kubetune.spec import EXIT_CONFIG_ERROR, FineTuneJob
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.estimate.calibration import calibrate
from kubetune_trainer.estimate.gpus import load_gpu_table
from kubetune_trainer.estimate.model_facts import model_facts
from kubetune_trainer.estimate.prediction import estimate
from kubetune_trainer.estimate.report import format_gpu_table, format_report

EXIT_UNAVAILABLE = 4  # as `kubetune`: storage, network or credentials


def _config_dir(path: str) -> str:
    """A directory holding config.json, from a config.json file or a model directory."""
    given = Path(path).expanduser()
    if given.is_dir() and (given / "config.json").is_file():
        return str(given)
    if given.is_file():
        import shutil

        directory = Path(tempfile.mkdtemp(prefix="kubetune-estimate-"))
        shutil.copyfile(given, directory / "config.json")
        return str(directory)
    raise ConfigError(f"--model-config {path}: no such config.json file or directory holding one")


def given_tokens(job: FineTuneJob, tokens: int, sequences: int | None = None) -> dict[str, Any]:
    """`count_tokens`' result from a given token count (the data need not be reachable)."""
    if tokens < 1 or (sequences is not None and sequences < 1):
        raise ConfigError("--tokens and --sequences must be positive")
    spec = job.spec
    seq_len = spec.training.max_seq_length
    sequences = sequences or max(1, -(-tokens // seq_len))
    fraction = spec.validation.fraction or 0.0
    val_tokens = round(tokens * fraction) if spec.validation.datasets is None else round(tokens * 0.05)
    val_sequences = max(1, round(sequences * (fraction or 0.05)))
    method = "given (--tokens): not counted from the data"
    return {
        "method": method,
        "exact": False,
        "rows": sequences,
        "sequences": sequences,
        "tokens": tokens,
        "trainableTokens": tokens,
        "truncatedRows": 0,
        "meanSequenceLength": round(tokens / sequences, 1),
        "longestSequence": min(seq_len, max(1, -(-tokens // sequences))),
        "validation": {
            "method": method,
            "rows": val_sequences,
            "sequences": val_sequences,
            "tokens": val_tokens,
            "trainableTokens": val_tokens,
        },
    }


def main(args: Any) -> int:
    """`kubetune estimate` (args: manifest, gpu, gpus, mfu, gpu_table, calibrate, json; list_gpus if the
    CLI defines it: print the GPU table and stop)."""
    if getattr(args, "list_gpus", False):
        try:
            table = load_gpu_table(getattr(args, "gpu_table", None))
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        print(json.dumps(table, indent=2) if getattr(args, "json", False) else format_gpu_table(table))
        return 0
    try:
        job = load_job(args.manifest)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from kubetune.storage import StorageError

    try:
        table = load_gpu_table(getattr(args, "gpu_table", None))
        with contextlib.redirect_stdout(sys.stderr):  # model/tokenizer loading chatter stays off stdout
            facts = data = None
            if getattr(args, "model_config", None):
                facts = model_facts(job, _config_dir(args.model_config))
            if getattr(args, "tokens", None) is not None:
                data = given_tokens(job, args.tokens, getattr(args, "sequences", None))
            result = estimate(
                job,
                gpu=getattr(args, "gpu", None),
                gpus=getattr(args, "gpus", None),
                mfu=getattr(args, "mfu", None),
                gpu_table=table,
                facts=facts,
                data=data,
            )
        if getattr(args, "calibrate", False):
            result["calibration"] = calibrate(job, result, mfu=getattr(args, "mfu", None), gpu_table=table)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StorageError as error:
        print(
            f"error: {error}\n(to estimate without access to the model or the data, pass --model-config "
            "with the model's config.json and --tokens with the training tokens per epoch)",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_report(result))
    return 0
