"""GPU types: the table of peak bf16 TFLOPS, memory and price (built in, or --gpu-table), and the default MFU."""

from __future__ import annotations

import os
from pathlib import Path

from kubetune_trainer.errors import ConfigError

DEFAULT_MFU = 0.35
QLORA_MFU_FACTOR = 0.6  # dequantizing 4-bit weights in every matmul: ~40% lower throughput than LoRA

# Peak dense (no sparsity) bf16 tensor TFLOPS, memory as reported by the driver (GiB), and a
# representative on-demand price in USD per GPU-hour (2025 list prices of large clouds; they vary by
# provider, region and commitment: override them with --gpu-table).
GPU_TABLE: dict[str, dict[str, float]] = {
    "A10G": {"tflops": 70.0, "memoryGiB": 22.5, "pricePerHour": 1.01, "mfu": DEFAULT_MFU},
    "L4": {"tflops": 121.0, "memoryGiB": 22.5, "pricePerHour": 0.80, "mfu": DEFAULT_MFU},
    "L40S": {"tflops": 362.0, "memoryGiB": 45.0, "pricePerHour": 1.86, "mfu": DEFAULT_MFU},
    "A100-40GB": {"tflops": 312.0, "memoryGiB": 40.0, "pricePerHour": 2.75, "mfu": DEFAULT_MFU},
    "A100-80GB": {"tflops": 312.0, "memoryGiB": 80.0, "pricePerHour": 3.43, "mfu": DEFAULT_MFU},
    "H100-SXM": {"tflops": 989.0, "memoryGiB": 79.6, "pricePerHour": 6.88, "mfu": DEFAULT_MFU},
    "H200": {"tflops": 989.0, "memoryGiB": 140.4, "pricePerHour": 7.91, "mfu": DEFAULT_MFU},
    "B200": {"tflops": 2250.0, "memoryGiB": 179.0, "pricePerHour": 14.24, "mfu": 0.30},
}
# Substrings of torch.cuda.get_device_name() that identify a table entry (checked in order).
DEVICE_NAMES = [
    ("B200", "B200"),
    ("H200", "H200"),
    ("H100", "H100-SXM"),
    ("A100-SXM4-80GB", "A100-80GB"),
    ("A100 80GB", "A100-80GB"),
    ("A100-PCIE-80GB", "A100-80GB"),
    ("A100", "A100-40GB"),
    ("L40S", "L40S"),
    ("L4", "L4"),
    ("A10G", "A10G"),
]


def load_gpu_table(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, float]]:
    """The built-in table, with a YAML/JSON file's entries merged in (new types added, fields replaced).

    File format: {TYPE: {tflops: peak dense TFLOPS, memoryGiB: ..., pricePerHour: ..., mfu: ...}}.
    """
    table = {name: dict(entry) for name, entry in GPU_TABLE.items()}
    if path is None:
        return table
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--gpu-table {path}: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"--gpu-table {path}: expected a mapping of GPU type to {{tflops, memoryGiB, pricePerHour, mfu}}"
        )
    allowed = {"tflops", "memoryGiB", "pricePerHour", "mfu"}
    for name, fields in loaded.items():
        if not isinstance(fields, dict) or not set(fields) <= allowed:
            raise ConfigError(
                f"--gpu-table {path}: entry {name!r} must be a mapping with keys from {sorted(allowed)}"
            )
        entry = table.setdefault(str(name), {"mfu": DEFAULT_MFU})
        for key, value in fields.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"--gpu-table {path}: {name}.{key} must be a non-negative number")
            entry[key] = float(value)
        missing = {"tflops", "memoryGiB", "pricePerHour"} - set(entry)
        if missing:
            raise ConfigError(f"--gpu-table {path}: new GPU type {name!r} needs {sorted(missing)}")
    return table


def find_gpu(table: dict[str, dict[str, float]], name: str) -> str:
    for known in table:
        if known.lower() == name.lower():
            return known
    raise ConfigError(
        f"--gpu {name}: unknown GPU type; known: {', '.join(table)} (add others with --gpu-table)"
    )
