"""Trainer throughput and MFU: kubetune vs three TRL SFTTrainer configurations, side by side in one run.

Same model, data, sequence length, batch, LoRA settings, precision and steps. The TRL scripts use the
settings a careful user would pick on a CPU (no gradient checkpointing, prompt-completion data so the
loss is on completions only) in three batching strategies: random batches (the default),
`train_sampling_strategy="group_by_length"`, and TRL packing (`packing=True`, best-fit decreasing,
padding-free with per-example position ids). kubetune runs with its defaults (length-grouped batches)
and with `packing: true`. Every configuration runs in its own process; runs alternate and the best of
each is kept. All count effective (non-padding) tokens the same way
(`include_num_input_tokens_seen="non_padding"`) over the wall time of `trainer.train()`.

MFU (model FLOPs utilisation) = model training FLOPs per second / the matmul peak measured in this run
(a 2048^3 torch.matmul in the precision used, best of several). Model FLOPs per effective token, for
LoRA: 2N (frozen forward) + 2N (gradient w.r.t. activations, needed to reach earlier adapters)
+ 6 N_lora (adapter forward, activation and weight gradients), N = weights of the decoder's linear
layers (the embedding lookup, the output head and attention scores are not counted, so MFU is
conservative); for full fine-tuning 6 N.

    python bench/trainer_throughput.py [--model bundled://smollm2-135m-instruct] [--steps 20]
        [--precision fp32|bf16] [--repeats 2] [--only kubetune,trl-grouped]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
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
from cpu_precision import matmul_peak  # noqa: E402

DATA = REPO / "examples" / "data" / "pydoc_instructions.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": TARGETS}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def kubetune_run(args: argparse.Namespace, workdir: Path, packing: bool) -> dict:
    """One `kubetune run` in its own process; figures from its summary."""
    path = write_manifest(
        args,
        workdir,
        lora=LORA,
        task={"type": "instruction", "template": "chat-template"},
        data=DATA,
        validation={"fraction": 0.02},
        precision=args.precision,
        training={"packing": packing},
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(path), "--quiet"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    summary = json.loads((workdir / "kubetune" / "summary.json").read_text())
    return summary_row(summary, summary["lastLoss"] or summary["trainLoss"])


TRL_SCRIPT = (
    TRL_PRELUDE
    + r"""
from trl import SFTConfig, SFTTrainer
def prompt(r):
    user = r["instruction"] + (("\n\n" + r["input"]) if r["input"] else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
data = Dataset.from_list([{"prompt": prompt(r), "completion": r["output"] + tokenizer.eos_token} for r in rows])
bf16 = cfg["precision"] == "bf16"
"""
    + TRL_MODEL
    + r"""
batching = {"random": {}, "grouped": {"train_sampling_strategy": "group_by_length"}, "packed": {"packing": True}}
args = SFTConfig(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                 max_length=cfg["seq"], learning_rate=2e-4, logging_steps=5, report_to=[], use_cpu=True,
                 bf16=bf16, fp16=False, gradient_checkpointing=False, save_strategy="no", seed=0,
                 include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0,
                 **batching[cfg["batching"]])
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
start = time.time()
result = trainer.train()
seconds = time.time() - start
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"tokens": int(trainer.state.num_input_tokens_seen), "seconds": seconds,
                              "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
                              "final_loss": losses[-1] if losses else result.training_loss}))
"""
)


def trl_run(args: argparse.Namespace, workdir: Path, model_dir: str, batching: str) -> dict:
    """One TRL SFTTrainer script in its own process."""
    config = trl_config(args, workdir, model_dir, DATA, LORA, precision=args.precision, batching=batching)
    return run_result_script(TRL_SCRIPT, config, ENV)


def lora_flops_per_token(model_dir: str) -> tuple[float, int, int]:
    """(training FLOPs per token, N frozen decoder linear weights, N LoRA weights) for LoRA on TARGETS."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    n_base = n_lora = 0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            n_base += module.weight.numel()
            if name.rsplit(".", 1)[-1] in TARGETS:
                n_lora += LORA["r"] * (module.in_features + module.out_features)
    return 4 * n_base + 6 * n_lora, n_base, n_lora


CONFIGS = {
    "trl-random": ("TRL SFTTrainer, random batches (default)", lambda a, w, m: trl_run(a, w, m, "random")),
    "trl-grouped": ("TRL SFTTrainer, group_by_length", lambda a, w, m: trl_run(a, w, m, "grouped")),
    "trl-packed": ("TRL SFTTrainer, packing (bfd, padding-free)", lambda a, w, m: trl_run(a, w, m, "packed")),
    "kubetune": ("kubetune (length-grouped)", lambda a, w, m: kubetune_run(a, w, packing=False)),
    "kubetune-packed": ("kubetune, packing: true (exact)", lambda a, w, m: kubetune_run(a, w, packing=True)),
}


def main() -> None:
    parser = bench_parser(__doc__, steps=20, batch=8, seq=256)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    parser.add_argument(
        "--only", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS)
    )
    args = parser.parse_args()
    import torch

    model_dir = resolve_model(args.model)
    names = [n for n in args.only.split(",") if n]
    flops_per_token, n_base, n_lora = lora_flops_per_token(model_dir)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peaks: list[float] = []
    runs: dict[str, list[dict]] = {name: [] for name in names}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternate, and keep each configuration's best run (least disturbed)
            peaks.append(matmul_peak(dtype))
            for name in names:
                runs[name].append(CONFIGS[name][1](args, Path(tmp), model_dir))
        peaks.append(matmul_peak(dtype))
    peak = max(peaks) * 1e9
    total = time.time() - started
    best = {name: max(rows, key=lambda r: r["tokens_per_second"]) for name, rows in runs.items()}
    trl_names = [n for n in names if n.startswith("trl")]
    best_trl = max((best[n]["tokens_per_second"] for n in trl_names), default=None)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(
        f"model {args.model}, LoRA r={LORA['r']} on {len(TARGETS)} projections, {args.steps} steps x batch "
        f"{args.batch}, max {args.seq} tokens, {args.precision}, no gradient checkpointing; {total:.0f}s in all, "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"matmul peak {args.precision}: {max(peaks):.0f} GFLOP/s (runs: {', '.join(f'{p:.0f}' for p in peaks)}); "
        f"model FLOPs/token 4N+6N_lora = {flops_per_token / 1e6:.0f} M (N {n_base / 1e6:.1f} M, "
        f"N_lora {n_lora / 1e6:.2f} M)"
    )
    print("| configuration | runs (tokens/s) | best tokens/s | tokens | final loss | vs best TRL | MFU |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        row = best[name]
        ratio = f"{row['tokens_per_second'] / best_trl:.2f}" if best_trl else "-"
        mfu = row["tokens_per_second"] * flops_per_token / peak
        each = ", ".join(f"{r['tokens_per_second']:.1f}" for r in runs[name])
        print(
            f"| {CONFIGS[name][0]} | {each} | "
            f"{row['tokens_per_second']:.1f} | {row['tokens']:,} | {row['final_loss']:.3f} | {ratio} | "
            f"{100 * mfu:.0f}% |"
        )


if __name__ == "__main__":
    main()
