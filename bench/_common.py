"""What the CPU training benchmarks share: the argument parser, the model, the kubetune manifest they
run, the child-process protocol of the TRL scripts (one `RESULT {json}` line) and the row of figures
they compare (effective tokens, train seconds, tokens per second, final loss)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# The start of every TRL script: the config (argv[1]), the tokenizer and the first `examples` rows.
TRL_PRELUDE = r"""
import json, sys, time
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

cfg = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
rows = [json.loads(l) for l in open(cfg["data"])][: cfg["examples"]]
"""

# The fp32 model and its PEFT config (cfg["lora"] as in a kubetune manifest).
TRL_MODEL = r"""
model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype="float32")
lora = cfg["lora"]
peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules=lora["targetModules"], task_type="CAUSAL_LM")
"""


def bench_parser(doc: str | None, *, steps: int, batch: int, seq: int) -> argparse.ArgumentParser:
    """The parser with --model, --steps, --batch and --seq; `doc` (the module's) is its description."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled://smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)
    return parser


def resolve_model(source: str) -> str:
    """The local directory of the model `source` (a bundled:// or other ModelSpec source)."""
    from kubetune.spec import ModelSpec
    from kubetune_trainer.models import resolve_model_dir

    return resolve_model_dir(ModelSpec(source=source))


def write_manifest(
    args: argparse.Namespace,
    workdir: Path,
    *,
    lora: dict[str, Any],
    task: dict[str, Any],
    data: Path,
    validation: dict[str, Any],
    precision: str,
    training: dict[str, Any] | None = None,
) -> Path:
    """A LoRA FineTuneJob "bench" on `data` (args.model, args.examples, args.steps, args.batch,
    args.seq), written to workdir/bench.yaml; its output folder workdir/kubetune is emptied first
    (a fresh run, not a resume). `training` adds settings to spec.training."""
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": args.model},
            "method": {"type": "lora", "lora": lora},
            "task": task,
            "datasets": [{"source": str(data), "maxExamples": args.examples}],
            "validation": validation,
            "cleaning": {"dropDuplicates": False},
            "training": {
                "maxSteps": args.steps,
                "batchSizePerDevice": args.batch,
                "maxSeqLength": args.seq,
                "learningRate": 2e-4,
                "loggingSteps": 5,
                "precision": precision,
                "seed": 0,
                **(training or {}),
            },
            "evaluation": {"numSamplePrompts": 0},
            "output": {"uri": str(workdir / "kubetune"), "exports": ["adapter"]},
            "tracking": {"tensorboard": False},
        },
    }
    shutil.rmtree(workdir / "kubetune", ignore_errors=True)
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def summary_row(summary: dict[str, Any], final_loss: float) -> dict[str, Any]:
    """The compared figures of a kubetune run, from its summary (tokens per train second)."""
    seconds = summary["trainSeconds"]
    return {
        "tokens": summary["trainedTokens"],
        "seconds": seconds,
        "tokens_per_second": summary["trainedTokens"] / seconds,
        "final_loss": final_loss,
    }


def trl_config(
    args: argparse.Namespace, workdir: Path, model_dir: str, data: Path, lora: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The config (argv[1]) of a TRL script: the same model, data, LoRA, steps, batch and sequence
    length as the kubetune run, its output in workdir/trl; `extra` adds script-specific keys."""
    return {
        "model_dir": model_dir,
        "data": str(data),
        "examples": args.examples,
        "lora": lora,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "out": str(workdir / "trl"),
        **extra,
    }


def run_result_script(script: str, config: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run `python -c script json(config)`; the JSON of its last `RESULT ` line (exit with its output
    if it fails)."""
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])
