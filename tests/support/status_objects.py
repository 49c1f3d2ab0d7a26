"""Kubernetes objects as status.observe() sees them (a FineTuneJob, its Job, its pods), for the pure
status tests (tests/test_status.py, tests/test_status_finishing.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kubetune import status as st

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def cr(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": generation},
        "spec": {
            "model": {"source": "m"},
            "task": {"type": "chat"},
            "datasets": [{"source": "d"}],
            "resources": {"nodes": 2},
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return body


def job(
    attempt: int = 1, *conditions: str, suspend: bool = False, queue: str | None = None
) -> dict[str, Any]:
    labels = {"kubetune.io/attempt": str(attempt)}
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = queue
    return {
        "metadata": {"name": f"j-{attempt}", "labels": labels},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [
                {"type": c, "status": "True", "reason": c, "message": f"{c} happened"} for c in conditions
            ]
        },
    }


def pod(
    index: int,
    phase: str = "Running",
    *,
    node: str | None = "n1",
    exit_code: int | None = None,
    reason: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    waiting: str | None = None,
    pod_reason: str | None = None,
    message: str = "",
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}} if phase == "Running" else {}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason or "Error", "message": message}}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": "back-off pulling image"}}
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions or [],
        "containerStatuses": [{"name": "trainer", "state": state}],
    }
    if pod_reason:
        status["reason"] = pod_reason
    return {
        "metadata": {"name": f"j-1-{index}-abc"},
        "spec": {"nodeName": node} if node else {},
        "status": status,
    }


def running(attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "phase": "Running",
        "attempt": attempt,
        "restarts": 0,
        "preemptions": 0,
        "startTime": st.rfc3339(T0),
        **extra,
    }
