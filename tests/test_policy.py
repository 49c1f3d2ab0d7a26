"""policy.py and what render.py does with it: the tenant boundary as pure functions (no cluster).

Every finding of the tenant-boundary review is a case here: the spec a hostile tenant would write,
and the field and rule the refusal must name. tests/test_tenant_boundary.py runs the same attacks
through the operator on the real control plane; tests/test_admission.py through the chart's
admission policies.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune import status as st
from kubetune.policy import TenantPolicy
from kubetune.render import PlatformDefaults, PolicyViolation, RenderError, render_children
from tests.support.manifests import CROSS_NAMESPACE_ANTI_AFFINITY

NAMESPACE = "team-a"
DIGEST = "sha256:" + "a" * 64
PLATFORM = PlatformDefaults(
    image=f"registry.example.com/kubetune/trainer@{DIGEST}",
    output_uri_prefix="s3://runs",
    storage_credentials_secret="platform-s3",
    queue_name="team-a",
    data_volumes=[
        {"name": "datasets", "mountPath": "/data", "persistentVolumeClaim": {"claimName": "datasets"}}
    ],
    trainer_service_account_annotations={"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/tuning"},
    policy={
        "allowedImagePrefixes": ["registry.example.com/kubetune/"],
        "allowedPriorityClasses": ["training"],
        "requireQueue": True,
        "enforcedNodeSelector": {"pool": "team-a-gpus"},
        "enforcedTolerations": [{"key": "team-a", "operator": "Exists", "effect": "NoSchedule"}],
        "allowedNodeSelectorKeys": ["nvidia.com/gpu.product"],
        "allowedTolerationKeys": ["nvidia.com/gpu"],
        "allowedS3Endpoints": ["http://minio.storage:9000"],
        "allowedTrackingUris": ["https://mlflow.example.com/"],
        "allowedSourcePrefixes": ["s3://shared-models/", "s3://data/{namespace}/"],
        "dataPaths": ["/data"],
        "networkPolicy": {
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]
        },
    },
)


def cr(**spec: Any) -> dict[str, Any]:
    """A legitimate tenant job, with `spec` keys replaced (dotted keys set nested fields)."""
    body: dict[str, Any] = {
        "model": {"source": "s3://shared-models/llama/"},
        "task": {"type": "chat"},
        "datasets": [{"source": "s3://data/team-a/chat.jsonl"}],
        "resources": {
            "nodes": 2,
            "gpusPerNode": 8,
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
        },
    }
    for dotted, value in spec.items():
        target = body
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tenant-job", "namespace": NAMESPACE, "uid": "uid-1", "generation": 1},
        "spec": body,
    }


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in children}


def test_legitimate_tenant_job_renders_with_platform_identity_and_placement() -> None:
    children = by_kind(render_children(cr(), PLATFORM))
    pod = children["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tenant-job-trainer"
    assert pod["automountServiceAccountToken"] is False
    assert children["ServiceAccount"]["automountServiceAccountToken"] is False
    assert children["ServiceAccount"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/tuning"
    }
    assert children["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "tenant-job-trainer", "namespace": NAMESPACE}
    ]
    # enforced placement merged in, the tenant's allowed choices kept
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100", "pool": "team-a-gpus"}
    assert {"key": "team-a", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "training"
    assert children["Job"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert pod["containers"][0]["image"] == PLATFORM.image
    # the platform's storage credentials, by reference only
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "platform-s3"


def test_platform_storage_keys_only_for_jobs_that_use_s3() -> None:
    local = PlatformDefaults(**{**PLATFORM.__dict__, "output_uri_prefix": None})
    job = cr(
        **{
            "model.source": "bundled://smollm2-135m-instruct",
            "datasets": [{"source": "/data/chat.jsonl"}],
            "output": {"uri": "/data/out/"},
        }
    )
    env = by_kind(render_children(job, local))["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not any(e["name"].startswith("AWS_") for e in env)


def test_token_is_projected_short_lived_and_not_at_the_default_path() -> None:
    children = by_kind(render_children(cr(), PLATFORM))
    pod = children["Job"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "kubetune-token")
    token = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert token["expirationSeconds"] == 600 and "audience" not in token
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kubetune-token")
    assert mount == {"name": "kubetune-token", "mountPath": "/var/run/secrets/kubetune", "readOnly": True}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBETUNE_SA_DIR"] == "/var/run/secrets/kubetune"
    # the platform's data volume is mounted read-only where dataPaths allow reading
    data = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/data")
    assert data["readOnly"] is True
    assert {"name": "data-datasets", "persistentVolumeClaim": {"claimName": "datasets"}} in pod["volumes"]


def test_network_policy_confines_rendezvous_and_metrics_and_denies_metadata() -> None:
    netpol = by_kind(render_children(cr(), PLATFORM))["NetworkPolicy"]
    own = {
        "podSelector": {
            "matchLabels": {"kubetune.io/job-name": "tenant-job", "app.kubernetes.io/component": "trainer"}
        }
    }
    spec = netpol["spec"]
    assert spec["podSelector"] == own["podSelector"] and spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"][0] == {"from": [own]}  # rendezvous, collectives: the job's own pods only
    assert spec["ingress"][1]["ports"] == [{"protocol": "TCP", "port": 9090}]  # metrics: the scraper only
    assert len(spec["ingress"]) == 2
    blocks = [p["ipBlock"] for rule in spec["egress"] for p in rule.get("to", []) if "ipBlock" in p]
    assert {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "100.100.100.200/32"]} in blocks
    assert {"cidr": "::/0", "except": ["fd00:ec2::254/128"]} in blocks
    closed = PlatformDefaults(
        **{
            **PLATFORM.__dict__,
            "policy": PLATFORM.policy.model_copy(
                update={"network_policy": PLATFORM.policy.network_policy.model_copy(update={"egress": []})}
            ),
        }
    )
    egress = by_kind(render_children(cr(), closed))["NetworkPolicy"]["spec"]["egress"]
    assert [r.get("to") for r in egress] == [[own], None]  # own pods, then DNS (ports only)
    off = PlatformDefaults(policy={"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in by_kind(
        render_children(
            cr(**{"resources": {}, "model.source": "s3://m/x/", "output": {"uri": "s3://o/"}}), off
        )
    )


ATTACKS = [
    # identity
    ({"resources.serviceAccountName": "ci-deployer"}, "spec.resources.serviceAccountName", "extra"),
    # Secrets as a confused deputy (no admission here: Forbid is the default)
    (
        {"output": {"credentialsSecretRef": {"name": "other-team-s3"}}},
        "spec.output.credentialsSecretRef.name",
        "tenantSecretRefs",
    ),
    (
        {"model.credentialsSecretRef": {"name": "other-hf"}},
        "spec.model.credentialsSecretRef.name",
        "tenantSecretRefs",
    ),
    (
        {"storage": {"credentialsSecretRef": {"name": "x"}}},
        "spec.storage.credentialsSecretRef.name",
        "tenantSecretRefs",
    ),
    (
        {"tracking": {"wandb": {"project": "p", "mode": "offline", "apiKeySecretRef": {"name": "k"}}}},
        "spec.tracking.wandb.apiKeySecretRef.name",
        "tenantSecretRefs",
    ),
    ({"resources.imagePullSecrets": ["regcred"]}, "spec.resources.imagePullSecrets[0]", "tenantSecretRefs"),
    (
        {"tracking": {"mlflow": {"trackingUri": "https://evil.example.net/"}}},
        "spec.tracking.mlflow.trackingUri",
        "allowedTrackingUris",
    ),
    ({"tracking": {"wandb": {"project": "p"}}}, "spec.tracking.wandb.mode", "allowWandbOnline"),
    (
        {"storage": {"s3": {"endpointUrl": "https://collector.evil.example.net"}}},
        "spec.storage.s3.endpointUrl",
        "allowedS3Endpoints",
    ),
    # placement and priority
    (
        {"resources.nodeSelector": {"node-role.kubernetes.io/control-plane": ""}},
        "spec.resources.nodeSelector[node-role.kubernetes.io/control-plane]",
        "allowedNodeSelectorKeys",
    ),
    (
        {"resources.nodeSelector": {"pool": "team-b-gpus"}},
        "spec.resources.nodeSelector[pool]",
        "enforcedNodeSelector",
    ),
    (
        {"resources.tolerations": [{"operator": "Exists"}]},
        "spec.resources.tolerations[0]",
        "allowedTolerationKeys",
    ),
    (
        {"resources.tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
        "spec.resources.tolerations[0].key",
        "allowedTolerationKeys",
    ),
    (
        {"resources.priorityClassName": "system-node-critical"},
        "spec.resources.priorityClassName",
        "allowedPriorityClasses",
    ),
    (
        {"scheduling": {"queueName": "team-a", "priorityClassName": "urgent"}},
        "spec.scheduling.priorityClassName",
        "allowedWorkloadPriorityClasses",
    ),
    (
        {"resources.affinity": CROSS_NAMESPACE_ANTI_AFFINITY},
        "spec.resources.affinity",
        "allowAffinity",
    ),
    ({"resources.image": "docker.io/evil/trainer:latest"}, "spec.resources.image", "allowedImagePrefixes"),
    ({"resources.imagePullPolicy": "Never"}, "spec.resources.imagePullPolicy", "allowedImagePullPolicies"),
    # the container's own filesystem as data
    (
        {"datasets": [{"source": "/proc/self/environ", "fileType": "txt"}]},
        "spec.datasets[0].source",
        "dataPaths",
    ),
    (
        {"datasets": [{"source": "/var/run/secrets/kubernetes.io/serviceaccount/token", "fileType": "txt"}]},
        "spec.datasets[0].source",
        "dataPaths",
    ),
    (
        {"datasets": [{"source": "/data/../proc/self/environ", "fileType": "txt"}]},
        "spec.datasets[0].source",
        "dataPaths",
    ),
    (
        {"datasets": [{"source": "../proc/self/environ", "fileType": "txt"}]},
        "spec.datasets[0].source",
        "dataPaths",
    ),
    (
        {"validation": {"datasets": [{"source": "/etc/passwd", "fileType": "txt"}]}},
        "spec.validation.datasets[0].source",
        "dataPaths",
    ),
    ({"model.source": "/opt/venv/lib/python3.11/site-packages"}, "spec.model.source", "dataPaths"),
    ({"model.source": "../../proc/1"}, "spec.model.source", "dataPaths"),
    ({"model.source": "hf://../../proc/self"}, "spec.model.source", "dataPaths"),
    ({"model.adapter": "/var/run/secrets/kubernetes.io"}, "spec.model.adapter", "dataPaths"),
    ({"model.adapter": "../adapter"}, "spec.model.adapter", "dataPaths"),
    (
        {"datasets": [{"source": "s3:/../../proc/self/environ", "fileType": "txt"}]},
        "spec.datasets[0].source",
        "dataPaths",
    ),
    # (a URL is not a location the spec admits at all: refused before the policy is asked)
    (
        {"datasets": [{"source": "http://169.254.169.254/latest/meta-data/"}]},
        "spec.datasets[0].source",
        "spec",
    ),
    (
        {"storage": {"s3": {"caBundle": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"}}},
        "spec.storage.s3.caBundle",
        "dataPaths",
    ),
    # reading and writing other teams' data with the platform's credentials
    (
        {"datasets": [{"source": "s3://data/team-b/secret.jsonl"}]},
        "spec.datasets[0].source",
        "allowedSourcePrefixes",
    ),
    ({"output": {"uri": "s3://runs/team-b/their-job/"}}, "spec.output.uri", "allowedOutputPrefixes"),
    (
        {"model.adapter": "s3://runs/team-b/sft/exports/adapter/"},
        "spec.model.adapter",
        "allowedSourcePrefixes",
    ),
    # remote code
    (
        {"model": {"source": "org/model", "trustRemoteCode": True, "revision": "0" * 40}},
        "spec.model.trustRemoteCode",
        "allowTrustRemoteCode",
    ),
]


@pytest.mark.parametrize(("change", "field", "rule"), ATTACKS, ids=[a[1] + ":" + a[2] for a in ATTACKS])
def test_attack_is_refused_naming_the_field_and_the_rule(
    change: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(RenderError) as refused:
        render_children(cr(**change), PLATFORM)
    message = str(refused.value)
    assert field in message
    if rule == "extra":  # no such field any more: the spec itself refuses it
        assert "unknown field" in message
    elif rule == "spec":  # the spec's own rules refuse it
        assert not isinstance(refused.value, PolicyViolation)
    else:
        assert isinstance(refused.value, PolicyViolation)
        assert f"(policy.{rule})" in message


def test_trust_remote_code_needs_a_pinned_commit_everywhere() -> None:
    allowing = PlatformDefaults(
        **{
            **PLATFORM.__dict__,
            "policy": PLATFORM.policy.model_copy(update={"allow_trust_remote_code": True}),
        }
    )
    with pytest.raises(RenderError, match=r"spec.model.revision: .*40-hex commit"):
        render_children(
            cr(model={"source": "org/model", "trustRemoteCode": True, "revision": "main"}), allowing
        )
    render_children(
        cr(model={"source": "org/model", "trustRemoteCode": True, "revision": "ab" * 20}), allowing
    )


def test_an_empty_queue_name_does_not_skip_the_queue() -> None:
    job = by_kind(render_children(cr(scheduling={"queueName": ""}), PLATFORM))["Job"]
    assert (
        job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True
    )
    no_default = PlatformDefaults(**{**PLATFORM.__dict__, "queue_name": None})
    with pytest.raises(PolicyViolation, match=r"spec.scheduling.queueName: .*\(policy.requireQueue\)"):
        render_children(cr(scheduling={"queueName": ""}), no_default)
    allowed = PlatformDefaults(
        **{**PLATFORM.__dict__, "policy": PLATFORM.policy.model_copy(update={"allowed_queues": ["team-a"]})}
    )
    with pytest.raises(PolicyViolation, match=r"spec.scheduling.queueName: queue 'team-b'.*allowedQueues"):
        render_children(cr(scheduling={"queueName": "team-b"}), allowed)


def test_output_defaults_inside_the_namespace_prefix_and_may_be_chained() -> None:
    children = by_kind(render_children(cr(), PLATFORM))
    assert "s3://runs/team-a/tenant-job/" in children["ConfigMap"]["data"]["job.yaml"]
    # an earlier job's export (under the namespace's output prefix) is a valid model source
    render_children(cr(**{"model.source": "s3://runs/team-a/sft-job/exports/merged/"}), PLATFORM)
    # and so is its adapter, on the base it was trained on
    render_children(cr(**{"model.adapter": "s3://runs/team-a/sft-job/exports/adapter/"}), PLATFORM)
    render_children(cr(**{"model.adapter": "/data/adapters/sft"}), PLATFORM)


def test_image_digest_required_of_tenants_and_of_the_platform() -> None:
    strict = PLATFORM.policy.model_copy(update={"require_image_digest": True})
    with_digest = PlatformDefaults(**{**PLATFORM.__dict__, "policy": strict})
    render_children(cr(), with_digest)
    with pytest.raises(PolicyViolation, match=r"spec.resources.image: the image must be pinned by digest"):
        render_children(cr(**{"resources.image": "registry.example.com/kubetune/trainer:1.0"}), with_digest)
    by_tag = PlatformDefaults(
        **{**with_digest.__dict__, "image": "registry.example.com/kubetune/trainer:1.0"}
    )
    with pytest.raises(PolicyViolation, match=r"platform's trainer image .* not pinned by digest"):
        render_children(cr(), by_tag)


def test_policy_refuses_system_paths_as_data_volumes() -> None:
    with pytest.raises(ValueError, match=r"dataVolumes\[0\]: hostPath"):
        PlatformDefaults(data_volumes=[{"name": "x", "mountPath": "/data", "hostPath": {"path": "/"}}])
    for bad in ("/", "//", "///", "/proc", "/var/run/secrets", "/etc/ssl", "relative/dir"):
        with pytest.raises(ValueError, match=r"dataPaths\[0\]"):
            TenantPolicy.model_validate({"dataPaths": [bad]})
    with pytest.raises(ValueError, match=r"policy.allowedImagePrefixes: Input should be a valid list"):
        PlatformDefaults(policy={"allowedImagePrefixes": "registry.example.com/"})


def test_strict_defaults_need_nothing_of_a_plain_job() -> None:
    """With no policy configured, a job that names only model, data and sizes still runs."""
    plain = cr(**{"resources": {"nodes": 1, "gpusPerNode": 1}})
    children = by_kind(render_children(plain, PlatformDefaults(output_uri_prefix="s3://runs")))
    assert children["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "tenant-job-trainer"


def test_tampered_operator_fields_are_found_and_restored() -> None:
    written = {
        "phase": "Running",
        "attempt": 1,
        "restarts": 0,
        "preemptions": 0,
        "startTime": "2026-11-30T10:00:00Z",
        "conditions": [{"type": "Running", "status": "True"}],
        "message": "m",
        "observedGeneration": 1,
    }
    assert st.tampered_fields({**written, "progress": {"step": 5}}, written) == []
    tampered = {**written, "attempt": 7, "restarts": 0, "preemptions": 0}
    tampered.pop("startTime")
    assert st.tampered_fields(tampered, written) == ["attempt", "startTime"]
    assert st.restore_patch(tampered, written) == {"attempt": 1, "startTime": "2026-11-30T10:00:00Z"}
    assert st.restore_patch({**written, "completionTime": "x"}, written) == {"completionTime": None}


def test_validate_checks_the_platform_policy(tmp_path, capsys) -> None:
    import yaml

    from kubetune.cli import main

    manifest = tmp_path / "job.yaml"
    body = cr(**{"resources.priorityClassName": "system-node-critical"})
    body["metadata"] = {"name": "tenant-job"}
    manifest.write_text(yaml.safe_dump(body))
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(
        yaml.safe_dump(
            {
                "outputUriPrefix": "s3://runs",
                "policy": {
                    "allowedPriorityClasses": ["training"],
                    "allowedNodeSelectorKeys": ["nvidia.com/gpu.product"],
                    "allowedTolerationKeys": ["nvidia.com/gpu"],
                },
            }
        )
    )
    assert main(["validate", str(manifest)]) == 0  # the spec alone is valid
    assert main(["validate", str(manifest), "--platform-defaults", str(defaults), "-n", "team-a"]) == 3
    err = capsys.readouterr().err
    assert (
        "spec.resources.priorityClassName: 'system-node-critical' is not allowed (allowed: training)" in err
    )
    body["spec"]["resources"]["priorityClassName"] = "training"
    manifest.write_text(yaml.safe_dump(body))
    assert main(["validate", str(manifest), "--platform-defaults", str(defaults), "-n", "team-a"]) == 0
