"""The human-readable report of an estimate and of the GPU table."""

from __future__ import annotations

import math
from typing import Any

from kubetune_trainer.estimate.gpus import DEFAULT_MFU


def human_number(number: float) -> str:
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= size:
            return f"{number / size:.2f}{unit}"
    return f"{number:.0f}"


def human_duration(hours: float) -> str:
    if not math.isfinite(hours):
        return "-"
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} d"


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report."""
    model, data, steps, flops, memory = (result[k] for k in ("model", "data", "steps", "flops", "memory"))
    lines = [
        f"Estimate for {result['job']}: {result['method']} on {model['source']} ({model['architecture']})",
        "",
        f"  parameters        {model['parameters']:,} total, {model['trainableParameters']:,} trainable, "
        f"{model['flopParameters']:,} in matmuls  [{model['countedFrom']}]",
        f"  data              {data['rows']:,} training rows -> {data['sequences']:,} sequences, "
        f"{data['tokens']:,} tokens ({data['trainableTokens']:,} learned)  [{data['method']}]",
        f"                    validation {data['validation']['rows']:,} rows, {data['validation']['tokens']:,} tokens; "
        f"mean sequence {data['meanSequenceLength']} tokens, longest {data['longestSequence']}",
        f"  steps             {steps['totalSteps']:,} = {steps['stepsPerEpoch']:,}/epoch x {steps['epochs']:g} epochs  "
        f"(global batch {steps['globalBatchSize']} = {steps['batchSizePerDevice']} per device x "
        f"{steps['worldSize']} x {steps['gradientAccumulationSteps']} accumulation)",
        f"  tokens trained    {result['tokensTrained']:,}",
        f"  training FLOPs    {human_number(flops['total'])}FLOP = {flops['formula']} {human_number(flops['model'])}"
        + (f" + recompute {human_number(flops['recompute'])}" if flops["recompute"] else "")
        + f" + evaluation {human_number(flops['evaluation'])}",
        "",
        f"  memory per GPU    {memory['totalGiB']:.2f} GiB  ({memory['precision']}, {memory['strategy']} over "
        f"{memory['worldSize']}, gradient checkpointing {'on' if memory['gradientCheckpointing'] else 'off'})",
        f"    weights {memory['weightsGiB']:.2f}  gradients {memory['gradientsGiB']:.2f}  optimizer "
        f"{memory['optimizerGiB']:.2f}  gathered layers {memory['gatheredLayersGiB']:.2f}",
        f"    activations {memory['activationsGiB']:.2f} (without checkpointing "
        f"{memory['activationsWithoutCheckpointingGiB']:.2f}, with {memory['activationsWithCheckpointingGiB']:.2f})"
        f"  logits {memory['logitsGiB']:.2f}  runtime {memory['runtimeGiB']:.2f}",
        "",
        f"  {'GPU':<11} {'count':>5} {'TFLOPS':>7} {'MFU':>5} {'time':>10} {'GPU-hours':>10} {'$/GPU-h':>8} "
        f"{'cost $':>10} {'memory':>8} {'fits':>5}",
    ]
    for row in result["gpus"]:
        lines.append(
            f"  {row['gpu']:<11} {row['count']:>5} {row['peakTflops']:>7g} {row['mfu']:>5.2f} "
            f"{human_duration(row['hours']):>10} {row['gpuHours']:>10.2f} {row['pricePerGpuHour']:>8.2f} "
            f"{row['cost']:>10,.2f} {row['memoryGiB']:>6g}Gi {row['fits']:>5}"
        )
    calibration = result.get("calibration")
    if calibration:
        lines += [
            "",
            f"  calibration on {calibration['device']} ({calibration['precision']}, {calibration['stepsTimed']} "
            f"steps timed, {calibration['tokensPerStep']:g} tokens/step):",
            f"    predicted {calibration['predictedStepSeconds']:.4f} s/step at MFU {calibration['mfu']} of "
            f"{calibration['peakTflops']:g} TFLOPS [{calibration['peakFlopsSource']}]",
            f"    measured  {calibration['measuredStepSeconds']:.4f} s/step  (x{calibration['measuredOverPredicted']} "
            f"the prediction; implied MFU {calibration['impliedMfu']})",
        ]
        if "measuredPeakMemoryGiB" in calibration:
            lines.append(f"    peak GPU memory allocated {calibration['measuredPeakMemoryGiB']:.2f} GiB")
    if result["warnings"]:
        lines += [""] + [f"  warning: {w}" for w in result["warnings"]]
    lines += ["", "  assumptions:"] + [f"    - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def format_gpu_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'GPU':<11} {'TFLOPS':>7} {'memory GiB':>10} {'$/GPU-h':>8} {'MFU':>5}"]
    for name, entry in table.items():
        lines.append(
            f"{name:<11} {entry['tflops']:>7g} {entry['memoryGiB']:>10g} {entry['pricePerHour']:>8.2f} "
            f"{entry.get('mfu', DEFAULT_MFU):>5.2f}"
        )
    return "\n".join(lines)
