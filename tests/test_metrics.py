"""Prometheus metrics: the operator's (kubetune.metrics) and the trainer's (kubetune_trainer.metrics).

The operator's endpoint is scraped during a real job lifecycle in tests/test_chart.py; here its
bookkeeping is checked on a fresh registry, and the trainer's endpoint is scraped in the middle of
a real (tiny) training run: the run is held at step 2 until the scrape is done.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

try:
    from tests.support.controlplane import free_port
except ImportError:  # tests/ is on sys.path instead of the repository root
    from support.controlplane import free_port  # type: ignore[no-redef]

from kubetune.metrics import PHASES, OperatorMetrics
from tests.support.waiting import WaitTimeout, wait_for


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return samples_of(response.read().decode())


# ----- the operator -----

CREATED = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def cr(uid: str, namespace: str = "team-a", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": uid,
            "namespace": namespace,
            "name": uid,
            "creationTimestamp": CREATED.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "status": status,
    }


def test_operator_metrics_bookkeeping() -> None:
    registry = CollectorRegistry()
    m = OperatorMetrics(registry)
    m.record_update(cr("a"), {"phase": "Pending", "attempt": 1})
    m.record_update(cr("b", "team-b"), {"phase": "Pending", "attempt": 1})
    s = samples_of(generate_latest(registry).decode())
    assert value(s, "kubetune_finetunejobs", namespace="team-a", phase="Pending") == 1
    assert all(value(s, "kubetune_finetunejobs", namespace="team-a", phase=p) is not None for p in PHASES)
    # first Running of attempt 1: time to running observed once, from creationTimestamp
    m.record_update(
        cr("a", phase="Pending", attempt=1),
        {"phase": "Running", "attempt": 1},
        now=CREATED + timedelta(seconds=42),
    )
    m.record_update(
        cr("a", phase="Running", attempt=1),
        {"phase": "Running", "attempt": 1},
        now=CREATED + timedelta(seconds=50),
    )
    s = samples_of(generate_latest(registry).decode())
    assert value(s, "kubetune_job_time_to_running_seconds_count") == 1
    assert value(s, "kubetune_job_time_to_running_seconds_sum") == 42
    assert value(s, "kubetune_finetunejobs", namespace="team-a", phase="Running") == 1
    assert value(s, "kubetune_finetunejobs", namespace="team-a", phase="Pending") == 0
    # a failure restart and a preemption, counted by reason; a later Running of attempt 2 is not timed
    m.record_update(
        cr("a", phase="Running", attempt=1, restarts=0), {"phase": "Pending", "attempt": 2, "restarts": 1}
    )
    m.record_update(
        cr("a", phase="Pending", attempt=2, restarts=1, preemptions=0),
        {"phase": "Running", "attempt": 2, "restarts": 1, "preemptions": 0},
    )
    m.record_update(
        cr("a", phase="Running", attempt=2, preemptions=0),
        {"phase": "Pending", "attempt": 3, "preemptions": 1},
    )
    s = samples_of(generate_latest(registry).decode())
    assert value(s, "kubetune_job_restarts_total", namespace="team-a", reason="failure") == 1
    assert value(s, "kubetune_job_restarts_total", namespace="team-a", reason="preemption") == 1
    assert value(s, "kubetune_job_time_to_running_seconds_count") == 1
    # the job's loop ends: it leaves the gauge (its namespace too, once empty)
    m.forget("a")
    s = samples_of(generate_latest(registry).decode())
    assert value(s, "kubetune_finetunejobs", namespace="team-a", phase="Pending") is None
    assert value(s, "kubetune_finetunejobs", namespace="team-b", phase="Pending") == 1
    # bad input never raises into a reconcile
    m.record_update({"metadata": {}}, {})
    m.record_update(cr("c"), {"phase": "Running", "attempt": "x"})


def test_operator_reconcile_timer_counts_errors() -> None:
    registry = CollectorRegistry()
    m = OperatorMetrics(registry)
    with m.reconcile_timer():
        time.sleep(0.01)  # deliberate: the duration the timer measures
    with pytest.raises(ApiException), m.reconcile_timer():
        raise ApiException(status=409, reason="Conflict")
    with pytest.raises(KeyError), m.reconcile_timer():
        raise KeyError("x")
    s = samples_of(generate_latest(registry).decode())
    assert value(s, "kubetune_reconcile_duration_seconds_count") == 3
    assert value(s, "kubetune_reconcile_duration_seconds_sum") >= 0.01
    assert value(s, "kubetune_reconcile_errors_total", reason="api_409") == 1
    assert value(s, "kubetune_reconcile_errors_total", reason="KeyError") == 1


def test_operator_serves_metrics_on_the_given_address() -> None:
    from kubetune import metrics

    port = free_port()
    assert metrics.serve(port, "127.0.0.1")
    s = scrape(port)
    assert value(s, "kubetune_operator_info", version="0.1.0") == 1
    assert ("kubetune_reconcile_duration_seconds_count", ()) in s
    assert not metrics.serve(port, "127.0.0.1")  # a taken port is logged, not fatal


# ----- the trainer -----


def test_trainer_metrics_callback_is_a_no_op_off_rank_0(monkeypatch) -> None:
    from kubetune_trainer.metrics import MetricsCallback

    monkeypatch.delenv("KUBETUNE_METRICS_PORT", raising=False)
    assert not MetricsCallback(SimpleNamespace(rank=0)).enabled
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", str(free_port()))
    assert not MetricsCallback(SimpleNamespace(rank=1)).enabled
    monkeypatch.setenv("RANK", "3")
    assert not MetricsCallback().enabled


@pytest.mark.slow  # a training run of the tiny model
def test_trainer_metrics_are_served_during_a_training_run(make_job, monkeypatch, tmp_path: Path) -> None:
    """Rank 0 serves step, loss and tokens/s while it trains (a real tiny run, held at step 2)."""
    from transformers import TrainerCallback

    from kubetune_trainer import metrics as trainer_metrics
    from kubetune_trainer import train
    from kubetune_trainer.__main__ import run_trainer

    port = free_port()
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", str(port))
    monkeypatch.setenv("KUBETUNE_METRICS_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("KUBETUNE_JOB_NAME", "metrics-run")
    monkeypatch.setenv("KUBETUNE_JOB_NAMESPACE", "team-a")
    monkeypatch.setenv("KUBETUNE_ATTEMPT", "1")
    monkeypatch.delenv("RANK", raising=False)
    scraped: dict[str, Any] = {}
    done = threading.Event()

    class HoldAtStep2(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                assert done.wait(60), "the metrics endpoint was not scraped"

    def at_step_two() -> dict | None:
        try:
            s = scrape(port)
        except OSError:  # not serving yet
            return None
        return s if (value(s, "kubetune_trainer_step") or 0) >= 2 else None

    def scraper() -> None:
        try:
            scraped["during"] = wait_for(
                at_step_two, 300, "kubetune_trainer_step >= 2 on /metrics", interval=0.1
            )
        except WaitTimeout:
            return  # the test's own assertion reports it
        done.set()

    original = train.tracking_callbacks
    monkeypatch.setattr(
        train,
        "tracking_callbacks",
        lambda ctx: [*original(ctx), trainer_metrics.MetricsCallback(ctx), HoldAtStep2()],
    )
    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        code, summary = run_trainer(str(make_job("metrics", training={"maxSteps": 4})), show_progress=False)
        assert code == 0 and summary
        after = scrape(port)
    finally:
        done.set()
        trainer_metrics.stop()
    thread.join(5)
    during = scraped["during"]
    assert value(during, "kubetune_trainer_step") == 2
    assert value(during, "kubetune_trainer_total_steps") == 4
    assert value(during, "kubetune_trainer_loss") > 0
    assert value(during, "kubetune_trainer_tokens_per_second") > 0
    assert value(during, "kubetune_trainer_trained_tokens") > 0
    assert value(during, "kubetune_trainer_learning_rate") > 0
    assert (
        value(during, "kubetune_trainer_info", finetunejob="metrics-run", namespace="team-a", attempt="1")
        == 1
    )
    assert value(after, "kubetune_trainer_step") == 4
    assert value(after, "kubetune_trainer_trained_tokens") > value(during, "kubetune_trainer_trained_tokens")
