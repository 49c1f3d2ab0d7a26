"""bf16 on a CPU: matmul peak and one LoRA training step in fp32, bf16 autocast and bf16 weights.

For each precision it times forward+backward+AdamW steps of the same batch (alternating, best kept),
reports the loss of the first step against fp32, and profiles one fp32 step (top operators).
Also measures the matmul peak (GFLOP/s) of each dtype, the denominator of the throughput benchmark's
MFU. With --checkpointing it adds the same steps with gradient checkpointing.

    python bench/cpu_precision.py [--model bundled://smollm2-135m-instruct] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _common import bench_parser, resolve_model

from kubetune_trainer.models import cpu_has_native_bf16


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a size x size x size torch.matmul in `dtype` (the same kernels training calls)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def make_model(model_dir: str, weights: torch.dtype, checkpointing: bool) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    model.train()
    return model


def step(model: Any, optimizer: Any, batch: dict[str, torch.Tensor], autocast: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def main() -> None:
    parser = bench_parser(__doc__, steps=3, batch=4, seq=256)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    print(f"native bf16 (oneDNN): {cpu_has_native_bf16()}, threads {torch.get_num_threads()}")
    peaks = {
        name: max(matmul_peak(dtype) for _ in range(2))
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    configs = {
        "fp32": (torch.float32, False, False),
        "bf16 autocast": (torch.float32, True, False),
        "bf16 weights": (torch.bfloat16, False, False),
    }
    if args.checkpointing:
        configs.update({f"{k} +ckpt": (w, a, True) for k, (w, a, _) in list(configs.items())})
    setups = {}
    for name, (weights, autocast, checkpointing) in configs.items():
        model = make_model(model_dir, weights, checkpointing)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        first = step(model, optimizer, batch, autocast)  # warm-up, and the loss at the initial weights
        setups[name] = (model, optimizer, autocast, first, [])
    for _ in range(args.steps):  # alternate the configurations, keep each one's best step
        for model, optimizer, autocast, _, times in setups.values():
            started = time.perf_counter()
            step(model, optimizer, batch, autocast)
            times.append(time.perf_counter() - started)
    reference = setups["fp32"][3]
    tokens = args.batch * args.seq
    print(
        f"{'precision':20} {'best s/step':>11} {'tokens/s':>9} {'vs fp32':>8} {'first loss':>10} {'diff':>8}"
    )
    base = min(setups["fp32"][4])
    for name, (_, _, _, first, times) in setups.items():
        best = min(times)
        print(
            f"{name:20} {best:>11.2f} {tokens / best:>9.1f} {base / best:>7.2f}x {first:>10.4f} "
            f"{first - reference:>+8.4f}"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model, optimizer, autocast, _, _ = setups["fp32"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, optimizer, batch, autocast)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
