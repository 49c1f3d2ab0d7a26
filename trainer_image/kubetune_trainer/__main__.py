"""Trainer entry point: `python -m kubetune_trainer --config job.yaml` (what the pods run).

Exit codes (the operator acts on them):
    0    succeeded
    3    configuration or data error: retrying cannot help, the job fails at once
    143  preempted (SIGTERM): a checkpoint was saved, restart to resume; not counted as a failure
    other  unexpected failure: retried from the latest complete checkpoint, up to runPolicy.maxRestarts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from kubetune.manifest import ManifestError, load_job
from kubetune.spec import EXIT_CONFIG_ERROR, EXIT_OK, EXIT_PREEMPTED, EXIT_RETRYABLE
from kubetune.storage import StorageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kubetune-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="FineTuneJob manifest (YAML)")
    parser.add_argument("--output", help="override spec.output.uri (a directory or s3://bucket/prefix)")
    parser.add_argument("--deepspeed", help="DeepSpeed config JSON (rendered by the operator)")
    parser.add_argument(
        "--resume",
        choices=["auto", "latest", "never"],
        default="auto",
        help="auto/latest: continue from the latest complete checkpoint if there is one",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user (our own progress lines say it)."""
    import logging
    import warnings

    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"(transformers|peft|trl|accelerate)\b.*"
    )
    warnings.filterwarnings("ignore", message=r".*an autograd kernel was not registered.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "unable to detect a GPU" warning from DeepSpeed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _missing_dirs(output: str) -> list[Path]:
    """The local output directory and those of its parents that do not exist yet (deepest first)."""
    if "://" in output:
        return []
    path = Path(output).expanduser().resolve()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    """A run refused before it wrote anything leaves no empty output directories behind."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty (or already gone): keep it and its parents
            return


def run_trainer(
    config: str,
    output: str | None = None,
    deepspeed: str | None = None,
    resume: str = "auto",
    show_progress: bool = True,
) -> tuple[int, dict | None]:
    """Run one training process; returns (exit code, summary or None). Never raises."""
    from kubetune_trainer.errors import ConfigError

    quiet_libraries()

    try:
        job = load_job(config)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR, None
    new_dirs = _missing_dirs(output or job.spec.output.uri or f"runs/{job.metadata.name}")
    try:
        from kubetune_trainer.train import make_context, run

        deepspeed_config = None
        if deepspeed:
            deepspeed_config = json.loads(Path(deepspeed).read_text())
        elif (
            job.spec.resources.strategy.startswith("deepspeed") and int(os.environ.get("WORLD_SIZE", "1")) > 1
        ):
            import torch

            from kubetune.distributed import deepspeed_config as make_ds_config

            deepspeed_config = make_ds_config(job.spec, torch_adam=not torch.cuda.is_available())
        ctx = make_context(
            job, output=output, deepspeed_config=deepspeed_config, resume=resume, show_progress=show_progress
        )
        summary = run(ctx)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        _remove_if_empty(new_dirs)
        return EXIT_CONFIG_ERROR, None
    except StorageError as error:
        # 403/404/bad credentials cannot heal by retrying (exit 3); timeouts, throttling and 5xx can (exit 1)
        print(f"error: {error}", file=sys.stderr)
        if not error.retryable:
            _remove_if_empty(new_dirs)
        return (EXIT_RETRYABLE if error.retryable else EXIT_CONFIG_ERROR), None
    except KeyboardInterrupt:
        return EXIT_PREEMPTED, None
    except Exception:  # noqa: BLE001 - any other failure is retryable from the last checkpoint
        traceback.print_exc()
        from kubetune_trainer.callbacks import PreemptionHandler

        return (EXIT_PREEMPTED if PreemptionHandler.requested else EXIT_RETRYABLE), None
    if summary.get("preempted"):
        print(
            f"[kubetune] preempted at step {summary['step']}; checkpoint saved, exit {EXIT_PREEMPTED}",
            flush=True,
        )
        return EXIT_PREEMPTED, summary
    return EXIT_OK, summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, _ = run_trainer(args.config, args.output, args.deepspeed, args.resume, show_progress=not args.quiet)
    return code


if __name__ == "__main__":
    sys.exit(main())
