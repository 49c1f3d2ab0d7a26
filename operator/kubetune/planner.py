"""Observed children + the action status.observe() chose -> the steps that carry it out (pure).

`handlers.Reconciler` only executes the steps in order. What is decided here:

* `stop`: delete every worker Job not already being deleted;
* `delete`: delete the FineTuneJob (its TTL is over);
* `ensure` (children of `status.attempt`): delete unfinished Jobs of earlier attempts (Foreground,
  so their pods go before the Job), delete finished Jobs of earlier attempts beyond the
  `KEEP_FINISHED_ATTEMPTS` latest, then create-or-adopt every child of the attempt in render order
  (the PodGroup, if any, before the Job; the Job last), but wait instead of creating the Job while a
  pod of an earlier attempt still runs or an earlier unfinished Job is being deleted. Once the
  attempt's Job exists (not being deleted), nothing is created: the Job is created last, so every
  other child of the attempt existed then. This holds across operator restarts and failovers: a
  restarted operator creates nothing for running jobs (no create/409/read round per child).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kubetune import render
from kubetune.status import Action, job_finishing, pod_done

KEEP_FINISHED_ATTEMPTS = 2  # finished Jobs of earlier attempts kept for `kubectl logs`
WAIT_FOR_EARLIER_PODS = 2.0  # seconds before looking again


class StepKind(str, Enum):
    """What one step does."""

    DELETE_JOB = "delete-job"  # delete the worker Job `name` with `propagation`
    DELETE_SELF = "delete-self"  # delete the FineTuneJob
    ENSURE = "ensure"  # create `child`, or adopt the existing one of that name if this job owns it
    WAIT = "wait"  # stop here; look again after `seconds` (or when a watch event wakes the loop)


@dataclass(frozen=True)
class Step:
    """One step of a plan, with the reason (logged)."""

    kind: StepKind
    reason: str
    name: str = ""
    propagation: str = "Background"
    child: Mapping[str, Any] | None = field(default=None, compare=False)
    seconds: float = 0.0


def attempt_of(obj: Mapping[str, Any]) -> int:
    """The `kubetune.io/attempt` label of a child (0 when missing or not a number)."""
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {}).get(render.LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def plan_stop(jobs: Sequence[Mapping[str, Any]]) -> list[Step]:
    """Delete every worker Job not already being deleted."""
    return [Step(StepKind.DELETE_JOB, "stop the workers", _name(j)) for j in jobs if not _deleting(j)]


def plan_ensure(
    job_name: str,
    attempt: int,
    jobs: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    children: Callable[[], Sequence[Mapping[str, Any]]],
) -> list[Step]:
    """The steps that make the children of `attempt` exist (see the module docstring).

    `jobs`: the FineTuneJob's worker Jobs (all attempts); `pods`: its worker pods (all attempts);
    `children`: renders the attempt's children in creation order (called only when needed)."""
    steps: list[Step] = []
    stale = [j for j in jobs if attempt_of(j) != attempt]
    for job in stale:
        if not _deleting(job) and not job_finishing(job):
            steps.append(
                Step(
                    StepKind.DELETE_JOB,
                    f"attempt {attempt_of(job)} is not the current attempt {attempt}",
                    _name(job),
                    "Foreground",
                )
            )
    finished = sorted((j for j in stale if job_finishing(j) and not _deleting(j)), key=attempt_of)
    for job in finished[:-KEEP_FINISHED_ATTEMPTS] if len(finished) > KEEP_FINISHED_ATTEMPTS else []:
        steps.append(
            Step(
                StepKind.DELETE_JOB,
                f"only the {KEEP_FINISHED_ATTEMPTS} latest finished attempts are kept",
                _name(job),
            )
        )
    current = next(
        (j for j in jobs if _name(j) == render.job_name(job_name, attempt) and not _deleting(j)), None
    )
    if current is not None:
        return steps
    waiting = [_name(p) for p in pods if attempt_of(p) != attempt and not pod_done(p)]
    stopping = [_name(j) for j in stale if _deleting(j) and not job_finishing(j)]
    for child in children():
        if child["kind"] == "Job" and (waiting or stopping):
            steps.append(
                Step(
                    StepKind.WAIT,
                    "waiting for pods of earlier attempts to stop: " + ", ".join(waiting or stopping),
                    seconds=WAIT_FOR_EARLIER_PODS,
                )
            )
            return steps
        steps.append(Step(StepKind.ENSURE, f"child of attempt {attempt}", _name(child), child=child))
    return steps


def plan(
    action: Action,
    job_name: str,
    attempt: int,
    jobs: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    children: Callable[[], Sequence[Mapping[str, Any]]],
) -> list[Step]:
    """The steps for `action` (status.Action) given the observed worker Jobs and pods."""
    if action == Action.STOP:
        return plan_stop(jobs)
    if action == Action.DELETE:
        return [Step(StepKind.DELETE_SELF, "ttlSecondsAfterFinished is over", job_name)]
    if action == Action.ENSURE:
        return plan_ensure(job_name, attempt, jobs, pods, children)
    return []
