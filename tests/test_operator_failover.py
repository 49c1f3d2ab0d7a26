"""Failover and API server restarts, against a real control plane (its own: the restart is disruptive).

* two replicas with kopf peering; the active one is SIGKILLed (no cleanup, no peering record
  removed) while jobs are being created and a worker fails: the standby takes over when the dead
  replica's peering record expires (`--peering-lifetime`), every job progresses, no child is created
  twice and no status transition is lost (the failure is counted exactly once);
* kube-apiserver stopped and started again under a running operator (connections reset; the watches
  resume from a resourceVersion older than the new API server's watch cache: 410 Gone, kopf lists
  again and kubetune.cache replaces what it held): the same process goes on, without duplicates.

The takeover time is printed (bench/README.md records it); it is not asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.support.controlplane import ControlPlane
from tests.support.operator_cluster import (
    NS,
    SECRETS,
    _peering_crd,
    children,
    event_reasons,
    jobs,
    manifest,
    operator_process,
    running_pods,
    status,
    wait_phase,
)
from tests.support.operator_process import install_crd, service_account_kubeconfig


@pytest.fixture(scope="module")
def cp(request):
    failed_before = request.session.testsfailed
    with ControlPlane() as plane:
        for index in range(3):
            plane.add_fake_node(f"gpu-{index}", gpus=8, labels={"pool": "gpu"})
        plane.create_namespace(
            NS,
            labels={
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        )
        install_crd(plane)
        for name, data in SECRETS.items():
            plane.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": NS},
                    "stringData": data,
                }
            )
        yield plane
        if request.session.testsfailed > failed_before:
            print(plane.diagnostics(20))


@pytest.fixture(scope="module")
def api(cp):
    return cp.api_client()


def _one_job_per_attempt(api: client.ApiClient, name: str, attempts: int) -> None:
    names = [j["metadata"]["name"] for j in jobs(api, name)]
    # the current attempt's Job; an earlier one may be gone (deleted unfinished when the next attempt began)
    assert f"{name}-{attempts}" in names and set(names) <= {f"{name}-{a}" for a in range(1, attempts + 1)}, (
        names
    )
    assert event_reasons(api, name).count("CreatedWorkers") == attempts
    kids = children(api, name)
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap"):
        assert len(kids[kind]) == 1, (name, kind, kids[kind])
    assert len(kids["Service"]) <= 1, (name, kids["Service"])  # multi-node jobs only


def test_standby_takes_over_after_the_active_replica_is_sigkilled(cp, api, tmp_path: Path) -> None:
    cp.apply(_peering_crd("ClusterKopfPeering", "Cluster"))
    cp.apply(_peering_crd("KopfPeering", "Namespaced"))
    cp.wait_for(
        lambda: cp.kubectl("get", "clusterkopfpeerings", check=False).returncode == 0, 60, "peering CRD"
    )
    cp.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "failover"}})
    kubeconfig = service_account_kubeconfig(cp, tmp_path)
    peering = ("--peering", "failover", "--peering-lifetime", "10")
    active = operator_process(cp, tmp_path / "active.log", kubeconfig, (*peering, "--priority", "100"))
    standby = operator_process(cp, tmp_path / "standby.log", kubeconfig, (*peering, "--priority", "50"))
    try:
        active.start()
        standby.start()
        # a replica starts paused and resumes only when no live peer has a higher priority
        cp.wait_for(lambda: "clusterkopfpeerings" in standby.log(), 60, "the standby to watch its peers")
        cp.apply(manifest("steady"))
        cp.apply(manifest("failing", runPolicy={"maxRestarts": 3}))
        wait_phase(cp, api, "steady", "Running")
        wait_phase(cp, api, "failing", "Running")
        doomed = running_pods(cp, api, "failing", 1, 2)[0]["metadata"]["name"]
        # mid-work: new jobs arrive and the active replica dies while it creates their children
        fresh = [f"fresh-{i}" for i in range(3)]
        for name in fresh:
            cp.apply(
                manifest(name, resources={"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"pool": "gpu"}})
            )
        cp.wait_for(
            lambda: any(f"{NS}/fresh-" in line for line in active.log().splitlines()),
            30,
            "the active replica to start on the new jobs",
        )
        assert "Resuming operations" not in standby.log()
        active.kill()
        killed = time.monotonic()
        cp.fail_pod(NS, doomed, exit_code=1)  # a transition only the standby can record
        cp.wait_for(lambda: "Resuming operations" in standby.log(), 60, "the standby to take over")
        takeover = time.monotonic() - killed
        print(
            f"\nstandby resumed {takeover:.1f} s after the SIGKILL of the active replica (peering lifetime 10 s)"
        )
        for name in fresh:
            wait_phase(cp, api, name, "Running")
        print(f"every new job Running {time.monotonic() - killed:.1f} s after the SIGKILL")
        st = wait_phase(cp, api, "failing", "Running", check=lambda s: s.get("attempt") == 2)
        assert st["restarts"] == 1 and st.get("preemptions", 0) == 0
        assert event_reasons(api, "failing").count("Restarting") == 1
        time.sleep(5)  # several reconciles by the new active replica
        assert status(api, "failing")["attempt"] == 2 and status(api, "failing")["restarts"] == 1
        _one_job_per_attempt(api, "failing", 2)
        for name in ["steady", *fresh]:
            assert status(api, name)["phase"] == "Running" and status(api, name)["attempt"] == 1
            _one_job_per_attempt(api, name, 1)
        assert len(running_pods(cp, api, "failing", 2, 2)) == 2
        assert "Traceback" not in standby.log()
    finally:
        active.stop()
        standby.stop()


def test_operator_recovers_from_an_api_server_restart_without_duplicates(cp, api, tmp_path: Path) -> None:
    op = operator_process(cp, tmp_path / "operator.log", service_account_kubeconfig(cp, tmp_path))
    op.start()
    try:
        assert op.proc is not None
        pid = op.proc.pid
        cp.apply(manifest("through-restart", runPolicy={"maxRestarts": 3}))
        wait_phase(cp, api, "through-restart", "Running")
        doomed = running_pods(cp, api, "through-restart", 1, 2)[0]["metadata"]["name"]
        cp.restart_apiserver(down_seconds=3)
        # the same process goes on: a failure is restarted exactly once, a new job gets its children
        cp.fail_pod(NS, doomed, exit_code=1)
        cp.apply(manifest("after-restart"))
        st = wait_phase(
            cp, api, "through-restart", "Running", timeout=120, check=lambda s: s.get("attempt") == 2
        )
        assert st["restarts"] == 1
        wait_phase(cp, api, "after-restart", "Running", timeout=120)
        time.sleep(5)
        assert op.proc.poll() is None and op.proc.pid == pid
        _one_job_per_attempt(api, "through-restart", 2)
        _one_job_per_attempt(api, "after-restart", 1)
        assert status(api, "through-restart")["restarts"] == 1
        log = op.log()
        assert "relisted pods" in log or "relisted jobs" in log, log[
            -3000:
        ]  # the watches were resumed by listing
        assert "Traceback" not in log, log[-3000:]
    finally:
        op.stop()
