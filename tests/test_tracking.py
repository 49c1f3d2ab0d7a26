"""Experiment tracking: a tiny run really logs to W&B (offline) and MLflow (file: store), and the
credentials given through the environment appear nowhere in what is written or printed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kubetune_trainer.__main__ import run_trainer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow  # trains with the trackers

WANDB_KEY = "wandb-key-d41d8cd98f00b204e9800998ecf8427e"
MLFLOW_TOKEN = "mlflow-token-0cc175b9c0f1b6a831c399e269772661"


def wandb_records(path: Path) -> list[Any]:
    """Records of a .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks, chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # block trailer
            position += room
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        if position + 7 + length > len(data):  # still being written
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_and_mlflow_file_store_receive_metrics(
    make_job, tmp_path: Path, monkeypatch, capfd
) -> None:
    import mlflow

    from kubetune_trainer import tracking

    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MLFLOW_TOKEN)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    store = tmp_path / "mlruns"
    path = make_job(
        "tracked",
        training={"maxSteps": 3, "loggingSteps": 1},
        tracking={
            "tensorboard": False,
            "wandb": {"project": "kubetune-test", "mode": "offline"},
            "mlflow": {"trackingUri": f"file:{store}", "experiment": "kubetune-test"},
        },
    )
    code, summary = run_trainer(str(path), show_progress=True)
    tracking.finish_runs(summary)  # a no-op when train.run already closed them
    assert code == 0
    output = Path(summary["output"])

    # W&B: the offline run is under the output and holds the training and evaluation history
    (run_file,) = output.glob("wandb/offline-run-*/run-*.wandb")

    def finished() -> list | None:  # wandb's service may still be writing the log when finish() returns
        records = wandb_records(run_file)
        return records if any(r.WhichOneof("record_type") == "exit" for r in records) else None

    records = wait_for(finished, 60, f"the exit record in {run_file}", interval=0.5)
    history = [
        {"/".join(item.nested_key) or item.key: item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    train_steps = [int(h["train/global_step"]) for h in history if "train/loss" in h]
    eval_steps = [int(h["train/global_step"]) for h in history if "eval/loss" in h]
    assert train_steps == [1, 2, 3] and eval_steps == [0, 3], history  # baseline and final evaluation
    assert any(r.WhichOneof("record_type") == "run" and r.run.display_name == "tracked" for r in records)

    # MLflow: one finished run in the experiment, with per-step loss and both evaluations
    client = mlflow.MlflowClient(f"file:{store}")
    experiment = client.get_experiment_by_name("kubetune-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 3]
    assert run.data.params["kubetune.method"] == "lora"
    assert run.data.metrics["final.finalPerplexity"] == pytest.approx(summary["metrics"]["finalPerplexity"])

    # the credentials are nowhere: not in files written, not in what was printed
    printed = capfd.readouterr()
    for secret in (WANDB_KEY, MLFLOW_TOKEN):
        assert secret not in printed.out and secret not in printed.err
        for file in [*tmp_path.rglob("*")]:
            if file.is_file():
                assert secret.encode() not in file.read_bytes(), file
    assert "logging to Weights & Biases project kubetune-test" in printed.out
    assert "logging to MLflow file:" in printed.out


def _ctx(tmp_path: Path, rank: int = 0, **tracking: Any) -> Any:
    from kubetune.spec import TrackingSpec

    spec = SimpleNamespace(tracking=TrackingSpec.model_validate({"tensorboard": False, **tracking}))
    return SimpleNamespace(is_main=rank == 0, spec=spec, work_dir=tmp_path)


def test_online_wandb_without_a_key_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    from kubetune_trainer.errors import ConfigError
    from kubetune_trainer.tracking import callbacks_for

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc either
    monkeypatch.delenv("NETRC", raising=False)
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        callbacks_for(_ctx(tmp_path, wandb={"project": "p"}))
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    (callback,) = callbacks_for(_ctx(tmp_path, wandb={"project": "p"}))
    assert callback.name == "Weights & Biases"


def test_only_rank_zero_tracks(tmp_path: Path) -> None:
    from kubetune_trainer.tracking import callbacks_for

    both = {"wandb": {"project": "p", "mode": "offline"}, "mlflow": {"trackingUri": f"file:{tmp_path}/m"}}
    assert callbacks_for(_ctx(tmp_path, rank=1, **both)) == []
    assert [c.name for c in callbacks_for(_ctx(tmp_path, **both))] == ["Weights & Biases", "MLflow"]


def test_uris_are_printed_without_credentials() -> None:
    from kubetune_trainer.tracking import redact_uri

    assert (
        redact_uri("https://user:s3cret@mlflow.example.com:5000/x") == "https://***@mlflow.example.com:5000/x"
    )
    assert redact_uri("file:/tmp/mlruns") == "file:/tmp/mlruns"


def test_an_unreachable_tracking_server_does_not_fail_training(make_job, monkeypatch, capfd) -> None:
    from kubetune_trainer import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    path = make_job(
        "down",
        training={"maxSteps": 2},
        tracking={
            "tensorboard": False,
            "mlflow": {"trackingUri": "http://kt-user:pw-0cc175b9c0f1@127.0.0.1:9"},
        },
    )
    code, summary = run_trainer(str(path), show_progress=False)
    tracking.finish_runs(summary)
    assert code == 0 and summary["steps"] == 2
    printed = capfd.readouterr()
    assert "MLflow logging failed and is off for the rest of this run" in printed.out
    assert "pw-0cc175b9c0f1" not in printed.out + printed.err
