"""status.observe() while an attempt finishes: workers that already exited 0 keep the job Running.

Found by the former tests/test_e2e_cluster.py (now tests/test_real_node.py): rank 1 exits as soon as training ends, rank 0 goes on exporting
and uploading; the job went Running -> Initializing -> Succeeded.
"""

from __future__ import annotations

from kubetune.status import Action, observe
from tests.support.status_objects import T0, cr, job, pod, running


def test_a_finished_worker_keeps_the_job_running() -> None:
    u = observe(cr(running()), job(), [pod(0), pod(1, "Succeeded", exit_code=0, reason="Completed")], T0)
    assert u.phase == "Running" and u.action == Action.ENSURE


def test_all_workers_finished_before_the_job_is_complete() -> None:
    done = [pod(i, "Succeeded", exit_code=0, reason="Completed") for i in range(2)]
    u = observe(cr(running()), job(), done, T0)
    assert u.phase == "Running"
    u = observe(cr(running()), job(1, "Complete"), done, T0)
    assert u.phase == "Succeeded"


def test_a_finished_worker_does_not_make_a_starting_job_running() -> None:
    u = observe(
        cr({"phase": "Pending", "attempt": 1}),
        job(),
        [pod(0, "Pending"), pod(1, "Succeeded", exit_code=0, reason="Completed")],
        T0,
    )
    assert u.phase == "Initializing"
