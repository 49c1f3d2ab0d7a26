"""Preference throughput: kubetune's DPO vs a plain TRL DPOTrainer script, side by side in one run.

Same model, pairs, sequence length, batch, LoRA settings, beta and steps. The TRL script uses what a
careful user would pick on a CPU: fp32, no gradient checkpointing, conversational pairs (TRL applies
the chat template), a PEFT config so that the reference is the base with the adapter disabled.
Both count effective (non-padding) tokens the same way (`include_num_input_tokens_seen="non_padding"`:
prompt + chosen and prompt + rejected), divided by the same clock: the Trainer's `train_runtime` (its
training loop; kubetune's summary `trainSeconds` is that less its before-training evaluation). Runs alternate; each tool's best
(least disturbed) run is kept.

    python bench/preference_throughput.py [--model bundled://smollm2-135m-instruct] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    TRL_MODEL,
    TRL_PRELUDE,
    bench_parser,
    resolve_model,
    run_result_script,
    summary_row,
    trl_config,
    write_manifest,
)

DATA = REPO / "examples" / "data" / "pydoc_preferences.jsonl"
LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def kubetune_run(args: argparse.Namespace, workdir: Path) -> dict:
    path = write_manifest(
        args,
        workdir,
        lora=LORA,
        task={
            "type": "preference",
            "template": "chat-template",
            "preference": {"objective": "dpo", "beta": 0.1, "maxPromptLength": args.seq},
        },
        data=DATA,
        validation={"fraction": 0.02, "maxExamples": 2},
        precision="fp32",
        training={"loggingSteps": 1},  # the loss of the last step, as the TRL script logs it
    )
    from kubetune_trainer.__main__ import run_trainer

    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0, code
    return summary_row(summary, summary["lastLoss"])


TRL_SCRIPT = (
    TRL_PRELUDE
    + r"""
from trl import DPOConfig, DPOTrainer
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                           "chosen": [{"role": "assistant", "content": r["chosen"]}],
                           "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
"""
    + TRL_MODEL
    + r"""
args = DPOConfig(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                 max_length=cfg["seq"], beta=0.1, learning_rate=2e-4, logging_steps=1, report_to=[], use_cpu=True,
                 bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no", seed=0,
                 include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0)
trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
# the same clock as kubetune's trainSeconds: the Trainer's train_runtime (its training loop, after the
# optimizer and the data loader are set up), not the wall time of trainer.train()
seconds = trainer.train().metrics["train_runtime"]
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"tokens": int(trainer.state.num_input_tokens_seen), "seconds": seconds,
                              "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
                              "final_loss": losses[-1]}))
"""
)


def trl_run(args: argparse.Namespace, workdir: Path, model_dir: str) -> dict:
    config = trl_config(args, workdir, model_dir, DATA, LORA)
    return run_result_script(TRL_SCRIPT, config, {**os.environ, "PYTHONWARNINGS": "ignore"})


def main() -> None:
    parser = bench_parser(__doc__, steps=10, batch=4, seq=192)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
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
