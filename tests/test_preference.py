"""Preference tuning for real on a tiny llama: DPO/KTO/ORPO x full/LoRA/QLoRA with TRL's trainers,
data errors with file:line, truncation counts, resume after SIGKILL, torchrun with 2 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.spec import EXIT_CONFIG_ERROR, CleaningSpec, DatasetSpec
from kubetune_trainer import preference_data
from kubetune_trainer.__main__ import run_trainer
from kubetune_trainer.data import Row, load_dataset_rows
from kubetune_trainer.errors import DataError
from tests.support.trainer_fixtures import ENV, REPO, free_port, kill_after_checkpoint, two_ranks, write_jsonl

DATA = REPO / "examples" / "data"
PAIRS = {"source": str(DATA / "pydoc_preferences.jsonl"), "maxExamples": 40}
# Eight training pairs in one batch: every step sees the same pairs, so their loss and rewards must move.
FIXED_PAIRS = {"source": str(DATA / "pydoc_preferences.jsonl"), "maxExamples": 8}
CHAT_PAIRS = {"source": str(DATA / "pydoc_preferences_chat.jsonl"), "maxExamples": 40}
METHODS = {
    "full": {"type": "full"},
    "lora": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
    "qlora": {
        "type": "qlora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"},
    },
}
OBJECTIVES = {
    "dpo": {"objective": "dpo", "beta": 0.1},
    "ipo": {"objective": "dpo", "lossType": "ipo", "beta": 0.1},
    "kto": {"objective": "kto", "beta": 0.1},
    "orpo": {"objective": "orpo", "beta": 0.1},
}
LEARNING_RATE = {"full": 2e-3, "lora": 1e-2, "qlora": 1e-2}


def preference_job(
    make_job: Any, name: str, objective: str = "dpo", method: str = "lora", **overrides: Any
) -> Path:
    spec: dict[str, Any] = {
        "method": METHODS[method],
        "task": {"type": "preference", "template": "plain", "preference": OBJECTIVES[objective]},
        "datasets": [PAIRS],
        "validation": {"fraction": 0.1, "maxExamples": 4},
        "training": {
            "maxSteps": 5,
            "batchSizePerDevice": 4,
            "maxSeqLength": 64,
            "loggingSteps": 1,
            "learningRate": LEARNING_RATE[method],
            "precision": "fp32",
        },
        "evaluation": {"numSamplePrompts": 1, "maxNewTokens": 4},
        "output": {"exports": ["merged"] if method == "full" else ["adapter"]},
    }
    spec.update(overrides)
    return make_job(name, **spec)


def train_logs(output: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r and "eval_loss" not in r and "train_loss" not in r]


@pytest.mark.parametrize(
    ("objective", "method"),
    [
        ("dpo", "lora"),
        ("dpo", "full"),
        ("dpo", "qlora"),
        ("ipo", "lora"),
        ("kto", "lora"),
        ("kto", "full"),
        ("kto", "qlora"),
        ("orpo", "lora"),
        ("orpo", "full"),
        ("orpo", "qlora"),
    ],
)
def test_objective_by_method_learns_the_preference(make_job, objective: str, method: str) -> None:
    job = preference_job(
        make_job,
        f"{objective}-{method}",
        objective,
        method,
        datasets=[FIXED_PAIRS],
        validation={"datasets": [{**FIXED_PAIRS, "maxExamples": 4}]},  # training pairs
        evaluation={"numSamplePrompts": 0},
        training={
            "maxSteps": 4,
            "batchSizePerDevice": 8,
            "maxSeqLength": 64,
            "loggingSteps": 1,
            "learningRate": LEARNING_RATE[method],
            "precision": "fp32",
        },
    )
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0
    assert summary["task"] == "preference" and summary["objective"] == OBJECTIVES[objective]["objective"]
    assert summary["steps"] == 4 and summary["trainedTokens"] > 0
    info = summary["modelInfo"]
    assert (info["trainableParameters"] == info["parameters"]) == (method == "full")
    assert (info["linear4bitLayers"] > 0) == (method == "qlora")
    logs = train_logs(Path(summary["output"]))
    assert logs[-1]["loss"] < logs[0]["loss"], [r["loss"] for r in logs]
    # the reward of chosen over rejected training completions grows (TRL's own figures, per logged step)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"], [r["rewards/margins"] for r in logs]
    if "rewards/accuracies" in logs[0]:
        assert (
            logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
            or logs[-1]["rewards/accuracies"] == 1
        )
    metrics = summary["metrics"]
    assert metrics["heldOutPairs"] == 4
    assert metrics["finalRewardMargin"] > 0 and metrics["finalRewardAccuracy"] >= 0.5
    assert (
        summary["preference"]["before"]["rewardAccuracy"] == 0
    )  # the reference is the model before training
    kinds = {a["kind"] for a in summary["artifacts"]}
    assert ("merged" if method == "full" else "adapter") in kinds
    expected_reference = {"orpo": "none (orpo)"}.get(
        objective, "precomputed log-probabilities" if method == "full" else "base with the adapter disabled"
    )
    assert summary["reference"] == expected_reference


def test_chat_pairs_with_multi_turn_prompts_and_exports(make_job) -> None:
    """Chat rows (a system turn, an earlier exchange, a follow-up) through the chat template; every export."""
    job = preference_job(
        make_job,
        "chat",
        datasets=[CHAT_PAIRS],
        task={"type": "preference", "preference": {"objective": "dpo", "maxPromptLength": 40}},
        training={
            "maxSteps": 3,
            "batchSizePerDevice": 4,
            "maxSeqLength": 72,
            "loggingSteps": 1,
            "learningRate": 1e-2,
            "precision": "fp32",
        },
        output={"exports": ["adapter", "merged", "int8"]},
    )
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0
    train = summary["data"]["train"]
    assert train["promptTruncated"] > 0  # the multi-turn prompts are longer than 40 tokens
    assert train["sequences"] == train["rows"] - train["droppedNoCompletion"]
    assert {"adapter", "merged", "int8"} <= {a["kind"] for a in summary["artifacts"]}
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(Path(summary["output"]) / "exports" / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    card = (Path(summary["output"]) / "exports" / "adapter" / "README.md").read_text()
    assert "pydoc_preferences_chat.jsonl" in card
    samples = (Path(summary["output"]) / "samples" / "samples.jsonl").read_text().splitlines()
    assert samples and {"prompt", "before", "after"} <= set(json.loads(samples[0]))
    assert (
        json.loads(samples[0])["prompt"].rstrip().endswith("assistant")
    )  # the chat template's generation prompt


def test_kubetune_run_names_the_preference_figures(make_job, capsys: pytest.CaptureFixture[str]) -> None:
    """`kubetune run` on a DPO job: the baseline and the summary give the DPO loss and the held-out pairs'
    figures as such; the next-token loss and perplexity are those of the chosen completions."""
    from kubetune.cli import main

    job = preference_job(make_job, "cli", training={"maxSteps": 2, "loggingSteps": 1, "precision": "fp32"})
    assert main(["run", str(job)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((job.parent / "out-cli" / "summary.json").read_text())
    metrics = summary["metrics"]
    baseline = next(line for line in out.splitlines() if line.startswith("baseline: "))
    assert baseline.startswith(f"baseline: held-out pairs ({metrics['heldOutPairs']}): preference accuracy ")
    assert (
        f"; held-out DPO loss {metrics['baselineObjectiveLoss']:.4f}; chosen completions: held-out loss "
        in baseline
    )
    assert (
        f"held-out DPO loss {metrics['baselineObjectiveLoss']:.4f} -> {metrics['finalObjectiveLoss']:.4f}"
        in out
    )
    assert (
        f"held-out pairs ({metrics['heldOutPairs']}): reward accuracy {metrics['finalRewardAccuracy']:.3f}, "
        f"reward margin {metrics['finalRewardMargin']:.4f}, preference accuracy" in out
    )
    assert f"chosen completions: held-out perplexity {metrics['baselinePerplexity']:.3f} ->" in out
    card = (job.parent / "out-cli" / "exports" / "adapter" / "README.md").read_text()
    assert "| held-out DPO loss |" in card and "| held-out loss of the chosen completions |" in card


def test_kto_reads_unpaired_rows(make_job, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (DATA / "pydoc_preferences.jsonl").read_text().splitlines()[:24]]
    unpaired = [
        {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
        for i, r in enumerate(rows)
    ]
    source = write_jsonl(tmp_path / "unpaired.jsonl", unpaired)
    job = preference_job(
        make_job,
        "kto-unpaired",
        "kto",
        datasets=[{"source": str(source), "format": "unpaired"}],
        task={
            "type": "preference",
            "template": "plain",
            "preference": {"objective": "kto", "desirableWeight": 1.0, "undesirableWeight": 1.2},
        },
        training={
            "maxSteps": 3,
            "batchSizePerDevice": 4,
            "maxSeqLength": 64,
            "loggingSteps": 1,
            "learningRate": 1e-2,
            "precision": "fp32",
        },
    )
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0
    assert summary["data"]["train"]["rows"] == 22  # 24 rows, 2 held out: no pairs to score, the KTO loss is
    assert "heldOutPairs" not in summary["metrics"] and summary["metrics"]["finalObjectiveLoss"] is not None


# ---------------------------------------------------------------- rows: file:line errors, cleaning, truncation


def load(tmp_path: Path, rows: list[Any], fmt: str = "preference", **cleaning: Any) -> tuple[list[Row], Any]:
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    return load_dataset_rows(
        DatasetSpec(source=str(source), format=fmt),
        "preference",
        CleaningSpec(**cleaning),
        tmp_path / "cache",
    )


GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "preference", "missing required field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "preference", "missing required field 'prompt'"),
        (
            {"prompt": "q", "chosen": 4, "rejected": "b"},
            "preference",
            "field 'chosen' must be a string or a list",
        ),
        (
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            "preference",
            "chosen and rejected are the same",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "x",
                "rejected": "y",
            },
            "preference",
            "prompt must end with a user",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "user", "content": "x"}],
                "rejected": "y",
            },
            "preference",
            "chosen[0].role must be assistant",
        ),
        (
            {"prompt": [{"role": "robot", "content": "q"}], "chosen": "x", "rejected": "y"},
            "preference",
            "prompt[0].role must be one of",
        ),
        ({"prompt": "q", "completion": "a", "label": "maybe"}, "unpaired", "field 'label' must be true"),
        ({"prompt": "q", "completion": "a"}, "unpaired", "missing required field 'label'"),
    ],
)
def test_bad_rows_name_file_line_and_field(
    tmp_path: Path, row: dict[str, Any], fmt: str, message: str
) -> None:
    rows: list[Any] = (
        [GOOD, {**GOOD, "prompt": "What is 3+3?"}, row]
        if fmt == "preference"
        else [
            {"prompt": "q1", "completion": "a", "label": True},
            {"prompt": "q2", "completion": "b", "label": 0},
            row,
        ]
    )
    with pytest.raises(DataError) as caught:
        load(tmp_path, rows, fmt)
    assert f"rows.jsonl:3: {message}" in str(caught.value)
    assert "cleaning.skipInvalidRows" in str(caught.value)
    kept, report = load(tmp_path, rows, fmt, skip_invalid_rows=True)
    assert len(kept) == 2 and report.invalid == 1 and "rows.jsonl:3" in report.invalid_examples[0]


def test_conversations_without_prompt_are_split_and_cleaning_counts(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "  Hi?  "}
    rows = [
        {
            "chosen": [system, user, {"role": "assistant", "content": "Hello."}],
            "rejected": [system, user, {"role": "assistant", "content": "Go away."}],
        },
        GOOD,
        GOOD,  # a duplicate
        {"prompt": "q", "chosen": "  ", "rejected": "b"},  # empty after stripping
    ]
    kept, report = load(tmp_path, rows)
    assert report.duplicates == 1 and report.empty == 1 and len(kept) == 2
    assert kept[0].content["prompt"] == [system, {"role": "user", "content": "Hi?"}]
    assert kept[0].content["chosen"] == [{"role": "assistant", "content": "Hello."}]


def test_truncation_is_counted(tokenizer, tmp_path: Path) -> None:
    from kubetune.spec import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": "/m"},
            "datasets": [{"source": "d"}],
            "task": {"type": "preference", "template": "plain", "preference": {"maxPromptLength": 8}},
            "training": {"maxSeqLength": 24},
        }
    )
    rows = [
        Row("f:1", "preference", {"prompt": "word " * 30, "chosen": "yes", "rejected": "no"}),
        Row("f:2", "preference", {"prompt": "short", "chosen": "long " * 40, "rejected": "no"}),
        Row("f:3", "preference", {"prompt": "short", "chosen": "a", "rejected": "b"}),
    ]
    examples, stats = preference_data.tokenize_rows(rows, tokenizer, spec, unpaired=False)
    assert stats["promptTruncated"] == 1 and stats["completionTruncated"] == 1 and stats["sequences"] == 3
    assert all(len(e["prompt_ids"]) <= 8 for e in examples)
    assert all(len(e["prompt_ids"]) + len(e["chosen_ids"]) <= 24 for e in examples)
    unpaired, stats = preference_data.tokenize_rows(rows, tokenizer, spec, unpaired=True)
    assert [e["label"] for e in unpaired] == [True, False] * 3 and stats["rows"] == 6


def test_bad_row_fails_the_run_with_exit_3(make_job, tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "bad.jsonl", [GOOD, {**GOOD, "prompt": "p2"}, {"prompt": "p3", "chosen": "c"}]
    )
    job = preference_job(make_job, "bad", datasets=[{"source": str(source)}])
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == EXIT_CONFIG_ERROR
    assert "bad.jsonl:3: missing required field 'rejected'" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# ---------------------------------------------------------------- resume, torchrun


def test_sigkill_then_resume_continues_the_same_trajectory(make_job) -> None:
    settings = {
        "training": {
            "maxSteps": 8,
            "batchSizePerDevice": 2,
            "maxSeqLength": 64,
            "loggingSteps": 1,
            "learningRate": 5e-3,
            "precision": "fp32",
        },
        "checkpoint": {"everySteps": 3, "keepLast": 2},
        "evaluation": {"numSamplePrompts": 0},
    }
    reference_job = preference_job(make_job, "reference", **settings)
    code, reference = run_trainer(str(reference_job), show_progress=False)
    assert code == 0

    job = preference_job(make_job, "killed", **settings)
    output = job.parent / "out-killed"
    kill_after_checkpoint(job, output, 3, 4, "checkpoint step-3 and step 4")
    code, resumed = run_trainer(str(job), show_progress=False)
    assert code == 0 and resumed["resumedFrom"] in ("step-3", "step-6")
    expected = {r["step"]: r["loss"] for r in train_logs(Path(reference["output"]))}
    after = {r["step"]: r["loss"] for r in train_logs(output)}
    assert after[8] == pytest.approx(expected[8], abs=1e-4)
    assert resumed["metrics"]["finalRewardAccuracy"] == reference["metrics"]["finalRewardAccuracy"]
    assert (
        resumed["metrics"]["baselinePreferenceAccuracy"] == reference["metrics"]["baselinePreferenceAccuracy"]
    )


def test_two_ranks_under_torchrun(make_job) -> None:
    job = preference_job(
        make_job,
        "ranks",
        resources={"nodes": 1, "gpusPerNode": 0, "strategy": "ddp"},
        training={
            "maxSteps": 3,
            "batchSizePerDevice": 2,
            "maxSeqLength": 64,
            "loggingSteps": 1,
            "learningRate": 1e-2,
            "precision": "fp32",
        },
        output={"exports": ["adapter", "merged"]},
    )
    result = two_ranks(job, torchrun_args=("--master-port", str(free_port())))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((job.parent / "out-ranks" / "summary.json").read_text())
    assert summary["worldSize"] == 2 and summary["steps"] == 3 and summary["objective"] == "dpo"
    assert {"adapter", "merged"} <= {a["kind"] for a in summary["artifacts"]}


# ---------------------------------------------------------------- estimate


def test_estimate_counts_pairs_and_the_reference_model(make_job) -> None:
    from kubetune_trainer.estimate import estimate

    results = {}
    for objective, method in (("dpo", "lora"), ("dpo", "full"), ("orpo", "full")):
        job = preference_job(make_job, f"est-{objective}-{method}", objective, method, datasets=[PAIRS])
        results[(objective, method)] = estimate(job, gpu="H100-SXM", gpus=1)
    lora, full, orpo = results[("dpo", "lora")], results[("dpo", "full")], results[("orpo", "full")]
    assert (
        lora["data"]["sequences"] == 36 and lora["data"]["sequencesPerExample"] == 2
    )  # 40 pairs, 4 held out
    assert lora["memory"]["batchSizePerDevice"] == 8  # 4 pairs = 8 sequences per micro-batch
    assert lora["flops"]["reference"] == pytest.approx(
        2 * lora["model"]["flopParameters"] * lora["tokensTrained"], rel=1e-3
    )
    data_tokens = full["data"]["tokens"] + full["data"]["validation"]["tokens"]
    assert full["flops"]["reference"] == 2 * full["model"]["flopParameters"] * data_tokens  # precomputed once
    assert orpo["flops"]["reference"] == 0
    assert any("precomputed" in a for a in full["assumptions"]) and any(
        "no reference" in a for a in orpo["assumptions"]
    )
    assert full["memory"]["totalBytes"] == orpo["memory"]["totalBytes"]  # no frozen copy in memory


def test_kto_training_data_needs_both_labels(make_job, tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": True} for i in range(12)]
    source = write_jsonl(tmp_path / "desirable.jsonl", rows)
    job = preference_job(
        make_job, "kto-one-label", "kto", datasets=[{"source": str(source), "format": "unpaired"}]
    )
    code, _ = run_trainer(str(job), show_progress=False)
    assert code == EXIT_CONFIG_ERROR
