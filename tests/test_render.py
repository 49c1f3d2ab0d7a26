"""render.py and distributed.py: FineTuneJob -> children, pure (no cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import distributed
from kubetune.render import PlatformDefaults, RenderError, render_children
from kubetune.spec import FineTuneJobSpec
from tests.support.render_objects import by_kind, container, cr, env_of, trusted

REPO = Path(__file__).resolve().parents[1]
SECRET_VALUES = ["AKIA-super-secret-id", "wJalr-secret-key", "hf_secret_token", "wandb-secret-key"]


def test_children_names_and_kinds() -> None:
    children = render_children(cr(), trusted())
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("ServiceAccount", "legal-lora-trainer"),
        ("Role", "legal-lora-trainer"),
        ("RoleBinding", "legal-lora-trainer"),
        ("NetworkPolicy", "legal-lora-workers"),
        ("ConfigMap", "legal-lora-config"),
        ("Service", "legal-lora"),
        ("Job", "legal-lora-1"),
    ]
    for child in children:
        assert child["metadata"]["namespace"] == "team-a"
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "legal-lora",
                "uid": "uid-1234",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"]["labels"]["kubetune.io/job-name"] == "legal-lora"


def test_indexed_job_and_torchrun_command() -> None:
    children = render_children(cr(attempt=1), trusted())
    job = by_kind(children)["Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "legal-lora" and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "legal-lora-trainer"
    assert container(children)["command"] == [
        "python",
        "-m",
        "kubetune_trainer.launch",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",
        "--master-addr",
        "legal-lora-1-0.legal-lora",
        "--master-port",
        "29500",
        "-m",
        "kubetune_trainer",
        "--config",
        "/etc/kubetune/job.yaml",
        "--deepspeed",
        "/etc/kubetune/deepspeed.json",
    ]
    env = env_of(children)
    assert env["KUBETUNE_JOB_NAME"] == "legal-lora" and env["KUBETUNE_JOB_NAMESPACE"] == "team-a"
    assert env["KUBETUNE_ATTEMPT"] == "1"
    assert env["HOME"] == "/cache" and env["HF_HOME"].startswith("/cache/") and env["TMPDIR"] == "/tmp"


# read by the libraries the trainer runs, not by kubetune's own code
LIBRARY_VARIABLES = {
    "HOME",
    "TMPDIR",
    "PYTHONUNBUFFERED",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "TRITON_CACHE_DIR",
    "OMP_NUM_THREADS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
}


def test_every_pod_variable_is_read() -> None:
    """Each variable the worker pods get is read by kubetune_trainer's code or by a library it runs."""
    children = render_children(cr({"resources": {"nodes": 2, "gpusPerNode": 0}}), trusted(), attempt=1)
    source = "\n".join(p.read_text() for p in (REPO / "trainer_image" / "kubetune_trainer").rglob("*.py"))
    unread = [
        name for name in env_of(children) if name not in LIBRARY_VARIABLES and f'"{name}"' not in source
    ]
    assert not unread, f"pod variables nothing reads: {unread}"
    assert "OMP_NUM_THREADS" in env_of(children)


def test_later_attempt_resumes() -> None:
    children = render_children(cr(attempt=3), trusted())
    job = by_kind(children)["Job"]
    assert job["metadata"]["name"] == "legal-lora-3"
    assert job["metadata"]["labels"]["kubetune.io/attempt"] == "3"
    assert job["spec"]["template"]["metadata"]["labels"]["kubetune.io/attempt"] == "3"
    command = container(children)["command"]
    assert command[-2:] == ["--resume", "latest"]
    assert command[command.index("--master-addr") + 1] == "legal-lora-3-0.legal-lora"
    assert env_of(children)["KUBETUNE_ATTEMPT"] == "3"


def test_single_node_cpu() -> None:
    children = render_children(cr({"resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "4"}}), trusted())
    command = container(children)["command"]
    assert command[command.index("--nproc-per-node") + 1] == "1"
    assert command[command.index("--master-addr") + 1] == "127.0.0.1"
    assert "--deepspeed" not in command
    assert container(children)["resources"] == {"requests": {"cpu": "4"}, "limits": {"cpu": "4"}}
    assert env_of(children)["OMP_NUM_THREADS"] == "4"
    assert "deepspeed.json" not in by_kind(children)["ConfigMap"]["data"]


@pytest.mark.parametrize(
    ("cpu", "threads"), [("500m", "1"), ("2500m", "2"), ("1.5", "1"), (16, "16"), ("8e0", "8")]
)
def test_cpu_threads_from_the_cpu_quantity(cpu: Any, threads: str) -> None:
    children = render_children(cr({"resources": {"nodes": 1, "gpusPerNode": 0, "cpu": cpu}}), trusted())
    assert env_of(children)["OMP_NUM_THREADS"] == threads


def test_resources_and_placement() -> None:
    children = render_children(cr(), trusted())
    res = container(children)["resources"]
    assert res["requests"] == res["limits"] == {"nvidia.com/gpu": "8", "cpu": "32", "memory": "256Gi"}
    pod = by_kind(children)["Job"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"]["nodeAffinity"]
    assert pod["priorityClassName"] == "training"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container(children)["imagePullPolicy"] == "IfNotPresent"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["config"]["configMap"]["name"] == "legal-lora-config"
    mounts = {m["mountPath"]: m for m in container(children)["volumeMounts"]}
    assert mounts["/etc/kubetune"]["readOnly"] is True and {"/dev/shm", "/cache", "/tmp"} <= set(mounts)


def test_security_context() -> None:
    children = render_children(cr(), trusted())
    pod = by_kind(children)["Job"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(children)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True


def test_kueue_labels_and_suspend() -> None:
    job = by_kind(render_children(cr(), trusted()))["Job"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["spec"]["suspend"] is True
    plain = by_kind(render_children(cr({"scheduling": {}}), trusted()))["Job"]
    assert (
        "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"] and plain["spec"]["suspend"] is False
    )
    queued = by_kind(render_children(cr({"scheduling": {}}), trusted(queue_name="shared")))["Job"]
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "shared" and queued["spec"]["suspend"]


def test_secret_env_by_reference() -> None:
    env = {e["name"]: e for e in container(render_children(cr(), trusted()))["env"]}
    ref = env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "s3", "key": "AWS_ACCESS_KEY_ID", "optional": False}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN", "optional": True}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wandb"
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    for e in env.values():
        assert "value" not in e or not any(s in e["value"] for s in SECRET_VALUES)


def test_storage_and_platform_secret_fallbacks() -> None:
    spec = {"output": {"uri": "s3://runs/"}, "storage": {"credentialsSecretRef": {"name": "storage"}}}
    env = env_of(render_children(cr(spec), trusted()))
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "storage"
    env = env_of(
        render_children(
            cr({"output": {"uri": "s3://runs/"}}), trusted(storage_credentials_secret="platform-s3")
        )
    )
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "platform-s3"
    env = env_of(render_children(cr({"output": {"uri": "s3://runs/"}}), trusted()))
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {
        "name": "hf",
        "key": "AWS_ACCESS_KEY_ID",
        "optional": True,
    }


def test_model_credentials_read_an_s3_adapter() -> None:
    """model.credentialsSecretRef's AWS keys are passed when only model.adapter is in S3 (the source is not)."""
    spec: dict[str, Any] = {
        "model": {"source": "bundled://smollm2-135m-instruct", "credentialsSecretRef": {"name": "hf"}},
        "output": {"uri": "s3://runs/team-a/"},  # no credentialsSecretRef of its own
    }
    local = env_of(render_children(cr(spec), trusted()))
    assert "AWS_ACCESS_KEY_ID" not in local
    spec["model"]["adapter"] = "s3://runs/team-a/sft/exports/adapter/"
    env = env_of(render_children(cr(spec), trusted()))
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {
        "name": "hf",
        "key": "AWS_ACCESS_KEY_ID",
        "optional": True,
    }
    assert env["HF_TOKEN"]["secretKeyRef"]["name"] == "hf"


def test_no_secret_values_anywhere() -> None:
    """The operator only ever handles Secret names; nothing rendered holds a value."""
    text = json.dumps(render_children(cr(), trusted(storage_credentials_secret="platform-s3")))
    for value in SECRET_VALUES:
        assert value not in text
    assert '"secretKeyRef"' in text and "Secret" not in {c["kind"] for c in render_children(cr(), trusted())}


def test_config_map_holds_effective_manifest() -> None:
    defaults = trusted(
        image="registry.local/trainer:1", s3_endpoint_url="http://minio:9000", node_selector={"pool": "gpu"}
    )
    children = render_children(
        cr({"resources": {"nodes": 2, "gpusPerNode": 8, "strategy": "deepspeed-zero2"}}), defaults
    )
    data = by_kind(children)["ConfigMap"]["data"]
    manifest = yaml.safe_load(data["job.yaml"])
    assert manifest["kind"] == "FineTuneJob" and manifest["metadata"] == {
        "name": "legal-lora",
        "namespace": "team-a",
    }
    assert manifest["spec"]["resources"]["image"] == "registry.local/trainer:1"
    assert manifest["spec"]["resources"]["nodeSelector"] == {"pool": "gpu"}
    assert manifest["spec"]["storage"]["s3"]["endpointUrl"] == "http://minio:9000"
    assert manifest["spec"]["model"]["credentialsSecretRef"] == {"name": "hf"}
    FineTuneJobSpec.model_validate(manifest["spec"])
    ds = json.loads(data["deepspeed.json"])
    assert ds["zero_optimization"]["stage"] == 2
    assert container(children)["image"] == "registry.local/trainer:1"


def test_single_node_job_needs_no_service() -> None:
    """One node rendezvouses on loopback: no Service (and no Endpoints for the control plane to keep)."""
    one = cr({"resources": {"nodes": 1, "gpusPerNode": 4}})
    children = render_children(one, trusted())
    assert [c["kind"] for c in children] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "ConfigMap",
        "Job",
    ]
    pod = by_kind(children)["Job"]["spec"]["template"]["spec"]
    assert "subdomain" not in pod
    command = container(children)["command"]
    assert command[command.index("--master-addr") + 1] == "127.0.0.1"


def test_headless_service() -> None:
    svc = by_kind(render_children(cr(), trusted()))["Service"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"] == [
        {"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"]["kubetune.io/job-name"] == "legal-lora"
    job = by_kind(render_children(cr(), trusted()))["Job"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())


def test_trainer_rbac_is_scoped_to_the_job() -> None:
    children = by_kind(render_children(cr(), trusted()))
    rules = children["Role"]["rules"]
    assert {
        "apiGroups": ["kubetune.io"],
        "resources": ["finetunejobs"],
        "resourceNames": ["legal-lora"],
        "verbs": ["get"],
    } in rules
    assert {
        "apiGroups": ["kubetune.io"],
        "resources": ["finetunejobs/status"],
        "resourceNames": ["legal-lora"],
        "verbs": ["get", "patch"],
    } in rules
    assert children["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "legal-lora-trainer", "namespace": "team-a"}
    ]
    assert children["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "legal-lora-trainer"
    with pytest.raises(RenderError, match=r"spec.resources.serviceAccountName"):  # tenants name no identity
        render_children(cr({"resources": {"serviceAccountName": "ci-deployer"}}), trusted())


def test_output_uri_required_or_defaulted() -> None:
    body = cr({"output": {}})
    with pytest.raises(RenderError, match="spec.output.uri"):
        render_children(body, trusted())
    children = render_children(body, trusted(output_uri_prefix="s3://platform/runs"))
    manifest = yaml.safe_load(by_kind(children)["ConfigMap"]["data"]["job.yaml"])
    assert manifest["spec"]["output"]["uri"] == "s3://platform/runs/team-a/legal-lora/"


def test_invalid_spec_names_the_field() -> None:
    with pytest.raises(RenderError, match=r"spec\.method"):
        render_children(cr({"method": {"type": "qlora"}}), trusted())


def test_platform_defaults_from_env_and_file(tmp_path) -> None:
    path = tmp_path / "defaults.yaml"
    path.write_text("image: reg/trainer:2\nnodeSelector: {pool: gpu}\nqueueName: shared\n")
    defaults = PlatformDefaults.from_env(
        {
            "KUBETUNE_DEFAULTS_FILE": str(path),
            "KUBETUNE_DEFAULT_STORAGE_CREDENTIALS_SECRET": "s3",
            "KUBETUNE_DEFAULT_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
            "KUBETUNE_DEFAULT_QUEUE_NAME": "override",
        }
    )
    assert defaults.image == "reg/trainer:2" and defaults.node_selector == {"pool": "gpu"}
    assert defaults.queue_name == "override" and defaults.storage_credentials_secret == "s3"
    assert defaults.tolerations == [{"key": "gpu", "operator": "Exists"}]
    with pytest.raises(ValueError, match="unknown platform default"):
        PlatformDefaults.from_mapping({"imagee": "x"})


def test_spec_own_settings_win_over_defaults() -> None:
    defaults = trusted(
        node_selector={"pool": "cpu"}, queue_name="shared", tolerations=[{"key": "x", "operator": "Exists"}]
    )
    pod = by_kind(render_children(cr(), defaults))["Job"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "gpu"
    job = by_kind(render_children(cr(), defaults))["Job"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


# ----- distributed.py -----


def spec_with(**resources: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"source": "m"},
            "task": {"type": "chat"},
            "datasets": [{"source": "d"}],
            "resources": resources,
        }
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config(stage: int) -> None:
    ds = distributed.deepspeed_config(spec_with(strategy=f"deepspeed-zero{stage}", gpusPerNode=8))
    assert ds["zero_optimization"]["stage"] == stage
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert ds[key] == "auto"
    assert ds["optimizer"]["params"]["lr"] == "auto" and "torch_adam" not in ds["optimizer"]["params"]
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        assert "stage3_gather_16bit_weights_on_model_save" not in ds["zero_optimization"]
    json.dumps(ds)


def test_deepspeed_cpu_and_precision() -> None:
    spec = spec_with(strategy="deepspeed-zero2", gpusPerNode=0)
    ds = distributed.deepspeed_config(spec)
    assert (
        ds["optimizer"]["params"]["torch_adam"] is True and ds["zero_optimization"]["overlap_comm"] is False
    )
    bf16 = FineTuneJobSpec.model_validate(
        {**spec.model_dump(by_alias=True), "training": {"precision": "bf16"}}
    )
    ds = distributed.deepspeed_config(bf16)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    with pytest.raises(ValueError):
        distributed.deepspeed_config(spec_with(strategy="ddp"))


def test_fsdp_options() -> None:
    opts = distributed.fsdp_options(spec_with(strategy="fsdp"))
    assert opts["fsdp"] == "full_shard auto_wrap"
    assert opts["fsdp_config"]["use_orig_params"] is True
    with pytest.raises(ValueError):
        distributed.fsdp_options(spec_with(strategy="ddp"))


def test_launcher_args() -> None:
    args = distributed.launcher_args(
        spec_with(nodes=3, gpusPerNode=0),
        master_addr="j-0.svc",
        master_port=1234,
        node_rank_expr="$(JOB_COMPLETION_INDEX)",
        nproc_per_node=1,
        resume="latest",
    )
    assert args == [
        "python",
        "-m",
        "kubetune_trainer.launch",
        "--nnodes",
        "3",
        "--nproc-per-node",
        "1",
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",
        "--master-addr",
        "j-0.svc",
        "--master-port",
        "1234",
        "-m",
        "kubetune_trainer",
        "--config",
        "/etc/kubetune/job.yaml",
        "--resume",
        "latest",
    ]
    assert distributed.world_size(spec_with(nodes=2, gpusPerNode=8)) == 16


def test_platform_pod_annotations_and_labels() -> None:
    defaults = trusted(
        pod_annotations={"sidecar.istio.io/inject": "false"},
        pod_labels={"cost-center": "ml", "kubetune.io/job-name": "spoof"},
    )
    template = by_kind(render_children(cr(), defaults))["Job"]["spec"]["template"]
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert template["metadata"]["labels"]["cost-center"] == "ml"
    assert template["metadata"]["labels"]["kubetune.io/job-name"] == "legal-lora"  # ours win
