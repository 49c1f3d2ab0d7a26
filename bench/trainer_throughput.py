"""Trainer throughput: kubetune vs a plain TRL SFTTrainer script, side by side in one run.

Same model, data, sequence length, batch, LoRA settings and steps. The TRL script uses the settings
a careful user would pick on a CPU (fp32, no gradient checkpointing, prompt-completion data so the
loss is on completions only). Both count effective (non-padding) tokens the same way
(`include_num_input_tokens_seen="non_padding"`), divided by the wall time of `trainer.train()`.

    python bench/trainer_throughput.py [--model bundled://smollm2-135m-instruct] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "pydoc_instructions.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]}


def kubetune_run(args: argparse.Namespace, workdir: Path) -> dict:
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
        "spec": {
            "model": {"source": args.model},
            "method": {"type": "lora", "lora": LORA},
            "task": {"type": "instruction", "template": "chat-template"},
            "datasets": [{"source": str(DATA), "maxExamples": args.examples}],
            "validation": {"fraction": 0.02},
            "cleaning": {"dropDuplicates": False},
            "training": {"maxSteps": args.steps, "batchSizePerDevice": args.batch, "maxSeqLength": args.seq,
                         "learningRate": 2e-4, "loggingSteps": 5, "precision": "fp32", "seed": 0},
            "evaluation": {"numSamplePrompts": 0},
            "output": {"uri": str(workdir / "kubetune"), "exports": ["adapter"]},
            "tracking": {"tensorboard": False},
        },
    }
    import shutil

    shutil.rmtree(workdir / "kubetune", ignore_errors=True)  # a fresh run, not a resume
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(manifest))
    from kubetune_trainer.__main__ import run_trainer

    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0, code
    train_seconds = summary["trainSeconds"]
    return {"tokens": summary["trainedTokens"], "seconds": train_seconds,
            "tokens_per_second": summary["trainedTokens"] / train_seconds, "final_loss": summary["lastLoss"]}


TRL_SCRIPT = r'''
import json, sys, time
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

cfg = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
rows = [json.loads(l) for l in open(cfg["data"])][: cfg["examples"]]
def prompt(r):
    user = r["instruction"] + (("\n\n" + r["input"]) if r["input"] else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
data = Dataset.from_list([{"prompt": prompt(r), "completion": r["output"] + tokenizer.eos_token} for r in rows])
model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype="float32")
lora = cfg["lora"]
peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules=lora["targetModules"], task_type="CAUSAL_LM")
args = SFTConfig(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                 max_length=cfg["seq"], learning_rate=2e-4, logging_steps=5, report_to=[], use_cpu=True,
                 bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no", seed=0,
                 include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0)
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
start = time.time()
result = trainer.train()
seconds = time.time() - start
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"tokens": int(trainer.state.num_input_tokens_seen), "seconds": seconds,
                              "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
                              "final_loss": losses[-1]}))
'''


def trl_run(args: argparse.Namespace, workdir: Path, model_dir: str) -> dict:
    config = {"model_dir": model_dir, "data": str(DATA), "examples": args.examples, "lora": LORA,
              "steps": args.steps, "batch": args.batch, "seq": args.seq, "out": str(workdir / "trl")}
    result = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(config)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled://smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    from kubetune.spec import ModelSpec
    from kubetune_trainer.models import resolve_model_dir

    model_dir = resolve_model_dir(ModelSpec(source=args.model))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.time()
        runs: dict[str, list[dict]] = {"TRL": [], "kubetune": []}
        for _ in range(args.repeats):  # alternate, and keep each tool's best run (least disturbed)
            runs["TRL"].append(trl_run(args, workdir, model_dir))
            runs["kubetune"].append(kubetune_run(args, workdir))
        trl = max(runs["TRL"], key=lambda r: r["tokens_per_second"])
        ours = max(runs["kubetune"], key=lambda r: r["tokens_per_second"])
        total = time.time() - started
    print(f"model {args.model}, LoRA r={LORA['r']}, {args.steps} steps x batch {args.batch}, max {args.seq} tokens, "
          f"fp32, no gradient checkpointing ({total:.0f}s in all)")
    print(f"{'':10} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'final loss':>10}")
    for name, row in (("TRL", trl), ("kubetune", ours)):
        print(f"{name:10} {row['tokens']:>8} {row['seconds']:>8.1f} {row['tokens_per_second']:>9.1f} "
              f"{row['final_loss']:>10.4f}")
    for name, rows in runs.items():
        print(f"  {name} runs: " + ", ".join(f"{r['tokens_per_second']:.1f}" for r in rows) + " tokens/s")
    print(f"ratio kubetune / TRL effective tokens per second: {ours['tokens_per_second'] / trl['tokens_per_second']:.2f}")


if __name__ == "__main__":
    main()
