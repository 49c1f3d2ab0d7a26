"""Resuming never unpickles arbitrary objects: real resumes still work, planted pickles are refused.

Real training of the tiny llama: one process (LoRA), and DeepSpeed ZeRO-2/3 with two ranks under
torchrun over gloo. A checkpoint is resumed for real (the losses after the resume match the
uninterrupted run), and copies of it with one file replaced by a malicious pickle (its __reduce__
would create a marker file), re-manifested as whoever can write the output could, are refused:
exit code 3, a message naming the file, and no marker. FSDP checkpoints (torch.distributed.checkpoint,
DCP) cannot be trained here (accelerate runs FSDP only on accelerators and falls back to DDP on CPU),
so a real DCP checkpoint written by torch.distributed.checkpoint.save stands in for them.

Under torchrun the refusing worker exits 3, but torchrun itself exits 1 whatever its workers' codes
(ChildFailedError), and that is what a pod running torchrun reports; carrying the 3 through is the
launcher's business, not the trainer's.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kubetune.checkpoints import read_manifest, write_manifest
from kubetune_trainer.__main__ import run_trainer
from kubetune_trainer.errors import UnsafeCheckpointError
from kubetune_trainer.safe_loading import verify_checkpoint, weights_only_loading
from tests.support.trainer_fixtures import PYDOC, two_ranks

LOSS_TOLERANCE = 1e-4  # same seed, same data order, restored RNG and optimizer: CPU runs agree to rounding
STEPS, EVERY = 4, 2  # checkpoints at steps 2 and 4; a resume from step 2 retrains steps 3 and 4


class Payload:
    """Pickles as a call to exec() that creates `marker`: what an attacker plants in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# ----- helpers


def write_job(directory: Path, model: Path, name: str, strategy: str | None = None) -> Path:
    """A FineTuneJob for the tiny model (as tests.support.trainer_fixtures.make_job writes them)."""
    spec: dict[str, Any] = {
        "model": {"source": str(model)},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "task": {"type": "instruction"},
        "datasets": [{"source": str(PYDOC), "maxExamples": 60}],
        "training": {
            "maxSteps": STEPS,
            "batchSizePerDevice": 2,
            "maxSeqLength": 96,
            "loggingSteps": 1,
            "learningRate": 1e-3,
            # fp32: the DeepSpeed checkpoint files named below are those of fp32 ZeRO (auto would be bf16
            # for LoRA on CPUs with native bf16, whose optimizer shards are named bf16_zero_pp_rank_...)
            "precision": "fp32",
        },
        "checkpoint": {"everySteps": EVERY, "keepLast": 3},
        "evaluation": {"numSamplePrompts": 0},
        "output": {"uri": str(directory / f"out-{name}"), "exports": []},
        "tracking": {"tensorboard": False},
    }
    if strategy:
        spec["resources"] = {"nodes": 1, "gpusPerNode": 0, "strategy": strategy}
    path = directory / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": name},
                "spec": spec,
            }
        )
    )
    return path


def torchrun(job: Path, output: Path) -> subprocess.CompletedProcess:
    """Two ranks on this machine (gloo); the trainer derives the DeepSpeed config from the spec."""
    return two_ranks(job, "--output", str(output), "--quiet")


def losses(output: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run appends to metrics.jsonl)."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def rewind(trained: Path, target: Path) -> Path:
    """A copy of a finished run's output whose latest complete checkpoint is step EVERY."""
    shutil.copytree(trained, target)
    shutil.rmtree(target / "checkpoints" / f"step-{STEPS}")
    (target / "summary.json").unlink()
    return target


def remanifest(checkpoint: Path) -> None:
    """Rewrite manifest.json over the changed files, as whoever can write the output can."""
    manifest = read_manifest(checkpoint)
    assert manifest is not None
    extra = {
        k: v
        for k, v in manifest.items()
        if k not in {"step", "files", "configHash", "createdAt", "formatVersion"}
    }
    write_manifest(checkpoint, manifest["step"], manifest["configHash"], extra=extra)


def plant_torch_file(checkpoint: Path, relative: str, marker: Path) -> None:
    (checkpoint / relative).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": Payload(marker), "tensor": torch.zeros(2)}, checkpoint / relative)


def save_dcp(directory: Path, state: dict[str, Any]) -> None:
    """A real torch.distributed.checkpoint directory (what accelerate writes for FSDP sharded state)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(directory))


def dcp_state(lr: Any = 1e-3) -> dict[str, Any]:
    """A model and optimizer state dict like FSDP's: tensors, and plain values DCP stores as byte items."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer_state = optimizer.state_dict()
    optimizer_state["param_groups"][0]["lr"] = lr
    return {"model": model.state_dict(), "optimizer": optimizer_state}


def assert_refused(code: int, text: str, marker: Path, named: str) -> None:
    assert code == 3, text[-3000:]
    assert not marker.exists(), "the planted pickle ran"
    assert named in text and "non-allowlisted object" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


# ----- trained checkpoints, shared by the tests of this module


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """(job, output) of a finished one-process LoRA run with checkpoints at steps 2 and 4."""
    directory = tmp_path_factory.mktemp("single")
    job = write_job(directory, tiny_model, "single")
    code, summary = run_trainer(str(job), show_progress=False)
    assert code == 0 and summary is not None
    return job, Path(summary["output"])


@pytest.fixture(scope="module", params=["deepspeed-zero2", "deepspeed-zero3"])
def deepspeed_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> tuple[Path, Path, str]:
    """(job, output, stage) of a finished two-rank DeepSpeed ZeRO run with checkpoints at steps 2 and 4."""
    stage = request.param
    directory = tmp_path_factory.mktemp(stage)
    job = write_job(directory, tiny_model, stage, strategy=stage)
    output = directory / f"out-{stage}"
    result = torchrun(job, output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (output / "checkpoints" / f"step-{EVERY}" / "latest").is_file()
    return job, output, stage


# ----- (1) resuming for real, every load weights-only


def test_single_process_resume_matches_uninterrupted_run(single_run, tmp_path: Path, capsys) -> None:
    job, trained = single_run
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    output = rewind(trained, tmp_path / "resumed")
    code, summary = run_trainer(str(job), output=str(output), show_progress=False)
    assert code == 0, capsys.readouterr().err[-3000:]
    assert summary["resumedFrom"] == f"step-{EVERY}" and summary["steps"] == STEPS
    reference, resumed = losses(trained), losses(output)
    for step in range(EVERY + 1, STEPS + 1):
        assert abs(resumed[step] - reference[step]) < LOSS_TOLERANCE
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # enforcement ends with the Trainer


def test_deepspeed_resume_matches_uninterrupted_run(deepspeed_run, tmp_path: Path) -> None:
    """ZeRO model and optimizer states, RNG and trainer state come back through weights-only loads."""
    job, trained, stage = deepspeed_run
    output = rewind(trained, tmp_path / "resumed")
    result = torchrun(job, output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from complete checkpoint step {EVERY}" in result.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert (
        summary["resumedFrom"] == f"step-{EVERY}" and summary["steps"] == STEPS and summary["worldSize"] == 2
    )
    reference, resumed = losses(trained), losses(output)
    for step in range(EVERY + 1, STEPS + 1):
        assert abs(resumed[step] - reference[step]) < LOSS_TOLERANCE, stage


# ----- (2) a planted pickle in any file resume loads is refused: exit 3, the file named, no marker


def _replace_with_bin(name: str) -> Callable[[Path, Path], str]:
    def plant(checkpoint: Path, marker: Path) -> str:
        # Weights as a torch .bin: transformers/peft load it when present (pytorch_model.bin even
        # beside a LoRA adapter; adapter_model.bin when the .safetensors is gone).
        (checkpoint / "adapter_model.safetensors").unlink()
        plant_torch_file(checkpoint, name, marker)
        return name

    return plant


def _plant(relative: str) -> Callable[[Path, Path], str]:
    def plant(checkpoint: Path, marker: Path) -> str:
        plant_torch_file(checkpoint, relative, marker)
        return relative

    return plant


def _plant_dcp_metadata(checkpoint: Path, marker: Path) -> str:
    directory = checkpoint / "pytorch_model_fsdp_0"
    save_dcp(directory, dcp_state())
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return "pytorch_model_fsdp_0/.metadata"


def _plant_dcp_rank_metadata(checkpoint: Path, marker: Path) -> str:
    # A rank's own index, which DCP reads when the global one is missing or unreadable.
    directory = checkpoint / "pytorch_model_fsdp_0"
    save_dcp(directory, dcp_state())
    (directory / "__1.metadata").write_bytes(pickle.dumps(Payload(marker)))
    return "pytorch_model_fsdp_0/__1.metadata"


def _plant_dcp_item(checkpoint: Path, marker: Path) -> str:
    # The index is genuine; one plain value (stored by DCP as a torch.save'd byte item) is the payload.
    save_dcp(checkpoint / "optimizer_0", dcp_state(lr=Payload(marker)))
    return "optimizer_0/__0_0.distcp"


SINGLE_PROCESS_FILES = {
    "rng-state": _plant("rng_state.pth"),
    "optimizer": _plant("optimizer.pt"),
    "scheduler": _plant("scheduler.pt"),
    "grad-scaler": _plant("scaler.pt"),
    "model-weights-bin": _replace_with_bin("pytorch_model.bin"),
    "adapter-weights-bin": _replace_with_bin("adapter_model.bin"),
    "fsdp-dcp-metadata": _plant_dcp_metadata,
    "fsdp-dcp-rank-metadata": _plant_dcp_rank_metadata,
    "fsdp-dcp-item": _plant_dcp_item,
}


@pytest.mark.parametrize("kind", sorted(SINGLE_PROCESS_FILES))
def test_planted_pickle_refused_single_process(single_run, tmp_path: Path, capsys, kind: str) -> None:
    job, trained = single_run
    output = rewind(trained, tmp_path / "tampered")
    checkpoint = output / "checkpoints" / f"step-{EVERY}"
    marker = tmp_path / "pwned"
    named = SINGLE_PROCESS_FILES[kind](checkpoint, marker)
    remanifest(checkpoint)
    code, summary = run_trainer(str(job), output=str(output), show_progress=False)
    assert summary is None
    assert_refused(code, capsys.readouterr().err, marker, named)


def _deepspeed_files(stage: str, tag: str) -> dict[str, str]:
    model_states = (
        "mp_rank_00_model_states.pt"
        if stage == "deepspeed-zero2"
        else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    )
    return {
        "model-states": f"{tag}/{model_states}",
        "optimizer-shard-rank0": f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "optimizer-shard-rank1": f"{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng-state-rank1": "rng_state_1.pth",
    }


@pytest.mark.parametrize(
    "kind", ["model-states", "optimizer-shard-rank0", "optimizer-shard-rank1", "rng-state-rank1"]
)
def test_planted_pickle_refused_deepspeed(deepspeed_run, tmp_path: Path, capsys, kind: str) -> None:
    """Each DeepSpeed file (checked in-process: the check runs before anything distributed)."""
    job, trained, stage = deepspeed_run
    output = rewind(trained, tmp_path / "tampered")
    checkpoint = output / "checkpoints" / f"step-{EVERY}"
    relative = _deepspeed_files(stage, (checkpoint / "latest").read_text().strip())[kind]
    assert (checkpoint / relative).is_file()  # a file this stage really writes
    marker = tmp_path / "pwned"
    plant_torch_file(checkpoint, relative, marker)
    remanifest(checkpoint)
    code, _ = run_trainer(str(job), output=str(output), show_progress=False)
    assert_refused(code, capsys.readouterr().err, marker, relative)


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed_run", ["deepspeed-zero2"], indirect=True)  # one stage is enough here
def test_planted_zero_shard_refused_under_torchrun(deepspeed_run, tmp_path: Path) -> None:
    """Under torchrun the ranks refuse before any collective: a worker exits 3, nobody hangs, no marker.

    (torchrun itself then exits 1, whatever its workers' codes: see the module docstring.)
    """
    job, trained, _ = deepspeed_run
    output = rewind(trained, tmp_path / "tampered")
    checkpoint = output / "checkpoints" / f"step-{EVERY}"
    relative = f"global_step{EVERY}/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # only rank 1 would load it
    marker = tmp_path / "pwned"
    plant_torch_file(checkpoint, relative, marker)
    remanifest(checkpoint)
    result = torchrun(job, output)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and not marker.exists()
    # Every rank checks, but the first to exit 3 gets the others stopped, maybe before they print.
    assert f"file {relative} contains a non-allowlisted object" in text, text[-3000:]
    assert re.search(r"exitcode\s*:\s*3\b", text), text[-3000:]


def test_deepspeed_latest_tag_outside_checkpoint_refused(deepspeed_run, tmp_path: Path, capsys) -> None:
    """DeepSpeed loads the tag `latest` names: it may not lead out of the checkpoint."""
    job, trained, _ = deepspeed_run
    output = rewind(trained, tmp_path / "tampered")
    checkpoint = output / "checkpoints" / f"step-{EVERY}"
    (checkpoint / "latest").write_text(str(tmp_path / "elsewhere"))
    remanifest(checkpoint)
    code, _ = run_trainer(str(job), output=str(output), show_progress=False)
    err = capsys.readouterr().err
    assert code == 3 and "file latest names" in err, err[-3000:]


def test_best_checkpoint_outside_output_refused(single_run, tmp_path: Path, capsys) -> None:
    """trainer_state.json's best checkpoint (reloaded at the end) may not point out of the output."""
    job, trained = single_run
    output = rewind(trained, tmp_path / "tampered")
    checkpoint = output / "checkpoints" / f"step-{EVERY}"
    elsewhere = tmp_path / "elsewhere"
    marker = tmp_path / "pwned"
    plant_torch_file(elsewhere, "pytorch_model.bin", marker)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["best_model_checkpoint"] = str(elsewhere)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    remanifest(checkpoint)
    code, _ = run_trainer(str(job), output=str(output), show_progress=False)
    err = capsys.readouterr().err
    assert code == 3 and "trainer_state.json names" in err and not marker.exists(), err[-3000:]


# ----- the scan admits genuine files; the load-time layer holds on its own


def test_genuine_dcp_checkpoint_passes_and_loads(tmp_path: Path) -> None:
    """A real DCP checkpoint passes the scan, and torch.distributed.checkpoint loads it in the enforced context."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    state = dcp_state()
    save_dcp(tmp_path / "pytorch_model_fsdp_0", state)
    metadata = tmp_path / "pytorch_model_fsdp_0" / ".metadata"
    (metadata.parent / "__0.metadata").write_bytes(metadata.read_bytes())  # a rank's own index: checked too
    verify_checkpoint(tmp_path)
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
    original = FileSystemReader.__dict__["read_metadata"]
    with weights_only_loading():
        assert FileSystemReader.__dict__["read_metadata"] is not original
        dcp.load(target, storage_reader=FileSystemReader(str(tmp_path / "pytorch_model_fsdp_0")))
    assert FileSystemReader.__dict__["read_metadata"] is original  # restored
    for name, tensor in state["model"].items():
        assert torch.equal(target["model"][name], tensor)


@pytest.mark.parametrize("planted", [".metadata", "byte item"])
def test_enforcement_refuses_dcp_at_load_time(tmp_path: Path, planted: str) -> None:
    """Without the scan: DCP's own reader (pickle.load for .metadata, torch.load(weights_only=False) for
    byte items) is restricted too, and the refusal comes out as UnsafeCheckpointError (exit 3)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    directory = tmp_path / "optimizer_0"
    marker = tmp_path / "pwned"
    if planted == ".metadata":
        save_dcp(directory, dcp_state())
        (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        save_dcp(directory, dcp_state(lr=Payload(marker)))
    target = {"optimizer": dcp_state()["optimizer"]}
    with pytest.raises(UnsafeCheckpointError, match="non-allowlisted object"):
        with weights_only_loading(checkpoint=str(tmp_path)):
            dcp.load(target, storage_reader=FileSystemReader(str(directory)))
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["exec", "os.system"])
def test_enforcement_overrides_explicit_weights_only_false(tmp_path: Path, payload: str) -> None:
    """Without the scan: a library's torch.load(weights_only=False) is weights-only inside the context."""
    marker = tmp_path / "pwned"
    path = tmp_path / "optimizer.pt"
    if payload == "exec":
        torch.save({"state": Payload(marker)}, path)
    else:

        class System:
            def __reduce__(self) -> tuple[Any, tuple[str]]:
                return (os.system, (f"touch {marker}",))

        torch.save({"state": System()}, path)
    with pytest.raises(UnsafeCheckpointError, match="non-allowlisted object"):
        with weights_only_loading(checkpoint=str(tmp_path)):
            torch.load(path, weights_only=False)
    assert not marker.exists()


def test_enforcement_deepspeed_checkpoint_engine(deepspeed_run, tmp_path: Path) -> None:
    """DeepSpeed's TorchCheckpointEngine.load (weights_only=False in its code) is weights-only in the
    context: a genuine ZeRO shard loads with the allowlist, a planted one is refused."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    _, trained, _ = deepspeed_run
    checkpoint = trained / "checkpoints" / f"step-{EVERY}"
    shard = checkpoint / f"global_step{EVERY}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    engine = TorchCheckpointEngine()
    with weights_only_loading(deepspeed=True):
        state = engine.load(str(shard), map_location="cpu")
    assert "optimizer_state_dict" in state
    marker = tmp_path / "pwned"
    plant_torch_file(tmp_path, "shard.pt", marker)
    with pytest.raises(UnsafeCheckpointError):
        with weights_only_loading(deepspeed=True):
            engine.load(str(tmp_path / "shard.pt"), map_location="cpu")
    assert not marker.exists()
