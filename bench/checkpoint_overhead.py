"""Checkpoint overhead: the fraction of training wall time blocked by checkpointing.

Trains the same job twice in one run, saving every K steps, once with background publishing
(hashing every file, writing the manifest and, for S3, uploading happen in a thread while training
goes on; only writing the files blocks) and once without (all of it blocks). Blocked time is
measured inside the trainer: transformers' checkpoint write plus our on_save.

    python bench/checkpoint_overhead.py [--model bundled://smollm2-135m-instruct] [--method full] [--every 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "pydoc_instructions.jsonl"


def run(args: argparse.Namespace, workdir: Path, background: bool) -> dict:
    name = "background" if background else "blocking"
    method = {"type": args.method} if args.method == "full" else {"type": "lora", "lora": {"r": 16}}
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": args.model},
            "method": method,
            "task": {"type": "instruction", "template": "plain"},
            "datasets": [{"source": str(DATA), "maxExamples": 400}],
            "training": {
                "maxSteps": args.steps,
                "batchSizePerDevice": args.batch,
                "maxSeqLength": 64,
                "learningRate": 1e-5,
                "loggingSteps": 5,
                "seed": 0,
            },
            "checkpoint": {"everySteps": args.every, "keepLast": 2, "background": background},
            "evaluation": {"numSamplePrompts": 0},
            "validation": {"maxExamples": 4},
            "output": {
                "uri": str(workdir / name),
                "exports": ["merged"] if args.method == "full" else ["adapter"],
            },
            "tracking": {"tensorboard": False},
        },
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    from kubetune_trainer.__main__ import run_trainer

    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0, code
    checkpoint_bytes = sum(
        f["size"]
        for f in json.loads(
            (workdir / name / "checkpoints" / f"step-{args.steps}" / "manifest.json").read_text()
        )["files"]
    )
    return {
        "train": summary["trainSeconds"],
        "blocked": summary["checkpointBlockedSeconds"],
        "bytes": checkpoint_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bundled://smollm2-135m-instruct")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "blocking": run(args, Path(tmp), background=False),
            "background": run(args, Path(tmp), background=True),
        }
    size_mb = rows["background"]["bytes"] / 1e6
    print(
        f"{args.method} fine-tuning of {args.model}: {args.steps} steps, a {size_mb:.0f} MB checkpoint every "
        f"{args.every} steps"
    )
    print(f"{'':12} {'train s':>8} {'blocked s':>10} {'blocked %':>10}")
    for name, row in rows.items():
        print(
            f"{name:12} {row['train']:>8.1f} {row['blocked']:>10.2f} {100 * row['blocked'] / row['train']:>9.1f}%"
        )
    ratio = rows["blocking"]["blocked"] / max(rows["background"]["blocked"], 1e-9)
    print(f"background publishing blocks {ratio:.1f}x less than blocking publishing")


if __name__ == "__main__":
    main()
