"""status.observe(): phases, conditions, restart decisions and events, pure (no cluster)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from kubetune import status as st
from kubetune.status import Action, observe
from tests.support.status_objects import T0, cr, job, pod, running


def cond(update: st.StatusUpdate, type_: str) -> dict[str, Any]:
    found = st.get_condition(update.status, type_)
    assert found is not None, update.status
    return found


def test_new_job_starts_attempt_one() -> None:
    u = observe(cr(), None, [], T0)
    assert u.phase == "Pending" and u.status["attempt"] == 1 and u.action == Action.ENSURE
    assert [e.reason for e in u.events] == ["Created"]
    assert u.status["observedGeneration"] == 1 and cond(u, "Running")["status"] == "False"
    assert cond(u, "Running")["observedGeneration"] == 1


def test_waiting_for_pods_and_unschedulable() -> None:
    status = {"phase": "Pending", "attempt": 1}
    u = observe(cr(status), job(), [], T0)
    assert u.phase == "Pending" and u.action == Action.ENSURE and "scheduled" in u.status["message"]
    unsched = pod(
        0,
        "Pending",
        node=None,
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: Insufficient nvidia.com/gpu",
            }
        ],
    )
    u = observe(cr(status), job(), [unsched], T0)
    assert u.phase == "Pending" and cond(u, "Running")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in u.status["message"]
    assert [(e.type, e.reason) for e in u.events] == [("Warning", "Unschedulable")]
    assert "Insufficient nvidia.com/gpu" in u.events[0].message
    again = observe(cr({**status, **u.status}), job(), [unsched], T0)  # said once, not at every look
    assert again.events == [] and not again.patch


def test_initializing_then_running() -> None:
    status = {"phase": "Pending", "attempt": 1}
    u = observe(cr(status), job(), [pod(0), pod(1, "Pending")], T0)
    assert u.phase == "Initializing" and u.status["startTime"] == st.rfc3339(T0)
    assert [e.reason for e in u.events] == ["Initializing"]
    later = T0 + timedelta(seconds=30)
    u2 = observe(cr({**status, **u.status}), job(), [pod(0), pod(1)], later)
    assert u2.phase == "Running" and u2.status["startTime"] == st.rfc3339(T0)
    assert cond(u2, "Running")["status"] == "True" and cond(u2, "Running")[
        "lastTransitionTime"
    ] == st.rfc3339(later)
    assert [(e.type, e.reason) for e in u2.events] == [("Normal", "AllWorkersRunning")]


def test_image_pull_problem_is_reported() -> None:
    u = observe(
        cr({"phase": "Pending", "attempt": 1}), job(), [pod(0, "Pending", waiting="ImagePullBackOff")], T0
    )
    assert u.phase == "Initializing" and "ImagePullBackOff" in u.status["message"]
    assert any(e.reason == "WorkerProblem" and e.type == "Warning" for e in u.events)


def test_steady_state_changes_nothing() -> None:
    first = observe(cr(running()), job(), [pod(0), pod(1)], T0)
    again = observe(cr({**running(), **first.status}), job(), [pod(0), pod(1)], T0 + timedelta(minutes=5))
    assert again.patch == {} and again.events == []
    assert cond(again, "Running")["lastTransitionTime"] == cond(first, "Running")["lastTransitionTime"]


def test_succeeded() -> None:
    u = observe(cr(running()), job(1, "Complete"), [pod(0, "Succeeded", exit_code=0)], T0)
    assert u.phase == "Succeeded" and u.action == Action.NONE
    assert cond(u, "Succeeded")["status"] == "True" and cond(u, "Running")["status"] == "False"
    assert u.status["completionTime"] == st.rfc3339(T0)
    assert [(e.type, e.reason) for e in u.events] == [("Normal", "Succeeded")]


def test_exit_code_3_fails_without_restart() -> None:
    pods = [pod(0, "Failed", exit_code=3, message="datasets[0]: file not found"), pod(1)]
    u = observe(cr(running()), job(), pods, T0)
    assert u.phase == "Failed" and u.status["restarts"] == 0 and u.status["attempt"] == 1
    assert cond(u, "Failed")["reason"] == "ConfigError" and "file not found" in cond(u, "Failed")["message"]
    assert u.action == Action.NONE  # the Job fails by itself (backoffLimit 0) and keeps the pod's logs
    assert [(e.type, e.reason) for e in u.events] == [("Warning", "ConfigError")]


def test_exit_code_3_wins_over_other_failures() -> None:
    pods = [pod(0, "Failed", exit_code=1), pod(1, "Failed", exit_code=3)]
    assert observe(cr(running()), job(1, "Failed"), pods, T0).phase == "Failed"


def test_exit_143_is_a_preemption_not_counted() -> None:
    u = observe(cr(running(restarts=1)), job(), [pod(0, "Failed", exit_code=143), pod(1)], T0)
    assert u.phase == "Pending" and u.action == Action.ENSURE
    assert u.status["attempt"] == 2 and u.status["preemptions"] == 1 and u.status["restarts"] == 1
    assert [(e.type, e.reason) for e in u.events] == [("Warning", "Preempted")]
    assert cond(u, "Running")["reason"] == "Preempted"


@pytest.mark.parametrize(
    "victim",
    [
        pod(
            0,
            conditions=[
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "preempted by a higher priority pod",
                }
            ],
        ),
        pod(0, "Failed", pod_reason="Evicted", message="node low on memory"),
        pod(0, "Failed", pod_reason="NodeLost"),
        pod(
            0,
            "Failed",
            exit_code=137,
            conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}],
        ),
    ],
    ids=["disruption-target", "evicted", "node-lost", "taint-manager-kill"],
)
def test_disruptions_are_preemptions(victim: dict[str, Any]) -> None:
    u = observe(cr(running()), job(), [victim, pod(1)], T0)
    assert u.status["preemptions"] == 1 and u.status["restarts"] == 0 and u.status["attempt"] == 2
    assert u.action == Action.ENSURE


def test_retryable_failure_counts_a_restart() -> None:
    u = observe(cr(running()), job(1, "Failed"), [pod(0, "Failed", exit_code=1), pod(1)], T0)
    assert u.phase == "Pending" and u.action == Action.ENSURE
    assert u.status["restarts"] == 1 and u.status["attempt"] == 2 and u.status["preemptions"] == 0
    (event,) = u.events
    assert event.type == "Warning" and event.reason == "Restarting" and "exit code 1" in event.message
    assert "attempt 2" in event.message


def test_oom_counts_a_restart() -> None:
    u = observe(cr(running()), job(), [pod(0, "Failed", exit_code=137, reason="OOMKilled")], T0)
    assert u.status["restarts"] == 1 and "OOMKilled" in u.events[0].message


def test_job_failed_without_pods_counts_a_restart() -> None:
    u = observe(cr(running()), job(1, "Failed"), [], T0)
    assert u.status["restarts"] == 1 and u.status["attempt"] == 2


def test_restart_limit() -> None:
    u = observe(cr(running(attempt=4, restarts=3)), job(4, "Failed"), [pod(0, "Failed", exit_code=2)], T0)
    assert u.phase == "Failed" and cond(u, "Failed")["reason"] == "RestartLimitExceeded"
    assert u.status["restarts"] == 3 and u.status["attempt"] == 4
    zero = observe(cr(running(), runPolicy={"maxRestarts": 0}), job(), [pod(0, "Failed", exit_code=1)], T0)
    assert zero.phase == "Failed"


def test_deadline() -> None:
    spec = {"runPolicy": {"activeDeadlineSeconds": 600}}
    u = observe(cr(running(), **spec), job(), [pod(0), pod(1)], T0 + timedelta(seconds=100))
    assert u.phase == "Running" and u.requeue_after == pytest.approx(500)
    u = observe(cr(running(), **spec), job(), [pod(0), pod(1)], T0 + timedelta(seconds=601))
    assert (
        u.phase == "Failed" and cond(u, "Failed")["reason"] == "DeadlineExceeded" and u.action == Action.STOP
    )


def test_suspend_and_resume() -> None:
    u = observe(cr(running(), suspend=True), job(), [pod(0), pod(1)], T0)
    assert u.phase == "Suspended" and u.action == Action.STOP
    assert cond(u, "Suspended")["status"] == "True" and [e.reason for e in u.events] == ["Suspended"]
    again = observe(cr({**running(), **u.status}, suspend=True), None, [], T0)
    assert again.action == Action.NONE and again.patch == {}
    resumed = observe(cr({**running(), **u.status}, suspend=False), None, [], T0 + timedelta(hours=1))
    assert resumed.phase == "Pending" and resumed.status["attempt"] == 2 and resumed.action == Action.ENSURE
    assert "startTime" not in resumed.status and resumed.patch["startTime"] is None
    assert cond(resumed, "Suspended")["status"] == "False"
    assert [e.reason for e in resumed.events] == ["Resumed"]
    assert resumed.status["restarts"] == 0 and resumed.status["preemptions"] == 0


def test_ttl_after_finished() -> None:
    done = {"phase": "Succeeded", "attempt": 1, "completionTime": st.rfc3339(T0)}
    u = observe(
        cr(done, runPolicy={"ttlSecondsAfterFinished": 60}),
        job(1, "Complete"),
        [],
        T0 + timedelta(seconds=20),
    )
    assert u.action == Action.NONE and u.requeue_after == pytest.approx(40)
    u = observe(
        cr(done, runPolicy={"ttlSecondsAfterFinished": 60}),
        job(1, "Complete"),
        [],
        T0 + timedelta(seconds=61),
    )
    assert u.action == Action.DELETE and [e.reason for e in u.events] == ["TTLExpired"]
    u = observe(cr(done), job(1, "Complete"), [], T0 + timedelta(days=30))
    assert u.action == Action.NONE and u.requeue_after is None


def test_failed_job_still_running_is_stopped() -> None:
    failed = {"phase": "Failed", "attempt": 1, "completionTime": st.rfc3339(T0)}
    assert observe(cr(failed), job(), [pod(0), pod(1)], T0).action == Action.STOP
    # a failed pod fails the Job by itself: keep it for its logs
    assert observe(cr(failed), job(), [pod(0, "Failed", exit_code=3), pod(1)], T0).action == Action.NONE
    assert observe(cr(failed), job(1, "Failed"), [], T0).action == Action.NONE


def test_kueue_queued_and_evicted() -> None:
    u = observe(cr({"phase": "Pending", "attempt": 1}), job(suspend=True, queue="team-a"), [], T0)
    assert (
        u.phase == "Pending" and cond(u, "Running")["reason"] == "Queued" and "team-a" in u.status["message"]
    )
    assert u.events == []
    u = observe(cr(running()), job(suspend=True, queue="team-a"), [], T0)
    assert u.phase == "Pending" and u.status["preemptions"] == 1 and u.status["attempt"] == 1
    assert [e.reason for e in u.events] == ["Preempted", "Queued"]


def test_config_error() -> None:
    u = st.config_error(cr(), "spec.output.uri: required in a cluster", T0)
    assert u.phase == "Failed" and cond(u, "Failed")["reason"] == "InvalidSpec" and u.action == Action.STOP
    assert st.config_error(cr({"phase": "Succeeded"}), "x", T0).patch == {}


def test_generation_is_observed() -> None:
    u = observe(cr(running(), generation=7), job(), [pod(0), pod(1)], T0)
    assert u.status["observedGeneration"] == 7 and cond(u, "Running")["observedGeneration"] == 7


def test_exit_code_reading() -> None:
    p = pod(0, "Failed")
    p["status"]["containerStatuses"] = [
        {"name": "a", "state": {"terminated": {"exitCode": 0}}},
        {"name": "trainer", "state": {"terminated": {"exitCode": 3}}},
    ]
    assert st.exit_code(p) == 3
    assert st.exit_code(pod(0)) is None


def test_messages_are_clipped() -> None:
    u = observe(cr(running()), job(), [pod(0, "Failed", exit_code=3, message="x" * 5000)], T0)
    assert len(u.status["message"]) <= st.MAX_MESSAGE
