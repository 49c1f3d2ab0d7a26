"""Where the time of one kubetune training step goes, by category, with torch.profiler.

Builds the Trainer that `kubetune run` builds for the throughput benchmark's manifest (SmolLM2-135M,
LoRA r=16 on the seven projections, the pydoc instruction data), trains a few steps and profiles
whole steps (data fetch and collation, forward, backward, gradient clipping, AdamW, callbacks). Every
profiled operator's self time is put in one category:

- frozen linear: matmuls of the base model's decoder projections (forward, gradient w.r.t. input)
- LoRA: matmuls with the rank r as a dimension (adapter forward and both gradients)
- attention: scaled_dot_product_attention and its backward, and the attention mask
- lm_head + loss: matmuls with the vocabulary as a dimension, log_softmax, nll_loss and backwards
- embedding: the lookup and its backward
- optimizer: everything under optimizer.step / zero_grad / gradient clipping
- data: everything under the dataloader fetch and the collator
- other ops: the rest (RMSNorm, SiLU, rotary embedding, adds, copies, casts)
- Python and framework: the step's wall time not spent in any operator, and the Python code of
  fused_lora.py's autograd function

    python bench/step_profile.py [--steps 4] [--batch 8] [--seq 256] [--precision fp32] [--packing]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import bench_parser, write_manifest  # noqa: E402
from trainer_throughput import DATA, LORA  # noqa: E402

CATEGORIES = [
    "frozen linear",
    "LoRA",
    "attention",
    "lm_head + loss",
    "embedding",
    "optimizer",
    "data",
    "other ops",
    "Python and framework",
]
SCOPES = {  # transformers' and torch's own profiler ranges, and ours
    "Optimizer.step": "optimizer",
    "Optimizer.zero_grad": "optimizer",
    "clip_grad_norm": "optimizer",
    "enumerate(DataLoader)": "data",
    "kubetune.data": "data",
}


def op_category(name: str, shapes: list[Any], rank: int, vocab: int) -> str | None:
    """The category of one operator from its name and input shapes (None: look at its parent)."""
    lowered = name.lower()
    if "scaled_dot_product" in lowered or "flash_attention" in lowered or "sdpa" in lowered:
        return "attention"
    if "embedding" in lowered:
        return "embedding"
    if any(key in lowered for key in ("log_softmax", "nll_loss", "cross_entropy")):
        return "lm_head + loss"
    dims = {d for shape in shapes if isinstance(shape, list) for d in shape}
    if lowered in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear"):
        if vocab in dims:
            return "lm_head + loss"
        if rank in dims:
            return "LoRA"
        return "frozen linear"
    return None


def categorize(prof: Any, rank: int, vocab: int) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Self CPU time (ms) per category of every operator in the profile, and per (category, operator)."""
    totals: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("ProfilerStep"):
            continue  # its own self time is Python (the remainder of the step's wall time)
        # fused_lora.py's autograd function: its self time is its own Python code (its operators are children)
        category = "Python and framework" if event.name.startswith("FusedLoraLinear") else None
        node = event
        while node is not None and category is None:
            category = SCOPES.get(node.name) or next(
                (c for key, c in SCOPES.items() if node.name.startswith(key)), None
            )
            node = node.cpu_parent
        if category is None:
            node = event
            while node is not None and category is None:
                category = op_category(node.name, node.input_shapes or [], rank, vocab)
                node = node.cpu_parent
        totals[category or "other ops"] += event.self_cpu_time_total / 1000
        by_op[(category or "other ops", event.name)] += event.self_cpu_time_total / 1000
    return totals, by_op


def main() -> None:
    parser = bench_parser(__doc__, steps=4, batch=8, seq=256)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    from tests.support.trainer_setup import build_trainer

    class Profiling(TrainerCallback):
        """Steps [warmup, warmup + steps) under the profiler, from one step's end to the next's."""

        def __init__(self) -> None:
            self.prof = profile(
                activities=[ProfilerActivity.CPU],
                record_shapes=True,
                schedule=schedule(wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1),
            )
            self.ends: list[float] = []
            self.tokens: list[int] = []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.prof.start()
            self.ends.append(time.perf_counter())

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            self.ends.append(time.perf_counter())
            self.prof.step()
            self.tokens.append(int(state.num_input_tokens_seen))

        def on_train_end(self, *_: Any, **__: Any) -> None:
            self.prof.stop()

    with tempfile.TemporaryDirectory() as tmp:
        args.steps_total = args.warmup + args.steps
        manifest_args = argparse.Namespace(**{**vars(args), "steps": args.warmup + args.steps})
        path = write_manifest(
            manifest_args,
            Path(tmp),
            lora=LORA,
            task={"type": "instruction", "template": "chat-template"},
            data=DATA,
            validation={"fraction": 0.02},
            precision=args.precision,
            training={"packing": args.packing},
        )
        profiling = Profiling()
        trainer = build_trainer(path, [profiling])
        vocab = trainer.model.get_output_embeddings().weight.shape[0]
        trainer.train()
    seconds = [b - a for a, b in zip(profiling.ends, profiling.ends[1:], strict=False)]
    profiled = seconds[args.warmup : args.warmup + args.steps]
    tokens = [b - a for a, b in zip([0, *profiling.tokens], profiling.tokens, strict=False)]
    totals, by_op = categorize(profiling.prof, LORA["r"], vocab)
    embedded = [e.input_shapes[1] for e in profiling.prof.events() if e.name == "aten::embedding"]
    steps = [e for e in profiling.prof.events() if e.name.startswith("ProfilerStep")]
    wall_ms = sum(e.cpu_time_total for e in steps) / 1000 / len(steps)
    per_step = {k: v / args.steps for k, v in totals.items()}
    python_ops = per_step.pop("Python and framework", 0.0)
    per_step["Python and framework"] = python_ops + max(0.0, wall_ms - python_ops - sum(per_step.values()))
    print(
        f"threads {torch.get_num_threads()}; unprofiled steps (s): "
        + ", ".join(f"{s:.2f}" for s in seconds[: args.warmup])
        + f"; profiled steps (s): {', '.join(f'{s:.2f}' for s in profiled)}; "
        f"effective tokens per profiled step: {sum(tokens[args.warmup :]) / args.steps:.0f}; "
        f"batch shapes (with padding): {embedded}"
    )
    print("| category | ms per step | share |")
    print("| --- | ---: | ---: |")
    for name in CATEGORIES:
        ms = per_step.get(name, 0.0)
        print(f"| {name} | {ms:.0f} | {100 * ms / wall_ms:.1f}% |")
    print(f"| step (wall, under the profiler) | {wall_ms:.0f} | 100% |")
    others = sorted(((ms, op) for (c, op), ms in by_op.items() if c == "other ops"), reverse=True)
    print("other ops, ms per step: " + ", ".join(f"{op} {ms / args.steps:.0f}" for ms, op in others[:10]))
    print(
        profiling.prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50, max_shapes_column_width=70
        )
    )


if __name__ == "__main__":
    main()
