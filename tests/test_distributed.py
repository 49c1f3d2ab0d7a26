"""Distributed training for real on CPU: two 'nodes' under torchrun (DDP over gloo), DeepSpeed ZeRO-2/3."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kubetune.distributed import deepspeed_config
from kubetune.manifest import load_job
from tests.support.trainer_fixtures import ENV, free_port, torchrun, two_ranks

pytestmark = pytest.mark.slow  # launches several training processes


def test_two_nodes_ddp_over_gloo(make_job) -> None:
    """torchrun --nnodes 2: two processes on 127.0.0.1 standing in for two nodes, one rank each."""
    job = make_job(
        "twonodes",
        resources={"nodes": 2, "gpusPerNode": 0, "strategy": "ddp"},
        training={"maxSteps": 4, "batchSizePerDevice": 2},
        output={"exports": ["adapter", "merged"]},
    )
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            torchrun(
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "-m",
                "kubetune_trainer",
                "--config",
                str(job),
            ),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    summary = json.loads((job.parent / "out-twonodes" / "summary.json").read_text())
    assert summary["worldSize"] == 2 and summary["steps"] == 4
    assert {"adapter", "merged"} <= {a["kind"] for a in summary["artifacts"]}


@pytest.mark.parametrize("stage", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_zero_on_cpu(make_job, stage: str) -> None:
    job = make_job(
        stage,
        resources={"nodes": 1, "gpusPerNode": 0, "strategy": stage},
        training={"maxSteps": 3, "batchSizePerDevice": 2},
        output={"exports": ["adapter", "merged"]},
    )
    config = deepspeed_config(load_job(job).spec, torch_adam=True)
    assert config["zero_optimization"]["stage"] == int(stage[-1])
    assert config["optimizer"]["params"]["torch_adam"] is True
    ds_file = job.parent / f"{stage}.json"
    ds_file.write_text(json.dumps(config))
    result = two_ranks(job, "--deepspeed", str(ds_file))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((job.parent / f"out-{stage}" / "summary.json").read_text())
    assert summary["worldSize"] == 2 and summary["steps"] == 3
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(Path(summary["output"]) / "exports" / "merged")
