"""Experiment tracking: Weights & Biases and MLflow, as transformers callbacks on rank 0 only.

    spec.tracking.wandb   project, entity, mode online|offline. The API key comes only from the
                          environment (WANDB_API_KEY, from tracking.wandb.apiKeySecretRef in a cluster)
                          and is never written or printed by kubetune. Offline runs are written under
                          the output: <output>/wandb/offline-run-*/ (upload later with `wandb sync`).
    spec.tracking.mlflow  trackingUri (http(s)://, databricks, sqlite:///..., or file:/path) and
                          experiment. Credentials only from the environment (MLFLOW_TRACKING_TOKEN or
                          MLFLOW_TRACKING_USERNAME/PASSWORD, from credentialsSecretRef in a cluster).

Both are small subclasses of transformers' WandbCallback and MLflowCallback, configured from the spec
instead of process-wide environment variables. Each opens its run at the first log (the baseline
evaluation) and keeps it open past the end of training, so the final evaluation lands in the same run;
`finish_runs()` closes the runs (and otherwise they are closed when the process exits).

Hook (train.py):

    def tracking_callbacks(ctx):
        ...
        callbacks += tracking.callbacks_for(ctx)
    ...
    # at the end of run(), after write_summary (optional; exit closes the runs too):
    tracking.finish_runs(summary)
"""

from __future__ import annotations

import atexit
import netrc
import os
import re
from typing import Any
from urllib.parse import urlsplit

from transformers.integrations import MLflowCallback, WandbCallback

from kubetune_trainer.errors import ConfigError

_OPEN: list[Any] = []  # trackers whose run is open, closed by finish_runs()
_ATEXIT_REGISTERED = False


def callbacks_for(ctx: Any) -> list[Any]:
    """Weights & Biases and MLflow callbacks for the spec; none on ranks other than 0."""
    if not ctx.is_main:
        return []
    tracking = ctx.spec.tracking
    callbacks: list[Any] = []
    if tracking.wandb is not None:
        callbacks.append(KubetuneWandbCallback(ctx, tracking.wandb))
    if tracking.mlflow is not None:
        callbacks.append(KubetuneMlflowCallback(ctx, tracking.mlflow))
    return callbacks


def finish_runs(summary: dict[str, Any] | None = None) -> None:
    """Close every run opened by these callbacks, with the run summary's final figures if given."""
    while _OPEN:
        tracker = _OPEN.pop()
        try:
            tracker.finish(summary)
        except Exception as error:  # noqa: BLE001 - a tracker problem must not fail a finished run
            print(
                f"[kubetune] warning: closing the {tracker.name} run failed: {type(error).__name__}: {error}",
                flush=True,
            )


def _register(tracker: Any) -> None:
    global _ATEXIT_REGISTERED
    _OPEN.append(tracker)
    if not _ATEXIT_REGISTERED:
        atexit.register(finish_runs)
        _ATEXIT_REGISTERED = True


def redact_uri(uri: str) -> str:
    """A URI fit to print: user and password removed."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()


class _NeverFailsTraining:
    """A tracker outage must not fail a training run: the first error disables the tracker with a warning."""

    name = "tracker"
    _disabled = False

    def _guard(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        if self._disabled:
            return None
        try:
            return method(*args, **kwargs)
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - any tracker failure: warn once and go on
            self._disabled = True
            message = re.sub(r"//[^/@\s]+@", "//***@", f"{type(error).__name__}: {error}")[:300]
            print(
                f"[kubetune] warning: {self.name} logging failed and is off for the rest of this run ({message})",
                flush=True,
            )
            return None

    def on_train_begin(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(super().on_train_begin, *args, **kwargs)  # type: ignore[misc]

    def on_log(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(super().on_log, *args, **kwargs)  # type: ignore[misc]

    def on_save(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(super().on_save, *args, **kwargs)  # type: ignore[misc]

    def on_train_end(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(super().on_train_end, *args, **kwargs)  # type: ignore[misc]


def _final_metrics(summary: dict[str, Any] | None) -> dict[str, float]:
    if not summary:
        return {}
    metrics = {f"final/{k}": v for k, v in summary.get("metrics", {}).items() if isinstance(v, (int, float))}
    for key in ("trainedTokens", "tokensPerSecond", "durationSeconds", "steps"):
        if isinstance(summary.get(key), (int, float)):
            metrics[f"final/{key}"] = summary[key]
    return metrics


def _spec_params(ctx: Any) -> dict[str, Any]:
    """The job's own settings (secret references are names, never values)."""
    spec = ctx.spec
    params = {
        "job": ctx.job.metadata.name,
        "model": spec.model.source,
        "method": spec.method.type,
        "task": spec.task.type,
        "worldSize": ctx.world_size,
    }
    params.update(
        {
            f"training.{k}": v
            for k, v in spec.training.model_dump(mode="json", by_alias=True, exclude_none=True).items()
        }
    )
    if spec.method.lora is not None:
        params.update(
            {f"lora.{k}": v for k, v in spec.method.lora.model_dump(mode="json", by_alias=True).items()}
        )
    return params


# ------------------------------------------------------------------------------ Weights & Biases


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class KubetuneWandbCallback(_NeverFailsTraining, WandbCallback):
    """transformers' WandbCallback with the run opened from spec.tracking.wandb."""

    name = "Weights & Biases"

    def __init__(self, ctx: Any, spec: Any):
        try:
            super().__init__()
        except RuntimeError:
            raise ConfigError(
                "tracking.wandb needs the wandb package in the trainer image (pip install wandb)"
            ) from None
        from transformers.integrations.integration_utils import WandbLogModel

        self._log_model = WandbLogModel("false")  # never upload model weights to W&B
        self.ctx, self.spec, self.run = ctx, spec, None
        if spec.mode == "online" and not _wandb_key_available():
            raise ConfigError(
                "tracking.wandb.mode online needs WANDB_API_KEY in the environment (in a cluster: "
                "tracking.wandb.apiKeySecretRef naming a Secret with WANDB_API_KEY); or use "
                "mode: offline to write the run under the output"
            )

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.run is None:
            directory = self.ctx.work_dir  # wandb adds wandb/<run>/ below it
            directory.mkdir(parents=True, exist_ok=True)
            self.run = self._wandb.init(
                project=self.spec.project,
                entity=self.spec.entity,
                mode=self.spec.mode,
                dir=str(directory),
                name=self.ctx.job.metadata.name,
                job_type="fine-tune",
                tags=[str(self.ctx.spec.method.type), str(self.ctx.spec.task.type)],
                config={"kubetune": _spec_params(self.ctx)},
                settings=self._wandb.Settings(silent=True),
            )
            _register(self)
            where = f"offline under {directory / 'wandb'}" if self.spec.mode == "offline" else "online"
            print(f"[kubetune] logging to Weights & Biases project {self.spec.project} ({where})", flush=True)
        super().setup(args, state, model, **kwargs)  # finds the open run; adds the TrainingArguments

    def finish(self, summary: dict[str, Any] | None) -> None:
        if self.run is None:
            return
        for key, value in _final_metrics(summary).items():
            self.run.summary[key] = value
        self.run.finish()
        self.run = None
        if self.spec.mode == "offline" and self.ctx.output_is_s3:
            from kubetune import storage

            local = self.ctx.work_dir / "wandb"
            if local.exists():
                storage.upload_tree(local, self.ctx.output_path("wandb"), options=self.ctx.s3)


# ------------------------------------------------------------------------------ MLflow


class KubetuneMlflowCallback(_NeverFailsTraining, MLflowCallback):
    """transformers' MLflowCallback with the run opened from spec.tracking.mlflow."""

    name = "MLflow"

    def __init__(self, ctx: Any, spec: Any):
        try:
            super().__init__()
        except RuntimeError:
            raise ConfigError(
                "tracking.mlflow needs the mlflow package in the trainer image (pip install mlflow-skinny)"
            ) from None
        self.ctx, self.spec, self.run_id = ctx, spec, None
        if spec.tracking_uri.startswith("file:"):
            # MLflow >= 3.7 refuses the file store unless told otherwise; the spec asked for it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    def setup(self, args: Any, state: Any, model: Any) -> None:
        if state.is_world_process_zero and self.run_id is None:
            mlflow = self._ml_flow
            mlflow.set_tracking_uri(self.spec.tracking_uri)
            experiment = mlflow.set_experiment(self.spec.experiment)
            run = mlflow.start_run(
                run_name=self.ctx.job.metadata.name,
                experiment_id=experiment.experiment_id,
                nested=mlflow.active_run() is not None,
                tags={
                    "kubetune.job": self.ctx.job.metadata.name,
                    "kubetune.method": str(self.ctx.spec.method.type),
                },
            )
            self.run_id = run.info.run_id
            params = {
                re.sub(r"[^0-9A-Za-z_\-. /]", "_", k): str(v)[:250] for k, v in _spec_params(self.ctx).items()
            }
            mlflow.log_params({f"kubetune.{k}": v for k, v in params.items()})
            _register(self)
            print(
                f"[kubetune] logging to MLflow {redact_uri(self.spec.tracking_uri)} experiment "
                f"{self.spec.experiment} (run {self.run_id})",
                flush=True,
            )
        super().setup(args, state, model)  # finds the active run; logs the TrainingArguments
        self._auto_end_run = False  # ended by finish(), after the final evaluation

    def finish(self, summary: dict[str, Any] | None) -> None:
        if self.run_id is None:
            return
        mlflow = self._ml_flow
        metrics = _final_metrics(summary)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            if metrics:
                mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()})
            mlflow.end_run()
        else:
            client = mlflow.MlflowClient()
            for key, value in metrics.items():
                client.log_metric(self.run_id, key.replace("/", "."), value)
            client.set_terminated(self.run_id)
        self.run_id = None
