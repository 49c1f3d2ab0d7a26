"""Exact packing: several examples in one sequence, each seeing only itself.

`pack` concatenates whole examples into sequences of at most maxSeqLength tokens and records, per
token, its position inside its own example (`position_ids` restart at 0 at every example). The first
label of every example after the first is IGNORE_INDEX: unpacked, nothing predicts an example's first
token, so packed, the last token of the previous example must not learn to predict it either.

`PackedCollator` pads a batch of such sequences and passes `position_ids` *without* an attention
mask. transformers (masking_utils.find_packed_sequence_indices) then reads the example boundaries
from the restarting position ids and builds a block-diagonal causal mask: with attn_implementation
sdpa or eager (CPU) the 4D mask limits attention to the example; with flash_attention_2 (GPU, where
installed) the same position ids select the variable-length kernel (cu_seqlens). The padding at the
end of a row restarts its position ids too, so it forms a block of its own that no real token sees.
The batch carries use_cache=False: transformers only reads packed boundaries when there is no KV cache.
The loss of every example is then that of the example alone (tests/test_packing.py).

On CPU (sdpa or eager) the block-diagonal mask costs the full square of every row: SDPA cannot skip
the masked blocks. The trainer therefore switches such models to PER_EXAMPLE_ATTENTION
(use_per_example_attention): for a batch that carries `cu_seq_lens_q` (segment_boundaries, added by
the trainer's compute_loss) it runs causal SDPA on each example (and padding run) alone, the work of
unpacked examples without their padding; any other call (generation, unpacked batches) is plain sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_trainer.data import IGNORE_INDEX, PaddingCollator, TokenizedExample

PER_EXAMPLE_ATTENTION = "kubetune_per_example_sdpa"


@dataclass
class PackedExample(TokenizedExample):
    """A packed sequence: the concatenated examples and each token's position within its example."""

    position_ids: list[int]


def pack(examples: list[TokenizedExample], max_length: int) -> list[PackedExample]:
    """Greedily concatenate whole examples into sequences of at most max_length tokens (no cross-talk)."""
    packed: list[PackedExample] = []
    current = PackedExample([], [], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > max_length:
            packed.append(current)
            current = PackedExample([], [], [])
        labels = list(example.labels)
        if current.input_ids and labels:
            labels[0] = IGNORE_INDEX  # nothing in another example predicts this token
        current.input_ids.extend(example.input_ids)
        current.labels.extend(labels)
        current.position_ids.extend(range(len(example.input_ids)))
    if current.input_ids:
        packed.append(current)
    return packed


@dataclass
class PackedCollator:
    """Pad packed sequences; position ids restart per example and per padding run, no attention mask.

    Features without `position_ids` (unpacked evaluation examples) count as one example each.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"])
            labels[row, :length] = torch.as_tensor(feature["labels"])
            positions = feature.get("position_ids")
            position_ids[row, :length] = (
                torch.as_tensor(positions) if positions is not None else torch.arange(length)
            )
            position_ids[row, length:] = torch.arange(longest - length)
        # use_cache=False: with a (new, empty) KV cache transformers would not look for packed boundaries
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


def data_collator(spec: Any, tokenizer: Any) -> Any:
    """The collator for this run: exact packing for `training.packing` (instruction and chat), else padding."""
    from kubetune.spec import TaskType

    if spec.training.packing and spec.task.type != TaskType.completion.value:
        return PackedCollator(pad_token_id=tokenizer.pad_token_id)
    return PaddingCollator(pad_token_id=tokenizer.pad_token_id)


def dataset_columns(sequences: list[TokenizedExample]) -> dict[str, list[list[int]]]:
    """Columns of the training dataset: input_ids, labels, and position_ids for packed sequences."""
    columns = {"input_ids": [s.input_ids for s in sequences], "labels": [s.labels for s in sequences]}
    packed = [s for s in sequences if isinstance(s, PackedExample)]
    if sequences and len(packed) == len(sequences):
        columns["position_ids"] = [s.position_ids for s in packed]
    return columns


def segment_boundaries(position_ids: Any) -> Any:
    """Cumulative lengths (int32, starting at 0) of the segments of the flattened batch: a segment
    starts wherever the position id is 0 (every example, every padding run, every row)."""
    import torch

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def per_example_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: causal SDPA on each segment of `cu_seq_lens_q` (over the
    flattened batch) alone; without it, transformers' sdpa with the mask it was given."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, length, dim = query.shape
    lengths = cu_seq_lens_q.diff().tolist()

    def segments(states: Any) -> Any:  # (batch, heads, length, dim) -> per segment (1, heads, tokens, dim)
        flat = states.transpose(1, 2).reshape(batch * length, states.shape[1], dim)
        return [s.transpose(0, 1).unsqueeze(0) for s in flat.split(lengths)]

    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=True
        )
        for q, k, v in zip(segments(query), segments(key), segments(value), strict=True)
    ]
    attention = torch.cat([o.squeeze(0).transpose(0, 1) for o in outputs])
    return attention.view(batch, length, heads, value.shape[-1]), None


def use_per_example_attention(model: Any) -> bool:
    """Switch a model on sdpa or eager attention to PER_EXAMPLE_ATTENTION; False if it uses another
    (flash attention: its variable-length kernel already reads the packed boundaries)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config
    if config._attn_implementation not in ("sdpa", "eager"):
        return False
    AttentionInterface.register(PER_EXAMPLE_ATTENTION, per_example_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PER_EXAMPLE_ATTENTION, sdpa_mask)  # for the calls it hands to sdpa
    config._attn_implementation = PER_EXAMPLE_ATTENTION
    return True
