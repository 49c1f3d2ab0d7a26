"""Exports of a real (tiny) training run: adapter, merged, int8 and onnx reload and compute what the
merged model computes; every artifact is pinned by the sha256 of its manifest and has a model card."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer.__main__ import run_trainer
from tests.support.trainer_fixtures import PYDOC

pytestmark = pytest.mark.slow  # trains the tiny model once and exports every kind

KINDS = ["adapter", "merged", "int8", "onnx"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    """One LoRA run on the tiny llama exporting every kind (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("exports")
    spec = {
        "model": {"source": str(tiny_model)},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]}},
        "task": {"type": "instruction"},
        "datasets": [{"source": str(PYDOC), "maxExamples": 60}],
        "validation": {"fraction": 0.1},
        "training": {
            "maxSteps": 3,
            "batchSizePerDevice": 4,
            "maxSeqLength": 96,
            "loggingSteps": 1,
            "learningRate": 1e-2,
        },
        "evaluation": {"numSamplePrompts": 1, "maxNewTokens": 4},
        "output": {"uri": str(root / "out"), "exports": KINDS},
        "tracking": {"tensorboard": False},
    }
    manifest = root / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "exports"},
                "spec": spec,
            }
        )
    )
    code, summary = run_trainer(str(manifest), show_progress=False)
    assert code == 0, "training with every export failed"
    return summary


@pytest.fixture(scope="module")
def merged_in_memory(run: dict[str, Any], tiny_model: Path) -> Any:
    """The merged model built in memory from the base weights and the trained adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    adapter = Path(run["output"]) / "exports" / "adapter"
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def _inputs(vocab: int, batch: int = 2, length: int = 11) -> tuple[Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, max(1, length - 3) :] = (
        0  # right padding in the last row (a row with no token at all is undefined)
    )
    return ids, mask


def _logits(model: Any, ids: Any, mask: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def _artifact(run: dict[str, Any], kind: str) -> dict[str, Any]:
    matches = [a for a in run["artifacts"] if a["kind"] == kind]
    assert len(matches) == 1, f"{kind}: {run['artifacts']}"
    return matches[0]


@pytest.mark.parametrize("kind", KINDS)
def test_artifact_is_pinned_by_its_manifest_and_has_a_model_card(run: dict[str, Any], kind: str) -> None:
    artifact = _artifact(run, kind)
    assert {"kind", "uri", "sha256", "sizeBytes"} <= set(artifact)
    directory = Path(artifact["uri"])
    manifest_path = directory / "manifest.json"
    assert artifact["sha256"] == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    manifest = json.loads(manifest_path.read_text())
    assert artifact["sizeBytes"] == sum(f["size"] for f in manifest["files"]) > 0
    for entry in manifest["files"]:  # the manifest pins every byte
        assert hashlib.sha256((directory / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    card = (directory / "README.md").read_text()
    assert f"({kind})" in card and "held-out perplexity" in card and "## Hyperparameters" in card


def test_merged_reloads_exactly(run: dict[str, Any], merged_in_memory: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        Path(run["output"]) / "exports" / "merged", dtype=torch.float32
    ).eval()
    ids, mask = _inputs(merged_in_memory.config.vocab_size)
    expected = _logits(merged_in_memory, ids, mask)
    assert torch.allclose(_logits(reloaded, ids, mask), expected, atol=1e-5, rtol=0)


def test_int8_reloads_and_reports_its_perplexity_change(run: dict[str, Any], merged_in_memory: Any) -> None:
    import torch

    from kubetune_trainer.export_formats import INT8_CONFIG, int8_module_names, load_int8, quantize_int8

    directory = Path(run["output"]) / "exports" / "int8"
    info = json.loads((directory / INT8_CONFIG).read_text())
    # the tied output head stays tied to the (fp32) embeddings; every other Linear is quantized
    assert "lm_head" not in info["modules"] and len(info["modules"]) == 2 * 7
    reloaded = load_int8(directory)
    ids, mask = _inputs(merged_in_memory.config.vocab_size)
    expected = _logits(merged_in_memory, ids, mask)
    got = _logits(reloaded, ids, mask)
    # the reload computes exactly what quantizing the in-memory merged model computes ...
    fresh, backend = quantize_int8(merged_in_memory, int8_module_names(merged_in_memory), info["backend"])
    assert backend == info["backend"]
    assert torch.allclose(got, _logits(fresh, ids, mask), atol=1e-5, rtol=0)
    # ... which is close to, but not exactly, the fp32 logits
    error = (got - expected).abs().max().item()
    assert 0 < error < 0.05 * expected.abs().max().item() + 0.05, error

    details = _artifact(run, "int8")
    assert details["int8Backend"] == info["backend"]
    assert details["int8QuantizedLinearLayers"] == 14
    assert details["fp32WeightsBytes"] > 0 and details["int8WeightsBytes"] > 0
    for key in ("fp32Perplexity", "int8Perplexity"):
        assert math.isfinite(details[key]) and details[key] > 1
    assert details["int8PerplexityChange"] == pytest.approx(
        details["int8Perplexity"] - details["fp32Perplexity"], abs=1e-3
    )
    assert abs(details["int8PerplexityChangePercent"]) < 5
    # the fp32 perplexity is the run's final held-out perplexity, measured again on the merged model
    assert details["fp32Perplexity"] == pytest.approx(run["metrics"]["finalPerplexity"], rel=1e-2)
    card = (directory / "README.md").read_text()
    assert "int8Perplexity" in card and "fp32Perplexity" in card


def test_onnx_matches_pytorch_with_dynamic_axes(run: dict[str, Any], merged_in_memory: Any) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from kubetune_trainer.export_formats import ONNX_TOLERANCE

    path = Path(run["output"]) / "exports" / "onnx" / "model.onnx"
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    for value in graph.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param for d in dims), f"{value.name} has fixed axes"
    assert [o.name for o in graph.graph.output] == ["logits"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((2, 11), (4, 3)):
        ids, mask = _inputs(merged_in_memory.config.vocab_size, batch, length)
        expected = _logits(merged_in_memory, ids, mask).numpy()
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert got.shape == expected.shape
        assert float(np.max(np.abs(got - expected))) <= ONNX_TOLERANCE

    details = _artifact(run, "onnx")
    assert 0 <= details["onnxMaxAbsDiff"] <= details["tolerance"] == ONNX_TOLERANCE
    assert details["opset"] == next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


# ------------------------------------------------------------------------- without a training run


class _Ctx:
    def __init__(self, work_dir: Path, rank: int = 0, world_size: int = 1):
        self.work_dir, self.rank, self.world_size = work_dir, rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _Trainer:
    def __init__(self, model: Any):
        self.model = model


def _spec() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        model=SimpleNamespace(trust_remote_code=False), method=SimpleNamespace(quantization=None)
    )


def test_weight_only_backend_round_trips(tmp_path: Path, tiny_model: Path) -> None:
    """The plain-PyTorch int8 backend (used when torch.ao.quantization is gone) saves and reloads."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.export_formats import INT8_CONFIG, int8_module_names, load_int8, quantize_int8

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    names = int8_module_names(model)
    quantized, backend = quantize_int8(model, names, backend="weight-only")
    assert backend == "weight-only"
    assert type(quantized.model.layers[0].mlp.down_proj).__name__ == "Int8WeightOnlyLinear"
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # the input is left alone
    model.config.save_pretrained(tmp_path)
    torch.save(quantized.state_dict(), tmp_path / "w.pt")
    (tmp_path / INT8_CONFIG).write_text(json.dumps({"backend": backend, "modules": names, "weights": "w.pt"}))
    ids, mask = _inputs(model.config.vocab_size)
    reloaded = _logits(load_int8(tmp_path), ids, mask)
    assert torch.allclose(reloaded, _logits(quantized, ids, mask), atol=1e-5, rtol=0)
    assert (reloaded - _logits(model, ids, mask)).abs().max().item() < 0.05


def test_every_export_kind_of_the_spec_has_an_exporter() -> None:
    from kubetune.spec import ExportKind
    from kubetune_trainer.exports import EXPORTERS

    missing = [kind.value for kind in ExportKind if not callable(EXPORTERS.get(kind))]
    assert not missing, f"ExportKind values with no exporter in kubetune_trainer.exports.EXPORTERS: {missing}"
    assert set(EXPORTERS) == set(ExportKind)


def test_other_ranks_export_nothing(tmp_path: Path) -> None:
    from kubetune.spec import ExportKind
    from kubetune_trainer.exports import EXPORTERS

    class Peft:
        peft_config = {"default": None}

    for kind in ("int8", "onnx"):
        target = tmp_path / kind
        details = EXPORTERS[ExportKind(kind)](
            trainer=_Trainer(Peft()),
            target=target,
            base_model_dir="unused",
            spec=_spec(),
            tokenizer=None,
            adapter_dir=tmp_path / "adapter",
            eval_set=None,
            ctx=_Ctx(tmp_path, rank=1, world_size=2),
        )
        assert details == {} and not target.exists()


def test_onnx_parity_failure_is_a_clear_error(
    tmp_path: Path, tiny_model: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full fine-tune (no adapter) is exported from a reloaded copy; a parity failure stops the export."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import export_formats
    from kubetune_trainer.errors import ConfigError

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    monkeypatch.setattr(
        export_formats, "_export_onnx_graph", lambda module, path, vocab: path.write_bytes(b"")
    )
    monkeypatch.setattr(export_formats, "onnx_parity", lambda path, module, vocab: 0.25)
    with pytest.raises(
        export_formats.ExportError, match=r"differ from PyTorch by up to 0.25 \(tolerance 0.001\)"
    ):
        export_formats.export_onnx(
            trainer=_Trainer(model),
            target=tmp_path / "onnx",
            base_model_dir="unused",
            spec=_spec(),
            tokenizer=tokenizer,
            adapter_dir=tmp_path,
            ctx=_Ctx(tmp_path),
        )
    assert issubclass(export_formats.ExportError, ConfigError)  # not retried: exit code 3
    assert all(p.requires_grad for p in model.parameters())  # the trainer's own model was not modified
    assert not (tmp_path / "exports" / ".onnx-source").exists()  # the reload copy is cleaned up
