"""kubetune_trainer.launch: torchrun, but the pod's exit code is the workers' (real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer.launch import exit_code_of

pytestmark = pytest.mark.slow  # runs the trainer under torchrun with several processes

WORKER = """
import os, sys
rank = int(os.environ["RANK"])
sys.exit(int(sys.argv[rank + 1]))
"""


def launch(tmp_path: Path, *codes: int) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_trainer.launch",
            "--standalone",
            f"--nproc-per-node={len(codes)}",
            str(script),
            *map(str, codes),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize(
    ("codes", "expected"), [((0, 0), 0), ((0, 3), 3), ((143, 0), 143), ((1, 3), 3), ((2, 0), 2)]
)
def test_pod_exits_with_the_workers_code(tmp_path: Path, codes: tuple[int, ...], expected: int) -> None:
    result = launch(tmp_path, *codes)
    assert result.returncode == expected, result.stderr[-2000:]
    if expected:
        assert f"exiting {expected}" in result.stderr


def test_priority_of_exit_codes() -> None:
    assert exit_code_of([1, 143]) == 143  # a preemption is not a failure
    assert exit_code_of([143, 3]) == 3  # a configuration error is never retried
    assert exit_code_of([-9]) == 1  # killed by a signal: an unexpected failure


def test_config_error_under_two_processes_exits_3(tmp_path: Path) -> None:
    """`kubetune run --nproc 2` on a dataset that does not exist: 3, not torchrun's 1."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(f"""
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: missing-data}}
spec:
  model: {{source: bundled://smollm2-135m-instruct}}
  task: {{type: instruction}}
  datasets: [{{source: {tmp_path}/nowhere.jsonl}}]
  output: {{uri: {tmp_path}/out}}
""")
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(manifest), "--nproc", "2", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "nowhere.jsonl" in result.stdout + result.stderr
