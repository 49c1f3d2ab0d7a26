"""Observed Job and pods -> FineTuneJob status and the next action (pure: the clock is an argument).

The operator owns phase, conditions, attempt, restarts, preemptions, startTime, completionTime,
observedGeneration and message. The trainer owns progress, checkpoint, artifacts and metrics;
nothing here reads or writes those.

Failure handling (one attempt = one Indexed Job with backoffLimit 0):

* a pod exits 3 (EXIT_CONFIG_ERROR)                        -> Failed at once, reason ConfigError
* a pod exits 143 (EXIT_PREEMPTED), is evicted, has a
  DisruptionTarget condition or lost its node              -> new attempt, preemptions+1 (not counted)
* any other failure                                         -> new attempt, restarts+1, until
                                                               runPolicy.maxRestarts, then Failed
* runPolicy.activeDeadlineSeconds after startTime           -> Failed, reason DeadlineExceeded
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import ValidationError

from kubetune.spec import (
    EXIT_CONFIG_ERROR,
    EXIT_PREEMPTED,
    TERMINAL_PHASES,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
    RunPolicySpec,
)

OPERATOR_FIELDS = (
    "phase",
    "conditions",
    "attempt",
    "restarts",
    "preemptions",
    "startTime",
    "completionTime",
    "observedGeneration",
    "message",
)
# pod.status.reason values meaning the pod was taken away rather than failing on its own
DISRUPTION_REASONS = {
    "Evicted",
    "Preempting",
    "NodeLost",
    "Shutdown",
    "NodeShutdown",
    "Terminated",
    "DeletionByTaintManager",
    "DeletionByPodGC",
    "PreemptionByScheduler",
    "EvictionByEvictionAPI",
    "TerminationByKubelet",
}
MAX_MESSAGE = 1024


def _status_defaults() -> dict[str, Any]:
    """{camelCase field: default} of the operator-owned status fields that have one (FineTuneJobStatus)."""
    out: dict[str, Any] = {}
    for name, info in FineTuneJobStatus.model_fields.items():
        key = info.alias or name
        default = info.get_default(call_default_factory=True)
        if key in OPERATOR_FIELDS and default is not None:
            out[key] = default
    return out


_DEFAULTS = _status_defaults()  # attempt, restarts, preemptions: 0; conditions: []


class Action(str, Enum):
    """What the operator does to the children after an observation."""

    NONE = "none"  # leave them
    ENSURE = "ensure"  # create missing children of status.attempt; delete Jobs of other attempts
    STOP = "stop"  # delete every worker Job (and so its pods); keep the rest
    DELETE = "delete"  # delete the FineTuneJob itself (TTL after finishing)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the FineTuneJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class StatusUpdate:
    """Result of one observation."""

    status: dict[str, Any]  # operator-owned status fields, complete
    patch: dict[str, Any]  # the changed ones (a merge patch for .status); empty when nothing changed
    action: Action
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # look again after this many seconds at the latest

    @property
    def phase(self) -> str | None:
        """The phase after this observation (a Phase value)."""
        return self.status.get("phase")


def rfc3339(moment: datetime) -> str:
    """UTC timestamp with seconds precision, as Kubernetes writes them."""
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339, `Z` or an offset) as an aware datetime; None if absent or unreadable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Conditions with `type_` set; lastTransitionTime kept when the status does not change."""
    out = [dict(c) for c in conditions]
    for cond in out:
        if cond.get("type") == type_:
            if cond.get("status") != status:
                cond["lastTransitionTime"] = rfc3339(now)
            cond.update(status=status, reason=reason, message=_clip(message))
            if generation is not None:
                cond["observedGeneration"] = generation
            return out
    cond = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": _clip(message),
        "lastTransitionTime": rfc3339(now),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    return out


def get_condition(status: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


# ----- reading pods and Jobs -----


def _job_condition(job: Mapping[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def terminated_state(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `state.terminated` of the first container that terminated with a non-zero exit code."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    found = None
    for cs in statuses:
        term = (cs.get("state") or {}).get("terminated")
        if term is not None:
            if term.get("exitCode", 0) != 0:
                return term
            found = found or term
    return found


def exit_code(pod: Mapping[str, Any]) -> int | None:
    """Exit code from pod.status.containerStatuses[].state.terminated.exitCode (non-zero preferred)."""
    term = terminated_state(pod)
    return None if term is None else term.get("exitCode")


def disruption(pod: Mapping[str, Any]) -> str | None:
    """Why the pod was taken away (preempted, evicted, node lost), or None."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return f"{cond.get('reason') or 'DisruptionTarget'}: {cond.get('message') or ''}".rstrip(": ")
    if status.get("reason") in DISRUPTION_REASONS:
        return f"{status['reason']}: {status.get('message') or ''}".rstrip(": ")
    if status.get("phase") == "Failed" and exit_code(pod) == EXIT_PREEMPTED:
        return f"exit code {EXIT_PREEMPTED} (SIGTERM; checkpoint saved)"
    return None


def _pod_name(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def pod_observation_key(pod: Mapping[str, Any]) -> str:
    """Everything of a worker pod that `observe` can read, as one comparable string.

    The operator wakes a job's loop on a pod event only when this changed: a pod's status changes when
    something happens to it (scheduled or not, started, a container waiting on an image, terminated,
    disrupted, deleted), never periodically, and metadata-only updates are ignored."""
    meta = pod.get("metadata") or {}
    return json.dumps(
        {
            "deleting": meta.get("deletionTimestamp"),
            "node": (pod.get("spec") or {}).get("nodeName"),
            "status": pod.get("status") or {},
        },
        sort_keys=True,
        default=str,
    )


def _failure_text(pod: Mapping[str, Any]) -> str:
    term = terminated_state(pod) or {}
    status = pod.get("status") or {}
    code = term.get("exitCode")
    text = f"pod {_pod_name(pod)} failed"
    if code is not None:
        text += f" with exit code {code}"
    reason = term.get("reason") or status.get("reason")
    if reason:
        text += f" ({reason})"
    detail = term.get("message") or status.get("message")
    if detail:
        text += f": {detail}"
    return text


def _waiting_problem(pods: Sequence[Mapping[str, Any]]) -> str | None:
    bad = {
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    }
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in bad:
                return f"pod {_pod_name(pod)}: {waiting['reason']}: {waiting.get('message') or ''}".rstrip(
                    ": "
                )
    return None


def _unschedulable(pods: Sequence[Mapping[str, Any]]) -> str | None:
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"pod {_pod_name(pod)}: {cond.get('reason') or 'Unschedulable'}: {cond.get('message') or ''}"
    return None


def _scheduled(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("spec") or {}).get("nodeName"))


# ----- the observation -----


class _Builder:
    def __init__(self, job_cr: Mapping[str, Any], now: datetime):
        self.now = now
        meta = job_cr.get("metadata") or {}
        self.generation = meta.get("generation")
        self.old = {
            k: copy.deepcopy(v) for k, v in (job_cr.get("status") or {}).items() if k in OPERATOR_FIELDS
        }
        self.new = copy.deepcopy(self.old)
        for key, default in _DEFAULTS.items():
            self.new.setdefault(key, copy.deepcopy(default))
        self.events: list[Event] = []
        self.action = Action.NONE
        self.requeue: float | None = None

    @property
    def old_phase(self) -> str | None:
        return self.old.get("phase")

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        self.new["conditions"] = set_condition(
            self.new["conditions"],
            type_,
            "True" if status else "False",
            reason,
            message,
            self.now,
            self.generation,
        )

    def phase(self, phase: Phase, reason: str, message: str, *, event: bool = True) -> None:
        message = _clip(message)
        name = Phase(phase).value
        self.new["phase"] = name
        self.new["message"] = message
        # condition types named after phases: Running, Suspended, Succeeded, Failed
        self.condition(Phase.running.value, name == Phase.running, reason, message)
        if name == Phase.suspended or get_condition(self.new, Phase.suspended.value):
            self.condition(Phase.suspended.value, name == Phase.suspended, reason, message)
        if name in TERMINAL_PHASES:
            self.condition(name, True, reason, message)
            self.new.setdefault("completionTime", rfc3339(self.now))
        if event and name != self.old_phase:
            self.events.append(Event("Warning" if name == Phase.failed else "Normal", reason, message))

    def requeue_in(self, seconds: float) -> None:
        seconds = max(1.0, seconds)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def result(self) -> StatusUpdate:
        if self.generation is not None and (
            self.old_phase not in TERMINAL_PHASES or self.new.get("phase") != self.old_phase
        ):
            self.new["observedGeneration"] = self.generation
        patch = {k: v for k, v in self.new.items() if self.old.get(k, _DEFAULTS.get(k)) != v}
        for k in self.old:
            if k not in self.new:
                patch[k] = None
        return StatusUpdate(
            status=self.new, patch=patch, action=self.action, events=self.events, requeue_after=self.requeue
        )


def _finished_run_policy(job_cr: Mapping[str, Any]) -> RunPolicySpec:
    """runPolicy of a finished job, whose spec as a whole may be invalid (it may have failed for that).

    The CRD's schema validates runPolicy; one that does not validate here has no TTL."""
    try:
        return RunPolicySpec.model_validate((job_cr.get("spec") or {}).get("runPolicy") or {})
    except ValidationError:
        return RunPolicySpec()


def observe(
    job_cr: Mapping[str, Any],
    child_job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
    spec: FineTuneJobSpec | None = None,
) -> StatusUpdate:
    """Status and next action from the FineTuneJob, the Job of its current attempt and that Job's pods.

    `spec` is the job's validated spec (the operator passes its effective spec); by default the CR's
    spec is validated here. A finished job's spec is not validated: only its TTL is read."""
    b = _Builder(job_cr, now)
    attempt = b.new["attempt"]

    # finished: nothing runs any more; only the TTL is left
    if b.old_phase in TERMINAL_PHASES:
        # a pod failure fails the Job by itself (backoffLimit 0) and keeps the failed pods for `kubectl
        # logs`; anything else (deadline, invalid spec) still running is stopped here
        failed_pods = any(_pod_phase(p) == "Failed" for p in pods)
        if (
            b.old_phase == Phase.failed
            and child_job is not None
            and not job_finished(child_job)
            and not failed_pods
        ):
            b.action = Action.STOP
        ttl = (
            spec.run_policy if spec is not None else _finished_run_policy(job_cr)
        ).ttl_seconds_after_finished
        done = parse_time(b.new.get("completionTime"))
        if ttl is not None and done is not None:
            left = (done - now).total_seconds() + ttl
            if left <= 0:
                b.action = Action.DELETE
                b.events.append(
                    Event("Normal", "TTLExpired", f"deleting the FineTuneJob {ttl}s after it finished")
                )
            else:
                b.requeue_in(left)
        return b.result()

    if spec is None:
        spec = FineTuneJobSpec.model_validate(job_cr.get("spec") or {})
    policy = spec.run_policy
    if spec.suspend:
        b.phase(
            Phase.suspended,
            "Suspended",
            "workers removed, checkpoints kept; set spec.suspend to false to resume "
            "from the latest checkpoint",
        )
        b.action = Action.STOP if child_job is not None else Action.NONE
        return b.result()

    if b.old_phase == Phase.suspended or attempt == 0:
        resumed = b.old_phase == Phase.suspended
        b.new["attempt"] = attempt + 1
        if resumed:
            b.new.pop("startTime", None)
        b.phase(
            Phase.pending,
            "Resumed" if resumed else "Created",
            f"{'resuming' if resumed else 'starting'} attempt {attempt + 1}"
            + (" from the latest checkpoint" if resumed else ""),
        )
        b.action = Action.ENSURE
        return b.result()

    # the deadline counts from startTime (the first time workers started in this run)
    deadline = policy.active_deadline_seconds
    started = parse_time(b.new.get("startTime"))
    if deadline and started is not None:
        left = (started - now).total_seconds() + deadline
        if left <= 0:
            b.phase(
                Phase.failed,
                "DeadlineExceeded",
                f"runPolicy.activeDeadlineSeconds ({deadline}s) exceeded since "
                f"{b.new['startTime']}; workers stopped",
            )
            b.action = Action.STOP
            return b.result()
        b.requeue_in(left)

    if child_job is None:
        b.action = Action.ENSURE
        if b.old_phase in (None, ""):
            b.phase(Phase.pending, "Created", f"creating attempt {attempt}")
        return b.result()

    b.action = Action.ENSURE  # idempotent: recreates anything missing of this attempt

    if _job_condition(child_job, "Complete") or _job_condition(child_job, "SuccessCriteriaMet"):
        b.phase(Phase.succeeded, "Succeeded", f"training finished (attempt {attempt})")
        b.action = Action.NONE
        if policy.ttl_seconds_after_finished is not None:
            b.requeue_in(float(policy.ttl_seconds_after_finished))
        return b.result()

    failed = [p for p in pods if _pod_phase(p) == "Failed"]
    disrupted = [(p, d) for p in pods if (d := disruption(p))]
    job_failed = _job_condition(child_job, "Failed") or _job_condition(child_job, "FailureTarget")
    config_errors = [p for p in failed if exit_code(p) == EXIT_CONFIG_ERROR]
    if config_errors:
        b.phase(
            Phase.failed,
            "ConfigError",
            f"{_failure_text(config_errors[0])}; exit code {EXIT_CONFIG_ERROR} is a "
            "configuration or data error: not retried",
        )
        b.action = Action.NONE  # the Job fails by itself (backoffLimit 0); its failed pod keeps the logs
        return b.result()
    if disrupted:
        pod, why = disrupted[0]
        b.new["preemptions"] = b.new["preemptions"] + 1
        b.new["attempt"] = attempt + 1
        message = (
            f"attempt {attempt} preempted (pod {_pod_name(pod)}: {why}); starting attempt {attempt + 1} "
            "from the latest checkpoint (not counted as a restart)"
        )
        b.phase(Phase.pending, "Preempted", message, event=False)
        b.events.append(Event("Warning", "Preempted", _clip(message)))
        return b.result()
    if failed or job_failed:
        what = (
            _failure_text(failed[0])
            if failed
            else (
                f"Job {child_job['metadata']['name']} failed: {(job_failed or {}).get('reason')}: "
                f"{(job_failed or {}).get('message', '')}"
            )
        )
        max_restarts = policy.max_restarts
        if b.new["restarts"] >= max_restarts:
            b.phase(
                Phase.failed,
                "RestartLimitExceeded",
                f"attempt {attempt}: {what}; runPolicy.maxRestarts ({max_restarts}) reached",
            )
            b.action = Action.NONE
            return b.result()
        b.new["restarts"] = b.new["restarts"] + 1
        b.new["attempt"] = attempt + 1
        message = (
            f"attempt {attempt}: {what}; restarting as attempt {attempt + 1} from the latest checkpoint "
            f"(restart {b.new['restarts']} of {max_restarts})"
        )
        b.phase(Phase.pending, "Restarting", message, event=False)
        b.events.append(Event("Warning", "Restarting", _clip(message)))
        return b.result()

    # Kueue keeps the Job suspended until the workload is admitted (and suspends it again to evict it)
    if (child_job.get("spec") or {}).get("suspend"):
        queue = ((child_job.get("metadata") or {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        if b.old_phase in (Phase.running, Phase.initializing):
            b.new["preemptions"] = b.new["preemptions"] + 1
            b.events.append(
                Event(
                    "Warning",
                    "Preempted",
                    f"Kueue evicted attempt {attempt}; it resumes from the "
                    "latest checkpoint when admitted again (not counted as a restart)",
                )
            )
        where = f" in queue {queue}" if queue else ""
        b.phase(
            Phase.pending,
            "Queued",
            f"waiting for admission{where}",
            event=b.old_phase not in (None, Phase.pending),
        )
        return b.result()

    nodes = spec.resources.nodes
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    running = [p for p in live if _pod_phase(p) == "Running"]
    # workers that already exited 0 (rank > 0 ends before rank 0 has exported) still count: the
    # attempt is finishing, not initializing again, until the Job controller marks it Complete
    finished = [p for p in live if _pod_phase(p) == "Succeeded"]
    if len(running) + len(finished) >= nodes:
        b.new.setdefault("startTime", rfc3339(now))
        b.phase(Phase.running, "AllWorkersRunning", f"attempt {attempt}: {nodes} worker pod(s) running")
        started = parse_time(b.new.get("startTime"))
        if deadline and started is not None:
            b.requeue_in((started - now).total_seconds() + deadline)
        return b.result()
    problem = _waiting_problem(live)
    if running or any(_scheduled(p) for p in live):
        b.new.setdefault("startTime", rfc3339(now))
        message = problem or f"attempt {attempt}: {len(running)}/{nodes} worker pod(s) running"
        b.phase(Phase.initializing, "Initializing", message)
        if problem and problem != b.old.get("message"):
            b.events.append(Event("Warning", "WorkerProblem", _clip(problem)))
        return b.result()
    unschedulable = _unschedulable(live)
    was = (get_condition(b.old, Phase.running.value) or {}).get("reason")
    b.phase(
        Phase.pending,
        "Unschedulable" if unschedulable else "Pending",
        unschedulable or f"attempt {attempt}: waiting for {nodes} worker pod(s) to be scheduled",
    )
    if (
        unschedulable and was != "Unschedulable" and b.old_phase == Phase.pending
    ):  # phase() posts none: same phase
        b.events.append(Event("Warning", "Unschedulable", _clip(unschedulable)))
    return b.result()


def tampered_fields(status: Mapping[str, Any], written: Mapping[str, Any]) -> list[str]:
    """Operator-owned status fields whose value differs from what the operator itself last wrote.

    Only the operator writes these (the trainer's token may patch the status subresource for its
    progress, and the chart's admission policy refuses anything else; without that policy, this is the
    operator's own check)."""
    return [k for k in OPERATOR_FIELDS if status.get(k, _DEFAULTS.get(k)) != written.get(k, _DEFAULTS.get(k))]


def restore_patch(status: Mapping[str, Any], written: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch for .status that puts back the operator's own fields as it last wrote them."""
    return {k: written.get(k) for k in tampered_fields(status, written)}


def job_finished(job: Mapping[str, Any]) -> bool:
    """The worker Job is Complete or Failed: the Job controller is done with it and its pods."""
    return any(_job_condition(job, t) for t in ("Complete", "Failed"))


def job_finishing(job: Mapping[str, Any]) -> bool:
    """The worker Job is finished, or its outcome is decided (FailureTarget, SuccessCriteriaMet) and the
    Job controller is terminating its remaining pods."""
    return any(_job_condition(job, t) for t in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"))


def pod_done(pod: Mapping[str, Any]) -> bool:
    """The pod has ended (Succeeded or Failed)."""
    return _pod_phase(pod) in ("Succeeded", "Failed")


def _pod_phase(pod: Mapping[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("phase")


def config_error(
    job_cr: Mapping[str, Any], message: str, now: datetime, reason: str = "InvalidSpec"
) -> StatusUpdate:
    """The job cannot run as specified: the spec failed validation or lacks what a cluster needs
    (reason InvalidSpec), or breaks the platform's tenant policy (reason PolicyViolation)."""
    b = _Builder(job_cr, now)
    if b.old_phase in TERMINAL_PHASES:
        return b.result()
    b.phase(Phase.failed, reason, message)
    b.action = Action.STOP
    return b.result()
