"""fused_lora.py against PEFT's own LoRA forward: one LoRA training step of SmolLM2, alternating in one process.

Each round runs one step (forward, backward, fused AdamW) with PEFT's `lora.Linear.forward` and one with
the fused layers, on the same model and shapes (random tokens; logits for the last third of each row, as
the trainer computes them only for learned tokens), so that both see the same state of the machine; the
median and best step of each are printed, and the loss of each before any update (the same numbers).

    python bench/fused_lora_ab.py [--batch 8] [--seq 70] [--rounds 10] [--precision fp32|bf16] [--dropout 0.05]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import resolve_model  # noqa: E402
from trainer_throughput import TARGETS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bundled://smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=70)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.fused_lora import fuse_lora_layers

    bf16 = args.precision == "bf16"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(args.model), dtype=torch.bfloat16 if bf16 else torch.float32
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # fp32 adapters, as the trainer keeps them
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    fuse_lora_layers(model)
    fused_forwards = {m: m.__dict__["forward"] for m in layers}
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    keep = args.seq // 3

    def step(fused: bool, update: bool = True) -> tuple[float, float]:
        for layer in layers:
            if fused:
                layer.forward = fused_forwards[layer]
            else:
                layer.__dict__.pop("forward", None)
        torch.manual_seed(1)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=tokens, use_cache=False, logits_to_keep=keep).logits
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), tokens[:, -keep:].flatten()
            )
        loss.backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, float(loss)

    first = {"peft": step(False, update=False)[1], "fused": step(True, update=False)[1]}
    times: dict[str, list[float]] = {"peft": [], "fused": []}
    for _ in range(args.rounds):
        times["peft"].append(step(False)[0])
        times["fused"].append(step(True)[0])
    print(
        f"LoRA r=16 on {len(layers)} layers, batch {args.batch} x {args.seq} tokens, {args.precision}, "
        f"dropout {args.dropout}, {args.rounds} rounds, {torch.get_num_threads()} threads"
    )
    for name, values in times.items():
        print(
            f"{name}: median {statistics.median(values):.3f} s, best {min(values):.3f} s, "
            f"loss before training {first[name]:.6f}"
        )
    ratio = statistics.median(times["peft"]) / statistics.median(times["fused"])
    print(f"PEFT / fused step time (medians): {ratio:.3f}")


if __name__ == "__main__":
    main()
