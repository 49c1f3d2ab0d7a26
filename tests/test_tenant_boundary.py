"""The tenant boundary, enforced by the operator alone, on a real control plane.

A tenant is a token user bound (RoleBinding in its namespace) only to the chart's tenant role
(`<release>-edit`, rendered from charts/kubetune/templates/user-roles.yaml): it may create
FineTuneJobs and nothing else. The operator runs as a ServiceAccount with exactly
`handlers.OPERATOR_RBAC_RULES` and the platform's strict policy, without the chart's admission
policies (the namespaced install mode, or a cluster without them): every attack must still end with
the job Failed, condition reason PolicyViolation and a Warning event naming the field and the rule,
and nothing created that the attack asked for. The same tenant's legitimate job runs to Succeeded.
The trainer's own token cannot take over operator-owned status fields: the operator restores them.
tests/test_admission.py runs the same attacks against the chart's admission policies.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support.cluster import FakeNode, make_cluster, wait_reconciles
from tests.support.controlplane import HOLD_ANNOTATION, ControlPlane, ensure_binaries
from tests.support.manifests import CROSS_NAMESPACE_ANTI_AFFINITY, finetunejob, user_role_binding
from tests.support.operator_cluster import finetunejob_events

pytestmark = pytest.mark.slow  # a control plane and the operator

REPO = Path(__file__).resolve().parents[1]
NS = "team-a"
OTHER_NS = "team-b"
TENANT = "alice"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
DIGEST = "sha256:" + "b" * 64
PLATFORM_IMAGE = f"registry.example.com/kubetune/trainer@{DIGEST}"
POLICY = {
    "allowedImagePrefixes": ["registry.example.com/kubetune/"],
    "requireImageDigest": True,
    "allowedPriorityClasses": ["training"],
    "enforcedNodeSelector": {"pool": "team-a"},
    "allowedNodeSelectorKeys": ["nvidia.com/gpu.product"],
    "allowedTolerationKeys": ["nvidia.com/gpu"],
    "allowedS3Endpoints": [],
    "allowedTrackingUris": ["https://mlflow.example.com/"],
    "allowedSourcePrefixes": ["s3://shared-models/", "s3://data/{namespace}/"],
    "tenantSecretRefs": "Forbid",
}
OPERATOR_ENV = {
    "KUBETUNE_DEFAULT_IMAGE": PLATFORM_IMAGE,
    "KUBETUNE_DEFAULT_POD_ANNOTATIONS": json.dumps({HOLD_ANNOTATION: "true"}),
    "KUBETUNE_DEFAULT_OUTPUT_URI_PREFIX": "s3://runs",
    "KUBETUNE_DEFAULT_STORAGE_CREDENTIALS_SECRET": "platform-s3",
    "KUBETUNE_DEFAULT_POLICY": json.dumps(POLICY),
}


def tenant_role(tmp: Path) -> list[dict[str, Any]]:
    """The chart's tenant ClusterRoles, rendered by helm (the exact rules platform teams install)."""
    out = subprocess.run(
        [
            str(ensure_binaries(["helm"]) / "helm"),
            "template",
            "kubetune",
            str(REPO / "charts/kubetune"),
            "--show-only",
            "templates/user-roles.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=tmp,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def cp(request, tmp_path_factory):
    nodes = [
        FakeNode("team-a-gpu", labels={"pool": "team-a", "nvidia.com/gpu.product": "H100"}),
        FakeNode(
            "team-b-gpu",
            labels={"pool": "team-b", "nvidia.com/gpu.product": "H100"},
            taints=[{"key": "team-b", "value": "dedicated", "effect": "NoSchedule"}],
        ),
    ]
    with make_cluster(
        request,
        extra_tokens={TENANT: ("alice-token-0123456789", ["tenants"])},
        nodes=nodes,
        namespaces=[NS, OTHER_NS],
        namespace_labels={"pod-security.kubernetes.io/enforce": "restricted"},
        crd=True,
    ) as plane:
        for role in tenant_role(tmp_path_factory.mktemp("chart")):
            plane.apply(role)
        edit = next(
            r
            for r in tenant_role(tmp_path_factory.mktemp("chart2"))
            if r["metadata"]["name"].endswith("-edit")
        )
        plane.apply(user_role_binding("alice-tunes", NS, TENANT, edit["metadata"]["name"], "ClusterRole"))
        # another team's credentials and a privileged account in the tenant's namespace
        plane.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "team-b-s3", "namespace": NS},
                "stringData": {"AWS_ACCESS_KEY_ID": "AKIATEAMB", "AWS_SECRET_ACCESS_KEY": "team-b-secret"},
            }
        )
        plane.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "ci-deployer", "namespace": NS},
            }
        )
        plane.apply(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": "training"},
                "value": 1000,
            }
        )
        yield plane


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return OPERATOR_ENV


@pytest.fixture(scope="module")
def admin(cp):
    return cp.api_client()


@pytest.fixture(scope="module")
def tenant(cp):
    return client.CustomObjectsApi(cp.api_client(TENANT))


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    body = finetunejob(
        name,
        NS,
        model={"source": "s3://shared-models/smollm2/"},
        task={"type": "chat"},
        datasets=[{"source": "s3://data/team-a/chat.jsonl"}],
        resources={"nodes": 2, "gpusPerNode": 1},
    )
    for dotted, value in spec.items():
        target = body["spec"]
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return body


def status(admin: client.ApiClient, name: str) -> dict[str, Any]:
    try:
        return (
            client.CustomObjectsApi(admin)
            .get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
            .get("status")
            or {}
        )
    except ApiException as error:
        if error.status == 404:
            return {}
        raise


def wait_phase(cp: ControlPlane, admin: client.ApiClient, name: str, phase: str, timeout: float = 60) -> dict:
    return cp.wait_for(
        lambda: (lambda s: s if s.get("phase") == phase else None)(status(admin, name)),
        timeout,
        f"{name} phase {phase}",
    )


def warning_events(admin: client.ApiClient, name: str) -> list[dict[str, Any]]:
    return [e for e in finetunejob_events(admin, NS, name) if e.get("type") == "Warning"]


def worker_jobs(admin: client.ApiClient, name: str) -> list[Any]:
    return (
        client.BatchV1Api(admin).list_namespaced_job(NS, label_selector=f"kubetune.io/job-name={name}").items
    )


ATTACKS = [
    (
        "secret-deputy",
        {"output": {"credentialsSecretRef": {"name": "team-b-s3"}}},
        "spec.output.credentialsSecretRef.name",
        "tenantSecretRefs",
    ),
    (
        "tracker-exfil",
        {"tracking": {"mlflow": {"trackingUri": "https://collector.evil.example.net/"}}},
        "spec.tracking.mlflow.trackingUri",
        "allowedTrackingUris",
    ),
    (
        "s3-endpoint",
        {"storage": {"s3": {"endpointUrl": "https://collector.evil.example.net"}}},
        "spec.storage.s3.endpointUrl",
        "allowedS3Endpoints",
    ),
    (
        "control-plane",
        {
            "resources.nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
            "resources.tolerations": [{"operator": "Exists"}],
        },
        "spec.resources.tolerations[0]",
        "allowedTolerationKeys",
    ),
    (
        "other-team-nodes",
        {"resources.nodeSelector": {"pool": "team-b"}},
        "spec.resources.nodeSelector[pool]",
        "enforcedNodeSelector",
    ),
    (
        "system-priority",
        {"resources.priorityClassName": "system-node-critical"},
        "spec.resources.priorityClassName",
        "allowedPriorityClasses",
    ),
    (
        "block-others",
        {"resources.affinity": CROSS_NAMESPACE_ANTI_AFFINITY},
        "spec.resources.affinity",
        "allowAffinity",
    ),
    (
        "own-image",
        {"resources.image": "docker.io/evil/trainer:latest"},
        "spec.resources.image",
        "allowedImagePrefixes",
    ),
    (
        "pull-secret",
        {"resources.imagePullSecrets": ["team-b-s3"]},
        "spec.resources.imagePullSecrets[0]",
        "tenantSecretRefs",
    ),
    (
        "read-token",
        {"datasets": [{"source": "/var/run/secrets/kubernetes.io/serviceaccount/token", "fileType": "txt"}]},
        "spec.datasets[0].source",
        "dataPaths",
    ),
    (
        "read-environ",
        {"datasets": [{"source": "/proc/self/environ", "fileType": "txt"}]},
        "spec.datasets[0].source",
        "dataPaths",
    ),
    (
        "remote-code",
        {"model": {"source": "org/model", "trustRemoteCode": True, "revision": "c" * 40}},
        "spec.model.trustRemoteCode",
        "allowTrustRemoteCode",
    ),
    (
        "other-output",
        {"output": {"uri": "s3://runs/team-b/their-job/"}},
        "spec.output.uri",
        "allowedOutputPrefixes",
    ),
    (
        "other-data",
        {"datasets": [{"source": "s3://data/team-b/private.jsonl"}]},
        "spec.datasets[0].source",
        "allowedSourcePrefixes",
    ),
]


@pytest.mark.parametrize(("name", "change", "field", "rule"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_fails_with_policy_violation(
    cp, admin, tenant, operator, name: str, change: dict[str, Any], field: str, rule: str
) -> None:
    tenant.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, manifest(name, **change))
    st = wait_phase(cp, admin, name, "Failed", 30)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PolicyViolation"
    assert field in failed["message"] and f"(policy.{rule})" in failed["message"]
    cp.wait_for(
        lambda: any(
            e["reason"] == "PolicyViolation" and field in e["message"] for e in warning_events(admin, name)
        ),
        30,
        f"PolicyViolation event of {name}",
    )
    assert worker_jobs(admin, name) == []  # nothing ran
    assert "team-b-secret" not in json.dumps(st)


def test_tenant_cannot_name_a_service_account(cp, tenant) -> None:
    """The field is gone from the schema: the API server refuses it (strict field validation), and with
    the default 'Warn' it is pruned, never reaching the operator."""
    body = manifest("borrowed-identity", **{"resources.serviceAccountName": "ci-deployer"})
    result = cp.kubectl(
        "apply", "--validate=strict", "-f", "-", input=json.dumps(body), check=False, user=TENANT
    )
    assert result.returncode != 0 and 'unknown field "spec.resources.serviceAccountName"' in result.stderr
    created = tenant.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)  # pruned by the server
    assert "serviceAccountName" not in created["spec"]["resources"]


def test_tenant_rbac_is_only_finetunejobs(cp) -> None:
    for verb, resource, *extra in [
        ("create", "pods"),
        ("get", "secrets"),
        ("create", "jobs.batch"),
        ("patch", "finetunejobs.kubetune.io", "--subresource=status"),
        ("create", "rolebindings"),
        ("create", "serviceaccounts/token"),
    ]:
        out = cp.kubectl(
            "auth", "can-i", verb, resource, *extra, "-n", NS, "--as", TENANT, check=False
        ).stdout
        assert out.strip() == "no", (verb, resource)
    assert (
        cp.kubectl(
            "auth", "can-i", "create", "finetunejobs.kubetune.io", "-n", NS, "--as", TENANT
        ).stdout.strip()
        == "yes"
    )


def test_legitimate_job_runs_to_success_as_its_own_identity(cp, admin, tenant, operator) -> None:
    name = "legit"
    tenant.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        manifest(
            name,
            **{
                "resources.nodeSelector": {"nvidia.com/gpu.product": "H100"},
                "resources.priorityClassName": "training",
                "tracking": {"mlflow": {"trackingUri": "https://mlflow.example.com/team-a"}},
            },
        ),
    )
    cp.wait_for(lambda: len(worker_jobs(admin, name)) == 1, 30, "worker Job")
    job = admin.sanitize_for_serialization(worker_jobs(admin, name)[0])
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{name}-trainer" and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100", "pool": "team-a"}
    assert pod["containers"][0]["image"] == PLATFORM_IMAGE
    netpol = client.NetworkingV1Api(admin).read_namespaced_network_policy(f"{name}-workers", NS)
    assert netpol.spec.pod_selector.match_labels["kubetune.io/job-name"] == name
    # the node selector is enforced: nodes of team-b do not run it (one node x 8 GPUs takes both pods)
    wait_phase(cp, admin, name, "Running", 60)
    pods = (
        client.CoreV1Api(admin).list_namespaced_pod(NS, label_selector=f"kubetune.io/job-name={name}").items
    )
    assert {p.spec.node_name for p in pods} == {"team-a-gpu"}
    for p in pods:
        cp.release_pod(NS, p.metadata.name)
    wait_phase(cp, admin, name, "Succeeded", 60)


def test_trainer_token_cannot_take_over_operator_status(cp, admin, operator) -> None:
    """Without the admission policy the trainer's token may patch the status subresource; whatever it sets
    among the operator's fields is put back, and the worker Job is neither deleted nor recreated."""
    name = "tamper"
    client.CustomObjectsApi(admin).create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, manifest(name))
    before = wait_phase(cp, admin, name, "Running", 60)
    job_uid = worker_jobs(admin, name)[0].metadata.uid
    token = cp.kubectl("-n", NS, "create", "token", f"{name}-trainer").stdout.strip()
    config = client.Configuration()
    config.host, config.ssl_ca_cert = cp.server, cp.ca_cert
    config.api_key = {"authorization": f"Bearer {token}"}
    trainer = client.CustomObjectsApi(client.ApiClient(config))
    trainer.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        name,
        {
            "status": {
                "attempt": 5,
                "restarts": 0,
                "startTime": "2099-01-01T00:00:00Z",
                "progress": {"step": 7},
            }
        },
    )
    # the operator looks again at its next wake-up (a resync, a pod event, a new generation): make one now
    cp.kubectl(
        "-n", NS, "patch", "ftj", name, "--type=merge", "-p", '{"spec": {"runPolicy": {"maxRestarts": 4}}}'
    )
    restored = cp.wait_for(
        lambda: (lambda s: s if s.get("attempt") == 1 else None)(status(admin, name)), 30, "attempt restored"
    )
    assert restored["startTime"] == before["startTime"] and restored["progress"]["step"] == 7
    cp.wait_for(
        lambda: any(
            e["reason"] == "StatusTampered" and "status.attempt" in e["message"]
            for e in warning_events(admin, name)
        ),
        30,
        "StatusTampered event",
    )
    wait_reconciles(cp, operator)  # and a few reconciles later, still the same Job
    jobs = worker_jobs(admin, name)
    assert [j.metadata.uid for j in jobs] == [job_uid] and jobs[0].metadata.deletion_timestamp is None
    assert status(admin, name)["phase"] == "Running"
