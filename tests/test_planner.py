"""planner.py: observed worker Jobs and pods + action -> steps (pure, no cluster)."""

from __future__ import annotations

from typing import Any

from kubetune import planner
from kubetune.planner import Step, StepKind
from kubetune.status import Action

NAME = "legal-lora"


def job(attempt: int, *, finished: str | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"{NAME}-{attempt}", "labels": {"kubetune.io/attempt": str(attempt)}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    conditions = [{"type": finished, "status": "True"}] if finished else []
    return {"kind": "Job", "metadata": meta, "status": {"conditions": conditions}}


def pod(attempt: int, index: int = 0, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"name": f"{NAME}-{attempt}-{index}", "labels": {"kubetune.io/attempt": str(attempt)}},
        "status": {"phase": phase},
    }


def children(attempt: int, podgroup: bool = False) -> list[dict[str, Any]]:
    kinds = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap"] + (["PodGroup"] if podgroup else [])
    rendered = [{"kind": k, "metadata": {"name": f"{NAME}-{k.lower()}"}} for k in kinds]
    return rendered + [{"kind": "Job", "metadata": {"name": f"{NAME}-{attempt}"}, "spec": {"completions": 1}}]


def kinds(steps: list[Step]) -> list[tuple[str, str]]:
    return [(s.kind.value, s.name) for s in steps]


def ensure(
    attempt: int, jobs: list[dict[str, Any]], pods: list[dict[str, Any]], podgroup: bool = False
) -> list[Step]:
    return planner.plan(Action.ENSURE, NAME, attempt, jobs, pods, lambda: children(attempt, podgroup))


def test_first_attempt_creates_every_child_in_render_order_job_last() -> None:
    steps = ensure(1, [], [])
    assert [s.kind for s in steps] == [StepKind.ENSURE] * 5
    assert [s.child["kind"] for s in steps if s.child] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Job",
    ]
    assert steps[-1].name == f"{NAME}-1"


def test_podgroup_is_created_before_the_job() -> None:
    steps = ensure(1, [], [], podgroup=True)
    assert [s.child["kind"] for s in steps if s.child][-2:] == ["PodGroup", "Job"]


def test_nothing_to_do_once_the_attempts_job_exists_even_after_an_operator_restart() -> None:
    """The Job is created last: if it exists, so did every other child (no create/409/read round)."""
    rendered: list[int] = []

    def render() -> list[dict[str, Any]]:
        rendered.append(1)
        return children(1)

    assert planner.plan(Action.ENSURE, NAME, 1, [job(1)], [pod(1)], render) == []
    assert rendered == []  # not even rendered


def test_a_job_being_deleted_is_not_the_current_one() -> None:
    steps = ensure(1, [job(1, deleting=True)], [])
    assert [s.kind for s in steps] == [StepKind.ENSURE] * 5


def test_unfinished_earlier_attempt_is_deleted_foreground_and_the_new_job_waits_for_its_pods() -> None:
    steps = ensure(2, [job(1)], [pod(1)])
    assert steps[0] == Step(StepKind.DELETE_JOB, steps[0].reason, f"{NAME}-1", "Foreground")
    assert "attempt 1" in steps[0].reason
    assert [s.kind for s in steps[1:]] == [StepKind.ENSURE] * 4 + [StepKind.WAIT]
    assert steps[-1].seconds == planner.WAIT_FOR_EARLIER_PODS and f"{NAME}-1-0" in steps[-1].reason


def test_a_job_of_an_earlier_attempt_still_being_deleted_blocks_the_new_job_even_without_pods() -> None:
    steps = ensure(2, [job(1, deleting=True)], [])
    assert kinds(steps)[-1] == ("wait", "")
    assert not any(s.kind == StepKind.DELETE_JOB for s in steps)  # already being deleted: not again


def test_finished_pods_of_earlier_attempts_do_not_block() -> None:
    steps = ensure(2, [job(1, finished="Failed")], [pod(1, phase="Failed")])
    assert kinds(steps)[-1] == ("ensure", f"{NAME}-2")
    assert not any(s.kind == StepKind.DELETE_JOB for s in steps)  # finished Jobs are kept for their logs


def test_only_the_two_latest_finished_attempts_are_kept() -> None:
    jobs = [job(1, finished="Failed"), job(2, finished="Complete"), job(3, finished="FailureTarget"), job(4)]
    steps = ensure(4, jobs, [pod(4)])
    assert kinds(steps) == [("delete-job", f"{NAME}-1")]
    assert steps[0].propagation == "Background"


def test_stop_deletes_every_job_not_already_being_deleted() -> None:
    steps = planner.plan(
        Action.STOP,
        NAME,
        3,
        [job(2, finished="Failed"), job(3), job(1, deleting=True)],
        [],
        lambda: children(3),
    )
    assert kinds(steps) == [("delete-job", f"{NAME}-2"), ("delete-job", f"{NAME}-3")]


def test_delete_action_deletes_the_finetunejob_and_none_does_nothing() -> None:
    assert kinds(planner.plan(Action.DELETE, NAME, 1, [job(1)], [], lambda: children(1))) == [
        ("delete-self", NAME)
    ]
    assert planner.plan(Action.NONE, NAME, 1, [job(1)], [pod(1)], lambda: children(1)) == []


def test_attempt_label_that_is_not_a_number_reads_as_zero() -> None:
    assert planner.attempt_of({"metadata": {"labels": {"kubetune.io/attempt": "x"}}}) == 0
    assert planner.attempt_of({}) == 0
