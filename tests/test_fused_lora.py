"""The fused LoRA linear layer (fused_lora.py) computes what PEFT's computes: outputs and every gradient,
with and without dropout, a base bias, autocast; and PEFT's own forward runs where it does not apply."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from kubetune_trainer.fused_lora import FusedLoraLinear, fuse_lora_layers, fused_call
from tests.support.trainer_setup import build_trainer


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 40, bias=True)
        self.down = nn.Linear(40, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def peft_model(dropout: float, bias: str = "all", **config: Any) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        TwoLayers(),
        LoraConfig(
            r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["up", "down"], bias=bias, **config
        ),
    )
    with torch.no_grad():  # B starts at zero: give it values so that the adapter path counts
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model


def outputs_and_gradients(model: nn.Module, x: torch.Tensor, seed: int = 7) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout masks
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    found = {"out": out.detach(), "x": x.grad}
    found.update({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layer_equals_peft_outputs_and_gradients(dropout: float) -> None:
    reference = peft_model(dropout)
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) == 2
    x = torch.randn(3, 5, 24)
    expected, found = outputs_and_gradients(reference, x), outputs_and_gradients(fused, x)
    assert set(found) == set(expected)
    assert {"up.base_layer.bias", "up.lora_A.default.weight", "down.lora_B.default.weight"} <= {
        name.removeprefix("base_model.model.") for name in found
    }
    for name in expected:
        torch.testing.assert_close(
            found[name], expected[name], rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_dropout_masks_differ_between_calls_and_are_off_in_eval() -> None:
    fused = peft_model(0.5)
    fuse_lora_layers(fused)
    x = torch.randn(4, 24)
    torch.manual_seed(1)
    first = fused(x)
    second = fused(x)
    assert not torch.allclose(first, second)  # dropout acts in training
    fused.eval()
    reference = peft_model(0.5).eval()
    torch.testing.assert_close(fused(x), reference(x))  # and not in eval


def test_autocast_bf16_is_as_close_to_fp32_as_peft() -> None:
    """bf16 frozen weights, fp32 adapters, autocast (precision bf16): element by element, two bf16
    computations differ by rounding, so each is compared with the fp32 computation as a whole."""
    exact_model = peft_model(0.0)
    x = torch.randn(3, 5, 24)
    exact = outputs_and_gradients(copy.deepcopy(exact_model), x)
    reference = exact_model
    for name, parameter in reference.named_parameters():
        if "lora_" not in name:
            parameter.data = parameter.data.to(torch.bfloat16)
    fused = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, found = outputs_and_gradients(reference, x), outputs_and_gradients(fused, x)

    def error(values: torch.Tensor, name: str) -> float:
        return float((values.float() - exact[name].float()).norm() / exact[name].float().norm())

    for name in expected:
        assert found[name].dtype == expected[name].dtype, name
        assert error(found[name], name) < 0.02, name
        assert error(found[name], name) < 1.5 * error(expected[name], name) + 1e-3, name


def test_peft_forward_runs_where_the_fused_one_does_not_apply() -> None:
    fused = peft_model(0.0)
    fuse_lora_layers(fused)
    reference = peft_model(0.0)
    layer = fused.base_model.model.up
    x = torch.randn(2, 24)
    assert fused_call(layer, x, (), {}) is not None
    with fused.disable_adapter(), reference.disable_adapter():
        assert fused_call(layer, x, (), {}) is None
        torch.testing.assert_close(fused(x), reference(x))
    torch.testing.assert_close(fused(x), reference(x))
    layer.merge()
    assert fused_call(layer, x, (), {}) is None
    layer.unmerge()
    assert fused_call(layer, x.double(), (), {}) is None  # mixed dtypes without autocast: PEFT's promotion
    dora = peft_model(0.0, use_dora=True)
    fuse_lora_layers(dora)
    assert fused_call(dora.base_model.model.up, x, (), {}) is None  # DoRA: PEFT's variant forward


def test_the_trainer_trains_lora_through_the_fused_layers(make_job) -> None:
    path = make_job(
        "fused",
        method={
            "type": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targetModules": ["all-linear"]},
        },
    )
    trainer = build_trainer(path)
    model = trainer.model
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    assert layers and all("forward" in m.__dict__ for m in layers)
    calls = []
    original = FusedLoraLinear.forward

    def counting(ctx: Any, *args: Any) -> Any:
        calls.append(1)
        return original(ctx, *args)

    FusedLoraLinear.forward = staticmethod(counting)  # type: ignore[method-assign]
    try:
        ids = torch.randint(0, 100, (2, 6))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.args.bf16):  # as the Trainer runs it
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        FusedLoraLinear.forward = staticmethod(original)  # type: ignore[method-assign]
    assert len(calls) == len(layers)
    assert all(m.lora_A["default"].weight.grad is not None for m in layers)
