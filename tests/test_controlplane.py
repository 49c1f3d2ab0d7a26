"""The test control plane itself: scheduling onto fake GPU nodes and kwok pod lifecycles.

Starts a real etcd/kube-apiserver/kube-controller-manager/kube-scheduler/kwok (see
tests/support/controlplane.py and docs/control-plane.md). Binaries are built on first use by
scripts/build-control-plane.sh (tens of minutes cold; run it beforehand in CI).
"""

from __future__ import annotations

import time

import pytest

from tests.support.cluster import FakeNode, make_cluster
from tests.support.controlplane import FAIL_EXIT_CODE_ANNOTATION, FAIL_LABEL, HOLD_ANNOTATION, ControlPlane

pytestmark = pytest.mark.slow  # a control plane

NODE = "kwok-gpu-0"
NS = "cp-test"


@pytest.fixture(scope="module")
def cp(request):
    with make_cluster(
        request,
        extra_tokens={"alice": ("alice-token", ["kubetune-devs"])},
        nodes=[FakeNode(NODE, labels={"nvidia.com/gpu.product": "H100"})],
        namespaces=[NS],
        diagnostics_lines=60,
    ) as plane:
        yield plane


def job(
    name: str,
    gpus: int = 1,
    annotations: dict | None = None,
    labels: dict | None = None,
    backoff_limit: int = 0,
) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"annotations": annotations or {}, "labels": labels or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "registry.invalid/kubetune/trainer:test",
                            "command": ["python", "-m", "kubetune_trainer"],
                            "resources": {
                                "limits": {"nvidia.com/gpu": str(gpus)},
                                "requests": {"cpu": "1", "memory": "1Gi"},
                            },
                        }
                    ],
                },
            },
        },
    }


def job_pods(cp: ControlPlane, name: str) -> list[dict]:
    return cp.get_json("pods", "-n", NS, "-l", f"batch.kubernetes.io/job-name={name}")["items"]


def job_condition(cp: ControlPlane, name: str, cond: str) -> bool:
    j = cp.get_json("job", "-n", NS, name)
    return any(c["type"] == cond and c["status"] == "True" for c in j.get("status", {}).get("conditions", []))


def test_versions_and_fake_gpu_node(cp):
    v = cp.kubectl("version", "-o", "json").stdout
    assert '"gitVersion": "v1.33.' in v  # both client and server report v1.33.x
    from kubernetes import client

    nodes = client.CoreV1Api(cp.api_client()).list_node().items
    node = next(n for n in nodes if n.metadata.name == NODE)
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def test_gpu_job_is_scheduled_on_fake_node_and_completes(cp):
    cp.apply(job("gpu-job", gpus=2))
    cp.wait_for(lambda: job_condition(cp, "gpu-job", "Complete"), 90, "Job gpu-job Complete")
    pods = job_pods(cp, "gpu-job")
    assert len(pods) == 1
    pod = pods[0]
    assert pod["spec"]["nodeName"] == NODE
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # ServiceAccount admission ran (kube-controller-manager created the SA) and the projected
    # token volume was added.
    assert pod["spec"]["serviceAccountName"] == "default"
    assert any(v.get("projected") for v in pod["spec"]["volumes"])


def test_chaos_label_fails_pod_with_chosen_exit_code(cp):
    cp.apply(job("chaos-job", annotations={FAIL_EXIT_CODE_ANNOTATION: "42"}, labels={FAIL_LABEL: "true"}))
    cp.wait_for(lambda: job_condition(cp, "chaos-job", "Failed"), 90, "Job chaos-job Failed")
    pods = job_pods(cp, "chaos-job")
    assert len(pods) == 1
    pod = pods[0]
    assert pod["spec"]["nodeName"] == NODE
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 42
    j = cp.get_json("job", "-n", NS, "chaos-job")
    assert j["status"].get("failed") == 1
    assert not job_condition(cp, "chaos-job", "Complete")


def _running_pod(cp: ControlPlane, job_name: str) -> dict:
    def running():
        pods = job_pods(cp, job_name)
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    return cp.wait_for(running, 60, f"pod of {job_name} Running")


def test_held_pod_stays_running_until_released(cp):
    cp.apply(job("held-job", annotations={HOLD_ANNOTATION: "true"}))
    pod = _running_pod(cp, "held-job")
    assert pod["spec"]["nodeName"] == NODE
    time.sleep(5)  # deliberate: what is tested is that the held pod stays Running while time passes
    pod = cp.get_json("pod", "-n", NS, pod["metadata"]["name"])
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    assert not job_condition(cp, "held-job", "Complete")
    j = cp.get_json("job", "-n", NS, "held-job")
    assert j["status"].get("active") == 1 and j["status"].get("ready") == 1

    cp.release_pod(NS, pod["metadata"]["name"])
    cp.wait_for(lambda: job_condition(cp, "held-job", "Complete"), 60, "Job held-job Complete")


def test_held_pod_failed_later_with_exit_code(cp):
    cp.apply(job("held-fail-job", annotations={HOLD_ANNOTATION: "true"}))
    pod = _running_pod(cp, "held-fail-job")
    cp.fail_pod(
        NS,
        pod["metadata"]["name"],
        exit_code=137,
        reason="OOMKilled",
        message="CUDA error: out of memory; rank 0: killed",
    )
    cp.wait_for(lambda: job_condition(cp, "held-fail-job", "Failed"), 60, "Job held-fail-job Failed")
    pod = cp.get_json("pod", "-n", NS, pod["metadata"]["name"])
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Failed"
    assert term["exitCode"] == 137 and term["reason"] == "OOMKilled"
    assert term["message"] == "CUDA error: out of memory; rank 0: killed"


def test_too_many_gpus_stays_pending(cp):
    cp.apply(job("greedy-job", gpus=16))

    def unschedulable():
        pods = job_pods(cp, "greedy-job")
        if not pods:
            return False
        conds = pods[0]["status"].get("conditions", [])
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    cp.wait_for(unschedulable, 60, "greedy pod Unschedulable")
    pod = job_pods(cp, "greedy-job")[0]
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_extra_token_user_is_subject_to_rbac(cp):
    r = cp.kubectl("-n", NS, "get", "pods", user="alice", check=False)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()
    cp.kubectl("-n", NS, "create", "role", "pod-reader", "--verb=get,list", "--resource=pods")
    cp.kubectl("-n", NS, "create", "rolebinding", "alice-pods", "--role=pod-reader", "--group=kubetune-devs")
    cp.wait_for(
        lambda: cp.kubectl("-n", NS, "get", "pods", user="alice", check=False).returncode == 0,
        30,
        "alice can list pods",
    )
    assert (
        cp.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", user="alice").stdout
        == "alice"
    )
