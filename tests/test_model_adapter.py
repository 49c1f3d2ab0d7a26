"""model.adapter: a job that starts from an earlier job's output, for real on a tiny llama.

SFT (LoRA) -> its merged export as model.source, or its adapter (local, s3://) as model.adapter -> DPO
(the usual SFT-then-DPO recipe), and continued SFT from an adapter. The adapter is merged into the base
first, so the model before training, and DPO's reference model, is the SFT model: the tests compare
log-probabilities with those of base + SFT adapter computed here with PEFT, and with the raw base's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.spec import EXIT_CONFIG_ERROR
from kubetune_trainer.__main__ import run_trainer
from tests.support.tiny_model import tiny_llama_dir
from tests.support.trainer_fixtures import REPO, write_job

PAIRS = REPO / "examples" / "data" / "pydoc_preferences.jsonl"
LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
METHODS = {
    "lora": LORA,
    "full": {"type": "full"},
    "qlora": {
        **LORA,
        "type": "qlora",
        "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"},
    },
}
# the held-out pairs every DPO job here is measured on (their log-probabilities are compared)
HELD_OUT = {"datasets": [{"source": str(PAIRS), "maxExamples": 4}]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Path]:
    """A directory for this module's jobs, with its own kubetune cache (merged models, S3 downloads), so
    that what a test merges is what these tests did. The tiny model is built before, in the usual cache."""
    directory = tmp_path_factory.mktemp("adapter")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBETUNE_CACHE", str(directory / "cache"))
        yield directory


@pytest.fixture(scope="module")
def sft(workdir: Path, tiny_model: Path) -> dict[str, Any]:
    """An SFT LoRA job on the pydoc instructions that moves the model a lot: its summary (adapter and
    merged exports)."""
    job = write_job(
        workdir,
        tiny_model,
        "sft",
        method=LORA,
        training={"maxSteps": 6, "learningRate": 1e-2, "precision": "fp32"},
        evaluation={"numSamplePrompts": 0},
        output={"exports": ["adapter", "merged"]},
    )
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0
    return summary


def export_dir(summary: dict[str, Any], kind: str) -> str:
    return next(a["uri"] for a in summary["artifacts"] if a["kind"] == kind)


def dpo_job(workdir: Path, name: str, model: dict[str, Any], method: str = "lora", **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "model": model,
        "method": METHODS[method],
        "task": {"type": "preference", "template": "plain", "preference": {"objective": "dpo", "beta": 0.1}},
        "datasets": [{"source": str(PAIRS), "maxExamples": 40}],
        "validation": HELD_OUT,
        "training": {
            "maxSteps": 3,
            "batchSizePerDevice": 4,
            "maxSeqLength": 64,
            "loggingSteps": 1,
            "learningRate": 2e-3 if method == "full" else 1e-2,
            "precision": "fp32",
        },
        "evaluation": {"numSamplePrompts": 0},
        "output": {"exports": ["merged"] if method == "full" else ["adapter"]},
        **overrides,
    }
    return write_job(workdir, Path(model["source"]), name, **spec)


def reference_logps(job: Path, base: str, adapter: str | None) -> list[dict[str, float]]:
    """The held-out pairs' log-probabilities under `base` with `adapter` applied by PEFT (not merged), the
    pairs tokenized as the trainer does."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.manifest import load_job
    from kubetune_trainer import data as data_lib
    from kubetune_trainer import preference_data
    from kubetune_trainer.models import cache_root, load_tokenizer
    from kubetune_trainer.preference import pair_logps

    spec = load_job(job).spec
    tokenizer = load_tokenizer(base)
    rows = data_lib.prepare_rows(spec, cache_root() / "data").validation
    pairs = preference_data.tokenize_rows(rows, tokenizer, spec, False, training=False)[0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return pair_logps(model, pairs, tokenizer.pad_token_id)


def before_training(summary: dict[str, Any]) -> list[dict[str, float]]:
    """The held-out pairs' log-probabilities under the model before training (the DPO reference)."""
    return json.loads((Path(summary["output"]) / "baseline.json").read_text())["logps"]


def assert_same_logps(
    got: list[dict[str, float]], expected: list[dict[str, float]], tolerance: float
) -> None:
    assert len(got) == len(expected) == 4
    for pair, reference in zip(got, expected, strict=True):
        for side in ("chosen", "rejected"):
            assert pair[side] == pytest.approx(reference[side], abs=tolerance), (side, pair, reference)


def merged_models(workdir: Path) -> dict[str, float]:
    """{merged model directory: when its completion marker was written} in this module's cache."""
    from kubetune_trainer.model_cache import CACHE_MARKER

    root = workdir / "cache" / "models" / "merged"
    return {p.name: (p / CACHE_MARKER).stat().st_mtime for p in root.glob("*") if (p / CACHE_MARKER).exists()}


def test_dpo_from_the_merged_export_of_an_sft_job(
    workdir: Path, sft: dict[str, Any], tiny_model: Path
) -> None:
    merged = export_dir(sft, "merged")
    job = dpo_job(workdir, "dpo-from-merged", {"source": merged})
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0 and summary["steps"] == 3 and summary["model"] == merged
    sft_model = reference_logps(job, str(tiny_model), export_dir(sft, "adapter"))
    assert_same_logps(before_training(summary), sft_model, 1e-3)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_from_an_sft_adapter_starts_from_the_sft_model(
    workdir: Path, sft: dict[str, Any], tiny_model: Path, method: str
) -> None:
    adapter = export_dir(sft, "adapter")
    job = dpo_job(
        workdir, f"dpo-{method}-on-adapter", {"source": str(tiny_model), "adapter": adapter}, method
    )
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0 and summary["steps"] == 3 and summary["adapter"] == adapter
    assert (summary["modelInfo"]["trainableParameters"] == summary["modelInfo"]["parameters"]) == (
        method == "full"
    )
    # the reference (lora: the merged model with the new adapter disabled; full: log-probabilities
    # precomputed with the merged model) is base + SFT adapter, not the base
    sft_model = reference_logps(job, str(tiny_model), adapter)
    assert_same_logps(before_training(summary), sft_model, 1e-3)
    base_model = reference_logps(job, str(tiny_model), None)
    assert max(abs(a["chosen"] - b["chosen"]) for a, b in zip(sft_model, base_model, strict=True)) > 1.0
    assert summary["metrics"]["finalRewardMargin"] > 0
    # the export holds all three: base, SFT adapter and the DPO update
    kind = "merged" if method == "full" else "adapter"
    card = (Path(export_dir(summary, kind)) / "README.md").read_text()
    assert f"with the adapter `{adapter}` merged in" in card
    assert len(merged_models(workdir)) == 1  # one merge of this base and adapter, whichever job asked


def test_qlora_quantizes_the_merged_model(workdir: Path, sft: dict[str, Any], tiny_model: Path) -> None:
    adapter = export_dir(sft, "adapter")
    job = dpo_job(workdir, "dpo-qlora-on-adapter", {"source": str(tiny_model), "adapter": adapter}, "qlora")
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0 and summary["modelInfo"]["linear4bitLayers"] > 0
    # 4-bit weights move the log-probabilities a little; those of the SFT model, not of the base
    before = before_training(summary)
    sft_model = reference_logps(job, str(tiny_model), adapter)
    base_model = reference_logps(job, str(tiny_model), None)

    def distance(logps: list[dict[str, float]]) -> float:
        return sum(abs(a["chosen"] - b["chosen"]) for a, b in zip(before, logps, strict=True))

    assert distance(sft_model) < distance(base_model) / 4, (distance(sft_model), distance(base_model))


def test_dpo_from_an_sft_adapter_in_s3_is_merged_once(
    workdir: Path,
    sft: dict[str, Any],
    tiny_model: Path,
    s3_server: Any,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune import storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    adapter = f"{s3_prefix}/sft/exports/adapter/"
    storage.upload_tree(export_dir(sft, "adapter"), adapter, options=s3_server.options())
    from kubetune.spec import ModelSpec
    from kubetune_trainer.models import resolve_model_dir

    resolve_model_dir(ModelSpec(source=str(tiny_model), adapter=export_dir(sft, "adapter")))  # merged here
    merged = merged_models(workdir)
    assert len(merged) == 1
    job = dpo_job(
        workdir,
        "dpo-s3-adapter",
        {"source": str(tiny_model), "adapter": adapter},
        storage={"s3": {"endpointUrl": s3_server.endpoint_url, "addressingStyle": "path"}},
    )
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0 and summary["steps"] == 3
    assert merged_models(workdir) == merged  # the same content: the same merged model, not merged again
    assert_same_logps(
        before_training(summary), reference_logps(job, str(tiny_model), export_dir(sft, "adapter")), 1e-3
    )


def test_continued_sft_from_an_adapter(workdir: Path, sft: dict[str, Any], tiny_model: Path) -> None:
    """The same data and split as the SFT job: the next job's held-out loss before training is the SFT
    job's after training."""
    job = write_job(
        workdir,
        tiny_model,
        "sft-continued",
        model={"source": str(tiny_model), "adapter": export_dir(sft, "adapter")},
        method=LORA,
        training={"maxSteps": 2, "learningRate": 1e-3, "precision": "fp32"},
        evaluation={"numSamplePrompts": 0},
    )
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0
    assert summary["metrics"]["baselineEvalLoss"] == pytest.approx(sft["metrics"]["finalEvalLoss"], abs=1e-4)
    # (not the base's: without the adapter the loss before training would be the SFT job's before training)
    assert sft["metrics"]["baselineEvalLoss"] - summary["metrics"]["baselineEvalLoss"] > 0.05


def test_an_adapter_of_another_model_is_refused(
    workdir: Path, sft: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    for model, expected in (
        (tiny_llama_dir(hidden=32), "size mismatch"),
        (tiny_llama_dir(layers=3), "has no weights for 7 of model.source's modules"),
    ):
        adapter = export_dir(sft, "adapter")
        job = dpo_job(workdir, f"mismatch-{model.name}", {"source": str(model), "adapter": adapter})
        code, _ = run_trainer(str(job), show_progress=False)
        output = capsys.readouterr()
        assert code == EXIT_CONFIG_ERROR
        assert f"model.adapter {adapter} does not fit model.source {model}" in output.err + output.out
        assert expected in output.err + output.out


def test_a_directory_without_adapter_config_is_refused(
    workdir: Path, sft: dict[str, Any], tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    merged = export_dir(sft, "merged")  # a whole model, not an adapter
    job = dpo_job(workdir, "not-an-adapter", {"source": str(tiny_model), "adapter": merged})
    code, _ = run_trainer(str(job), show_progress=False)
    output = capsys.readouterr()
    assert code == EXIT_CONFIG_ERROR
    assert f"model.adapter {merged}: no adapter_config.json there" in output.err + output.out
    assert "give it as model.source instead" in output.err + output.out
    missing = os.path.join(str(workdir), "nowhere")
    job = dpo_job(workdir, "no-adapter-dir", {"source": str(tiny_model), "adapter": missing})
    assert run_trainer(str(job), show_progress=False)[0] == EXIT_CONFIG_ERROR
    assert f"model.adapter {missing}: no such directory" in "".join(capsys.readouterr())


def test_estimate_with_an_adapter(workdir: Path, sft: dict[str, Any], tiny_model: Path) -> None:
    from kubetune_trainer.estimate import estimate

    plain = dpo_job(workdir, "estimate-plain", {"source": str(tiny_model)})
    chained = dpo_job(
        workdir, "estimate-chained", {"source": str(tiny_model), "adapter": export_dir(sft, "adapter")}
    )
    without, with_adapter = (estimate(job, gpu="H100-SXM", gpus=1) for job in (plain, chained))
    assert with_adapter["memory"] == without["memory"] and with_adapter["flops"] == without["flops"]
    assert with_adapter["model"]["adapter"] == export_dir(sft, "adapter")
    assert any("model.adapter" in a and "merged into the base" in a for a in with_adapter["assumptions"])
