"""`kubetune estimate job.yaml`: tokens, steps, FLOPs, time, cost and per-GPU memory of a job, before it runs.

    kubetune estimate job.yaml [--gpu TYPE] [--gpus N] [--mfu X] [--gpu-table FILE] [--calibrate] [--json]

Everything comes from the job itself:

* tokens: the datasets go through the trainer's own pipeline (data.prepare_rows, then tokenize_rows
  with the model's tokenizer): exact when there are at most SAMPLE_ROWS training rows, otherwise a
  seeded random sample of rows is tokenized and the counts are scaled (the output says which);
* steps: the arithmetic of transformers' Trainer;
* parameters: from the model's config on the meta device (no weights are loaded or downloaded);
* FLOPs: 6·N·T for full fine-tuning, 4·N·T (+ 6·N_adapter·T) for LoRA/QLoRA, plus recomputation
  under gradient checkpointing and the evaluations;
* time and cost at a stated MFU for GPU types of a table (peak dense bf16 TFLOPS, memory, price),
  which --gpu-table overrides or extends;
* memory per GPU: weights, gradients, optimizer states (sharded by the strategy), activations
  (with and without gradient checkpointing), logits, and a fixed runtime allowance.

`--calibrate` runs a few real training steps of a reduced copy of the job on this machine, through
the same trainer path as `kubetune run`, and prints the predicted against the measured step time.
The formulas are explained in docs/estimate.md.

The modules, in the order the estimate uses them:

    gpus         the GPU table (built in, or --gpu-table) and the default MFU
    model_facts  parameters and shapes from the model's config on the meta device
    tokens       tokens of the datasets through the trainer's data pipeline
    arithmetic   steps, FLOPs, bytes per parameter, activations, memory per GPU
    prediction   estimate(): all of the above for one job and one GPU type
    calibration  --calibrate: a few real steps of a reduced copy of the job
    report       the human-readable report
    cli          `kubetune estimate` itself (main)
"""

from __future__ import annotations

from kubetune_trainer.estimate.arithmetic import (
    GIB,
    activation_bytes,
    bytes_per_parameter,
    memory_per_gpu,
    plan_steps,
    training_flops,
)
from kubetune_trainer.estimate.calibration import calibrate, measure_peak_flops
from kubetune_trainer.estimate.cli import main
from kubetune_trainer.estimate.gpus import DEFAULT_MFU, GPU_TABLE, load_gpu_table
from kubetune_trainer.estimate.model_facts import model_facts
from kubetune_trainer.estimate.prediction import estimate
from kubetune_trainer.estimate.report import format_gpu_table, format_report
from kubetune_trainer.estimate.tokens import SAMPLE_ROWS, count_tokens

__all__ = [
    "DEFAULT_MFU",
    "GIB",
    "GPU_TABLE",
    "SAMPLE_ROWS",
    "activation_bytes",
    "bytes_per_parameter",
    "calibrate",
    "count_tokens",
    "estimate",
    "format_gpu_table",
    "format_report",
    "load_gpu_table",
    "main",
    "measure_peak_flops",
    "memory_per_gpu",
    "model_facts",
    "plan_steps",
    "training_flops",
]
