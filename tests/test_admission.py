"""The chart's admission policies, against a real control plane (kube-apiserver v1.33; nothing mocked).

The chart (helm template, every object applied server-side as tests/test_chart.py does) installs a
FineTuneJobPolicy and four ValidatingAdmissionPolicies. A tenant, a static-token user bound ONLY to
the chart's `kubetune-edit` ClusterRole in its namespace, tries every way across the tenant boundary
with `kubectl apply`: each is refused by the API server with a message naming the field and the
rule, and the operator's own policy.check() names the same rule for the same spec. The tenant's
legitimate job (only allowed values) is admitted.

The trainer's token (a per-job ServiceAccount with the Role render.render_rbac makes) may patch
status.progress but not the operator's status fields; the operator's token (the chart's
ServiceAccount and ClusterRole) can create the children render.render_children makes and nothing
shaped otherwise. The tenant quotas (scoped: system priority classes, cross-namespace affinity)
refuse pods directly.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubetune import policy, render
from tests.support.chart import find, install_chart, one, wait_counted
from tests.support.cluster import FakeNode, make_cluster
from tests.support.controlplane import ControlPlane
from tests.support.manifests import CROSS_NAMESPACE_ANTI_AFFINITY, chat_job, role, user_role_binding
from tests.support.operator_process import token_kubeconfig

pytestmark = pytest.mark.slow  # a control plane with the chart installed

GROUP, VERSION = "kubetune.io", "v1alpha1"
SYSTEM_NS, TEAM_A, TEAM_B = "kubetune-system", "team-a", "team-b"
OPERATOR = "kubetune-operator"
OPERATOR_USER = f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR}"
TENANT = "alice"  # a static-token user of team-a
POLICIES = (
    "kubetune-tenant-policy",
    "kubetune-secret-refs",
    "kubetune-trainer-status",
    "kubetune-operator-children",
)
IMAGE = "registry.example/kubetune/trainer:1"

VALUES: dict[str, Any] = {
    "defaults": {
        "image": IMAGE,
        "outputUriPrefix": "s3://platform-runs",
        "storageCredentialsSecret": "s3-creds",
        "s3EndpointUrl": "http://minio.storage:9000",
        "nodeSelector": {"pool": "gpu"},
        "gangSchedulers": {"coscheduling": "scheduler-plugins-scheduler"},
    },
    "policy": {
        "allowedImagePrefixes": ["registry.example/kubetune/"],
        "allowedImagePullPolicies": ["IfNotPresent"],
        "allowedPriorityClasses": ["training"],
        "allowedWorkloadPriorityClasses": ["batch"],
        "requireQueue": True,
        "allowedQueues": [TEAM_A],
        "enforcedNodeSelector": {"pool": "gpu"},
        "allowedNodeSelectorKeys": ["nvidia.com/gpu.product"],
        "allowedTolerationKeys": ["nvidia.com/gpu"],
        "allowAffinity": True,
        "allowedS3Endpoints": ["http://minio.storage:9000/"],
        "allowedTrackingUris": ["http://mlflow.platform:5000"],
        "allowedSourcePrefixes": ["s3://datasets/", "s3://models/{namespace}/"],
        "dataPaths": ["/data"],
    },
    "tenants": {TEAM_A: {}, TEAM_B: {"resourceQuota": {"count/finetunejobs.kubetune.io": None}}},
}


# ----- fixtures -----


@pytest.fixture(scope="module")
def cp(request) -> Iterator[ControlPlane]:
    with make_cluster(
        request,
        extra_tokens={TENANT: ("alice-token-0123456789", ["team-a-devs"])},
        nodes=[FakeNode("gpu-0", labels={"pool": "gpu"})],
        namespaces=[SYSTEM_NS, TEAM_A, TEAM_B],
    ) as plane:
        yield plane


@pytest.fixture(scope="module")
def chart(cp, tmp_path_factory) -> list[dict[str, Any]]:
    docs = install_chart(cp, tmp_path_factory.mktemp("chart"), VALUES, (TEAM_A, TEAM_B))
    # the tenant: the chart's tenant role only, in team-a; and one Secret of its own
    cp.apply(user_role_binding("alice-kubetune", TEAM_A, TENANT, "kubetune-edit", "ClusterRole"))
    cp.apply(
        role(
            "alice-secrets",
            TEAM_A,
            [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": ["alice-creds"],
                    "verbs": ["get"],
                }
            ],
        )
    )
    cp.apply(user_role_binding("alice-secrets", TEAM_A, TENANT, "alice-secrets"))
    for name in ("alice-creds", "other-team-creds", "s3-creds"):
        cp.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": TEAM_A},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": "AKIATEST",
                    "AWS_SECRET_ACCESS_KEY": "x",
                    "HF_TOKEN": "hf",
                },
            }
        )
    # the policies act once the API server has loaded them and their parameters
    refused = manifest("probe", resources={"priorityClassName": "system-node-critical"})

    def active() -> bool:
        result = tenant_apply(cp, refused, dry_run=True)
        return result.returncode != 0 and "policy.allowedPriorityClasses" in result.stderr

    cp.wait_for(active, 60, "the tenant policy in force", interval=1)
    return docs


@pytest.fixture(scope="module")
def platform(chart) -> render.PlatformDefaults:
    """The operator's defaults exactly as the chart's ConfigMap gives them."""
    data = yaml.safe_load(one(chart, "ConfigMap", "kubetune-defaults")["data"]["defaults.yaml"])
    return render.PlatformDefaults.from_mapping(data)


# ----- helpers -----


def manifest(name: str, namespace: str = TEAM_A, **spec: Any) -> dict[str, Any]:
    """A legitimate job of team-a under VALUES' policy; keyword arguments replace spec groups."""
    return chat_job(
        name, namespace, "s3://datasets/chat.jsonl", **{"scheduling": {"queueName": TEAM_A}, **spec}
    )


LEGIT_SPEC: dict[str, Any] = {
    "model": {
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "credentialsSecretRef": {"name": "alice-creds"},
    },
    "datasets": [
        {"source": "s3://datasets/chat.jsonl"},
        {"source": "/data/team-a/extra.jsonl"},
        {"source": "s3://models/team-a/prev/data.jsonl"},
    ],
    "output": {"uri": "s3://platform-runs/team-a/legit/", "credentialsSecretRef": {"name": "alice-creds"}},
    "storage": {"s3": {"endpointUrl": "http://minio.storage:9000"}},
    "tracking": {
        "mlflow": {
            "trackingUri": "http://mlflow.platform:5000",
            "credentialsSecretRef": {"name": "alice-creds"},
        },
        "wandb": {"project": "p", "mode": "offline", "apiKeySecretRef": {"name": "alice-creds"}},
    },
    "resources": {
        "nodes": 2,
        "gpusPerNode": 1,
        "image": "registry.example/kubetune/trainer:2",
        "imagePullPolicy": "IfNotPresent",
        "imagePullSecrets": ["alice-creds"],
        "priorityClassName": "training",
        "nodeSelector": {"pool": "gpu", "nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"a": "b"}},
                        },
                    }
                ]
            }
        },
    },
    "scheduling": {"queueName": TEAM_A, "priorityClassName": "batch"},
}


def tenant_apply(
    cp: ControlPlane, body: dict[str, Any], *, dry_run: bool = False, user: str = TENANT
) -> subprocess.CompletedProcess:
    args = ["apply", "--validate=strict", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    return cp.kubectl(*args, input=json.dumps(body), check=False, user=user)


def kubectl_as(
    cp: ControlPlane, kubeconfig: str, *args: str, input: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(cp.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_as(
    cp: ControlPlane, kubeconfig: str, body: dict[str, Any], *, dry_run: bool = True
) -> subprocess.CompletedProcess:
    """`kubectl create` of BODY with KUBECONFIG's identity: by default a server-side dry run."""
    args = ["create", "--dry-run=server", "-f", "-"] if dry_run else ["create", "-f", "-"]
    return kubectl_as(cp, kubeconfig, *args, input=json.dumps(body))


def patch_configmap_as(
    cp: ControlPlane, kubeconfig: str, name: str, patch: dict[str, Any]
) -> subprocess.CompletedProcess:
    """A merge patch of team-a's ConfigMap NAME with KUBECONFIG's identity."""
    return kubectl_as(
        cp, kubeconfig, "-n", TEAM_A, "patch", "configmap", name, "--type=merge", "-p", json.dumps(patch)
    )


def admin_dry_run(cp: ControlPlane, body: dict[str, Any]) -> subprocess.CompletedProcess:
    """`kubectl create --dry-run=server` of BODY as the admin (admission only: RBAC allows all)."""
    return cp.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)


def operator_violations(
    spec: dict[str, Any], platform: render.PlatformDefaults, namespace: str = TEAM_A
) -> list[str]:
    """What the operator says about the same spec: policy.check() (through render.effective_spec,
    which also refuses a job without a queue when the policy requires one)."""
    try:
        render.effective_spec({"metadata": {"name": "j", "namespace": namespace}, "spec": spec}, platform)
    except render.PolicyViolation as violation:
        return str(violation).split("; ")
    return []


# ----- the chart's objects -----


def test_chart_renders_the_policy_and_the_admission_policies(chart, platform) -> None:
    params = one(chart, "FineTuneJobPolicy", "kubetune")
    # the same policy as the operator's, plus the platform's output prefix per namespace
    expected = platform.policy.model_dump(mode="json", by_alias=True, exclude_none=True)
    expected["allowedOutputPrefixes"] = [
        *expected["allowedOutputPrefixes"],
        "s3://platform-runs/{namespace}/",
    ]
    assert (
        policy.TenantPolicy.model_validate(params["spec"]).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        == expected
    )
    assert platform.policy.tenant_secret_refs == "VerifiedByAdmission"  # the chart's default with admission
    assert {d["metadata"]["name"] for d in find(chart, "ValidatingAdmissionPolicy")} == set(POLICIES)
    for binding in find(chart, "ValidatingAdmissionPolicyBinding"):
        assert binding["spec"]["validationActions"] == ["Deny"]
    tenant = one(chart, "ValidatingAdmissionPolicyBinding", "kubetune-tenant-policy")
    assert tenant["spec"]["paramRef"] == {"name": "kubetune", "parameterNotFoundAction": "Deny"}
    variables = {
        v["name"]: v["expression"]
        for v in one(chart, "ValidatingAdmissionPolicy", "kubetune-tenant-policy")["spec"]["variables"]
    }
    assert variables["forbiddenPaths"] == repr(list(policy.FORBIDDEN_PATH_PREFIXES)).replace(" ", "")


def test_the_api_server_accepts_every_expression(cp, chart) -> None:
    """Type-checked against the CRD schemas and within the cost budget (the server refuses a policy
    whose estimated cost is too high, and reports type errors in status.typeChecking)."""

    def checked() -> list[dict[str, Any]] | None:
        out = [cp.get_json("validatingadmissionpolicy", name) for name in POLICIES]
        done = all(p.get("status", {}).get("observedGeneration") == p["metadata"]["generation"] for p in out)
        return out if done else None

    for vap in cp.wait_for(checked, 60, "type checking of the admission policies"):
        warnings = (vap["status"].get("typeChecking") or {}).get("expressionWarnings") or []
        assert not warnings, (vap["metadata"]["name"], warnings)
        assert not [c for c in vap["status"].get("conditions", []) if c.get("status") == "False"], vap[
            "status"
        ]


# ----- the tenant -----


def test_tenant_is_bound_only_to_the_chart_role(cp, chart) -> None:
    def can(*args: str) -> bool:
        return cp.kubectl("auth", "can-i", *args, user=TENANT, check=False).stdout.strip() == "yes"

    assert can("create", "finetunejobs.kubetune.io", "-n", TEAM_A)
    assert not can("create", "finetunejobs.kubetune.io", "-n", TEAM_B)
    assert not can("get", "secrets/other-team-creds", "-n", TEAM_A) and can(
        "get", "secrets/alice-creds", "-n", TEAM_A
    )
    assert not can("patch", "finetunejobs.kubetune.io", "--subresource=status", "-n", TEAM_A)
    assert not can("create", "pods", "-n", TEAM_A)


def test_legitimate_job_is_admitted(cp, chart, platform) -> None:
    body = manifest("legit", **copy.deepcopy(LEGIT_SPEC))
    assert operator_violations(body["spec"], platform) == []
    result = tenant_apply(cp, body)
    assert result.returncode == 0, result.stderr
    stored = cp.get_json("-n", TEAM_A, "ftj", "legit")
    assert stored["spec"]["resources"]["image"] == "registry.example/kubetune/trainer:2"
    # a plain job: platform image, output, queue and placement by default
    plain = manifest("plain")
    assert operator_violations(plain["spec"], platform) == []
    assert tenant_apply(cp, plain).returncode == 0
    # metadata-only changes pass (the tenant policy checks only spec changes)
    assert (
        cp.kubectl("-n", TEAM_A, "label", "ftj", "plain", "team=a", user=TENANT, check=False).returncode == 0
    )


def test_gang_provider_the_platform_did_not_enable_is_refused_at_apply(cp, chart, platform) -> None:
    """spec.scheduling.gang.provider picks one of the platform's gang schedulers (defaults.gangSchedulers),
    never a scheduler of the tenant's choosing: an enabled provider is admitted, another one is refused
    at apply with the same message the operator gives."""
    gang_job = manifest(
        "gang-ok",
        resources={"nodes": 2},
        scheduling={"queueName": TEAM_A, "gang": {"provider": "coscheduling"}},
    )
    assert operator_violations(gang_job["spec"], platform) == []
    assert tenant_apply(cp, gang_job, dry_run=True).returncode == 0
    body = manifest(
        "gang-volcano",
        resources={"nodes": 2},
        scheduling={"queueName": TEAM_A, "gang": {"provider": "volcano"}},
    )
    expected = (
        "spec.scheduling.gang.provider: volcano is not enabled on this platform "
        "(enabled: coscheduling; the platform sets gangSchedulers)"
    )
    assert expected in "; ".join(operator_violations(body["spec"], platform))
    result = tenant_apply(cp, body)
    assert result.returncode != 0, "a gang provider the platform did not enable was admitted"
    assert "ValidatingAdmissionPolicy 'kubetune-tenant-policy'" in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr


def test_resources_service_account_name_is_an_unknown_field(cp, chart) -> None:
    """A tenant-named ServiceAccount is not even expressible: the field is gone and strict field
    validation refuses it."""
    result = tenant_apply(cp, manifest("sa", resources={"serviceAccountName": "team-b-deployer"}))
    assert result.returncode != 0
    assert 'unknown field "spec.resources.serviceAccountName"' in result.stderr, result.stderr


SECRET_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "model": (
        {"model": {"source": "org/model", "credentialsSecretRef": {"name": "other-team-creds"}}},
        "spec.model.credentialsSecretRef.name",
    ),
    "output": (
        {"output": {"credentialsSecretRef": {"name": "other-team-creds"}}},
        "spec.output.credentialsSecretRef.name",
    ),
    "storage": (
        {"storage": {"credentialsSecretRef": {"name": "other-team-creds"}}},
        "spec.storage.credentialsSecretRef.name",
    ),
    "wandb": (
        {
            "tracking": {
                "wandb": {"project": "p", "mode": "offline", "apiKeySecretRef": {"name": "other-team-creds"}}
            }
        },
        "spec.tracking.wandb.apiKeySecretRef.name",
    ),
    "mlflow": (
        {
            "tracking": {
                "mlflow": {
                    "trackingUri": "http://mlflow.platform:5000",
                    "credentialsSecretRef": {"name": "other-team-creds"},
                }
            }
        },
        "spec.tracking.mlflow.credentialsSecretRef.name",
    ),
    "imagePullSecrets": (
        {"resources": {"imagePullSecrets": ["alice-creds", "other-team-creds"]}},
        "spec.resources.imagePullSecrets[1]",
    ),
}


@pytest.mark.parametrize("field", sorted(SECRET_FIELDS))
def test_secret_the_tenant_cannot_read_is_refused(cp, chart, field: str) -> None:
    spec, path = SECRET_FIELDS[field]
    result = tenant_apply(cp, manifest(f"secret-{field.lower()}", **copy.deepcopy(spec)))
    assert result.returncode != 0
    assert f"{path}: {TENANT} may not get Secret 'other-team-creds' in namespace {TEAM_A}" in result.stderr, (
        result.stderr
    )
    # the same reference to a Secret the tenant may read is admitted
    readable = json.loads(json.dumps(spec).replace("other-team-creds", "alice-creds"))
    ok = tenant_apply(cp, manifest(f"secret-{field.lower()}", **readable), dry_run=True)
    assert ok.returncode == 0, ok.stderr


# (name, spec groups, [substrings of the refusal: the field and the rule])
ATTACKS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "s3-endpoint",
        {"storage": {"s3": {"endpointUrl": "http://exfil.example:9000"}}},
        ["spec.storage.s3.endpointUrl", "http://exfil.example:9000", "policy.allowedS3Endpoints"],
    ),
    (
        "tracking-uri",
        {"tracking": {"mlflow": {"trackingUri": "http://exfil.example/mlflow"}}},
        ["spec.tracking.mlflow.trackingUri", "policy.allowedTrackingUris"],
    ),
    (
        "wandb-online",
        {"tracking": {"wandb": {"project": "p"}}},
        ["spec.tracking.wandb.mode", "policy.allowWandbOnline"],
    ),
    ("empty-queue", {"scheduling": {"queueName": ""}}, ["spec.scheduling.queueName", "policy.requireQueue"]),
    ("no-queue", {"scheduling": {}}, ["spec.scheduling.queueName", "policy.requireQueue"]),
    (
        "other-queue",
        {"scheduling": {"queueName": "team-b"}},
        ["spec.scheduling.queueName", "policy.allowedQueues"],
    ),
    (
        "workload-priority",
        {"scheduling": {"queueName": TEAM_A, "priorityClassName": "urgent"}},
        ["spec.scheduling.priorityClassName", "policy.allowedWorkloadPriorityClasses"],
    ),
    (
        "control-plane-node",
        {"resources": {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}},
        [
            "spec.resources.nodeSelector[node-role.kubernetes.io/control-plane]",
            "policy.allowedNodeSelectorKeys",
        ],
    ),
    (
        "other-teams-nodes",
        {"resources": {"nodeSelector": {"pool": "team-b-h100"}}},
        ["spec.resources.nodeSelector[pool]", "pool=gpu", "policy.enforcedNodeSelector"],
    ),
    (
        "keyless-toleration",
        {"resources": {"tolerations": [{"operator": "Exists"}]}},
        ["spec.resources.tolerations", "without a key", "policy.allowedTolerationKeys"],
    ),
    (
        "control-plane-toleration",
        {
            "resources": {
                "tolerations": [
                    {
                        "key": "node-role.kubernetes.io/control-plane",
                        "operator": "Exists",
                        "effect": "NoSchedule",
                    }
                ]
            }
        },
        [
            "spec.resources.tolerations[].key",
            "node-role.kubernetes.io/control-plane",
            "policy.allowedTolerationKeys",
        ],
    ),
    (
        "system-priority",
        {"resources": {"priorityClassName": "system-node-critical"}},
        ["spec.resources.priorityClassName", "system-node-critical", "policy.allowedPriorityClasses"],
    ),
    (
        "cross-namespace-anti-affinity",
        {
            "resources": {
                "affinity": {
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "topologyKey": "kubernetes.io/hostname",
                                "namespaceSelector": {},
                                "labelSelector": {"matchLabels": {"app": "inference"}},
                            }
                        ]
                    }
                }
            }
        },
        ["spec.resources.affinity", "namespaceSelector", "policy.allowAffinity"],
    ),
    (
        "cross-namespace-preferred-affinity",
        {
            "resources": {
                "affinity": {
                    "podAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 10,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "namespaces": [TEAM_B],
                                    "labelSelector": {},
                                },
                            }
                        ]
                    }
                }
            }
        },
        ["spec.resources.affinity", "policy.allowAffinity"],
    ),
    (
        "image",
        {"resources": {"image": "docker.io/attacker/miner:latest"}},
        ["spec.resources.image", "docker.io/attacker/miner:latest", "policy.allowedImagePrefixes"],
    ),
    (
        "image-prefix-lookalike",
        {"resources": {"image": "registry.example/kubetune-evil/trainer:1"}},
        ["spec.resources.image", "policy.allowedImagePrefixes"],
    ),
    (
        "pull-policy",
        {"resources": {"imagePullPolicy": "Never"}},
        ["spec.resources.imagePullPolicy", "Never", "policy.allowedImagePullPolicies"],
    ),
    (
        "proc-environ",
        {"datasets": [{"source": "/proc/self/environ"}]},
        ["spec.datasets[].source", "/proc/self/environ", "policy.dataPaths"],
    ),
    (
        "service-account-token",
        {"datasets": [{"source": "/var/run/secrets/kubernetes.io/serviceaccount/token"}]},
        ["spec.datasets[].source", "/var/run/secrets/kubernetes.io/serviceaccount/token", "policy.dataPaths"],
    ),
    (
        "kubetune-token",
        {"validation": {"datasets": [{"source": "/var/run/secrets/kubetune/token"}]}},
        ["spec.validation.datasets[].source", "policy.dataPaths"],
    ),
    (
        "relative-dotdot",
        {"datasets": [{"source": "../../etc/passwd"}]},
        ["spec.datasets[].source", "../../etc/passwd", "policy.dataPaths"],
    ),
    (
        "dotdot-out-of-data",
        {"datasets": [{"source": "/data/../proc/self/environ"}]},
        ["spec.datasets[].source", "policy.dataPaths"],
    ),
    ("relative", {"datasets": [{"source": "train.jsonl"}]}, ["spec.datasets[].source", "policy.dataPaths"]),
    # refused by the CRD's own rules (no scheme but s3:// is read) before the tenant policy is asked
    ("file-scheme", {"datasets": [{"source": "file:///etc/passwd"}]}, ["spec.datasets[0].source", "crd"]),
    ("model-path", {"model": {"source": "/opt/venv/lib"}}, ["spec.model.source", "policy.dataPaths"]),
    (
        "ca-bundle",
        {"storage": {"s3": {"caBundle": "/etc/shadow"}}},
        ["spec.storage.s3.caBundle", "policy.dataPaths"],
    ),
    (
        "other-bucket",
        {"datasets": [{"source": "s3://team-b-private/data.jsonl"}]},
        ["spec.datasets[].source", "s3://team-b-private/data.jsonl", "policy.allowedSourcePrefixes"],
    ),
    (
        "other-namespace-model",
        {"model": {"source": "s3://models/team-b/secret-model/"}},
        ["spec.model.source", "s3://models/team-a/", "policy.allowedSourcePrefixes"],
    ),
    (
        "adapter-path",
        {"model": {"source": "s3://models/team-a/base/", "adapter": "/var/run/secrets/kubernetes.io"}},
        ["spec.model.adapter", "policy.dataPaths"],
    ),
    (
        "other-namespace-adapter",
        {
            "model": {
                "source": "s3://models/team-a/base/",
                "adapter": "s3://models/team-b/sft/exports/adapter/",
            }
        },
        ["spec.model.adapter", "s3://models/team-a/", "policy.allowedSourcePrefixes"],
    ),
    (
        "trust-remote-code",
        {"model": {"source": "org/model", "revision": "a" * 40, "trustRemoteCode": True}},
        ["spec.model.trustRemoteCode", "policy.allowTrustRemoteCode"],
    ),
    (
        "output-other-namespace",
        {"output": {"uri": "s3://platform-runs/team-b/steal/"}},
        ["spec.output.uri", "s3://platform-runs/team-a/", "policy.allowedOutputPrefixes"],
    ),
    (
        "output-elsewhere",
        {"output": {"uri": "s3://exfil/bucket/"}},
        ["spec.output.uri", "policy.allowedOutputPrefixes"],
    ),
]


@pytest.mark.parametrize(("name", "spec", "expected"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused_at_apply(
    cp, chart, platform, name: str, spec: dict[str, Any], expected: list[str]
) -> None:
    body = manifest(f"attack-{name}", **copy.deepcopy(spec))
    result = tenant_apply(cp, body)
    assert result.returncode != 0, f"{name} was admitted"
    if "crd" in expected:  # the CRD's schema refuses it, naming the field
        assert expected[0] in result.stderr, result.stderr
        return
    assert "ValidatingAdmissionPolicy 'kubetune-tenant-policy'" in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)
    assert cp.kubectl("-n", TEAM_A, "get", "ftj", f"attack-{name}", check=False).returncode != 0
    # the operator's own check names the same rule for the same spec
    rule = next(t for t in expected if t.startswith("policy."))
    assert any(rule in v for v in operator_violations(body["spec"], platform)), operator_violations(
        body["spec"], platform
    )


def test_trust_remote_code_needs_a_pinned_commit(cp, chart) -> None:
    """Even where the policy would allow it (the CRD's own rule), a branch is refused."""
    body = manifest("trc-branch", model={"source": "org/model", "revision": "main", "trustRemoteCode": True})
    result = tenant_apply(cp, body)
    assert (
        result.returncode != 0 and "spec.model.revision" in result.stderr and "40-hex commit" in result.stderr
    )


def test_changing_the_spec_later_is_checked_too(cp, chart) -> None:
    name = "later"
    assert tenant_apply(cp, manifest(name, suspend=True)).returncode == 0
    result = tenant_apply(
        cp, manifest(name, suspend=True, resources={"priorityClassName": "system-cluster-critical"})
    )
    assert result.returncode != 0 and "policy.allowedPriorityClasses" in result.stderr, result.stderr
    result = tenant_apply(
        cp, manifest(name, suspend=True, resources={"imagePullSecrets": ["other-team-creds"]})
    )
    assert result.returncode != 0 and "spec.resources.imagePullSecrets[0]" in result.stderr, result.stderr


def test_a_missing_policy_object_denies(cp, chart, tmp_path) -> None:
    """parameterNotFoundAction: Deny: without its FineTuneJobPolicy nothing is admitted."""
    params = one(chart, "FineTuneJobPolicy", "kubetune")
    cp.kubectl("delete", "finetunejobpolicy", "kubetune")
    try:

        def denied() -> bool:
            result = tenant_apply(cp, manifest("no-params"), dry_run=True)
            return result.returncode != 0 and "kubetune" in result.stderr

        cp.wait_for(denied, 30, "denial without parameters", interval=1)
    finally:
        cp.apply(params)
    cp.wait_for(
        lambda: tenant_apply(cp, manifest("no-params"), dry_run=True).returncode == 0,
        30,
        "the policy back",
        interval=1,
    )


# ----- the trainer's token and the status -----


def _create_job_as_admin(cp: ControlPlane, name: str) -> dict[str, Any]:
    """A legitimate job (created if missing) as the API server returns it (uid and all)."""
    cp.apply(manifest(name))
    return cp.get_json("-n", TEAM_A, "ftj", name)


@pytest.fixture(scope="module")
def operator_kubeconfig(cp, chart, tmp_path_factory) -> str:
    return token_kubeconfig(cp, SYSTEM_NS, OPERATOR, tmp_path_factory.mktemp("operator") / "op.kubeconfig")


def _patch_status(
    cp: ControlPlane, kubeconfig: str, name: str, status: dict[str, Any]
) -> subprocess.CompletedProcess:
    return kubectl_as(
        cp,
        kubeconfig,
        "-n",
        TEAM_A,
        "patch",
        "finetunejobs.kubetune.io",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def test_trainer_token_writes_only_its_part_of_the_status(cp, chart, operator_kubeconfig, tmp_path) -> None:
    name = "status-job"
    job = _create_job_as_admin(cp, name)
    for obj in render.render_rbac(job):  # the operator-made SA, Role and RoleBinding of the job
        cp.apply(obj)
    trainer = token_kubeconfig(cp, TEAM_A, render.trainer_account_name(name), tmp_path / "trainer.kubeconfig")
    # the operator sets the lifecycle fields (it is not restricted)
    started = {
        "phase": "Running",
        "attempt": 1,
        "restarts": 0,
        "startTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 1,
        "message": "attempt 1 running",
    }
    result = _patch_status(cp, operator_kubeconfig, name, started)
    assert result.returncode == 0, result.stderr
    # the trainer reports progress, checkpoints, metrics, artifacts
    report = {
        "progress": {"step": 5, "totalSteps": 10, "loss": 1.5},
        "checkpoint": {"step": 5, "uri": "s3://platform-runs/team-a/status-job/checkpoint-5/"},
        "metrics": {"finalEvalLoss": 1.2},
        "artifacts": [
            {
                "kind": "adapter",
                "uri": "s3://platform-runs/team-a/status-job/adapter/",
                "sha256": "0" * 64,
                "sizeBytes": 10,
            }
        ],
    }
    result = _patch_status(cp, trainer, name, report)
    assert result.returncode == 0, result.stderr
    assert cp.get_json("-n", TEAM_A, "ftj", name)["status"]["progress"]["step"] == 5
    for field, value in [
        ("attempt", 7),
        ("restarts", 3),
        ("startTime", "2030-01-01T00:00:00Z"),
        ("phase", "Succeeded"),
        ("completionTime", "2026-01-01T01:00:00Z"),
        ("message", "done"),
        (
            "conditions",
            [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Done",
                    "lastTransitionTime": "2026-01-01T01:00:00Z",
                }
            ],
        ),
    ]:
        result = _patch_status(cp, trainer, name, {field: value, "progress": {"step": 6}})
        assert result.returncode != 0, field
        assert f"status.{field}: only the operator changes this" in result.stderr, result.stderr
        assert "kubetune-trainer-status" in result.stderr
    # removing a field is a change too
    result = _patch_status(cp, trainer, name, {"message": None})
    assert result.returncode != 0 and "status.message" in result.stderr
    status = cp.get_json("-n", TEAM_A, "ftj", name)["status"]
    assert status["attempt"] == 1 and status["phase"] == "Running" and status["progress"]["step"] == 5
    # the trainer cannot touch the spec or another job at all (RBAC)
    other = _create_job_as_admin(cp, "status-other")
    assert other and _patch_status(cp, trainer, "status-other", {"progress": {"step": 1}}).returncode != 0
    # and the tenant policy does not get in the operator's way: metadata patches by the operator pass
    result = kubectl_as(
        cp,
        operator_kubeconfig,
        "-n",
        TEAM_A,
        "annotate",
        "finetunejobs.kubetune.io",
        name,
        "kopf.zalando.org/last-handled-configuration={}",
    )
    assert result.returncode == 0, result.stderr


# ----- the operator's rights -----


def test_operator_creates_exactly_the_children_render_makes(cp, chart, platform, operator_kubeconfig) -> None:
    name = "children"
    job = _create_job_as_admin(cp, name)
    children = render.render_children(job, platform)
    kinds = [c["kind"] for c in children]
    assert {"ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "ConfigMap", "Service", "Job"} <= set(
        kinds
    )
    for child in children:
        result = create_as(cp, operator_kubeconfig, child, dry_run=False)
        assert result.returncode == 0, (child["kind"], result.stderr)
    # and may change its own ConfigMap
    result = patch_configmap_as(cp, operator_kubeconfig, render.config_map_name(name), {"data": {"x": "y"}})
    assert result.returncode == 0, result.stderr
    # and delete its Job
    result = kubectl_as(cp, operator_kubeconfig, "-n", TEAM_A, "delete", "job", render.job_name(name, 1))
    assert result.returncode == 0, result.stderr


def _operator_job(job: dict[str, Any], platform: render.PlatformDefaults) -> dict[str, Any]:
    (rendered,) = [c for c in render.render_children(job, platform, attempt=2) if c["kind"] == "Job"]
    return rendered


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("service-account-default", "spec.template.spec.serviceAccountName"),
        ("other-jobs-account", "spec.template.spec.serviceAccountName"),
        ("no-labels", "metadata.labels"),
        ("other-jobs-labels", "spec.template.spec.serviceAccountName"),
        ("automount", "automountServiceAccountToken"),
        ("host-network", "hostNetwork"),
        ("host-path", "hostPath"),
        ("privileged", "privileged"),
        ("name", "metadata.name"),
    ],
)
def test_operator_cannot_create_other_jobs(
    cp, chart, platform, operator_kubeconfig, change: str, expected: str
) -> None:
    job = _create_job_as_admin(cp, "plain")
    bad = _operator_job(job, platform)
    pod = bad["spec"]["template"]["spec"]
    if change == "service-account-default":
        pod["serviceAccountName"] = "default"
    elif change == "other-jobs-account":
        pod["serviceAccountName"] = "legit-trainer"
    elif change == "no-labels":  # (a Job without labels gets its pod template's)
        bad["metadata"]["labels"] = {}
        bad["spec"]["template"]["metadata"]["labels"] = {"app": "x"}
    elif change == "other-jobs-labels":  # labelled as another job's: its pods must run as that job's account
        bad["metadata"]["labels"]["kubetune.io/job-name"] = "legit"
        bad["metadata"]["name"] = "legit-9"
    elif change == "automount":
        pod["automountServiceAccountToken"] = True
    elif change == "host-network":
        pod["hostNetwork"] = True
    elif change == "host-path":
        pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    elif change == "privileged":
        pod["containers"][0]["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    elif change == "name":
        bad["metadata"]["name"] = "plain-backup"
    result = create_as(cp, operator_kubeconfig, bad)
    assert result.returncode != 0, change
    assert expected in result.stderr and "kubetune-operator-children" in result.stderr, result.stderr
    # the unchanged Job would be admitted
    good = _operator_job(job, platform)
    ok = create_as(cp, operator_kubeconfig, good)
    assert ok.returncode == 0, ok.stderr


def test_operator_cannot_touch_objects_that_are_not_its_own(cp, chart, platform, operator_kubeconfig) -> None:
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "team-settings", "namespace": TEAM_A},
            "data": {"endpoint": "https://internal"},
        }
    )
    result = patch_configmap_as(
        cp, operator_kubeconfig, "team-settings", {"data": {"endpoint": "https://exfil"}}
    )
    assert result.returncode != 0 and "metadata.labels" in result.stderr, result.stderr
    # labelling it in the same patch does not make it the operator's
    labels = {"app.kubernetes.io/managed-by": "kubetune-operator", "kubetune.io/job-name": "team-settings"}
    result = patch_configmap_as(
        cp,
        operator_kubeconfig,
        "team-settings",
        {"metadata": {"labels": labels}, "data": {"endpoint": "https://exfil"}},
    )
    assert result.returncode != 0 and "is not the operator's" in result.stderr, result.stderr
    assert cp.get_json("-n", TEAM_A, "configmap", "team-settings")["data"]["endpoint"] == "https://internal"
    job = _create_job_as_admin(cp, "plain")
    role, binding = [c for c in render.render_rbac(job) if c["kind"] in ("Role", "RoleBinding")]
    # (a rule it holds itself: RBAC refuses to grant more than that before admission is asked)
    role["rules"].append({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]})
    result = create_as(cp, operator_kubeconfig, role)
    assert result.returncode != 0 and "rules:" in result.stderr, result.stderr
    good_role = next(c for c in render.render_rbac(job) if c["kind"] == "Role")  # (a binding needs its Role)
    result = create_as(cp, operator_kubeconfig, good_role, dry_run=False)
    assert result.returncode == 0 or "AlreadyExists" in result.stderr, result.stderr
    binding["subjects"].append({"kind": "ServiceAccount", "name": "default", "namespace": TEAM_A})
    result = create_as(cp, operator_kubeconfig, binding)
    assert result.returncode != 0 and "roleRef/subjects" in result.stderr, result.stderr
    # a NetworkPolicy or Service of the job's name and labels that selects other pods
    network_policy = render.render_network_policy(job, platform)
    network_policy["spec"]["podSelector"] = {}
    result = create_as(cp, operator_kubeconfig, network_policy)
    assert result.returncode != 0 and "spec.podSelector" in result.stderr, result.stderr
    service = render.render_service(job)
    service["spec"].update(selector={"app": "inference"}, clusterIP=None, type="NodePort")
    result = create_as(cp, operator_kubeconfig, service)
    assert result.returncode != 0 and "headless" in result.stderr, result.stderr


# ----- quotas -----


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": TEAM_A},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], **spec},
    }


def test_quota_refuses_system_priority_pods(cp, chart) -> None:
    result = admin_dry_run(cp, _pod("critical", priorityClassName="system-node-critical"))
    assert result.returncode != 0 and "exceeded quota: kubetune-priority-classes" in result.stderr, (
        result.stderr
    )
    # a pod without a priority class is not in the scope (In, not NotIn)
    result = admin_dry_run(cp, _pod("plain-pod"))
    assert result.returncode == 0, result.stderr


def test_quota_refuses_cross_namespace_affinity(cp, chart) -> None:
    result = admin_dry_run(cp, _pod("anti", affinity=CROSS_NAMESPACE_ANTI_AFFINITY))
    assert result.returncode != 0 and "exceeded quota: kubetune-cross-namespace-affinity" in result.stderr, (
        result.stderr
    )
    same_namespace = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname", "labelSelector": {}}
            ]
        }
    }
    result = admin_dry_run(cp, _pod("anti", affinity=same_namespace))
    assert result.returncode == 0, result.stderr


def test_priority_class_scope_not_in_matches_pods_without_a_class(cp, chart) -> None:
    """Why the chart uses `In [forbidden]`: a `NotIn [allowed]` scope also matches pods that name no
    priority class, so a 0-pod quota with it would refuse every ordinary pod."""
    namespace = "scope-probe"
    cp.create_namespace(namespace)
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "not-in", "namespace": namespace},
            "spec": {
                "hard": {"pods": "0"},
                "scopeSelector": {
                    "matchExpressions": [
                        {"scopeName": "PriorityClass", "operator": "NotIn", "values": ["training"]}
                    ]
                },
            },
        }
    )
    wait_counted(cp, namespace, "not-in")
    pod = {**_pod("plain-pod"), "metadata": {"name": "plain-pod", "namespace": namespace}}
    result = admin_dry_run(cp, pod)
    assert result.returncode != 0 and "exceeded quota: not-in" in result.stderr, result.stderr


def test_tenant_default_quota(cp, chart) -> None:
    hard = cp.get_json("-n", TEAM_A, "resourcequota", "kubetune")["spec"]["hard"]
    assert hard["count/finetunejobs.kubetune.io"] == "20" and hard["requests.nvidia.com/gpu"] == "8"
    assert (
        "count/finetunejobs.kubetune.io"
        not in cp.get_json("-n", TEAM_B, "resourcequota", "kubetune")["spec"]["hard"]
    )
    used = cp.get_json("-n", TEAM_A, "resourcequota", "kubetune")["status"]["used"]
    assert int(used["count/finetunejobs.kubetune.io"]) >= 0


# ----- the parameters and the cost budget -----


def test_changing_the_policy_object_changes_admission(cp, chart, platform) -> None:
    """The FineTuneJobPolicy is read at every request: rules the test values leave off, turned on."""
    patch = {
        "spec": {
            "requireImageDigest": True,
            "allowHubModels": False,
            "allowedTrackingUris": [],
            "tenantSecretRefs": "Forbid",
        }
    }
    stricter = render.PlatformDefaults.from_mapping(
        {
            **yaml.safe_load(one(chart, "ConfigMap", "kubetune-defaults")["data"]["defaults.yaml"]),
            "policy": {
                **platform.policy.model_dump(mode="json", by_alias=True, exclude_none=True),
                **patch["spec"],
            },
        }
    )
    cp.kubectl("patch", "finetunejobpolicy", "kubetune", "--type=merge", "-p", json.dumps(patch))
    try:
        cases = [
            (
                {"resources": {"image": "registry.example/kubetune/trainer:2"}},
                ["spec.resources.image", "pinned by digest", "policy.requireImageDigest"],
            ),
            ({"model": {"source": "org/model"}}, ["spec.model.source", "hub model", "policy.allowHubModels"]),
            (
                {"tracking": {"mlflow": {"trackingUri": "http://mlflow.platform:5000"}}},
                ["spec.tracking.mlflow.trackingUri", "none", "policy.allowedTrackingUris"],
            ),
            (
                {"output": {"credentialsSecretRef": {"name": "alice-creds"}}},
                ["spec.output.credentialsSecretRef.name", "policy.tenantSecretRefs"],
            ),
        ]

        def in_force() -> bool:
            result = tenant_apply(cp, manifest("strict", **cases[0][0]), dry_run=True)
            return result.returncode != 0 and "policy.requireImageDigest" in result.stderr

        cp.wait_for(in_force, 30, "the changed parameters in force", interval=1)
        for spec, expected in cases:
            result = tenant_apply(cp, manifest("strict", **spec), dry_run=True)
            assert result.returncode != 0, spec
            for text in expected:
                assert text in result.stderr, (text, result.stderr)
            rule = next(t for t in expected if t.startswith("policy."))
            assert any(rule in v for v in operator_violations(manifest("strict", **spec)["spec"], stricter))
        pinned = manifest(
            "strict", resources={"image": "registry.example/kubetune/trainer@sha256:" + "c" * 64}
        )
        result = tenant_apply(cp, pinned, dry_run=True)
        assert result.returncode == 0, result.stderr
    finally:
        cp.apply(one(chart, "FineTuneJobPolicy", "kubetune"))


def test_a_large_legitimate_job_stays_within_the_cost_budget(cp, chart, platform) -> None:
    """At runtime the API server stops a policy that costs more than its budget (and then refuses the
    request, failurePolicy Fail): a job at the CRD's limits of datasets, with long paths, passes."""
    long = "x" * 1500
    datasets = [{"source": f"/data/team-a/{long}/{i}.jsonl"} for i in range(32)]
    datasets += [{"source": f"s3://datasets/{long}/{i}.jsonl"} for i in range(32)]
    validation = {"datasets": [{"source": f"s3://models/team-a/{long}/{i}.jsonl"} for i in range(64)]}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] * 64
    body = manifest(
        "large",
        datasets=datasets,
        validation=validation,
        resources={
            "tolerations": tolerations,
            "nodeSelector": {"pool": "gpu"},
            "imagePullSecrets": ["alice-creds"] * 8,
        },
    )
    assert operator_violations(body["spec"], platform) == []
    result = tenant_apply(cp, body, dry_run=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # more pull secrets than the authorization checks the budget allows are refused, with a message
    body["spec"]["resources"]["imagePullSecrets"].append("alice-creds")
    result = tenant_apply(cp, body, dry_run=True)
    assert result.returncode != 0 and "spec.resources.imagePullSecrets: at most 8 Secrets" in result.stderr
    body["spec"]["resources"]["imagePullSecrets"].pop()
    # and an attack hidden at the end of such a job is found
    body["spec"]["validation"]["datasets"][-1] = {"source": "/proc/self/environ"}
    result = tenant_apply(cp, body, dry_run=True)
    assert (
        result.returncode != 0 and "spec.validation.datasets[].source: '/proc/self/environ'" in result.stderr
    ), result.stderr[-2000:]
