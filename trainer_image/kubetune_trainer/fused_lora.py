"""LoRA linear layers as one autograd function: the same arithmetic as PEFT's, fewer passes over memory.

PEFT computes a LoRA linear layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the three
matmuls, the forward writes and reads the `(tokens, out_features)` output three more times (the scaled
adapter output, the sum), the backward multiplies the gradient by the scaling once more, and autograd
adds the two gradients that reach `x` (through the base weight and through `lora_A`). On a CPU those
elementwise passes are memory-bound: with LoRA on the seven projections of a small model they were a
tenth of a training step (bench/README.md).

`FusedLoraLinear` does the same arithmetic as GEMMs that accumulate in place:

    forward   y = x W^T + b;  h = dropout(x) A^T;  y += scaling * h B^T          (addmm_, alpha=scaling)
    backward  g_h = scaling * g B;  dB = scaling * g^T h;  dA = g_h^T dropout(x)
              dx = g W + (g_h A) * dropout_mask                                  (one addmm)

Dropout draws its mask the way `torch.nn.Dropout` does on a CPU (a Bernoulli tensor scaled by
1 / (1 - p)), so with the same seed the fused layer and PEFT's compute the same numbers. Under autocast
the matmuls run in the autocast dtype, as PEFT's do; the gradients come back in each input's dtype.

`fuse_lora_layers(model)` gives every PEFT `lora.Linear` of a model this forward; a call the fused path
does not cover (adapters disabled or merged, several or mixed adapters, DoRA and other variants, a
base layer that is not a plain `nn.Linear` such as a 4-bit one, parameters that ZeRO-3 or FSDP2 shard)
takes PEFT's own forward, so the result never depends on which path ran.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


class FusedLoraLinear(torch.autograd.Function):
    """`x W^T + b + scaling * dropout(x) A^T B^T` with its gradients, in GEMMs that accumulate in place."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout: float,
        training: bool,
    ) -> torch.Tensor:
        dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            weight_c, lora_a_c, lora_b_c = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            out = rows.mm(weight_c.t()) if bias is None else torch.addmm(bias.to(dtype), rows, weight_c.t())
            noise = None
            dropped = rows
            if training and dropout > 0:
                noise = torch.empty_like(rows).bernoulli_(1 - dropout).div_(1 - dropout)
                dropped = rows * noise
            hidden = dropped.mm(lora_a_c.t())
            out.addmm_(hidden, lora_b_c.t(), alpha=scaling)
        ctx.save_for_backward(dropped, weight_c, hidden, lora_a_c, lora_b_c, noise)
        ctx.scaling = scaling
        ctx.x_meta = (x.shape, x.dtype)
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        dropped, weight, hidden, lora_a, lora_b, noise = ctx.saved_tensors
        scaling = ctx.scaling
        x_shape, x_dtype = ctx.x_meta
        a_dtype, b_dtype, bias_dtype = ctx.param_dtypes
        needs_x, _, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            grad_hidden = g.mm(lora_b).mul_(scaling)
            grad_b = g.t().mm(hidden).mul_(scaling).to(b_dtype) if needs_b else None
            grad_a = grad_hidden.t().mm(dropped).to(a_dtype) if needs_a else None
            grad_bias = g.sum(0).to(bias_dtype) if needs_bias else None
            grad_x = None
            if needs_x:
                through_adapter = grad_hidden.mm(lora_a)
                if noise is not None:
                    through_adapter.mul_(noise)
                grad_x = torch.addmm(through_adapter, g, weight).view(x_shape).to(x_dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def _plain(tensor: torch.Tensor | None) -> bool:
    """A whole, ordinary tensor: not sharded by ZeRO-3 (ds_id) or FSDP2 (a DTensor), not quantized."""
    return tensor is None or (
        type(tensor) in (torch.Tensor, nn.Parameter) and not hasattr(tensor, "ds_id") and tensor.dim() <= 2
    )


def fused_call(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The fused forward of a PEFT lora.Linear for this call, or None where PEFT's own must run."""
    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    base, lora_a, lora_b, dropout = (
        layer.base_layer,
        layer.lora_A[name],
        layer.lora_B[name],
        layer.lora_dropout[name],
    )
    if type(base) is not nn.Linear or base.weight.requires_grad or lora_b.bias is not None:
        return None
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return None
    if not all(_plain(t) for t in (base.weight, base.bias, lora_a.weight, lora_b.weight)):
        return None
    mixed = {x.dtype, base.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}
    if len(mixed) > 1 and not torch.is_autocast_enabled(x.device.type):
        return None  # PEFT's promotion rules for mixed dtypes without autocast
    rate = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return FusedLoraLinear.apply(
        x,
        base.weight,
        base.bias,
        lora_a.weight,
        lora_b.weight,
        float(layer.scaling[name]),
        rate,
        dropout.training,
    )


def fuse_lora_layers(model: Any) -> int:
    """Give every PEFT lora.Linear in `model` the fused forward (PEFT's where it does not apply);
    returns how many layers were given it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is not LoraLinear or "forward" in module.__dict__:
            continue
        module.forward = types.MethodType(_fused_or_peft_forward, module)  # type: ignore[method-assign]
        count += 1
    return count


def _fused_or_peft_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """A lora.Linear's forward: the fused one where it applies, PEFT's class forward otherwise."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = fused_call(layer, x, args, kwargs)
    return LoraLinear.forward(layer, x, *args, **kwargs) if fused is None else fused
