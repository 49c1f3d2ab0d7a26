"""Attention for training on CPU: per packed example, and in fp32 when the activations are bf16.

Registered with transformers as CPU_ATTENTION (use_cpu_attention switches a model on sdpa to it):

- a packed batch (packing.py) carries `cu_seq_lens_q`, the boundaries of its examples over the
  flattened batch (segment_boundaries; the trainer's compute_loss adds them). Causal SDPA then runs on
  each example alone: the work of the unpacked examples without their padding, where transformers'
  block-diagonal mask costs the full square of every row (SDPA cannot skip masked blocks on CPU);
- bf16 query, key and value are computed in fp32 and the result cast back: torch's CPU flash
  attention backward in bf16 is several times slower than in fp32 (bench/README.md), and attention
  is a small share of the FLOPs;
- every other call (generation, unpacked batches with a mask) is transformers' sdpa with its mask.
"""

from __future__ import annotations

from typing import Any

CPU_ATTENTION = "kubetune_cpu_sdpa"


def segment_boundaries(position_ids: Any) -> Any:
    """Cumulative lengths (int32, starting at 0) of the segments of the flattened batch: a segment
    starts wherever the position id is 0 (every example, every padding run, every row)."""
    import torch

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def cpu_sdpa(
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
    """transformers attention function: causal SDPA on each segment of `cu_seq_lens_q` alone, or
    transformers' sdpa with the mask it was given; bf16 inputs computed in fp32 (autocast, which
    would cast them back to bf16, is off inside)."""
    import torch

    with torch.autocast(query.device.type, enabled=False):
        return _cpu_sdpa(module, query, key, value, attention_mask, dropout, scaling, cu_seq_lens_q, **kwargs)


def _cpu_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float,
    scaling: float | None,
    cu_seq_lens_q: Any,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.bfloat16:
        query, key, value = query.float(), key.float(), value.float()
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return output.to(dtype), None
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
    return attention.view(batch, length, heads, value.shape[-1]).to(dtype), None


def use_cpu_attention(model: Any) -> bool:
    """Switch a transformers model on sdpa attention to CPU_ATTENTION; False (unchanged) otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config
    if config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(CPU_ATTENTION, cpu_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_ATTENTION, sdpa_mask)  # for the calls it hands to sdpa
    config._attn_implementation = CPU_ATTENTION
    return True
