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

On CPU the block-diagonal mask costs the full square of every row (SDPA cannot skip masked blocks):
there the trainer runs attention per example instead (attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_trainer.data import IGNORE_INDEX, PaddingCollator, TokenizedExample


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
