"""Checkpoints and recovery: SIGKILL resume matches an uninterrupted run, SIGTERM exits 143, early stopping."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.checkpoints import CheckpointStore
from kubetune.spec import EXIT_PREEMPTED
from kubetune_trainer.__main__ import run_trainer
from tests.support.trainer_fixtures import kill_after_checkpoint, progress_step, start
from tests.support.waiting import wait_for, while_running

pytestmark = pytest.mark.slow  # trains, is preempted and resumes

LOSS_TOLERANCE = 1e-4  # same seed, same data order, restored RNG: CPU runs agree to float rounding


def job_kwargs() -> dict:
    return {
        "training": {"maxSteps": 12, "batchSizePerDevice": 2, "loggingSteps": 1, "learningRate": 1e-3},
        "checkpoint": {"everySteps": 3, "keepLast": 2},
        "evaluation": {"numSamplePrompts": 0},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
    }


def final_step_loss(output: Path) -> float:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r and r["step"] == 12][-1]["loss"]


def test_sigkill_then_resume_matches_uninterrupted_run(make_job) -> None:
    reference_job = make_job("reference", **job_kwargs())
    code, reference = run_trainer(str(reference_job), show_progress=False)
    assert code == 0

    job = make_job("killed", **job_kwargs())
    output = Path(job.parent / "out-killed")
    # Kill it hard in the middle of the interval after the step-6 checkpoint completed.
    killed_at = kill_after_checkpoint(job, output, 6, 7, "the step-6 checkpoint and step 7", interval=0.05)

    store = CheckpointStore(str(output))
    latest = store.latest()
    assert latest is not None and latest.step >= 6
    assert killed_at - latest.step <= 3  # at most one checkpoint interval is redone

    result = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(job)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from complete checkpoint step {latest.step}" in result.stdout
    resumed = json.loads((output / "summary.json").read_text())
    assert resumed["resumedFrom"] == f"step-{latest.step}"
    assert resumed["steps"] == reference["steps"] == 12
    assert abs(resumed["metrics"]["finalEvalLoss"] - reference["metrics"]["finalEvalLoss"]) < LOSS_TOLERANCE
    assert abs(final_step_loss(output) - final_step_loss(Path(reference["output"]))) < LOSS_TOLERANCE
    # the baseline measured before the kill is kept, not re-measured on a half-trained model
    assert resumed["metrics"]["baselineEvalLoss"] == pytest.approx(
        reference["metrics"]["baselineEvalLoss"], abs=1e-6
    )


def test_incomplete_checkpoint_is_ignored(make_job) -> None:
    job = make_job("partial", **job_kwargs())
    output = Path(job.parent / "out-partial")
    partial = output / "checkpoints" / "step-9"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half-written")  # no manifest.json
    assert CheckpointStore(str(output)).latest() is None
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0 and summary["resumedFrom"] is None and summary["steps"] == 12


def test_sigterm_saves_checkpoint_and_exits_preempted(make_job) -> None:
    kwargs = job_kwargs()
    kwargs["training"]["maxSteps"] = 200
    kwargs["checkpoint"]["everySteps"] = 100
    job = make_job("preempt", **kwargs)
    output = Path(job.parent / "out-preempt")
    process = start(job)
    wait_for(while_running(process, lambda: progress_step(output) >= 4), 300, "step 4", interval=0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, out[-3000:]
    latest = CheckpointStore(str(output)).latest()
    assert latest is not None and 4 <= latest.step < 100  # saved where it stopped, not at an interval
    assert not (output / "summary.json").exists()


def test_changed_config_does_not_resume_into_old_checkpoints(make_job) -> None:
    job = make_job("changed", **job_kwargs())
    code, _ = run_trainer(str(job), show_progress=False)
    assert code == 0
    kwargs = job_kwargs()
    kwargs["training"]["learningRate"] = 5e-4
    changed = make_job("changed", **kwargs)
    code, summary = run_trainer(str(changed), show_progress=False)
    assert code == 3 and summary is None


def test_early_stopping_on_plateau_keeps_best(make_job) -> None:
    kwargs = job_kwargs()
    kwargs["training"] = {
        "maxSteps": 40,
        "batchSizePerDevice": 2,
        "learningRate": 1e-9,
        "loggingSteps": 2,
        "earlyStopping": {"patience": 2, "minDelta": 0.01},
    }
    kwargs["evaluation"] = {"everySteps": 2, "numSamplePrompts": 0}
    kwargs["checkpoint"] = {"everySteps": 2, "keepLast": 1}
    job = make_job("plateau", **kwargs)
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0
    assert summary["earlyStopped"] and summary["steps"] < 40
    best = summary["bestStep"]
    assert best is not None
    steps = {
        p.name for p in (Path(summary["output"]) / "checkpoints").iterdir() if p.name.startswith("step-")
    }
    assert f"step-{best}" in steps  # the best checkpoint survives keepLast pruning
