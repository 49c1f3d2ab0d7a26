"""Prometheus metrics of a training run, served by rank 0 when KUBETUNE_METRICS_PORT is set.

The operator sets KUBETUNE_METRICS_PORT (render.TRAINER_METRICS_PORT, container port `metrics`) on
every worker pod; only the process of global rank 0 serves, on 0.0.0.0 (KUBETUNE_METRICS_ADDRESS
to change it), path `/metrics`. Add `MetricsCallback(ctx)` to the Trainer's callbacks: it is a
no-op on other ranks and when the variable is unset.

| metric | type | what |
|---|---|---|
| `kubetune_trainer_step` | gauge | optimizer steps done (global step) |
| `kubetune_trainer_total_steps` | gauge | planned steps |
| `kubetune_trainer_epoch` | gauge | fractional epoch |
| `kubetune_trainer_loss` | gauge | latest logged training loss |
| `kubetune_trainer_eval_loss` | gauge | latest evaluation loss |
| `kubetune_trainer_learning_rate` | gauge | latest logged learning rate |
| `kubetune_trainer_tokens_per_second` | gauge | input tokens per second (all ranks) since this process started training |
| `kubetune_trainer_trained_tokens` | gauge | input tokens seen so far (all ranks, resumed runs included) |
| `kubetune_trainer_info` | gauge | 1, labels finetunejob, namespace, attempt (from the pod's KUBETUNE_* variables) |

Every value is set (never incremented), so a second callback in the same process is harmless;
the server is started once per process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from transformers import TrainerCallback

log = logging.getLogger("kubetune.trainer.metrics")

PORT_ENV = "KUBETUNE_METRICS_PORT"
ADDRESS_ENV = "KUBETUNE_METRICS_ADDRESS"


class TrainerMetrics:
    """The gauges, in their own registry (nothing else of the process is exported)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("kubetune_trainer_step", "Optimizer steps done", registry=r)
        self.total_steps = Gauge("kubetune_trainer_total_steps", "Planned optimizer steps", registry=r)
        self.epoch = Gauge("kubetune_trainer_epoch", "Fractional epoch", registry=r)
        self.loss = Gauge("kubetune_trainer_loss", "Latest logged training loss", registry=r)
        self.eval_loss = Gauge("kubetune_trainer_eval_loss", "Latest evaluation loss", registry=r)
        self.learning_rate = Gauge(
            "kubetune_trainer_learning_rate", "Latest logged learning rate", registry=r
        )
        self.tokens_per_second = Gauge(
            "kubetune_trainer_tokens_per_second",
            "Input tokens per second, all ranks, since this process started training",
            registry=r,
        )
        self.trained_tokens = Gauge(
            "kubetune_trainer_trained_tokens", "Input tokens seen so far, all ranks", registry=r
        )
        self.info = Gauge(
            "kubetune_trainer_info",
            "The FineTuneJob this process trains",
            ["finetunejob", "namespace", "attempt"],
            registry=r,
        )
        self.server: Any = None
        self.port: int | None = None


_METRICS: TrainerMetrics | None = None
_LOCK = threading.Lock()


def trainer_metrics() -> TrainerMetrics:
    """The process's metrics (created once)."""
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = TrainerMetrics()
        return _METRICS


def serve(port: int, address: str = "0.0.0.0") -> TrainerMetrics:
    """Start the endpoint once per process (later calls return the same metrics)."""
    metrics = trainer_metrics()
    with _LOCK:
        if metrics.server is None:
            try:
                metrics.server, _ = start_http_server(port, addr=address, registry=metrics.registry)
                metrics.port = port
                log.info("metrics on http://%s:%s/metrics", address, port)
            except OSError as error:  # never fail a run over its metrics
                log.warning("metrics endpoint %s:%s not started: %s", address, port, error)
    return metrics


def stop() -> None:
    """Shut the endpoint down (tests; a pod's process simply exits)."""
    metrics = trainer_metrics()
    with _LOCK:
        if metrics.server is not None:
            metrics.server.shutdown()
            metrics.server.server_close()
            metrics.server = None
            metrics.port = None


def _rank(ctx: Any) -> int:
    if ctx is not None and getattr(ctx, "rank", None) is not None:
        return int(ctx.rank)
    return int(os.environ.get("RANK", "0"))


class MetricsCallback(TrainerCallback):
    """Feeds the Prometheus gauges from the Trainer's state and logs (rank 0, KUBETUNE_METRICS_PORT set)."""

    def __init__(self, ctx: Any = None, port: int | None = None, address: str | None = None):
        raw = port if port is not None else os.environ.get(PORT_ENV)
        number = int(raw) if _rank(ctx) == 0 and raw else 0
        self.enabled = number > 0
        self.port = number if self.enabled else None
        self.address = address or os.environ.get(ADDRESS_ENV) or "0.0.0.0"
        self.metrics: TrainerMetrics | None = None
        self.started = 0.0
        self.start_tokens = 0
        if self.enabled:
            self.metrics = serve(number, self.address)
            self.metrics.info.labels(
                finetunejob=os.environ.get("KUBETUNE_JOB_NAME", ""),
                namespace=os.environ.get("KUBETUNE_JOB_NAMESPACE", ""),
                attempt=os.environ.get("KUBETUNE_ATTEMPT", ""),
            ).set(1)

    def _update(self, state: Any) -> None:
        m = self.metrics
        if m is None or not state.is_world_process_zero:
            return
        m.step.set(state.global_step)
        if state.max_steps:
            m.total_steps.set(state.max_steps)
        m.epoch.set(state.epoch or 0.0)
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        m.trained_tokens.set(tokens)
        elapsed = time.time() - self.started
        if self.started and elapsed > 0:
            m.tokens_per_second.set((tokens - self.start_tokens) / elapsed)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.time()
        self.start_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._update(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._update(state)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        m = self.metrics
        if m is None or not state.is_world_process_zero or not logs:
            return
        if isinstance(logs.get("loss"), (int, float)):
            m.loss.set(float(logs["loss"]))
        if isinstance(logs.get("eval_loss"), (int, float)):
            m.eval_loss.set(float(logs["eval_loss"]))
        if isinstance(logs.get("learning_rate"), (int, float)):
            m.learning_rate.set(float(logs["learning_rate"]))
        self._update(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._update(state)
