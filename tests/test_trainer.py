"""Real training on a tiny llama: every method x task, precision choice, exit codes, the summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.spec import EXIT_CONFIG_ERROR
from kubetune_trainer.__main__ import run_trainer
from tests.support.trainer_fixtures import REPO

pytestmark = pytest.mark.slow  # trains the tiny model end to end

DATA = REPO / "examples" / "data"
TASK_DATA = {
    "instruction": {"source": str(DATA / "pydoc_instructions.jsonl"), "maxExamples": 40},
    "chat": {"source": str(DATA / "pydoc_chat.jsonl"), "maxExamples": 30},
    "completion": {"source": str(DATA / "pydoc_modules.txt")},
}
METHODS = {
    "full": {"type": "full"},
    "lora": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}},
    "qlora": {
        "type": "qlora",
        "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"},
    },
}


@pytest.mark.parametrize("task", sorted(TASK_DATA))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_by_task_trains(make_job, method: str, task: str) -> None:
    exports = ["merged"] if method == "full" else ["adapter", "merged"]
    path = make_job(
        f"{method}-{task}",
        method=METHODS[method],
        task={"type": task},
        datasets=[TASK_DATA[task]],
        output={"exports": exports},
    )
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0
    assert summary["steps"] == 3 and summary["trainedTokens"] > 0
    assert math.isfinite(summary["trainLoss"])
    info = summary["modelInfo"]
    if method == "full":
        assert info["trainableParameters"] == info["parameters"]
    else:
        assert 0 < info["trainableParameters"] < info["parameters"] / 2
    assert (info["linear4bitLayers"] > 0) == (method == "qlora")
    kinds = {a["kind"] for a in summary["artifacts"]}
    assert set(exports) <= kinds
    output = Path(summary["output"])
    on_disk = json.loads((output / "summary.json").read_text())
    assert on_disk["steps"] == 3
    # the merged model loads with plain transformers (no peft) and has no adapter weights left
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(output / "exports" / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_summary_is_written_last_and_checkpoints_are_complete(make_job) -> None:
    path = make_job(
        "order",
        training={"maxSteps": 4},
        checkpoint={"everySteps": 2, "keepLast": 1},
        tracking={"tensorboard": True},
    )
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0
    output = Path(summary["output"])
    summary_time = (output / "summary.json").stat().st_mtime
    newest_other = max(
        p.stat().st_mtime for p in output.rglob("*") if p.is_file() and p.name != "summary.json"
    )
    assert summary_time >= newest_other
    steps = sorted(p.name for p in (output / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-4"]  # keepLast 1
    import transformers.trainer

    assert transformers.trainer.PREFIX_CHECKPOINT_DIR == "checkpoint"  # our step-N naming did not leak
    manifest = json.loads((output / "checkpoints" / "step-4" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["configHash"] == summary["configHash"]
    assert {f["path"] for f in manifest["files"]} >= {
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
    }
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (output / "samples" / "samples.jsonl").read_text().splitlines()
    assert samples and {"prompt", "before", "after"} <= set(json.loads(samples[0]))


def test_checkpoint_prefix_is_confined_and_restored() -> None:
    """The one rebinding of a transformers global (the checkpoint directory name) is undone on exit,
    also when saving fails."""
    import transformers.trainer

    from kubetune_trainer.train import checkpoint_prefix

    assert transformers.trainer.PREFIX_CHECKPOINT_DIR == "checkpoint"
    with checkpoint_prefix():
        assert transformers.trainer.PREFIX_CHECKPOINT_DIR == "step"
    assert transformers.trainer.PREFIX_CHECKPOINT_DIR == "checkpoint"
    with pytest.raises(OSError), checkpoint_prefix():
        raise OSError("disk full")
    assert transformers.trainer.PREFIX_CHECKPOINT_DIR == "checkpoint"


def test_precision_choice_on_cpu() -> None:
    from kubetune_trainer.errors import ConfigError
    from kubetune_trainer.models import cpu_has_native_bf16, pick_precision

    native = "bf16" if cpu_has_native_bf16() else "fp32"  # no GPU here
    assert pick_precision("auto", "lora") == pick_precision("auto", "qlora") == native
    assert pick_precision("auto", "full") == "fp32"
    assert pick_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16")


def test_bf16_training_runs_on_cpu(make_job) -> None:
    path = make_job("bf16", training={"precision": "bf16", "maxSteps": 2})
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0 and summary["precision"] == "bf16"


def test_data_error_exits_with_do_not_retry_code(make_job, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    path = make_job("bad", datasets=[{"source": str(bad)}])
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(path)], capture_output=True, text=True
    )
    assert result.returncode == EXIT_CONFIG_ERROR
    assert f"{bad}:2: not valid JSON" in result.stderr
    assert not (tmp_path / "out-bad" / "summary.json").exists()


def test_offline_hub_id_is_a_clear_error(make_job) -> None:
    path = make_job("hub", model={"source": "meta-llama/Llama-3.2-1B"})
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == EXIT_CONFIG_ERROR and summary is None


@pytest.mark.slow
def test_bundled_smollm2_loss_goes_down(make_job) -> None:
    path = make_job(
        "smol",
        model={"source": "bundled://smollm2-135m-instruct"},
        task={"type": "instruction", "template": "chat-template"},
        datasets=[{"source": str(DATA / "pydoc_instructions.jsonl"), "maxExamples": 120}],
        validation={"fraction": 0.1},
        training={
            "maxSteps": 8,
            "batchSizePerDevice": 4,
            "maxSeqLength": 128,
            "learningRate": 1e-3,
            "loggingSteps": 1,
        },
    )
    code, summary = run_trainer(str(path), show_progress=False)
    assert code == 0
    metrics = summary["metrics"]
    assert metrics["finalEvalLoss"] < metrics["baselineEvalLoss"] - 0.05, metrics
    assert metrics["finalPerplexity"] < metrics["baselinePerplexity"]


def test_selective_logits_loss_equals_full_loss(tiny_model: Path, tmp_path: Path) -> None:
    """Logits only for tokens whose next token is learned (per row), no attention mask on a right-padded
    batch: the loss and the adapter gradients are transformers' full-logits, masked ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kubetune_trainer.train import accepts_logits_to_keep, make_trainer, selected_logits_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    model = get_peft_model(model, config)
    assert accepts_logits_to_keep(model)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 20))
    labels = ids.clone()
    for row, prompt in enumerate([8, 3, 12]):  # prompts of different lengths
        labels[row, :prompt] = -100
    labels[1, 15:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ids[1, 15:] = 0
    trainer = make_trainer(
        seed=0,
        group_by_length=True,
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
    )
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    model_inputs, target = selected_logits_inputs(model, batch)
    assert "attention_mask" not in model_inputs  # right padding: causal attention alone is exact
    assert target.numel() == (labels[:, 1:] != -100).sum()  # one logit row per learned token
    lora = [p for n, p in model.named_parameters() if "lora" in n]
    ours = trainer.compute_loss(model, dict(batch))
    ours_grads = torch.autograd.grad(ours, lora)
    reference = model(**batch).loss
    reference_grads = torch.autograd.grad(reference, lora)
    assert abs(ours.item() - reference.item()) < 1e-5
    for got, expected in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    left_padded = {**batch, "attention_mask": mask.flip(1)}
    assert "attention_mask" in selected_logits_inputs(model, left_padded)[0]  # left padding keeps the mask
