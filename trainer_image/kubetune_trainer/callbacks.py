"""Trainer callbacks: progress (terminal, progress.json, the CR status), checkpoints, preemption."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from kubetune.checkpoints import CheckpointStore, step_name
from kubetune_trainer.evaluation import perplexity


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


PREFERENCE_STATUS_METRICS = (
    "baselineObjectiveLoss",
    "finalObjectiveLoss",
    "baselinePreferenceAccuracy",
    "finalPreferenceAccuracy",
    "finalRewardAccuracy",
    "finalRewardMargin",
)


class ProgressReporter(TrainerCallback):
    """Shows progress (step/total, loss, tokens/s, ETA) and publishes it.

    On rank 0 it keeps `progress.json` in the work directory fresh, appends every log line to
    `metrics.jsonl`, and, when running in a cluster, patches the FineTuneJob status through
    `kubetune_trainer.status_reporter` (at most every few seconds).
    """

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.trainer: Any = None
        self.baseline: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.started = 0.0
        self.start_step = 0
        self.start_tokens = 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        # what eval_loss is: the held-out loss of the next tokens, or of a preference objective (DPO, ...)
        preference = ctx.spec.task.preference
        self.objective = str(preference.objective).upper() if preference else None
        self.bar: Any = None
        self.task: Any = None
        self.status = None
        if ctx.is_main:
            from kubetune_trainer.status_reporter import StatusReporter

            self.status = StatusReporter.from_env()

    # ---- figures
    def tokens_per_second(self, state: Any) -> float:
        elapsed = time.time() - self.started
        tokens = int(state.num_input_tokens_seen or 0) - self.start_tokens
        return tokens / elapsed if elapsed > 0 else 0.0

    def mean_tokens_per_second(self) -> float:
        return round(self._tps, 2) if hasattr(self, "_tps") else 0.0

    def eta_seconds(self, state: Any) -> int | None:
        done = state.global_step - self.start_step
        if done <= 0 or not state.max_steps:
            return None
        per_step = (time.time() - self.started) / done
        return int(per_step * (state.max_steps - state.global_step))

    def progress(self, state: Any) -> dict[str, Any]:
        self._tps = self.tokens_per_second(state)
        total = state.max_steps or None
        return {
            "step": state.global_step,
            "totalSteps": total,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": self.last_loss,
            "evalLoss": self.last_eval_loss,
            "tokensPerSecond": round(self._tps, 2),
            "trainedTokens": int(state.num_input_tokens_seen or 0),
            "etaSeconds": self.eta_seconds(state),
            "percent": int(100 * state.global_step / total) if total else None,
            "updatedAt": _now(),
        }

    # ---- callback events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.time()
        self.start_step = state.global_step
        self.start_tokens = int(state.num_input_tokens_seen or 0)
        if not self.ctx.is_main:
            return
        if self.ctx.show_progress and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(
                "train", total=state.max_steps, completed=state.global_step, loss="-", tps="-"
            )
            self.bar.start()
        self._publish(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)
        if self.status is not None:
            self.status.report(progress=self.progress(state))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not self.ctx.is_main or not logs:
            return
        if "loss" in logs:
            self.last_loss = round(float(logs["loss"]), 4)
        if "eval_loss" in logs:
            self.last_eval_loss = round(float(logs["eval_loss"]), 4)
        record = {
            "step": state.global_step,
            "time": _now(),
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
        }
        self.history.append(record)
        with (self.ctx.work_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        progress = self._publish(state)
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=state.global_step,
                loss=self.last_loss,
                tps=f"{progress['tokensPerSecond']:.0f}",
            )
            if "eval_loss" in logs and state.global_step > 0:
                self.bar.console.print(f"step {state.global_step}: {self.held_out_text(logs)}")
        if state.global_step == 0 and "eval_loss" in logs:
            # the baseline evaluation; the preference recipe prints its own (on the held-out pairs)
            if not self.objective and self.ctx.show_progress:
                ppl = perplexity(logs["eval_loss"])
                print(
                    f"baseline: held-out loss {self.last_eval_loss} (perplexity "
                    f"{'-' if ppl is None else f'{ppl:.2f}'}) on {self.ctx.job.metadata.name}",
                    flush=True,
                )
        elif self.bar is None and self.ctx.show_progress and ("loss" in logs or "eval_loss" in logs):
            eta = progress["etaSeconds"]
            print(
                f"step {state.global_step}/{state.max_steps}  loss {self.last_loss or '-'}  "
                f"{'eval_loss' if not self.objective else f'eval_{self.objective.lower()}_loss'} "
                f"{self.last_eval_loss or '-'}  {progress['tokensPerSecond']:.0f} tok/s  "
                f"ETA {eta if eta is not None else '-'}s",
                flush=True,
            )

    def held_out_text(self, logs: dict[str, Any]) -> str:
        """An evaluation's figures in words: the held-out loss, or for preference tasks the objective's
        held-out loss with TRL's reward accuracy and margin."""
        if not self.objective:
            return f"held-out loss {self.last_eval_loss}"
        extras = [
            f", {name} {float(logs[key]):.4g}"
            for key, name in (
                ("eval_rewards/accuracies", "reward accuracy"),
                ("eval_rewards/margins", "reward margin"),
            )
            if key in logs
        ]
        return f"held-out {self.objective} loss {self.last_eval_loss}" + "".join(extras)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.ctx.is_main:
            self._publish(state)

    def _publish(self, state: Any) -> dict[str, Any]:
        progress = self.progress(state)
        path = self.ctx.work_dir / "progress.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress))
        tmp.replace(path)
        if self.status is not None:
            self.status.report(progress=progress, force=True)
        return progress

    def report_checkpoint(self, step: int, uri: str) -> None:
        if self.status is not None:
            self.status.report(checkpoint={"step": step, "uri": uri, "time": _now()}, force=True)

    def finish(self, summary: dict[str, Any]) -> None:
        """Final figures to the CR status: metrics and artifacts."""
        if self.status is None:
            return
        metrics = summary["metrics"]
        self.status.report(
            metrics={
                "baselinePerplexity": metrics["baselinePerplexity"],
                "finalPerplexity": metrics["finalPerplexity"],
                "baselineEvalLoss": metrics["baselineEvalLoss"],
                "finalEvalLoss": metrics["finalEvalLoss"],
                **{k: metrics[k] for k in PREFERENCE_STATUS_METRICS if k in metrics},
            },
            artifacts=[
                {k: a[k] for k in ("kind", "uri", "sha256", "sizeBytes")} for a in summary["artifacts"]
            ],
            force=True,
        )
        self.status.close()

    def write_loss_plot(self) -> Path | None:
        """PNG plot of training and evaluation loss against steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.history if "eval_loss" in r]
        if not train and not evals:
            return None
        figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            axis.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            axis.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.set_title(f"{self.ctx.job.metadata.name}: loss")
        axis.legend()
        axis.grid(alpha=0.3)
        path = self.ctx.work_dir / "loss.png"
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        return path


class BaselineEvaluator(TrainerCallback):
    """Held-out loss and sample generations of the model before any update.

    Measured at the start of training, once the Trainer has built its engine (DeepSpeed cannot
    evaluate before that), and saved as `baseline.json` so that checkpoints carry it: a resumed run
    reads it back instead of measuring a half-trained model.
    """

    def __init__(self, ctx: Any, samples: Any, resumed_baseline: Path | None):
        self.ctx = ctx
        self.samples = samples
        self.trainer: Any = None
        self.result: dict[str, Any] | None = None
        self.seconds = 0.0  # inside trainer.train(), but not training
        if resumed_baseline is not None and resumed_baseline.exists():
            self.result = json.loads(resumed_baseline.read_text())

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.result is None:
            started = time.perf_counter()
            metrics = self.trainer.evaluate(metric_key_prefix="eval")
            self.result = {
                "eval_loss": metrics["eval_loss"],
                "perplexity": perplexity(metrics["eval_loss"]),
                "samples": self.samples.generate(self.trainer.model),
            }
            self.trainer.model.train()
            self.seconds = time.perf_counter() - started
        (self.ctx.work_dir / "baseline.json").write_text(json.dumps(self.result))


class CheckpointPublisher(TrainerCallback):
    """Makes each saved checkpoint complete (manifest written last), publishes it and prunes old ones."""

    def __init__(self, ctx: Any, store: CheckpointStore, config_hash: str, reporter: ProgressReporter):
        self.ctx = ctx
        self.store = store
        self.config_hash = config_hash
        self.reporter = reporter
        self.background = ctx.spec.checkpoint.background
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-ckpt")
        self._pending: list[Future] = []
        self.blocked_seconds = 0.0  # time on_save kept training waiting (for bench/checkpoint_overhead)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.ctx.is_main:
            return
        local = Path(args.output_dir) / step_name(state.global_step)
        baseline = self.ctx.work_dir / "baseline.json"
        if baseline.exists():
            (local / "kubetune_baseline.json").write_text(baseline.read_text())
        started = time.perf_counter()
        best = getattr(state, "best_global_step", None)
        step, uri = state.global_step, self.store.step_uri(state.global_step)
        extra = {"epoch": state.epoch, "job": self.ctx.job.metadata.name}

        def publish() -> None:
            # Hashing every file and writing the manifest (then, for S3, uploading) makes it complete.
            future = self.store.publish(
                local,
                step,
                self.config_hash,
                extra=extra,
                keep_last=self.ctx.spec.checkpoint.keep_last,
                protect={best} if best else (),
            )

            def reported(done: Future[Any]) -> None:
                if done.exception() is None:
                    self.reporter.report_checkpoint(step, uri)

            future.add_done_callback(reported)

        if self.background:
            self._pending.append(self._executor.submit(publish))
        else:
            publish()
            self.store.wait()
        self.blocked_seconds += time.perf_counter() - started

    def wait(self) -> None:
        """Block until every checkpoint handed to the background thread is published."""
        for future in self._pending:
            future.result()
        self._pending.clear()


class PreemptionHandler(TrainerCallback):
    """SIGTERM: finish the current step, save a checkpoint, stop; the process then exits 143.

    Every rank must stop at the same step, so under torch.distributed the flag is all-reduced.
    """

    requested = False

    def __init__(self, ctx: Any):
        self.ctx = ctx
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    @classmethod
    def _on_sigterm(cls, signum: int, frame: Any) -> None:
        cls.requested = True

    def _any_rank_requested(self) -> bool:
        flag = PreemptionHandler.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
            PreemptionHandler.requested = flag
        return flag

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._any_rank_requested():
            print(
                f"[kubetune] SIGTERM: saving a checkpoint at step {state.global_step} and stopping",
                flush=True,
            )
            control.should_save = True
            control.should_training_stop = True
