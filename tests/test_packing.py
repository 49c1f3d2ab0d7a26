"""Exact packing: a packed example's loss is the loss of the example alone (no cross-example attention)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.data import IGNORE_INDEX, TokenizedExample
from kubetune_trainer.packing import PackedCollator, PackedExample, dataset_columns, pack

TOLERANCE = 1e-5  # fp32


def examples(lengths: list[int], prompt: int = 3, seed: int = 0) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(5, 2000, (length,), generator=generator).tolist()
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_pack_restarts_positions_and_masks_the_first_label() -> None:
    items = examples([5, 4, 6, 9])
    packed = pack(items, max_length=12)
    assert [len(p.input_ids) for p in packed] == [9, 6, 9]
    assert packed[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packed[0].input_ids == items[0].input_ids + items[1].input_ids
    assert packed[0].labels == items[0].labels + items[1].labels  # prompts already masked the first label
    full = [TokenizedExample([1, 2, 3], [1, 2, 3]), TokenizedExample([4, 5], [4, 5])]
    assert pack(full, 8)[0].labels == [1, 2, 3, IGNORE_INDEX, 5]
    assert set(dataset_columns(packed)) == {"input_ids", "labels", "position_ids"}
    assert set(dataset_columns(items)) == {"input_ids", "labels"}


def test_collator_pads_with_a_block_of_its_own() -> None:
    batch = PackedCollator(pad_token_id=0)(
        [
            {"input_ids": [7, 8, 9], "labels": [7, 8, 9], "position_ids": [0, 0, 1]},
            {"input_ids": [5], "labels": [5]},
        ]
    )
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[7, 8, 9], [5, IGNORE_INDEX, IGNORE_INDEX]]


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy per position (0 where not learned), shape (batch, length - 1)."""
    labels = batch["labels"]
    batch = {**batch, "use_cache": False}
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss_per_example(tiny_model: Path, attention: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation=attention
    )
    model.eval()
    items = examples([17, 9, 30, 4, 22, 13], seed=1)
    packed = pack(items, max_length=48)
    assert len(packed) > 1 and any(p.position_ids.count(0) > 1 for p in packed)
    collate = PackedCollator(pad_token_id=0)
    batch = collate(
        [{"input_ids": p.input_ids, "labels": p.labels, "position_ids": p.position_ids} for p in packed]
    )
    with torch.no_grad():
        packed_losses = token_losses(model, batch)
        alone = [
            token_losses(model, collate([{"input_ids": e.input_ids, "labels": e.labels}]))[0] for e in items
        ]
    # cut each packed row back into its examples: their per-token losses are those of the example alone
    index = 0
    for row, sequence in enumerate(packed):
        starts = [i for i, p in enumerate(sequence.position_ids) if p == 0] + [len(sequence.input_ids)]
        for start, end in zip(starts, starts[1:], strict=False):
            expected = alone[index]
            got = packed_losses[row, start : end - 1]  # the last token predicts nothing in its example
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)
            assert got.sum() > 0
            index += 1
    assert index == len(items)
    # the same packed batch with one causal window (what packing did before) lets examples see each other
    with torch.no_grad():
        leaky = token_losses(
            model, {"input_ids": batch["input_ids"], "labels": batch["labels"], "use_cache": False}
        )
    assert (leaky - packed_losses).abs().max() > 100 * TOLERANCE


def test_trainer_loss_on_a_packed_batch_is_the_loss_of_the_examples(tiny_model: Path, tmp_path: Path) -> None:
    """The trainer's loss (selective logits) over a packed batch equals the token-weighted unpacked loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kubetune_trainer.train import make_trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        ),
    )
    model.eval()
    items = examples([11, 25, 7, 19], seed=2)
    packed: list[PackedExample] = pack(items, max_length=40)
    collate = PackedCollator(pad_token_id=0)
    batch = collate([p.__dict__ for p in packed])
    trainer = make_trainer(
        seed=0,
        group_by_length=False,
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
    )
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        total = sum(float(token_losses(model, collate([e.__dict__]))[0].sum()) for e in items)
    learned = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in items)
    assert ours.item() == pytest.approx(total / learned, abs=TOLERANCE)


def test_per_example_attention_equals_the_block_diagonal_mask(tiny_model: Path, tmp_path: Path) -> None:
    """Attention per packed example (the CPU path) gives the loss and adapter gradients of sdpa with
    transformers' block-diagonal mask; other calls (no boundaries) still take the mask."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kubetune_trainer.attention import CPU_ATTENTION, segment_boundaries, use_cpu_attention
    from kubetune_trainer.train import make_trainer, selected_logits_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    model = get_peft_model(model, config)
    packed = pack(examples([11, 25, 7, 19, 4], seed=3), max_length=40)
    batch = PackedCollator(pad_token_id=0)([p.__dict__ for p in packed])
    assert segment_boundaries(batch["position_ids"]).tolist()[:3] == [0, 11, 36]
    trainer = make_trainer(
        seed=0,
        group_by_length=False,
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
    )
    lora = [p for n, p in model.named_parameters() if "lora" in n]

    def loss_and_grads() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = trainer.compute_loss(model, dict(batch))
        return loss, torch.autograd.grad(loss, lora)

    masked, masked_grads = loss_and_grads()
    with torch.no_grad():
        masked_tokens = token_losses(model, batch)
    assert use_cpu_attention(model.get_base_model())
    assert model.config._attn_implementation == CPU_ATTENTION
    assert "cu_seq_lens_q" in selected_logits_inputs(model, batch)[0]  # so the mask is not used
    ours, ours_grads = loss_and_grads()
    assert ours.item() == pytest.approx(masked.item(), abs=TOLERANCE)
    for got, expected in zip(ours_grads, masked_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # a call without boundaries: transformers' mask, the same losses
        torch.testing.assert_close(token_losses(model, batch), masked_tokens)


def test_packing_trains_end_to_end(make_job) -> None:
    from kubetune_trainer.__main__ import run_trainer

    path = make_job(
        "packed", training={"packing": True, "maxSteps": 3, "maxSeqLength": 256, "batchSizePerDevice": 2}
    )
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0 and summary["steps"] == 3
    train = summary["data"]["train"]
    assert train["sequences"] < train["rows"] - train["noTrainableTokens"]  # several examples per sequence
    assert 0 < summary["trainedTokens"] and summary["lastLoss"] > 0


def test_cpu_attention_computes_bf16_in_fp32() -> None:
    """bf16 query, key and value (under bf16 autocast, as in training): the result of fp32 attention
    on them, returned in bf16."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from kubetune_trainer.attention import cpu_sdpa

    module = LlamaAttention(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2), 0)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, 9, 16, generator=generator).bfloat16() for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = cpu_sdpa(module, query, key, value, None, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), is_causal=True, scale=0.25, enable_gqa=True
    )
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected.transpose(1, 2).bfloat16(), rtol=0, atol=0)
