"""The operator against a real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok).

The CRD is applied for real, so its schema and CEL rules are checked by the API server. The operator
runs as a subprocess (`python -m kubetune.operator_main`) so it can be killed and restarted and its
log inspected. kwok plays the kubelets of two fake GPU nodes: the platform default pod annotation
`kubetune.test/hold: "true"` keeps worker pods Running until a test completes (releases) or fails
them (kwok chaos stage, with a chosen exit code). The namespace enforces the `restricted` Pod
Security Standard, so every worker pod the Job controller creates passes it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.manifest import ManifestError, parse_job
from tests import manifest_cases
from tests.support.cluster import FakeNode, make_cluster, wait_reconciles
from tests.support.controlplane import ControlPlane
from tests.support.operator_cluster import (
    GANG_SCHEDULERS,
    NS,
    OPERATOR_ENV,
    SECRETS,
    _peering_crd,
    children,
    event_reasons,
    events,
    ftj,
    jobs,
    manifest,
    operator_process,
    pods,
    running_pods,
    start_running,
    status,
    wait_phase,
)

pytestmark = pytest.mark.slow  # a control plane and the operator

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
SECRET_VALUES = [v for data in SECRETS.values() for v in data.values()]
# the upstream PodGroup CRDs (tests/data/crds/README.md): (file, CRD name, group, version)
POD_GROUP_CRDS = {
    "coscheduling": (
        "scheduling.x-k8s.io_podgroups.yaml",
        "podgroups.scheduling.x-k8s.io",
        "scheduling.x-k8s.io",
        "v1alpha1",
    ),
    "volcano": (
        "scheduling.volcano.sh_podgroups.yaml",
        "podgroups.scheduling.volcano.sh",
        "scheduling.volcano.sh",
        "v1beta1",
    ),
}


# ----- fixtures -----


@pytest.fixture(scope="module")
def cp(request):
    with make_cluster(
        request,
        nodes=[FakeNode(f"gpu-{index}", labels={"pool": "gpu"}) for index in range(2)],
        namespaces=[NS],
        namespace_labels={
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        },
        crd=True,
        secrets={NS: SECRETS},
    ) as plane:
        for file_name, *_ in POD_GROUP_CRDS.values():
            plane.kubectl("apply", "-f", str(REPO / "tests" / "data" / "crds" / file_name))
        yield plane


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return OPERATOR_ENV


# ----- helpers -----


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st.get("conditions", []) if c["type"] == type_)


def release_all(cp: ControlPlane, api: client.ApiClient, name: str, attempt: int) -> None:
    for p in pods(api, name, attempt, "Running"):
        cp.release_pod(NS, p["metadata"]["name"])


def delete(cp: ControlPlane, name: str) -> None:
    cp.kubectl("-n", NS, "delete", "ftj", name, "--wait=false", check=False)


# ----- the CRD, checked by the API server -----


def test_crd_is_served(cp) -> None:
    def explain() -> str | None:  # the CRD's OpenAPI is published a moment after it is Established
        result = cp.kubectl("explain", "finetunejob.spec.method.type", check=False)
        return result.stdout if result.returncode == 0 else None

    out = " ".join(cp.wait_for(explain, 60, "kubectl explain finetunejob", interval=1).split())
    assert "qlora" in out and "adapters on a 4-bit quantized frozen base" in out
    out = cp.kubectl("api-resources", "--api-group=kubetune.io").stdout
    assert "ftj" in out and "FineTuneJob" in out


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_accepted(cp, path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    body["metadata"]["namespace"] = NS
    result = cp.kubectl(
        "-n", NS, "create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(body), check=False
    )
    assert result.returncode == 0, result.stderr
    assert _validate_verdict(body) == []


def _server_verdict(cp: ControlPlane, body: dict) -> subprocess.CompletedProcess:
    # JSON, not YAML: the case's Python values reach both validators unchanged ("1e9" stays a string)
    return cp.kubectl("-n", NS, "create", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)


def _validate_verdict(body: dict) -> list[str]:
    try:
        parse_job(body)
    except ManifestError as error:
        return error.problems
    return []


@pytest.mark.parametrize("case", manifest_cases.INVALID, ids=[c.id for c in manifest_cases.INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(cp, case: manifest_cases.Case) -> None:
    """Both validators (kubetune validate's models and the API server's CRD) refuse it, naming the same field."""
    body = case.manifest("invalid")
    problems = _validate_verdict(body)
    assert any(p.startswith((f"{case.field}:", f"{case.field}[", f"{case.field}.")) for p in problems), (
        problems
    )
    result = _server_verdict(cp, body)
    assert result.returncode != 0, f"accepted by the API server: {body}"
    if not case.client_side:
        assert case.field in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and manifest_cases.LONG_KEY[:40] not in result.stderr


@pytest.mark.parametrize("case", manifest_cases.VALID, ids=[c.id for c in manifest_cases.VALID])
def test_valid_manifest_is_accepted_by_both(cp, case: manifest_cases.Case) -> None:
    body = case.manifest("valid")
    assert _validate_verdict(body) == []
    result = _server_verdict(cp, body)
    assert result.returncode == 0, result.stderr


def test_generated_mutations_get_the_same_verdict_from_both(cp, api) -> None:
    """Every field of every valid case and example set to wrong types, bounds, nulls and near misses:
    `kubetune validate` and the API server agree on each, and name the same field when they refuse."""
    documents = [c.manifest("x") for c in manifest_cases.VALID]
    for path in sorted((REPO / "examples").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        body["metadata"]["namespace"] = NS
        documents.append(body)
    custom = client.CustomObjectsApi(api)
    disagreements = []
    for index, (what, body) in enumerate(manifest_cases.mutations(documents)):
        body["metadata"]["name"] = f"mutation-{index}"
        problems = _validate_verdict(body)
        try:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, body, dry_run="All", field_validation="Strict"
            )
            server = ""
        except ApiException as error:
            server = json.loads(error.body or "{}").get("message") or str(error.status)
        if bool(problems) != bool(server):
            disagreements.append(
                f"{what}: validate {problems[:1] or 'accepted'}, server {server[:200] or 'accepted'}"
            )
        elif problems and not any(p.split(": ")[0].split("[")[0] in server for p in problems):
            disagreements.append(f"{what}: validate names {problems}, server {server[:200]}")
    assert not disagreements, "\n".join(disagreements[:30])


def test_spec_is_immutable_except_safe_fields(cp, api) -> None:
    """Transition rules: training config never changes; resources only while suspended."""
    body = manifest("immutable", suspend=True)
    cp.apply(body)

    def patch(spec: dict[str, Any]) -> subprocess.CompletedProcess:
        return cp.kubectl(
            "-n",
            NS,
            "patch",
            "ftj",
            "immutable",
            "--type=merge",
            "-p",
            json.dumps({"spec": spec}),
            check=False,
        )

    for spec, field in [
        ({"model": {"source": "hf://org/other"}}, "spec.model"),
        ({"training": {"learningRate": 0.1}}, "spec.training"),
        ({"datasets": [{"source": "s3://data/other.jsonl"}]}, "spec.datasets"),
        ({"output": {"uri": "s3://elsewhere/"}}, "spec.output"),
        ({"resources": {"strategy": "fsdp"}}, "spec.resources.strategy"),
    ]:
        result = patch(spec)
        assert result.returncode != 0 and field in result.stderr and "immutable" in result.stderr, (
            result.stderr
        )
    assert patch({"resources": {"nodes": 1}}).returncode == 0  # suspended: allowed
    assert patch({"suspend": False}).returncode == 0
    result = patch({"resources": {"nodes": 2}})
    assert result.returncode != 0 and "spec.resources" in result.stderr and "suspended" in result.stderr
    assert patch({"suspend": True, "resources": {"nodes": 2}}).returncode == 0  # in the same update: allowed
    assert patch({"runPolicy": {"maxRestarts": 7}}).returncode == 0  # always allowed
    delete(cp, "immutable")


# ----- the operator -----


def test_job_runs_to_success_with_the_right_children(cp, api, operator) -> None:
    name = "happy"
    start_running(cp, api, name)
    found = children(api, name)
    assert found == {
        "ServiceAccount": [f"{name}-trainer"],
        "Role": [f"{name}-trainer"],
        "RoleBinding": [f"{name}-trainer"],
        "ConfigMap": [f"{name}-config"],
        "Service": [name],
        "Job": [f"{name}-1"],
    }
    cr = ftj(api, name)
    (job,) = jobs(api, name)
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": name,
            "uid": cr["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["spec"]["backoffLimit"] == 0
    workers = sorted(pods(api, name, 1, "Running"), key=lambda p: p["spec"]["hostname"])
    assert [p["spec"]["hostname"] for p in workers] == [f"{name}-1-0", f"{name}-1-1"]
    assert {p["spec"]["nodeName"] for p in workers} <= {"gpu-0", "gpu-1"}
    container = workers[0]["spec"]["containers"][0]
    command = container["command"]
    assert command[command.index("--master-addr") + 1] == f"{name}-1-0.{name}"
    assert command[command.index("--node-rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_COMPLETION_INDEX"]  # set by the Job controller, expanded by the kubelet
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert workers[0]["spec"]["subdomain"] == name
    st = status(api, name)
    assert st["attempt"] == 1 and st["startTime"] and condition(st, "Running")["status"] == "True"
    out = cp.kubectl("-n", NS, "get", "ftj", name).stdout
    assert "Running" in out and "lora" in out
    release_all(cp, api, name, 1)
    st = wait_phase(cp, api, name, "Succeeded")
    assert st["completionTime"] and st["restarts"] == 0 and condition(st, "Succeeded")["status"] == "True"
    # Pending -> Running -> Succeeded, one event each (Event timestamps have 1 s resolution: no order)
    reasons = event_reasons(api, name)
    for reason in ("Created", "CreatedWorkers", "AllWorkersRunning", "Succeeded"):
        assert reasons.count(reason) == 1, reasons


def test_trainer_can_patch_only_its_own_status(cp, api, operator) -> None:
    """How progress travels: the pod's ServiceAccount may patch this job's status and nothing else."""
    name = "reporter"
    start_running(cp, api, name)
    token = cp.kubectl("-n", NS, "create", "token", f"{name}-trainer").stdout.strip()
    config = client.Configuration()
    config.host = cp.server
    config.ssl_ca_cert = cp.ca_cert
    config.api_key = {"authorization": f"Bearer {token}"}
    trainer = client.CustomObjectsApi(client.ApiClient(config))
    progress = {
        "status": {"progress": {"step": 40, "totalSteps": 100, "percent": 40, "loss": 1.25, "etaSeconds": 90}}
    }
    trainer.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, name, progress)
    st = status(api, name)
    assert st["progress"]["step"] == 40 and st["phase"] == "Running"
    row = cp.kubectl("-n", NS, "get", "ftj", name, "--no-headers").stdout.split()
    assert "40" in row and "1.25" in row and "90" in row
    for refused in (
        lambda: trainer.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, name, {"spec": {"suspend": True}}
        ),
        lambda: trainer.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "happy"),
        lambda: client.CoreV1Api(client.ApiClient(config)).read_namespaced_secret("s3-creds", NS),
    ):
        with pytest.raises(ApiException) as denied:
            refused()
        assert denied.value.status == 403
    wait_reconciles(cp, operator)  # the operator's next reconciles leave the trainer's fields alone
    assert status(api, name)["progress"]["loss"] == 1.25
    release_all(cp, api, name, 1)
    wait_phase(cp, api, name, "Succeeded")


def test_failed_pod_restarts_with_resume_counted(cp, api, operator) -> None:
    name = "flaky"
    start_running(cp, api, name, runPolicy={"maxRestarts": 2})
    first = running_pods(cp, api, name, 1, 2)
    assert "--resume" not in first[0]["spec"]["containers"][0]["command"]
    cp.fail_pod(NS, first[0]["metadata"]["name"], exit_code=1, message="CUDA error: an illegal memory access")
    st = wait_phase(cp, api, name, "Running", check=lambda s: s.get("attempt") == 2)
    assert st["restarts"] == 1 and st["preemptions"] == 0
    second = running_pods(cp, api, name, 2, 2)
    command = second[0]["spec"]["containers"][0]["command"]
    assert command[-2:] == ["--resume", "latest"]
    assert command[command.index("--master-addr") + 1] == f"{name}-2-0.{name}"
    assert {p["metadata"]["labels"]["kubetune.io/attempt"] for p in second} == {"2"}
    assert pods(api, name, 1, "Running") == []  # the first attempt's survivors were stopped
    restart = next(e for e in events(api, name) if e["reason"] == "Restarting")
    assert restart["type"] == "Warning" and "exit code 1" in restart["message"]
    release_all(cp, api, name, 2)
    st = wait_phase(cp, api, name, "Succeeded")
    assert st["restarts"] == 1 and st["attempt"] == 2


def test_exit_code_3_fails_without_restart(cp, api, operator) -> None:
    name = "badconfig"
    start_running(cp, api, name)
    victim = running_pods(cp, api, name, 1, 2)[0]
    cp.fail_pod(NS, victim["metadata"]["name"], exit_code=3, message="datasets[0]: no such file")
    st = wait_phase(cp, api, name, "Failed")
    assert st["restarts"] == 0 and st["attempt"] == 1
    failed = condition(st, "Failed")
    assert failed["reason"] == "ConfigError" and "exit code 3" in failed["message"]
    wait_reconciles(cp, operator)  # a few more reconciles: still no second attempt
    assert [j["metadata"]["name"] for j in jobs(api, name)] == [f"{name}-1"]
    assert pods(api, name, 1, "Running") == []  # the Job (backoffLimit 0) stopped the other worker
    assert pods(api, name, 1, "Failed")  # the failed pod is kept for `kubectl logs`
    assert any(e["reason"] == "ConfigError" and e["type"] == "Warning" for e in events(api, name))


def test_child_refused_by_the_api_server_fails_the_job(cp, api, operator) -> None:
    """A 4xx other than 404/409 on a child (here an admission policy's denial): Failed at once, with a
    condition and a Warning event carrying the server's message; no retry loop, no worker Job."""
    name = "refused-child"
    policy = "kubetune-test-refuse-children"
    label = "kubetune.io/job-name"
    cp.apply(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["", "batch", "rbac.authorization.k8s.io", "networking.k8s.io"],
                            "apiVersions": ["*"],
                            "operations": ["CREATE"],
                            "resources": ["*"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": f"!has(object.metadata.labels) || !('{label}' in "
                        f"object.metadata.labels) || object.metadata.labels['{label}'] != "
                        f"'{name}'",
                        "message": "the platform refuses children of refused-child",
                    }
                ],
            },
        }
    )
    cp.apply(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {"policyName": policy, "validationActions": ["Deny"]},
        }
    )
    probe = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "probe", "namespace": NS, "labels": {label: name}},
    }

    def active() -> bool:
        result = cp.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
        return result.returncode != 0 and "refuses children" in result.stderr

    try:
        cp.wait_for(active, 30, "admission policy active", interval=0.5)
        cp.apply(manifest(name))
        st = wait_phase(cp, api, name, "Failed")
        failed = condition(st, "Failed")
        assert failed["reason"] == "ChildRefused", failed
        message = failed["message"]
        assert "the platform refuses children of refused-child" in message and (
            "(422)" in message or "(403)" in message
        )
        # kopf posts events in the background: the status patch may be seen first
        cp.wait_for(
            lambda: any(
                e["reason"] == "ChildRefused"
                and e["type"] == "Warning"
                and "refuses children" in e["message"]
                for e in events(api, name)
            ),
            10,
            "the ChildRefused Warning event",
        )
        wait_reconciles(cp, operator)  # a few more reconciles: still Failed, still no workers
        assert status(api, name)["phase"] == "Failed" and jobs(api, name) == []
    finally:
        cp.kubectl(
            "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy, check=False
        )


def test_preemption_restarts_without_counting(cp, api, operator) -> None:
    name = "preempted"
    start_running(cp, api, name, runPolicy={"maxRestarts": 0})
    victim = running_pods(cp, api, name, 1, 2)[1]
    cp.fail_pod(NS, victim["metadata"]["name"], exit_code=143, message="SIGTERM: checkpoint saved")
    st = wait_phase(cp, api, name, "Running", check=lambda s: s.get("attempt") == 2)
    assert st["preemptions"] == 1 and st["restarts"] == 0
    assert running_pods(cp, api, name, 2, 2)[0]["spec"]["containers"][0]["command"][-2:] == [
        "--resume",
        "latest",
    ]
    release_all(cp, api, name, 2)
    wait_phase(cp, api, name, "Succeeded")


def test_disruption_target_stops_the_group_before_the_next_attempt(cp, api, operator) -> None:
    """A pod marked for preemption (DisruptionTarget) ends the attempt at once, not counted; the still
    running Job is deleted (Foreground) and attempt 2 starts only once attempt 1's pods are gone."""
    name = "disrupted"
    start_running(cp, api, name, runPolicy={"maxRestarts": 0})
    victim = running_pods(cp, api, name, 1, 2)[0]
    condition_patch = {
        "status": {
            "conditions": [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "preempted by a higher-priority pod",
                    # recent: the disruption controller resets DisruptionTarget on pods not deleted within 2 min
                    "lastTransitionTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            ]
        }
    }
    client.CoreV1Api(api).patch_namespaced_pod_status(victim["metadata"]["name"], NS, condition_patch)
    st = wait_phase(cp, api, name, "Running", check=lambda s: s.get("attempt") == 2)
    assert st["preemptions"] == 1 and st["restarts"] == 0
    assert [j["metadata"]["name"] for j in jobs(api, name)] == [f"{name}-2"]
    assert pods(api, name, 1) == []
    assert any(
        e["reason"] == "Preempted" and "PreemptionByScheduler" in e["message"] for e in events(api, name)
    )
    release_all(cp, api, name, 2)
    wait_phase(cp, api, name, "Succeeded")


def test_restart_limit_fails_the_job(cp, api, operator) -> None:
    name = "fragile"
    start_running(cp, api, name, runPolicy={"maxRestarts": 0})
    cp.fail_pod(NS, running_pods(cp, api, name, 1, 2)[0]["metadata"]["name"], exit_code=1)
    st = wait_phase(cp, api, name, "Failed")
    assert condition(st, "Failed")["reason"] == "RestartLimitExceeded" and st["restarts"] == 0


def test_suspend_and_resume(cp, api, operator) -> None:
    name = "pausable"
    start_running(cp, api, name)
    cp.kubectl("-n", NS, "patch", "ftj", name, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    st = wait_phase(cp, api, name, "Suspended")
    assert condition(st, "Suspended")["status"] == "True"
    cp.wait_for(lambda: not jobs(api, name) and not pods(api, name), 60, "workers removed")
    kept = children(api, name)
    assert kept["ConfigMap"] and kept["Service"] and kept["ServiceAccount"] and kept["Job"] == []
    # while suspended the worker group may be resized
    cp.kubectl("-n", NS, "patch", "ftj", name, "--type=merge", "-p", '{"spec": {"resources": {"nodes": 1}}}')
    cp.kubectl("-n", NS, "patch", "ftj", name, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    st = wait_phase(cp, api, name, "Running", check=lambda s: s.get("attempt") == 2)
    assert condition(st, "Suspended")["status"] == "False" and st["restarts"] == 0
    (job,) = jobs(api, name)
    assert job["metadata"]["name"] == f"{name}-2" and job["spec"]["completions"] == 1
    (worker,) = running_pods(cp, api, name, 2, 1)
    command = worker["spec"]["containers"][0]["command"]
    assert command[-2:] == ["--resume", "latest"] and command[command.index("--nnodes") + 1] == "1"
    assert sorted(r for r in event_reasons(api, name) if r in ("Suspended", "Resumed")) == [
        "Resumed",
        "Suspended",
    ]
    release_all(cp, api, name, 2)
    wait_phase(cp, api, name, "Succeeded")


def test_active_deadline(cp, api, operator) -> None:
    name = "slow"
    start_running(cp, api, name, runPolicy={"activeDeadlineSeconds": 4})
    st = wait_phase(cp, api, name, "Failed", timeout=30)
    assert condition(st, "Failed")["reason"] == "DeadlineExceeded"
    cp.wait_for(lambda: not jobs(api, name) and not pods(api, name, phase="Running"), 60, "workers stopped")


def test_ttl_after_finished_deletes_everything(cp, api, operator) -> None:
    name = "shortlived"
    start_running(cp, api, name, runPolicy={"ttlSecondsAfterFinished": 2})
    release_all(cp, api, name, 1)
    wait_phase(cp, api, name, "Succeeded")
    cp.wait_for(lambda: ftj(api, name) is None, 60, "FineTuneJob deleted after its TTL")
    cp.wait_for(
        lambda: not any(children(api, name).values()) and not pods(api, name), 90, "children collected"
    )


def test_deletion_garbage_collects_children(cp, api, operator) -> None:
    name = "doomed"
    start_running(cp, api, name)
    assert all(children(api, name).values())
    cp.kubectl("-n", NS, "delete", "ftj", name, "--wait=true", "--timeout=60s")
    cp.wait_for(
        lambda: not any(children(api, name).values()) and not pods(api, name), 90, "children collected"
    )


def test_no_finalizer_so_deletion_never_waits_for_the_operator(cp, api, operator) -> None:
    """Children go by ownerReferences, so jobs carry no finalizer: deleting one while no operator runs
    completes at once (and its children are collected); a finalizer left by an older version is removed."""
    name, legacy = "unblocked", "legacy"
    start_running(cp, api, name)
    assert not ftj(api, name)["metadata"].get("finalizers")
    operator.kill()
    try:
        cp.kubectl("-n", NS, "delete", "ftj", name, "--wait=true", "--timeout=30s")
        cp.wait_for(
            lambda: not any(children(api, name).values()) and not pods(api, name), 90, "children collected"
        )
        body = manifest(legacy)
        body["metadata"]["finalizers"] = ["kubetune.io/finalizer"]
        cp.apply(body)
    finally:
        operator.start()
    cp.wait_for(lambda: not ftj(api, legacy)["metadata"].get("finalizers"), 60, "the old finalizer removed")
    wait_phase(cp, api, legacy, "Running")
    delete(cp, legacy)


def test_unschedulable_job_stays_pending_with_reason(cp, api, operator) -> None:
    name = "toobig"
    cp.apply(manifest(name, resources={"nodes": 1, "gpusPerNode": 16}))
    st = wait_phase(cp, api, name, "Pending", check=lambda s: "Insufficient" in (s.get("message") or ""))
    assert condition(st, "Running")["reason"] == "Unschedulable"
    delete(cp, name)


def test_pod_changes_wake_the_job_without_polling(cp, api, operator, tmp_path) -> None:
    """With a resync interval far longer than the test, a change on a worker pod that no Job status
    reflects (a DisruptionTarget on a running pod) still reaches the FineTuneJob at once: the worker
    pods' watch wakes its loop."""
    name = "watched"
    operator.stop()
    watched = operator_process(cp, tmp_path / "watched.log", operator.kubeconfig, ("--interval", "600"))
    try:
        watched.start()
        start_running(cp, api, name)
        # past the Job controller's updates for the started pods: only the pod changes next
        cp.wait_for(
            lambda: (cp.get_json("-n", NS, "job", f"{name}-1").get("status") or {}).get("ready") == 2,
            60,
            "the Job controller counting both pods ready",
        )
        victim = running_pods(cp, api, name, 1, 2)[0]
        client.CoreV1Api(api).patch_namespaced_pod_status(
            victim["metadata"]["name"],
            NS,
            {
                "status": {
                    "conditions": [
                        {
                            "type": "DisruptionTarget",
                            "status": "True",
                            "reason": "EvictionByEvictionAPI",
                            "message": "drained",
                            "lastTransitionTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        }
                    ]
                }
            },
        )
        st = wait_phase(cp, api, name, "Running", timeout=40, check=lambda s: s.get("attempt") == 2)
        assert st["preemptions"] == 1 and st["restarts"] == 0
        delete(cp, name)
    finally:
        watched.stop()
        operator.start()


def test_kueue_labels_suspend_and_admission(cp, api, operator) -> None:
    """The Job is created suspended with Kueue's labels; admission (unsuspend) starts it, eviction requeues."""
    name = "queued"
    cp.apply(manifest(name, scheduling={"queueName": "team-a", "priorityClassName": "high"}))
    st = wait_phase(cp, api, name, "Pending", check=lambda s: "team-a" in (s.get("message") or ""))
    assert condition(st, "Running")["reason"] == "Queued"
    (job,) = jobs(api, name)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert pods(api, name) == []
    batch = client.BatchV1Api(api)
    batch.patch_namespaced_job(f"{name}-1", NS, {"spec": {"suspend": False}})  # what Kueue does on admission
    wait_phase(cp, api, name, "Running")
    batch.patch_namespaced_job(f"{name}-1", NS, {"spec": {"suspend": True}})  # eviction
    st = wait_phase(cp, api, name, "Pending", check=lambda s: s.get("preemptions") == 1)
    assert st["restarts"] == 0 and st["attempt"] == 1
    batch.patch_namespaced_job(f"{name}-1", NS, {"spec": {"suspend": False}})
    wait_phase(cp, api, name, "Running")
    release_all(cp, api, name, 1)
    wait_phase(cp, api, name, "Succeeded")


def test_operator_restart_adopts_children_without_duplicates(cp, api, operator) -> None:
    name = "survivor"
    start_running(cp, api, name, runPolicy={"maxRestarts": 3})
    before = children(api, name)
    created = event_reasons(api, name).count("CreatedWorkers")
    operator.kill()
    # a worker fails while no operator runs; the restarted operator must restart exactly once
    cp.fail_pod(NS, running_pods(cp, api, name, 1, 2)[0]["metadata"]["name"], exit_code=1)
    cp.wait_for(lambda: pods(api, name, 1, "Failed"), 30, "failed pod")
    operator.start()
    st = wait_phase(cp, api, name, "Running", check=lambda s: s.get("attempt") == 2)
    assert st["restarts"] == 1
    wait_reconciles(cp, operator, rounds=3)  # several reconciles of the adopted job
    after = children(api, name)
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service"):
        assert after[kind] == before[kind], kind
    assert [j for j in after["Job"] if j != f"{name}-1"] == [f"{name}-2"]
    assert len(running_pods(cp, api, name, 2, 2)) == 2
    assert status(api, name)["restarts"] == 1
    # and a plain restart while running creates nothing new
    operator.kill()
    operator.start()
    wait_reconciles(cp, operator, rounds=3)
    assert children(api, name) == after
    assert event_reasons(api, name).count("CreatedWorkers") == created + 1
    release_all(cp, api, name, 2)
    wait_phase(cp, api, name, "Succeeded")


@pytest.mark.parametrize("provider", ["coscheduling", "volcano"])
def test_gang_scheduling_pod_group_is_admitted_and_the_pods_join_it(cp, api, operator, provider: str) -> None:
    """The operator creates the attempt's PodGroup (the upstream CRD's schema admits it) before the Job;
    the pods name the platform's gang scheduler and the group. No gang scheduler runs here, so they
    stay Pending, unscheduled: none of them holds a node."""
    _, crd_name, group, version = POD_GROUP_CRDS[provider]
    cp.wait_for(
        lambda: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in cp.get_json("crd", crd_name).get("status", {}).get("conditions", [])
        ),
        60,
        f"{crd_name} Established",
    )
    name = f"gang-{provider}"
    gang: dict[str, Any] = {"provider": provider}
    if provider == "coscheduling":
        gang["scheduleTimeoutSeconds"] = 60
    cp.apply(manifest(name, scheduling={"gang": gang}))
    custom = client.CustomObjectsApi(api)
    pod_group = cp.wait_for(
        lambda: _get_or_none(
            lambda: custom.get_namespaced_custom_object(group, version, NS, "podgroups", f"{name}-1")
        ),
        60,
        f"PodGroup {name}-1",
    )
    assert pod_group["spec"]["minMember"] == 2
    if provider == "coscheduling":
        assert pod_group["spec"]["scheduleTimeoutSeconds"] == 60
    owner = pod_group["metadata"]["ownerReferences"][0]
    assert (
        owner["kind"] == "FineTuneJob"
        and owner["uid"] == ftj(api, name)["metadata"]["uid"]
        and owner["controller"]
    )
    workers = cp.wait_for(
        lambda: (lambda ps: ps if len(ps) == 2 else None)(pods(api, name, 1)), 60, "2 worker pods"
    )
    for pod in workers:
        assert pod["spec"]["schedulerName"] == GANG_SCHEDULERS[provider]
        if provider == "coscheduling":
            assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == f"{name}-1"
        else:
            assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == f"{name}-1"
    # deliberate: what is tested is that nothing happens (the default scheduler binds none of them)
    time.sleep(3)
    assert all(
        p["status"]["phase"] == "Pending" and not p["spec"].get("nodeName") for p in pods(api, name, 1)
    )
    assert status(api, name)["phase"] == "Pending"
    delete(cp, name)


def _get_or_none(read: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return read()
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def test_peering_lets_one_replica_act(cp, api, operator, tmp_path) -> None:
    """Two replicas with --peering: the higher priority acts, the other stands by and takes over."""
    cp.apply(_peering_crd("ClusterKopfPeering", "Cluster"))
    cp.apply(_peering_crd("KopfPeering", "Namespaced"))
    cp.wait_for(
        lambda: cp.kubectl("get", "clusterkopfpeerings", check=False).returncode == 0, 60, "peering CRD"
    )
    cp.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "kubetune"}})
    operator.stop()
    high = operator_process(
        cp, tmp_path / "high.log", operator.kubeconfig, ("--peering", "kubetune", "--priority", "100")
    )
    low = operator_process(
        cp, tmp_path / "low.log", operator.kubeconfig, ("--peering", "kubetune", "--priority", "50")
    )
    try:
        high.start()
        low.start()
        cp.wait_for(lambda: "clusterkopfpeerings" in low.log(), 60, "the low-priority replica to watch peers")
        name = "peered"
        start_running(cp, api, name)
        cp.wait_for(lambda: f"created Job {NS}/{name}-1" in high.log(), 60, "the high-priority replica's Job")
        wait_reconciles(cp, high)
        assert f"{NS}/{name}" not in low.log()
        high.stop()  # a graceful exit removes its peering record at once
        cp.wait_for(lambda: "Resuming operations" in low.log(), 60, "the standby replica to take over")
        release_all(cp, api, name, 1)
        wait_phase(cp, api, name, "Succeeded")
        assert f"{NS}/{name}: phase Succeeded" in low.log()
        assert children(api, name)["Job"] == [f"{name}-1"]
    finally:
        high.stop()
        low.stop()
        operator.start()


def test_secret_values_never_appear(cp, api, operator) -> None:
    """No Secret value in any object (but the Secrets), event, or operator log line."""
    kinds = "finetunejobs,jobs,pods,configmaps,services,serviceaccounts,roles,rolebindings,events"
    dump = cp.kubectl("get", kinds, "-A", "-o", "json").stdout
    assert json.loads(dump)["items"]
    log = operator.log()
    assert "kubetune.operator" in log and "created Job" in log
    for value in SECRET_VALUES:
        assert value not in dump, "secret value in an object"
        assert value not in log, "secret value in the operator log"
    secret = cp.get_json("-n", NS, "secret", "s3-creds")
    assert secret["data"]["AWS_SECRET_ACCESS_KEY"]  # the values are really there to be leaked
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 :][:6000]
    assert "Forbidden" not in log, "the operator lacks RBAC (OPERATOR_RBAC_RULES)"
    assert "Daemon 'reconcile' is cancelled" not in log, "a daemon did not stop by itself"
