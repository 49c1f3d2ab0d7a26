"""Preference throughput: kubetune's DPO vs a plain TRL DPOTrainer script, side by side in one run.

Same model, pairs, sequence length, batch, LoRA settings, beta and steps. The TRL script uses what a
careful user would pick on a CPU: fp32, no gradient checkpointing, conversational pairs (TRL applies
the chat template), a PEFT config so that the reference is the base with the adapter disabled.
Both count effective (non-padding) tokens the same way (`include_num_input_tokens_seen="non_padding"`:
prompt + chosen and prompt + rejected), divided by the wall time of training (kubetune's summary
`trainSeconds`, which leaves out its before-training evaluation). Runs alternate; each tool's best
(least disturbed) run is kept.

    python bench/preference_throughput.py [--model bundled://smollm2-135m-instruct] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "pydoc_preferences.jsonl"
LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def kubetune_run(args: argparse.Namespace, workdir: Path) -> dict:
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": args.model},
            "method": {"type": "lora", "lora": LORA},
            "task": {
                "type": "preference",
                "template": "chat-template",
                "preference": {"objective": "dpo", "beta": 0.1, "maxPromptLength": args.seq},
            },
            "datasets": [{"source": str(DATA), "maxExamples": args.examples}],
            "validation": {"fraction": 0.02, "maxExamples": 2},
            "cleaning": {"dropDuplicates": False},
            "training": {
                "maxSteps": args.steps,
                "batchSizePerDevice": args.batch,
                "maxSeqLength": args.seq,
                "learningRate": 2e-4,
                "loggingSteps": 5,
                "precision": "fp32",
                "seed": 0,
            },
            "evaluation": {"numSamplePrompts": 0},
            "output": {"uri": str(workdir / "kubetune"), "exports": ["adapter"]},
            "tracking": {"tensorboard": False},
        },
    }
    shutil.rmtree(workdir / "kubetune", ignore_errors=True)  # a fresh run, not a resume
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(manifest))
    from kubetune_trainer.__main__ import run_trainer

    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0, code
    seconds = summary["trainSeconds"]
    return {
        "tokens": summary["trainedTokens"],
        "seconds": seconds,
        "tokens_per_second": summary["trainedTokens"] / seconds,
        "final_loss": summary["lastLoss"],
    }


TRL_SCRIPT = r"""
import json, sys, time
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

cfg = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
rows = [json.loads(l) for l in open(cfg["data"])][: cfg["examples"]]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                           "chosen": [{"role": "assistant", "content": r["chosen"]}],
                           "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype="float32")
lora = cfg["lora"]
peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules=lora["targetModules"], task_type="CAUSAL_LM")
args = DPOConfig(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                 max_length=cfg["seq"], beta=0.1, learning_rate=2e-4, logging_steps=5, report_to=[], use_cpu=True,
                 bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no", seed=0,
                 include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0)
trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
start = time.time()
trainer.train()
seconds = time.time() - start
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"tokens": int(trainer.state.num_input_tokens_seen), "seconds": seconds,
                              "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
                              "final_loss": losses[-1]}))
"""


def trl_run(args: argparse.Namespace, workdir: Path, model_dir: str) -> dict:
    config = {
        "model_dir": model_dir,
        "data": str(DATA),
        "examples": args.examples,
        "lora": LORA,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "out": str(workdir / "trl"),
    }
    result = subprocess.run(
        [sys.executable, "-c", TRL_SCRIPT, json.dumps(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bundled://smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    from kubetune.spec import ModelSpec
    from kubetune_trainer.models import resolve_model_dir

    model_dir = resolve_model_dir(ModelSpec(source=args.model))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.time()
        runs: dict[str, list[dict]] = {"TRL": [], "kubetune": []}
        for _ in range(args.repeats):
            runs["TRL"].append(trl_run(args, workdir, model_dir))
            runs["kubetune"].append(kubetune_run(args, workdir))
        trl = max(runs["TRL"], key=lambda r: r["tokens_per_second"])
        ours = max(runs["kubetune"], key=lambda r: r["tokens_per_second"])
        total = time.time() - started
    print(
        f"model {args.model}, DPO beta 0.1, LoRA r={LORA['r']}, {args.steps} steps x batch {args.batch} pairs, "
        f"max {args.seq} tokens, fp32, no gradient checkpointing ({total:.0f}s in all)"
    )
    print(f"{'':10} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'final loss':>10}")
    for name, row in (("TRL", trl), ("kubetune", ours)):
        print(
            f"{name:10} {row['tokens']:>8} {row['seconds']:>8.1f} {row['tokens_per_second']:>9.1f} "
            f"{row['final_loss']:>10.4f}"
        )
    for name, rows in runs.items():
        print(f"  {name} runs: " + ", ".join(f"{r['tokens_per_second']:.1f}" for r in rows) + " tokens/s")
    print(
        f"ratio kubetune / TRL effective tokens per second: {ours['tokens_per_second'] / trl['tokens_per_second']:.2f}"
    )


if __name__ == "__main__":
    main()
