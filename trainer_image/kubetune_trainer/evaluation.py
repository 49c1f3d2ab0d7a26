"""Evaluation helpers: perplexity and sample generations before and after training."""

from __future__ import annotations

import json
import math
from typing import Any

from kubetune_trainer.data import Row, render_segments
from kubetune_trainer.models import unwrap_model


def perplexity(loss: float) -> float | None:
    """exp(mean held-out token loss), capped so it stays finite in JSON; None (JSON null) when the
    loss is not a number (nothing was measured)."""
    return round(math.exp(min(loss, 50.0)), 4) if math.isfinite(loss) else None


class SampleGenerator:
    """Greedy generations for a fixed set of prompts, for a person to compare before and after."""

    def __init__(self, ctx: Any, tokenizer: Any, validation_rows: list[Row]):
        self.ctx = ctx
        self.tokenizer = tokenizer
        spec = ctx.spec
        self.max_new_tokens = spec.evaluation.max_new_tokens
        self.prompts: list[str] = []
        if spec.evaluation.sample_prompts:
            self.prompts = [self._wrap(p) for p in spec.evaluation.sample_prompts]
        else:
            for row in validation_rows[: spec.evaluation.num_sample_prompts]:
                prompt = self._prompt_of(row)
                if prompt:
                    self.prompts.append(prompt)

    def _wrap(self, text: str) -> str:
        """A user prompt in the task's format (chat template or the instruction template)."""
        spec = self.ctx.spec
        if spec.task.type == "completion":
            return text
        row = Row("samplePrompts", "alpaca", {"instruction": text, "input": "", "output": ""})
        if spec.task.type == "chat":
            row = Row(
                "samplePrompts",
                "messages",
                {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]},
            )
        return self._prompt_of(row)

    def _prompt_of(self, row: Row) -> str:
        if row.format == "text":
            words = row.content["text"].split()
            return " ".join(words[: max(4, len(words) // 4)][:48])
        prompt = ""
        for text, is_response in render_segments(row, self.ctx.spec.task.template, self.tokenizer):
            if is_response:
                break
            prompt += text
        return prompt

    def generate(self, model: Any) -> list[dict[str, str]]:
        """Generate for every prompt (all ranks take part under ZeRO-3; results used on rank 0)."""
        import torch

        if not self.prompts:
            return []
        unwrapped = unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        synced = bool(
            self.ctx.deepspeed_config
            and self.ctx.deepspeed_config.get("zero_optimization", {}).get("stage") == 3
        )
        results = []
        device = next(unwrapped.parameters()).device
        for prompt in self.prompts:
            encoded = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            with torch.no_grad():
                output = unwrapped.generate(
                    **encoded,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    synced_gpus=synced,
                )
            completion = self.tokenizer.decode(
                output[0][encoded["input_ids"].shape[1] :], skip_special_tokens=True
            )
            results.append({"prompt": prompt, "completion": completion})
        if was_training:
            unwrapped.train()
        return results

    def write(self, ctx: Any, before: list[dict[str, str]], after: list[dict[str, str]]) -> None:
        """samples.jsonl and samples.md in the work directory (uploaded with the exports)."""
        out = ctx.work_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        lines = []
        markdown = [f"# Sample generations: {ctx.job.metadata.name}", ""]
        for index, (old, new) in enumerate(zip(before, after, strict=False), start=1):
            lines.append(
                json.dumps({"prompt": old["prompt"], "before": old["completion"], "after": new["completion"]})
            )
            markdown += [
                f"## Prompt {index}",
                "",
                "```",
                old["prompt"].strip(),
                "```",
                "",
                "**Before training**",
                "",
                old["completion"].strip() or "(empty)",
                "",
                "**After training**",
                "",
                new["completion"].strip() or "(empty)",
                "",
            ]
        (out / "samples.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
        (out / "samples.md").write_text("\n".join(markdown))
