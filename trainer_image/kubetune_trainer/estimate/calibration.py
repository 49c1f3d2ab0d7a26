"""--calibrate: a few real training steps of a reduced copy of the job, to compare with the prediction."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubetune.spec import FineTuneJob
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.estimate.arithmetic import GIB, training_flops
from kubetune_trainer.estimate.gpus import DEFAULT_MFU, DEVICE_NAMES, GPU_TABLE


def measure_peak_flops(device: str = "cpu", dtype: Any = None, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a large square matmul on this device (a practical peak)."""
    import torch

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    torch.mm(a, b)
    sync()
    count, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0:
            sync()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return 2 * size**3 * count / elapsed


def device_table_entry(table: dict[str, dict[str, float]], device_name: str) -> str | None:
    for needle, name in DEVICE_NAMES:
        if needle.lower() in device_name.lower() and name in table:
            return name
    return None


def reduced_job(job: FineTuneJob, output: Path, measured_steps: int) -> dict[str, Any]:
    """The job with few steps, little data, no periodic evaluation, checkpoints, exports or trackers."""
    manifest = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec = manifest["spec"]
    training = spec.setdefault("training", {})
    total = measured_steps + 1  # the first step (warm-up, allocations) is not measured
    training.update({"maxSteps": total, "loggingSteps": total})
    training.pop("epochs", None)
    training.pop("earlyStopping", None)
    batch = training.get("batchSizePerDevice", 4) * training.get("gradientAccumulationSteps", 1)
    needed = batch * total * 2 + 16
    for dataset in spec["datasets"]:
        dataset["maxExamples"] = min(dataset.get("maxExamples", needed), needed)
    validation = spec.setdefault("validation", {})
    validation["maxExamples"] = min(validation.get("maxExamples", 4), 4)
    spec["evaluation"] = {**spec.get("evaluation", {}), "samplePrompts": [], "numSamplePrompts": 0}
    spec["evaluation"].pop("everySteps", None)
    spec["checkpoint"] = {"keepLast": 1}
    spec["tracking"] = {"tensorboard": False}
    spec["output"] = {
        "uri": str(output),
        "exports": ["adapter"] if spec.get("method", {}).get("type", "lora") != "full" else [],
    }
    spec["resources"] = {**spec.get("resources", {}), "nodes": 1}
    manifest["metadata"] = {"name": job.metadata.name}
    return manifest


def calibrate(
    job: FineTuneJob,
    result: dict[str, Any],
    mfu: float | None = None,
    steps: int = 3,
    gpu_table: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train a reduced copy of the job for a few steps here; compare predicted and measured step time."""
    import torch
    import transformers.trainer as hf_trainer
    import yaml
    from transformers import TrainerCallback

    from kubetune_trainer.__main__ import run_trainer
    from kubetune_trainer.models import pick_precision

    table = gpu_table or GPU_TABLE
    on_gpu = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def _mark(self, state: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.marks = []
            self._mark(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark(state)

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="kubetune-calibrate-") as tmp:
        manifest = reduced_job(job, Path(tmp) / "out", steps)
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(manifest))
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        hf_trainer.DEFAULT_CALLBACKS.append(timer)  # type: ignore[arg-type]  # Trainer takes instances too
        try:
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report (--json)
                code, summary = run_trainer(str(path), resume="never", show_progress=False)
        finally:
            hf_trainer.DEFAULT_CALLBACKS.remove(timer)  # type: ignore[arg-type]
        peak_memory = torch.cuda.max_memory_allocated() if on_gpu else None
    if code != 0 or summary is None:
        raise ConfigError(
            f"calibration: the reduced training run failed (exit code {code}); see the log above"
        )
    marks = timer.marks[1:]  # from the end of the first (warm-up) step
    if len(marks) < 2:
        raise ConfigError("calibration: too few steps were timed")
    measured = (marks[-1][0] - marks[0][0]) / (len(marks) - 1)
    tokens_per_step = (marks[-1][1] - marks[0][1]) / (len(marks) - 1)

    spec = job.spec
    precision = pick_precision(str(spec.training.precision), spec.method.type)
    checkpointing = spec.training.gradient_checkpointing
    if checkpointing is None:
        checkpointing = on_gpu
    facts = result["model"]
    data = result["data"]
    learned = data["trainableTokens"] / data["tokens"] if facts.get("selectiveLogits") else 1.0
    per_token = training_flops(
        result["method"],
        facts["flopParameters"],
        facts["adapterParameters"],
        1,
        checkpointing,
        head_parameters=facts.get("headParameters", 0),
        head_tokens=learned,
    )["perToken"]
    flops_per_step = per_token * tokens_per_step
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    measured_peak = measure_peak_flops(
        "cuda" if on_gpu else "cpu", torch.float32 if precision == "fp32" else torch.bfloat16
    )
    entry = device_table_entry(table, device_name) if on_gpu else None
    peak = table[entry]["tflops"] * 1e12 if entry else measured_peak
    used_mfu = mfu if mfu is not None else (table[entry].get("mfu", DEFAULT_MFU) if entry else DEFAULT_MFU)
    predicted = flops_per_step / (peak * used_mfu)
    calibration: dict[str, Any] = {
        "device": device_name,
        "tableEntry": entry,
        "precision": precision,
        "gradientCheckpointing": checkpointing,
        "peakFlopsSource": f"table ({entry})" if entry else f"measured {'bf16' if on_gpu else 'fp32'} matmul",
        "peakTflops": round(peak / 1e12, 4),
        "measuredMatmulTflops": round(measured_peak / 1e12, 4),
        "mfu": used_mfu,
        "stepsTimed": len(marks) - 1,
        "tokensPerStep": round(tokens_per_step, 1),
        "flopsPerStep": flops_per_step,
        "predictedStepSeconds": round(predicted, 6),
        "measuredStepSeconds": round(measured, 6),
        "measuredOverPredicted": round(measured / predicted, 3) if predicted else None,
        "impliedMfu": round(flops_per_step / (measured * peak), 5) if measured > 0 else None,
        "note": "the reduced job keeps the model, method, batch size, sequence length and precision; the first "
        "step is not timed. Use impliedMfu with --mfu to correct the estimate for this kind of device.",
    }
    if peak_memory is not None:
        calibration["measuredPeakMemoryGiB"] = round(peak_memory / GIB, 3)
    return calibration
