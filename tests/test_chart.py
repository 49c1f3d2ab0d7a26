"""The Helm chart (charts/kubetune), rendered by the real helm and applied to a real control plane.

Without a cluster: `helm lint --strict` in every mode, the chart's CRD is the generated one, the
RBAC is exactly handlers.OPERATOR_RBAC_RULES (cluster-wide, or Roles per namespace), the
Deployment's arguments are accepted by the operator's own parser and pass the restricted Pod
Security Standard, the defaults ConfigMap loads as render.PlatformDefaults, the values schema
rejects bad values, and the Argo CD health check (Lua, run through lupa) maps every phase.

Against the control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok): the
rendered objects are applied with server-side apply into namespaces that enforce the `restricted`
Pod Security Standard; the operator Deployment's pod is admitted there (kwok runs it); the operator
itself runs as a subprocess with exactly the Deployment's arguments, the chart's defaults
ConfigMap and a token of the chart's ServiceAccount, so it has the chart's RBAC and nothing more,
and runs a job Pending -> Running -> Succeeded while its /metrics endpoint is scraped;
SubjectAccessReviews show what that ServiceAccount may and may not do; applying a FineTuneJob again
changes nothing (GitOps); the namespaced mode runs a job with Roles only; `helm install/upgrade/
uninstall` work as docs/platform.md says.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune import crd, operator_main, render
from kubetune.handlers import OPERATOR_RBAC_RULES
from kubetune.policy import TenantPolicy
from kubetune.spec import Phase
from tests.support.chart import (
    CHART,
    RELEASE,
    apply_chart,
    find,
    helm,
    install_chart,
    one,
    render_chart,
    values_args,
)
from tests.support.cluster import FakeNode, make_cluster, wait_reconciles
from tests.support.controlplane import HOLD_ANNOTATION, ControlPlane
from tests.support.manifests import chat_job, user_role_binding
from tests.support.operator_process import OperatorProcess, token_kubeconfig

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
SYSTEM_NS = "kubetune-system"
OPERATOR = "kubetune-operator"  # <fullname>-operator with release "kubetune"
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"}
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules as (apiGroup, resource, verb) triples (what they grant, however grouped)."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # admission policies are cluster-scoped objects: not in the namespaced mode
    "namespaced": {
        "rbac": {"scope": "namespaced"},
        "watchNamespaces": ["team-a", "team-b"],
        "admission": {"enabled": False},
    },
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "trainerPodMonitor": {"enabled": True},
        }
    },
    "namespaced-monitoring-peering": {
        "rbac": {"scope": "namespaced"},
        "watchNamespaces": ["team-a"],
        "replicas": 2,
        "admission": {"enabled": False},
        "podDisruptionBudget": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}, "trainerPodMonitor": {"enabled": True}},
    },
    "peering": {"replicas": 3, "podDisruptionBudget": {"enabled": True}},
    "platform": {
        "image": {"digest": "sha256:" + "a" * 64, "requireDigest": True},
        "defaults": {
            "image": "registry.example/trainer@sha256:" + "b" * 64,
            "s3EndpointUrl": "http://minio.storage:9000",
            "storageCredentialsSecret": "s3",
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "queueName": "team",
            "cacheSizeLimit": "200Gi",
            "dataVolumes": [
                {"name": "datasets", "mountPath": "/data", "persistentVolumeClaim": {"claimName": "datasets"}}
            ],
        },
        "policy": {
            "requireImageDigest": True,
            "requireQueue": True,
            "dataPaths": ["/data"],
            "allowedImagePrefixes": ["registry.example/"],
        },
        "tenantDefaults": {"forbiddenPriorityClasses": ["platform-critical"]},
        "tenants": {
            "team-a": {
                "resourceQuota": {"requests.nvidia.com/gpu": "16", "pods": None},
                "limitRange": {"default": {"cpu": "8", "memory": "64Gi"}},
                "localQueue": {"clusterQueue": "gpu"},
            }
        },
    },
    "no-metrics": {"metrics": {"enabled": False}},
}


# ----- without a cluster -----


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_is_clean(variant: str, tmp_path: Path) -> None:
    result = helm("lint", str(CHART), "--strict", *values_args(VARIANTS[variant], tmp_path), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    docs = render_chart(tmp_path, VARIANTS[variant], crds=True)
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc


def test_chart_versions_follow_the_package() -> None:
    from kubetune import __version__

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__, "bump Chart.yaml appVersion with the package version"
    assert render.DEFAULT_IMAGE == f"ghcr.io/kubetune/trainer:{chart['appVersion']}"  # the chart's default


def test_chart_crd_is_the_generated_one() -> None:
    chart_crd = (CHART / "crds" / "finetunejobs.kubetune.io.yaml").read_text()
    assert chart_crd == (REPO / "crds" / "finetunejobs.kubetune.io.yaml").read_text(), (
        "charts/kubetune/crds/ is stale: make crd (or copy crds/finetunejobs.kubetune.io.yaml)"
    )
    assert chart_crd == crd.render_yaml(), "the CRD is stale: make crd"
    policy_crd = (CHART / "crds" / "finetunejobpolicies.kubetune.io.yaml").read_text()
    assert (
        policy_crd
        == (REPO / "crds" / "finetunejobpolicies.kubetune.io.yaml").read_text()
        == crd.render_policy_yaml()
    ), "the FineTuneJobPolicy CRD is stale: make crd"


def test_cluster_rbac_is_exactly_the_operator_rules(tmp_path: Path) -> None:
    docs = render_chart(tmp_path)
    role = one(docs, "ClusterRole", OPERATOR)
    assert role["rules"] == OPERATOR_RBAC_RULES
    binding = one(docs, "ClusterRoleBinding", OPERATOR)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": OPERATOR,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": SYSTEM_NS}]
    assert one(docs, "ServiceAccount", OPERATOR)["metadata"]["namespace"] == SYSTEM_NS
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    assert "secrets" not in {r for _, r, _ in triples(role["rules"])}


def test_namespaced_rbac_is_roles_per_namespace(tmp_path: Path) -> None:
    docs = render_chart(tmp_path, VARIANTS["namespaced"])
    assert not find(docs, "ClusterRoleBinding") and not find(docs, "ClusterRole", OPERATOR)
    assert {d["metadata"]["name"] for d in find(docs, "ClusterRole")} == {"kubetune-edit", "kubetune-view"}
    expected = {t for t in triples(OPERATOR_RBAC_RULES) if t[1] not in CLUSTER_SCOPED}
    for namespace in ("team-a", "team-b"):
        (role,) = find(docs, "Role", OPERATOR, namespace)
        assert triples(role["rules"]) == expected
        (binding,) = find(docs, "RoleBinding", OPERATOR, namespace)
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == OPERATOR
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": SYSTEM_NS}]
    args = operator_container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--namespaced-rbac" in args
    parsed = operator_main.parse_args(args)
    assert parsed.namespace == ["team-a", "team-b"] and parsed.namespaced_rbac
    # without watchNamespaces; and with the admission policies, which are cluster-scoped: refused with
    # the namespaced mode, with a clear message
    for other, message in (
        ("admission.enabled=false", "watchNamespaces"),
        ("watchNamespaces={a}", "admission.enabled needs rbac.scope=cluster"),
    ):
        result = helm(
            "template", RELEASE, str(CHART), "--set", "rbac.scope=namespaced", "--set", other, check=False
        )
        assert result.returncode != 0 and message in result.stderr, result.stderr
    assert (
        one(docs, "ConfigMap", "kubetune-defaults")["data"]["defaults.yaml"].count("tenantSecretRefs: Forbid")
        == 1
    )


def test_deployment_arguments_probes_and_pod_security(tmp_path: Path) -> None:
    docs = render_chart(tmp_path)
    deployment = one(docs, "Deployment", OPERATOR)
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(docs)
    args = operator_main.parse_args(container["args"])  # the operator's own parser accepts them
    assert args.all_namespaces and args.peering is None and args.standalone
    assert args.defaults == "/etc/kubetune/defaults.yaml"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert args.metrics_port == ports["metrics"] == 8080 and args.metrics_address == "0.0.0.0"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # the restricted Pod Security Standard (also enforced for real in test_operator_pod_is_admitted...)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/kubetune"]]["configMap"]["name"] == "kubetune-defaults"
    assert pod["serviceAccountName"] == OPERATOR
    service = one(docs, "Service", f"{OPERATOR}-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not find(docs, "ServiceMonitor") and not find(docs, "ClusterKopfPeering")


def test_replicas_run_kopf_peering(tmp_path: Path) -> None:
    docs = render_chart(tmp_path, VARIANTS["peering"])
    deployment = one(docs, "Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 3 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    args = operator_main.parse_args(operator_container(docs)["args"])
    assert args.peering == "kubetune" and not args.standalone
    # --priority=auto: a distinct priority per pod, from its hostname
    os.environ["HOSTNAME"], saved = "kubetune-operator-7d9c-abcde", os.environ.get("HOSTNAME")
    try:
        first = operator_main.parse_args(["--priority=auto"]).priority
        os.environ["HOSTNAME"] = "kubetune-operator-7d9c-fghij"
        assert first != operator_main.parse_args(["--priority=auto"]).priority and first > 0
    finally:
        if saved is None:
            os.environ.pop("HOSTNAME", None)
        else:
            os.environ["HOSTNAME"] = saved
    assert one(docs, "ClusterKopfPeering", "kubetune")
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    crds = {
        d["metadata"]["name"]
        for d in render_chart(tmp_path, VARIANTS["peering"], crds=True)
        if d["kind"] == "CustomResourceDefinition"
    }
    assert crds == {
        "finetunejobs.kubetune.io",
        "finetunejobpolicies.kubetune.io",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    namespaced = render_chart(tmp_path, VARIANTS["namespaced-monitoring-peering"])
    assert [d["metadata"]["namespace"] for d in find(namespaced, "KopfPeering")] == ["team-a"]
    assert not find(namespaced, "ClusterKopfPeering")


def test_monitoring_objects(tmp_path: Path) -> None:
    docs = render_chart(tmp_path, VARIANTS["monitoring"])
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", f"{OPERATOR}-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert (
        monitor["spec"]["endpoints"][0]["port"] == "metrics"
        and monitor["metadata"]["labels"]["release"] == "prometheus"
    )
    pods = one(docs, "PodMonitor")
    trainer_pod = render.render_job(
        {"metadata": {"name": "j", "namespace": "team-a", "uid": "u"}},
        render.parse_spec(
            {
                "model": {"source": "org/m"},
                "task": {"type": "chat"},
                "datasets": [{"source": "d"}],
                "output": {"uri": "s3://o/"},
            }
        ),
        1,
        render.PlatformDefaults(),
    )["spec"]["template"]
    wanted = dict(pods["spec"]["selector"]["matchLabels"])
    assert wanted.pop("batch.kubernetes.io/job-completion-index") == "0"  # only rank 0's pod serves
    assert wanted.items() <= trainer_pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in trainer_pod["spec"]["containers"][0]["ports"]}
    assert (
        pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        and ports["metrics"] == render.TRAINER_METRICS_PORT
    )
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    without = render_chart(tmp_path, VARIANTS["no-metrics"])
    assert "--metrics-port=0" in operator_container(without)["args"]
    assert not find(without, "Service")


def test_defaults_configmap_is_platform_defaults(tmp_path: Path) -> None:
    def defaults_of(docs: list[dict[str, Any]]) -> render.PlatformDefaults:
        path = tmp_path / "defaults.yaml"
        path.write_text(one(docs, "ConfigMap", "kubetune-defaults")["data"]["defaults.yaml"])
        return render.PlatformDefaults.from_file(path)

    plain = render_chart(tmp_path)
    # image: render.DEFAULT_IMAGE; the strict policy, with Secrets named in specs checked at admission
    assert defaults_of(plain) == render.PlatformDefaults(
        policy=TenantPolicy(tenant_secret_refs="VerifiedByAdmission")
    )
    assert defaults_of(render_chart(tmp_path, {"admission": {"enabled": False}})) == render.PlatformDefaults()
    values = {
        "defaults": {
            "image": "registry.example/trainer:2",
            "imagePullPolicy": "Always",
            "imagePullSecrets": ["regcred"],
            "s3EndpointUrl": "http://minio.storage:9000",
            "s3Region": "eu-1",
            "s3AddressingStyle": "path",
            "storageCredentialsSecret": "s3-creds",
            "outputUriPrefix": "s3://runs",
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "queueName": "default",
            "priorityClassName": "training",
            "cacheSizeLimit": "200Gi",
            "terminationGracePeriodSeconds": 600,
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "ml"},
            "trainerServiceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/t"},
            "dataVolumes": [
                {"name": "datasets", "mountPath": "/data", "nfs": {"server": "nfs", "path": "/x"}}
            ],
            "gangSchedulers": {"coscheduling": "scheduler-plugins-scheduler"},
        },
        "policy": {
            "allowedImagePrefixes": ["registry.example/"],
            "requireQueue": True,
            "dataPaths": ["/data"],
            "tenantSecretRefs": "Forbid",
            "networkPolicy": {"egress": []},
        },
    }
    full = render_chart(tmp_path, values)
    assert defaults_of(full) == render.PlatformDefaults.from_mapping(
        {**values["defaults"], "policy": values["policy"]}
    )
    # every PlatformDefaults field can be set from the chart (the policy from `policy:`), and nothing else
    schema = json.loads((CHART / "values.schema.json").read_text())
    fields = {render._camel(f) for f in render.PlatformDefaults.__dataclass_fields__} - {"policy"}
    assert set(schema["properties"]["defaults"]["properties"]) == fields == set(values["defaults"])
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(chart_values["defaults"]) == fields
    # `policy:` is TenantPolicy, key for key, with the model's (strict) defaults
    policy_fields = {f.alias or name for name, f in TenantPolicy.model_fields.items()}
    assert set(schema["properties"]["policy"]["properties"]) == policy_fields == set(chart_values["policy"])
    model_defaults = TenantPolicy().model_dump(mode="json", by_alias=True, exclude_none=True)
    assert {**chart_values["policy"], "tenantSecretRefs": "Forbid"} == model_defaults
    annotation = "checksum/defaults"
    checksums = {
        one(d, "Deployment")["spec"]["template"]["metadata"]["annotations"][annotation] for d in (plain, full)
    }
    assert len(checksums) == 2, "changing the defaults must roll the operator"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": 0}, "/replicas"),
        ({"rbac": {"scope": "everything"}}, "/rbac/scope"),
        ({"defaults": {"imageName": "x"}}, "imageName"),
        ({"defaults": {"imagePullPolicy": "Sometimes"}}, "/defaults/imagePullPolicy"),
        ({"defaults": {"s3EndpointUrl": "minio:9000"}}, "/defaults/s3EndpointUrl"),
        (
            {"securityContext": {"allowPrivilegeEscalation": True}},
            "/securityContext/allowPrivilegeEscalation",
        ),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"tenants": {"team-a": {"localQueue": {"name": "q"}}}}, "clusterQueue"),
        ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "/metrics/serviceMonitor/interval"),
        ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
        ({"image": {"digest": "md5:" + "a" * 64}}, "/image/digest"),
        ({"defaults": {"image": "Registry Example/trainer"}}, "/defaults/image"),
        ({"defaults": {"image": "registry.example/trainer:1@sha256:xyz"}}, "/defaults/image"),
        ({"policy": {"allowedImages": ["x"]}}, "allowedImages"),
        ({"policy": {"tenantSecretRefs": "Allow"}}, "/policy/tenantSecretRefs"),
        ({"policy": {"dataPaths": ["data"]}}, "/policy/dataPaths/0"),
        ({"admission": {"enabled": "yes"}}, "/admission/enabled"),
        ({"tenantDefaults": {"resourceQuota": {"pods": "many"}}}, "/tenantDefaults/resourceQuota/pods"),
        # template checks (fail with the value and what to do)
        ({"image": {"requireDigest": True}}, "image.requireDigest: set image.digest"),
        (
            {"admission": {"enabled": False}, "policy": {"tenantSecretRefs": "VerifiedByAdmission"}},
            "policy.tenantSecretRefs=VerifiedByAdmission needs admission.enabled=true",
        ),
        ({"policy": {"requireImageDigest": True}}, "policy.requireImageDigest: the platform's trainer image"),
        ({"policy": {"dataPaths": ["/proc/data"]}}, "under /proc, never data"),
        ({"policy": {"dataPaths": ["/"]}}, "/policy/dataPaths/0"),
        ({"policy": {"dataPaths": ["//"]}}, 'policy.dataPaths[0] "//": must be an absolute directory'),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_values_schema_rejects(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    result = helm("template", RELEASE, str(CHART), *values_args(values, tmp_path), check=False)
    assert result.returncode != 0, f"accepted {values}"
    assert message in result.stderr, result.stderr


def test_user_roles_aggregate_into_edit_and_view(tmp_path: Path) -> None:
    docs = render_chart(tmp_path)
    edit, view = one(docs, "ClusterRole", "kubetune-edit"), one(docs, "ClusterRole", "kubetune-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {"create", "delete", "patch"} <= set(edit["rules"][0]["verbs"])
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert not find(render_chart(tmp_path, {"rbac": {"userRoles": False}}), "ClusterRole", "kubetune-edit")


def test_tenant_quotas_limits_and_queues(tmp_path: Path) -> None:
    docs = render_chart(tmp_path, VARIANTS["platform"])
    quota = one(docs, "ResourceQuota", "kubetune")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["tenantDefaults"]
    # the tenant's keys over tenantDefaults; null drops one
    expected = {
        k: v for k, v in {**defaults["resourceQuota"], "requests.nvidia.com/gpu": "16"}.items() if k != "pods"
    }
    assert quota["metadata"]["namespace"] == "team-a" and quota["spec"]["hard"] == expected
    affinity = one(docs, "ResourceQuota", "kubetune-cross-namespace-affinity")
    assert affinity["spec"] == {
        "hard": {"pods": "0"},
        "scopeSelector": {
            "matchExpressions": [{"scopeName": "CrossNamespacePodAffinity", "operator": "Exists"}]
        },
    }
    priority = one(docs, "ResourceQuota", "kubetune-priority-classes")
    assert priority["spec"] == {
        "hard": {"pods": "0"},
        "scopeSelector": {
            "matchExpressions": [
                {
                    "scopeName": "PriorityClass",
                    "operator": "In",
                    "values": ["system-node-critical", "system-cluster-critical", "platform-critical"],
                }
            ]
        },
    }
    limits = one(docs, "LimitRange")
    assert limits["spec"]["limits"] == [{"type": "Container", "default": {"cpu": "8", "memory": "64Gi"}}]
    # a tenant without settings gets the defaults (quota and limits); scoped quotas can be turned off
    bare = render_chart(tmp_path, {"tenants": {"team-c": {}}, "tenantDefaults": {"scopedQuotas": False}})
    assert one(bare, "ResourceQuota", "kubetune")["spec"]["hard"] == defaults["resourceQuota"]
    assert one(bare, "LimitRange")["spec"]["limits"] == [{"type": "Container", **defaults["limitRange"]}]
    assert [d["metadata"]["name"] for d in find(bare, "ResourceQuota")] == ["kubetune"]
    queue = one(docs, "LocalQueue")
    assert queue["apiVersion"].startswith("kueue.x-k8s.io/") and queue["metadata"]["name"] == "team-a"
    assert queue["spec"] == {"clusterQueue": "gpu"}
    assert operator_container(docs)["image"] == "ghcr.io/kubetune/operator@sha256:" + "a" * 64


# ----- the Argo CD health check (Lua) -----


def lua_health(obj: dict[str, Any]) -> dict[str, str]:
    import lupa  # a dev dependency: the health check must run, not be skipped

    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:  # Argo CD hands the script the object as nested Lua tables
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([to_lua(v) for v in value])
        return value

    runtime.globals().obj = to_lua(obj)
    script = (CHART / "argocd" / "health.lua").read_text()
    result = runtime.execute(script)
    return {"status": result["status"], "message": result["message"]}


def _ftj(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "generation": generation},
        "spec": {"model": {"source": "org/m"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize(
    ("status", "health"),
    [
        (None, "Progressing"),
        ({}, "Progressing"),
        (
            {"phase": "Pending", "message": "waiting for admission in queue q", "observedGeneration": 1},
            "Progressing",
        ),
        ({"phase": "Initializing", "observedGeneration": 1}, "Progressing"),
        ({"phase": "Running", "observedGeneration": 1}, "Progressing"),
        ({"phase": "Succeeded", "message": "done", "observedGeneration": 1}, "Healthy"),
        ({"phase": "Failed", "message": "exit code 3", "observedGeneration": 1}, "Degraded"),
        ({"phase": "Suspended", "observedGeneration": 1}, "Suspended"),
        ({"phase": "Sleeping"}, "Unknown"),
    ],
    ids=[
        "no-status",
        "empty-status",
        "pending",
        "initializing",
        "running",
        "succeeded",
        "failed",
        "suspended",
        "unknown-phase",
    ],
)
def test_argocd_health_check(status: dict[str, Any] | None, health: str) -> None:
    assert lua_health(_ftj(status))["status"] == health


def test_every_phase_has_a_health_and_a_dashboard_series() -> None:
    """The phases are declared once (spec.Phase): the Argo CD health check and the dashboard know each."""
    panels = json.loads((CHART / "dashboards" / "kubetune.json").read_text())["panels"]
    queries = " ".join(t.get("expr", "") for p in panels for t in p.get("targets") or [])
    for phase in Phase:
        assert lua_health(_ftj({"phase": phase.value, "observedGeneration": 1}))["status"] != "Unknown", phase
        assert f'phase="{phase.value}"' in queries, phase


def test_argocd_health_messages() -> None:
    running = lua_health(
        _ftj(
            {
                "phase": "Running",
                "message": "attempt 1: 2 worker pod(s) running",
                "observedGeneration": 1,
                "progress": {"step": 120, "totalSteps": 300, "loss": 0.91, "etaSeconds": 540},
                "conditions": [{"type": "Running", "status": "True"}],
            }
        )
    )
    assert running == {
        "status": "Progressing",
        "message": "attempt 1: 2 worker pod(s) running (step 120/300, loss 0.91, ETA 540s)",
    }
    assert (
        lua_health(_ftj({"phase": "Failed", "message": "exit code 3: bad row"}))["message"]
        == "exit code 3: bad row"
    )
    stale = lua_health(_ftj({"phase": "Running", "observedGeneration": 1}, generation=2))
    assert stale["status"] == "Progressing" and "generation 2" in stale["message"]
    # a finished job stays Healthy after an allowed edit (the operator no longer bumps observedGeneration)
    assert (
        lua_health(_ftj({"phase": "Succeeded", "observedGeneration": 1}, generation=3))["status"] == "Healthy"
    )
    assert lua_health(_ftj(None))["message"]


# ----- against the control plane -----

TEAM_A, TEAM_B = "team-a", "team-b"
SA_USER = f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR}"
CLUSTER_VALUES: dict[str, Any] = {
    "defaults": {
        "image": "registry.invalid/kubetune/trainer:test",
        "outputUriPrefix": "s3://platform-runs",
        "nodeSelector": {"pool": "gpu"},
        "storageCredentialsSecret": "s3-creds",
        "podAnnotations": {HOLD_ANNOTATION: "true"},  # kwok keeps worker pods Running until released
    },
    "policy": {"allowedSourcePrefixes": ["s3://data/"]},
    # the operator of the namespaced-mode test (another release) writes the status of its jobs too
    "admission": {"trustedStatusWriters": ["system:serviceaccount:kt-ns-system:kt-ns-kubetune-operator"]},
    "tenants": {
        TEAM_A: {
            "resourceQuota": {
                "requests.nvidia.com/gpu": "8",
                "requests.cpu": "64",
                "requests.memory": "256Gi",
                "count/jobs.batch": "20",
            },
            # pods that set no cpu/memory (a spec without resources.cpu/memory) get these
            "limitRange": {
                "default": {"cpu": "2", "memory": "8Gi"},
                "defaultRequest": {"cpu": "2", "memory": "8Gi"},
            },
        }
    },
}


class ChartOperator(OperatorProcess):
    """The operator as a subprocess, run as the chart's Deployment would run it.

    Its arguments and environment are the rendered Deployment's, except the addresses of its endpoints
    (loopback, free ports), the defaults file (the chart's ConfigMap as applied, copied to a local
    file) and a shorter reconcile interval; it authenticates with a token of the chart's ServiceAccount.
    """

    def __init__(
        self,
        cp: ControlPlane,
        directory: Path,
        docs: list[dict[str, Any]],
        namespace: str,
        account: str,
        name: str = "operator",
    ):
        deployment = one(docs, "Deployment")
        (self.container,) = deployment["spec"]["template"]["spec"]["containers"]
        config_map = deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
        defaults = cp.get_json("-n", namespace, "configmap", config_map)["data"]["defaults.yaml"]
        self.defaults_file = directory / f"{name}-defaults.yaml"
        self.defaults_file.write_text(defaults)
        kubeconfig = token_kubeconfig(
            cp, namespace, account, directory / f"{name}.kubeconfig", context="chart"
        )
        env = {e["name"]: e["value"] for e in self.container.get("env", []) if "value" in e}
        super().__init__(
            cp, directory / f"{name}.log", kubeconfig, env={**env, "TMPDIR": str(directory)}, name=name
        )

    def command(self) -> list[str]:
        out = []
        for arg in self.container["args"]:
            key = arg.split("=", 1)[0]
            if key == "--liveness":
                arg = f"--liveness=http://127.0.0.1:{self.health_port}/healthz"
            elif key == "--metrics-port":
                arg = f"--metrics-port={self.metrics_port}"
            elif key == "--defaults":
                arg = f"--defaults={self.defaults_file}"
            elif key == "--interval":
                arg = "--interval=2"
            out.append(arg)
        return [
            sys.executable,
            "-m",
            "kubetune.operator_main",
            *out,
            "--metrics-address=127.0.0.1",
            "--verbose",
        ]


@pytest.fixture(scope="module")
def cp(request):
    s3_creds = {"s3-creds": {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "secret-value"}}
    with make_cluster(
        request,
        nodes=[FakeNode(f"gpu-{index}", labels={"pool": "gpu"}) for index in range(2)],
        namespaces=[SYSTEM_NS, TEAM_A, TEAM_B],
        namespace_labels=RESTRICTED,
        secrets={TEAM_A: s3_creds, TEAM_B: s3_creds},
    ) as plane:
        yield plane


@pytest.fixture(scope="module")
def chart_docs(cp, tmp_path_factory) -> list[dict[str, Any]]:
    docs = install_chart(cp, tmp_path_factory.mktemp("chart"), CLUSTER_VALUES, (TEAM_A,))
    return docs


@pytest.fixture(scope="module")
def operator(cp, chart_docs, tmp_path_factory) -> Iterator[ChartOperator]:
    op = ChartOperator(cp, tmp_path_factory.mktemp("operator"), chart_docs, SYSTEM_NS, OPERATOR)
    op.start()
    yield op
    op.stop()
    log = op.log()
    assert "Forbidden" not in log, "the chart's RBAC is missing something the operator needs"
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 :][:6000]


def manifest(name: str, namespace: str = TEAM_A, **spec: Any) -> dict[str, Any]:
    """A job that leaves output, image and placement to the platform defaults."""
    return chat_job(name, namespace, **spec)


def ftj(api: client.ApiClient, name: str, namespace: str = TEAM_A) -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_phase(
    cp: ControlPlane,
    api: client.ApiClient,
    name: str,
    phase: str,
    namespace: str = TEAM_A,
    timeout: float = 60,
    attempt: int | None = None,
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = ftj(api, name, namespace).get("status") or {}
        return st if st.get("phase") == phase and (attempt is None or st.get("attempt") == attempt) else None

    try:
        return cp.wait_for(ready, timeout, f"{namespace}/{name} phase {phase}")
    except Exception:
        print(json.dumps(ftj(api, name, namespace).get("status"), indent=1))
        raise


def worker_pods(
    api: client.ApiClient,
    name: str,
    namespace: str = TEAM_A,
    attempt: int | None = None,
    phase: str | None = None,
) -> list[dict[str, Any]]:
    selector = f"kubetune.io/job-name={name}" + (f",kubetune.io/attempt={attempt}" if attempt else "")
    items = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    pods = [api.sanitize_for_serialization(p) for p in items]
    return [p for p in pods if phase is None or p["status"].get("phase") == phase]


def release(cp: ControlPlane, api: client.ApiClient, name: str, namespace: str = TEAM_A) -> None:
    for pod in worker_pods(api, name, namespace, phase="Running"):
        cp.release_pod(namespace, pod["metadata"]["name"])


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def managed_fields(cp: ControlPlane, *args: str) -> list[dict[str, Any]]:
    out = cp.kubectl("get", *args, "-o", "json", "--show-managed-fields").stdout
    return json.loads(out)["metadata"]["managedFields"]


def test_chart_objects_are_applied_server_side(cp, chart_docs) -> None:
    fields = managed_fields(cp, "-n", SYSTEM_NS, "deployment", OPERATOR)
    managers = {m["manager"] for m in fields if m["operation"] == "Apply"}
    assert managers == {"kubetune-chart"}
    assert cp.get_json("clusterrole", OPERATOR)["rules"] == OPERATOR_RBAC_RULES
    assert cp.get_json("-n", TEAM_A, "limitrange", "kubetune")["spec"]["limits"][0]["default"]["cpu"] == "2"
    assert cp.get_json("crd", "clusterkopfpeerings.kopf.dev")["spec"]["scope"] == "Cluster"


def test_operator_pod_is_admitted_under_restricted_pod_security(cp, api, chart_docs) -> None:
    """The Deployment's pod passes the enforced restricted standard; a pod that does not is refused."""
    selector = ",".join(
        f"{k}={v}" for k, v in one(chart_docs, "Deployment")["spec"]["selector"]["matchLabels"].items()
    )

    def running() -> list[dict[str, Any]]:
        items = client.CoreV1Api(api).list_namespaced_pod(SYSTEM_NS, label_selector=selector).items
        return [p for p in items if p.status.phase == "Running"]

    (pod,) = cp.wait_for(running, 60, "the operator Deployment's pod (run by kwok)")
    assert (
        pod.spec.service_account_name == OPERATOR
        and pod.spec.containers[0].security_context.read_only_root_filesystem
    )
    events = cp.kubectl("-n", SYSTEM_NS, "get", "events", "-o", "json").stdout
    assert "violates PodSecurity" not in events
    unsafe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "unsafe", "namespace": SYSTEM_NS},
        "spec": {
            "containers": [
                {"name": "c", "image": "busybox", "securityContext": {"allowPrivilegeEscalation": True}}
            ]
        },
    }
    result = cp.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(unsafe), check=False)
    assert result.returncode != 0 and "violates PodSecurity" in result.stderr


def test_job_lifecycle_under_the_charts_rbac_with_metrics(cp, api, operator) -> None:
    """Pending -> Running -> Succeeded with the chart's ServiceAccount; defaults, quota and PSS apply."""
    name = "chart-happy"
    cp.apply(manifest(name))
    st = wait_phase(cp, api, name, "Running")
    assert st["attempt"] == 1
    pods = worker_pods(api, name, phase="Running")
    assert len(pods) == 2  # admitted in a namespace enforcing `restricted`, under its ResourceQuota
    pod = pods[0]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.invalid/kubetune/trainer:test"  # platform defaults, from the chart
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert container["resources"]["limits"] == {
        "cpu": "2",
        "memory": "8Gi",
        "nvidia.com/gpu": "1",
    }  # LimitRange
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert env["KUBETUNE_METRICS_PORT"]["value"] == str(render.TRAINER_METRICS_PORT)
    config = yaml.safe_load(cp.get_json("-n", TEAM_A, "configmap", f"{name}-config")["data"]["job.yaml"])
    assert config["spec"]["output"]["uri"] == f"s3://platform-runs/{TEAM_A}/{name}/"
    quota = cp.get_json("-n", TEAM_A, "resourcequota", "kubetune")["status"]["used"]
    assert quota["count/jobs.batch"] != "0" and quota["requests.nvidia.com/gpu"] == "2"

    samples = cp.wait_for(
        lambda: (
            lambda s: (
                s if metric(s, "kubetune_finetunejobs", namespace=TEAM_A, phase="Running") == 1 else None
            )
        )(operator.metrics()),
        30,
        "jobs-by-phase gauge",
    )
    assert metric(samples, "kubetune_finetunejobs", namespace=TEAM_A, phase="Failed") == 0
    assert metric(samples, "kubetune_reconcile_duration_seconds_count") > 0
    assert metric(samples, "kubetune_job_time_to_running_seconds_count") >= 1
    assert metric(samples, "kubetune_operator_info", version="0.1.0") == 1

    release(cp, api, name)
    st = wait_phase(cp, api, name, "Succeeded")
    assert st["restarts"] == 0 and st["completionTime"]
    samples = cp.wait_for(
        lambda: (
            lambda s: (
                s if metric(s, "kubetune_finetunejobs", namespace=TEAM_A, phase="Succeeded") >= 1 else None
            )
        )(operator.metrics()),
        30,
        "Succeeded in the gauge",
    )
    assert metric(samples, "kubetune_finetunejobs", namespace=TEAM_A, phase="Running") == 0
    log = operator.log()
    assert "Forbidden" not in log and f"{TEAM_A}/{name}: phase Succeeded" in log


def test_restart_is_counted_in_metrics(cp, api, operator) -> None:
    name = "chart-restart"
    before = (
        metric(operator.metrics(), "kubetune_job_restarts_total", namespace=TEAM_A, reason="failure") or 0
    )
    cp.apply(manifest(name, resources={"nodes": 1, "gpusPerNode": 1}))
    wait_phase(cp, api, name, "Running")
    (pod,) = worker_pods(api, name, attempt=1, phase="Running")
    cp.fail_pod(TEAM_A, pod["metadata"]["name"], exit_code=1)
    wait_phase(cp, api, name, "Running", attempt=2)
    samples = operator.metrics()
    assert metric(samples, "kubetune_job_restarts_total", namespace=TEAM_A, reason="failure") == before + 1
    release(cp, api, name)
    wait_phase(cp, api, name, "Succeeded")


def _snapshot(cp: ControlPlane, name: str, namespace: str = TEAM_A) -> dict[str, tuple[str, Any]]:
    """resourceVersion (and generation) of the FineTuneJob and every child."""
    out: dict[str, tuple[str, Any]] = {}
    cr = cp.get_json("-n", namespace, "ftj", name)
    out["FineTuneJob"] = (cr["metadata"]["resourceVersion"], cr["metadata"]["generation"])
    kinds = "serviceaccounts,roles,rolebindings,configmaps,services,jobs"
    for item in cp.get_json("-n", namespace, kinds, "-l", f"kubetune.io/job-name={name}")["items"]:
        out[f"{item['kind']}/{item['metadata']['name']}"] = (
            item["metadata"]["resourceVersion"],
            item["metadata"].get("generation"),
        )
    return out


def test_reapplying_the_same_manifest_changes_nothing(cp, api, operator) -> None:
    """GitOps: a second apply of the same manifest (as Argo CD or Flux would) is a no-op, and the
    operator never writes to the spec."""
    name = "chart-gitops"
    text = yaml.safe_dump(manifest(name))
    cp.kubectl("apply", "--server-side", "--field-manager=argocd-controller", "-f", "-", input=text)
    wait_phase(cp, api, name, "Running")
    cp.wait_for(lambda: _stable(cp, operator, name), 120, "a steady state", interval=0.5)
    before = _snapshot(cp, name)
    assert {
        "FineTuneJob",
        f"Job/{name}-1",
        f"ConfigMap/{name}-config",
        f"Service/{name}",
        f"ServiceAccount/{name}-trainer",
        f"Role/{name}-trainer",
        f"RoleBinding/{name}-trainer",
    } <= set(before)
    result = cp.kubectl("apply", "--server-side", "--field-manager=argocd-controller", "-f", "-", input=text)
    assert "serverside-applied" in result.stdout or "unchanged" in result.stdout, result.stdout
    wait_reconciles(cp, operator, rounds=3)
    assert _snapshot(cp, name) == before
    assert cp.get_json("-n", TEAM_A, "ftj", name)["metadata"]["generation"] == 1
    fields = managed_fields(cp, "-n", TEAM_A, "ftj", name)
    spec_owners = {
        m["manager"] for m in fields if "f:spec" in m.get("fieldsV1", {}) and m.get("subresource") != "status"
    }
    assert spec_owners == {"argocd-controller"}, fields
    status_owners = {m["manager"] for m in fields if m.get("subresource") == "status"}
    assert status_owners, "the operator writes the status through the status subresource"
    release(cp, api, name)
    wait_phase(cp, api, name, "Succeeded")


def _stable(cp: ControlPlane, operator: OperatorProcess, name: str) -> bool:
    """Nothing of the job changes over two more reconciles of each job."""
    first = _snapshot(cp, name)
    wait_reconciles(cp, operator)
    return _snapshot(cp, name) == first


def _sar(
    api: client.ApiClient,
    user: str,
    verb: str,
    resource: str,
    group: str = "",
    namespace: str | None = None,
    subresource: str | None = None,
    name: str | None = None,
) -> bool:
    namespace_of_user = user.split(":")[2]
    attributes = {"verb": verb, "resource": resource, "group": group}
    if namespace:
        attributes["namespace"] = namespace
    if subresource:
        attributes["subresource"] = subresource
    if name:
        attributes["name"] = name
    review = client.AuthorizationV1Api(api).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace_of_user}",
                    "system:authenticated",
                ],
                "resourceAttributes": attributes,
            },
        }
    )
    return bool(review.status.allowed)


def _rule_checks(rules: list[dict[str, Any]]) -> Iterator[tuple[str, str, str, str | None]]:
    for group, resource, verb in sorted(triples(rules)):
        base, _, sub = resource.partition("/")
        yield group, base, verb, sub or None


def test_subject_access_reviews_of_the_operator_account(api, chart_docs) -> None:
    """What the chart's ServiceAccount may do: every rule of OPERATOR_RBAC_RULES, and nothing else."""
    for group, resource, verb, sub in _rule_checks(OPERATOR_RBAC_RULES):
        namespace = None if resource in CLUSTER_SCOPED else TEAM_B
        assert _sar(api, SA_USER, verb, resource, group, namespace, sub), (group, resource, sub, verb)
    rbac_group = "rbac.authorization.k8s.io"
    denied: list[
        tuple[str, str, str, str | None, str | None]
    ] = [  # verb, resource, group, namespace, subresource
        ("get", "secrets", "", TEAM_A, None),
        ("list", "secrets", "", TEAM_A, None),
        ("list", "secrets", "", None, None),
        ("watch", "secrets", "", None, None),
        ("get", "secrets", "", SYSTEM_NS, None),
        ("create", "deployments", "apps", TEAM_A, None),
        ("patch", "deployments", "apps", SYSTEM_NS, None),
        ("patch", "nodes", "", None, None),
        ("delete", "nodes", "", None, None),
        ("get", "clusterroles", rbac_group, None, None),
        ("create", "clusterrolebindings", rbac_group, None, None),
        ("escalate", "roles", rbac_group, TEAM_A, None),
        ("bind", "roles", rbac_group, TEAM_A, None),
        ("update", "roles", rbac_group, TEAM_A, None),
        ("create", "pods", "", TEAM_A, None),
        ("delete", "pods", "", TEAM_A, None),
        ("create", "pods", "", TEAM_A, "exec"),
        ("delete", "configmaps", "", TEAM_A, None),
        ("create", "finetunejobs", GROUP, TEAM_A, None),
        ("update", "finetunejobs", GROUP, TEAM_A, None),
        ("patch", "jobs", "batch", TEAM_A, None),
        ("create", "namespaces", "", None, None),
        ("create", "customresourcedefinitions", "apiextensions.k8s.io", None, None),
        ("create", "serviceaccounts", "", TEAM_A, "token"),
    ]
    for verb, resource, group, namespace, sub in denied:
        assert not _sar(api, SA_USER, verb, resource, group, namespace, sub), (
            verb,
            resource,
            group,
            namespace,
            sub,
        )


def test_namespace_editors_may_run_finetunejobs(cp, api, chart_docs) -> None:
    """The chart's user roles aggregate into `edit`/`view`: a namespace editor may create jobs there."""
    cp.apply(user_role_binding("alice-edit", TEAM_A, "alice", "edit", "ClusterRole"))

    def allowed(verb: str, namespace: str) -> bool:
        review = client.AuthorizationV1Api(api).create_subject_access_review(
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": "alice",
                    "groups": ["system:authenticated"],
                    "resourceAttributes": {
                        "verb": verb,
                        "group": GROUP,
                        "resource": PLURAL,
                        "namespace": namespace,
                    },
                },
            }
        )
        return bool(review.status.allowed)

    cp.wait_for(lambda: allowed("create", TEAM_A), 30, "aggregation of kubetune-edit into edit")
    assert allowed("delete", TEAM_A) and allowed("list", TEAM_A)
    assert not allowed("create", TEAM_B) and not allowed("list", TEAM_B)


def test_namespaced_mode_runs_a_job_with_roles_only(cp, api, operator, tmp_path) -> None:
    """rbac.scope=namespaced: Roles in the watched namespaces only; the operator (--namespaced-rbac)
    runs a job there, and cannot even read FineTuneJobs elsewhere."""
    release_name, namespace = "kt-ns", "kt-ns-system"
    cp.create_namespace(namespace, labels=RESTRICTED)
    values = {
        **CLUSTER_VALUES,
        "tenants": {},
        "rbac": {"scope": "namespaced"},
        "watchNamespaces": [TEAM_B],
        "admission": {"enabled": False},
    }
    docs = render_chart(
        tmp_path,
        {**values, "rbac": {"scope": "namespaced", "userRoles": False}},
        release=release_name,
        namespace=namespace,
    )
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")  # nothing cluster-wide
    apply_chart(cp, docs, manager="kubetune-chart-ns")
    account = f"{release_name}-kubetune-operator"
    user = f"system:serviceaccount:{namespace}:{account}"
    namespaced_rules = [r for r in OPERATOR_RBAC_RULES if not set(r["resources"]) & CLUSTER_SCOPED]
    for group, resource, verb, sub in _rule_checks(namespaced_rules):
        assert _sar(api, user, verb, resource, group, TEAM_B, sub), (group, resource, sub, verb)
        assert not _sar(api, user, verb, resource, group, TEAM_A, sub), (group, resource, sub, verb, TEAM_A)
    assert not _sar(api, user, "list", "namespaces") and not _sar(api, user, "list", "finetunejobs", GROUP)
    assert not _sar(api, user, "get", "secrets", "", TEAM_B)

    operator.stop()  # one operator per namespace at a time
    scoped = ChartOperator(cp, tmp_path, docs, namespace, account, name="namespaced")
    try:
        scoped.start()
        name = "chart-namespaced"
        cp.apply(manifest(name, namespace=TEAM_B))
        wait_phase(cp, api, name, "Running", namespace=TEAM_B)
        release(cp, api, name, TEAM_B)
        wait_phase(cp, api, name, "Succeeded", namespace=TEAM_B)
        samples = scoped.metrics()
        assert metric(samples, "kubetune_finetunejobs", namespace=TEAM_B, phase="Succeeded") == 1
        assert metric(samples, "kubetune_finetunejobs", namespace=TEAM_A, phase="Succeeded") is None
    finally:
        scoped.stop()
        operator.start()
    log = scoped.log()
    assert "Forbidden" not in log and "Not enough permissions" not in log, log[-4000:]
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 :][:6000]
    assert f"{TEAM_B}/{name}: phase Succeeded" in log and f"{TEAM_A}/" not in log


def test_helm_install_upgrade_uninstall(cp, chart_docs, tmp_path) -> None:
    """What docs/platform.md tells a platform team to run, against the control plane."""
    env = cp.env
    release_name, namespace = "kt-docs", "kt-docs"
    out = helm(
        "install",
        release_name,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "120s",
        "--set",
        "defaults.s3EndpointUrl=http://minio.storage:9000",
        "--set",
        "defaults.storageCredentialsSecret=s3-creds",
        env=env,
    ).stdout
    assert "STATUS: deployed" in out and "kt-docs-kubetune-operator" in out
    deployment = cp.get_json("-n", namespace, "deployment", "kt-docs-kubetune-operator")
    assert deployment["status"].get("readyReplicas") == 1
    checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/defaults"]
    defaults = cp.get_json("-n", namespace, "configmap", "kt-docs-kubetune-defaults")["data"]["defaults.yaml"]
    assert "s3EndpointUrl: http://minio.storage:9000" in defaults
    helm(
        "upgrade",
        release_name,
        str(CHART),
        "--namespace",
        namespace,
        "--reuse-values",
        "--wait",
        "--timeout",
        "120s",
        "--set",
        "defaults.queueName=team-queue",
        env=env,
    )
    deployment = cp.get_json("-n", namespace, "deployment", "kt-docs-kubetune-operator")
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/defaults"] != checksum
    assert (
        "queueName: team-queue"
        in cp.get_json("-n", namespace, "configmap", "kt-docs-kubetune-defaults")["data"]["defaults.yaml"]
    )
    assert re.search(r"kt-docs\s+kt-docs\s+2\s", helm("list", "-n", namespace, env=env).stdout)
    helm("uninstall", release_name, "--namespace", namespace, "--wait", env=env)
    assert cp.kubectl("get", "clusterrole", "kt-docs-kubetune-operator", check=False).returncode != 0
    assert cp.kubectl("get", "crd", "finetunejobs.kubetune.io").returncode == 0  # CRDs are kept (crds/)
