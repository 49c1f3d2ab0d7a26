"""FineTuneJob -> child manifests (pure: no API calls, no clock).

Children of a FineTuneJob `<name>` (all owned by it, controller=true, so deleting the job deletes them):

* ServiceAccount `<name>-trainer`, Role and RoleBinding `<name>-trainer`: the worker pods may `get`
  this one FineTuneJob and `get`/`patch` its status (resourceNames: [<name>]); the trainer reports
  progress, checkpoints, metrics and artifacts that way. Pods always run as this account (a tenant
  cannot name another); the platform may annotate it for workload identity
  (`trainerServiceAccountAnnotations`). The token is not automounted: a projected, pod-bound token
  that expires in 10 minutes (the kubelet renews it) is mounted at /var/run/secrets/kubetune, read
  only by rank 0's status reporter.
* NetworkPolicy `<name>-workers` (unless the platform turns it off): ingress to the worker pods only
  from the job's own pods and, on the metrics port, from the platform's scraper; egress to the job's
  own pods, DNS, and what the platform allows (default: everything but cloud metadata addresses).
* ConfigMap `<name>-config`: `job.yaml` (the manifest with platform defaults filled in; Secret
  *names* only, never values) and `deepspeed.json` for DeepSpeed strategies.
* headless Service `<name>` (multi-node jobs only): stable DNS names `<name>-<attempt>-<index>.<name>`
  for the pods; torchrun's rendezvous is rank 0's name. A single-node job rendezvouses on loopback and
  gets no Service (nor the Endpoints and EndpointSlice the control plane would keep for it).
* Indexed batch/v1 Job `<name>-<attempt>`: one pod per node running torchrun. `backoffLimit: 0`: any
  failed pod fails the attempt; the operator decides whether to start attempt N+1 (see status.py).

The run deadline (runPolicy.activeDeadlineSeconds) is enforced by the operator over the job's
running time, not passed to the Job, because a Job's deadline would restart with every attempt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml
from pydantic import ValidationError

from kubetune import __version__, scheduling
from kubetune.distributed import (
    CONFIG_DIR,
    MASTER_PORT,
    deepspeed_config,
    launcher_args,
    processes_per_node,
    uses_deepspeed,
)
from kubetune.manifest import format_validation_error
from kubetune.policy import METADATA_CIDRS, PolicyError, TenantPolicy
from kubetune.policy import check as check_policy
from kubetune.policy import enforce as enforce_policy
from kubetune.spec import API_GROUP, API_VERSION, KIND, PLURAL, FineTuneJobSpec

LABEL_JOB = f"{API_GROUP}/job-name"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
CONTAINER_NAME = "trainer"
TRAINER_COMPONENT = "trainer"  # app.kubernetes.io/component of the worker pods, their Job and their account
DEFAULT_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"
CACHE_DIR = "/cache"
RUN_AS_USER = 1000
TRAINER_METRICS_PORT = 9090  # rank 0's Prometheus endpoint (kubetune_trainer.metrics)
TOKEN_DIR = "/var/run/secrets/kubetune"  # the projected token, CA and namespace (status_reporter.py reads it)
TOKEN_EXPIRATION_SECONDS = 600  # the shortest the API server issues; the kubelet renews it at 80%
DATA_VOLUME_PREFIX = "data-"

# Environment variables filled from Secrets, per Secret reference: (variable, optional).
# Keys are the variable names; a Secret holds the keys it needs.
AWS_KEYS = [("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True)]
HF_KEYS = [("HF_TOKEN", True)]
MODEL_S3_KEYS = [("AWS_ACCESS_KEY_ID", True), ("AWS_SECRET_ACCESS_KEY", True), ("AWS_SESSION_TOKEN", True)]
WANDB_KEYS = [("WANDB_API_KEY", False)]
MLFLOW_KEYS = [
    ("MLFLOW_TRACKING_TOKEN", True),
    ("MLFLOW_TRACKING_USERNAME", True),
    ("MLFLOW_TRACKING_PASSWORD", True),
]


class RenderError(ValueError):
    """The spec cannot be run in a cluster (bad spec, or something only the cluster requires)."""


class PolicyViolation(RenderError, PolicyError):
    """The spec breaks the platform's tenant policy."""


@dataclass
class PlatformDefaults:
    """Platform-wide settings merged into specs that do not set their own.

    Loaded from a YAML file (camelCase keys, path in KUBETUNE_DEFAULTS_FILE) and/or environment
    variables KUBETUNE_DEFAULT_<FIELD> (upper snake case; dicts and lists as JSON), env winning.
    """

    image: str = DEFAULT_IMAGE
    image_pull_policy: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: str | None = None
    storage_credentials_secret: str | None = None
    output_uri_prefix: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    queue_name: str | None = None
    priority_class_name: str | None = None
    cache_size_limit: str | None = None
    termination_grace_period_seconds: int = 300
    pod_annotations: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)
    # annotations of every per-job ServiceAccount (workload identity: eks.amazonaws.com/role-arn, ...)
    trainer_service_account_annotations: dict[str, str] = field(default_factory=dict)
    # volumes the platform mounts into every worker pod: [{name, mountPath, readOnly?, <volume source>}]
    # (a persistentVolumeClaim, nfs, csi, ...); local dataset and model paths must lie under policy.dataPaths
    data_volumes: list[dict[str, Any]] = field(default_factory=list)
    policy: TenantPolicy = field(default_factory=TenantPolicy)
    # gang schedulers the platform runs: provider (coscheduling|volcano) -> the pods' schedulerName.
    # A spec may ask only for these (spec.scheduling.gang.provider); empty: no gang scheduling
    gang_schedulers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for provider, scheduler_name in self.gang_schedulers.items():
            if provider not in scheduling.PROVIDERS or not scheduler_name:
                raise ValueError(
                    f"gangSchedulers.{provider}: providers are {', '.join(scheduling.PROVIDERS)}, "
                    "each with the scheduler name its pods get"
                )
        if isinstance(self.policy, Mapping):
            try:
                self.policy = TenantPolicy.model_validate(dict(self.policy))
            except ValidationError as error:
                raise ValueError(
                    "invalid platform policy: "
                    + "; ".join(f"policy.{p}" for p in format_validation_error(error))
                ) from None
        for index, volume in enumerate(self.data_volumes):
            if (
                not isinstance(volume, Mapping)
                or not volume.get("name")
                or not str(volume.get("mountPath", "")).startswith("/")
            ):
                raise ValueError(
                    f"dataVolumes[{index}]: needs a name, an absolute mountPath and a volume source"
                )
            if "hostPath" in volume:  # the admission policy refuses worker Jobs with hostPath volumes
                raise ValueError(
                    f"dataVolumes[{index}]: hostPath volumes are not allowed (a node's own files); use "
                    "a persistentVolumeClaim, nfs or csi volume"
                )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PlatformDefaults:
        """From a dict with camelCase (or snake_case) keys; unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        camel = {_camel(n): n for n in known}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = key if key in known else camel.get(key)
            if name is None:
                raise ValueError(f"unknown platform default {key!r}; known: {sorted(camel)}")
            values[name] = value
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> PlatformDefaults:
        """From a YAML file."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of platform defaults")
        return cls.from_mapping(data)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PlatformDefaults:
        """KUBETUNE_DEFAULTS_FILE first, then KUBETUNE_DEFAULT_* variables."""
        env = os.environ if env is None else env
        data: dict[str, Any] = {}
        if env.get("KUBETUNE_DEFAULTS_FILE"):
            data = yaml.safe_load(Path(env["KUBETUNE_DEFAULTS_FILE"]).read_text()) or {}
        types = get_type_hints(cls)
        for f in fields(cls):
            raw = env.get(f"KUBETUNE_DEFAULT_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            data.pop(_camel(f.name), None)  # the file's camelCase key loses to the variable
            kind = types[f.name]
            if kind is int:
                data[f.name] = int(raw)
            elif kind is TenantPolicy or get_origin(kind) in (list, dict):
                data[f.name] = json.loads(raw)
            else:  # str or str | None
                data[f.name] = raw
        return cls.from_mapping(data)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


# ----- names -----


def service_name(name: str) -> str:
    """The headless Service (also the pods' subdomain)."""
    return name


def network_policy_name(name: str) -> str:
    return f"{name}-workers"


def config_map_name(name: str) -> str:
    return f"{name}-config"


def trainer_account_name(name: str) -> str:
    """ServiceAccount, Role and RoleBinding of the worker pods."""
    return f"{name}-trainer"


def job_name(name: str, attempt: int) -> str:
    """The batch/v1 Job of one attempt."""
    return f"{name}-{attempt}"


def master_address(name: str, attempt: int, nodes: int) -> str:
    """Rank 0's address: the first pod's DNS name under the headless Service (loopback for one node)."""
    if nodes == 1:
        return "127.0.0.1"
    return f"{job_name(name, attempt)}-0.{service_name(name)}"


# ----- spec -----


def parse_spec(spec: Mapping[str, Any]) -> FineTuneJobSpec:
    """Validate a CR's spec; RenderError lists every problem with its field path."""
    try:
        return FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as error:
        problems = [f"spec.{p}" for p in format_validation_error(error)]
        raise RenderError("invalid spec: " + "; ".join(problems)) from None


def apply_defaults(
    spec: FineTuneJobSpec, defaults: PlatformDefaults, *, name: str, namespace: str
) -> FineTuneJobSpec:
    """The spec with platform defaults filled where it sets nothing; RenderError if still unrunnable."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    res = data.setdefault("resources", {})
    res.setdefault("image", defaults.image)
    if defaults.image_pull_policy:
        res.setdefault("imagePullPolicy", defaults.image_pull_policy)
    if not res.get("imagePullSecrets") and defaults.image_pull_secrets:
        res["imagePullSecrets"] = list(defaults.image_pull_secrets)
    if not res.get("nodeSelector") and defaults.node_selector:
        res["nodeSelector"] = dict(defaults.node_selector)
    if not res.get("tolerations") and defaults.tolerations:
        res["tolerations"] = [dict(t) for t in defaults.tolerations]
    if defaults.priority_class_name:
        res.setdefault("priorityClassName", defaults.priority_class_name)
    storage = data.setdefault("storage", {})
    s3 = storage.setdefault("s3", {})
    if defaults.s3_endpoint_url:
        s3.setdefault("endpointUrl", defaults.s3_endpoint_url)
    if defaults.s3_region:
        s3.setdefault("region", defaults.s3_region)
    if defaults.s3_addressing_style and s3.get("addressingStyle", "auto") == "auto":
        s3["addressingStyle"] = defaults.s3_addressing_style
    if defaults.storage_credentials_secret and _uses_s3(data, defaults):
        # the platform's keys go only to jobs that read or write s3:// (and only by secretKeyRef)
        storage.setdefault("credentialsSecretRef", {"name": defaults.storage_credentials_secret})
    scheduling = data.setdefault("scheduling", {})
    if not scheduling.get("queueName"):  # "" is no queue name, not a way around the platform's queue
        scheduling.pop("queueName", None)
        if defaults.queue_name:
            scheduling["queueName"] = defaults.queue_name
    enforce_policy(defaults.policy, data)
    output = data.setdefault("output", {})
    if not output.get("uri") and defaults.output_uri_prefix:
        output["uri"] = f"{defaults.output_uri_prefix.rstrip('/')}/{namespace}/{name}/"
    if not output.get("uri"):
        raise RenderError(
            "spec.output.uri: required in a cluster (a pod's disk is gone when it ends), for example "
            "s3://bucket/runs/; or set the platform default outputUriPrefix"
        )
    return parse_spec(data)


def _uses_s3(data: Mapping[str, Any], defaults: PlatformDefaults) -> bool:
    """Whether a spec (camelCase dict) reads or writes any s3:// location, its default output included."""
    model = data.get("model") or {}
    sources = [model.get("source", ""), model.get("adapter") or ""]
    sources += [d.get("source", "") for d in data.get("datasets") or []]
    sources += [d.get("source", "") for d in (data.get("validation") or {}).get("datasets") or []]
    sources.append((data.get("output") or {}).get("uri") or defaults.output_uri_prefix or "")
    return any(str(s).startswith("s3://") for s in sources)


# ----- children -----


def owner_reference(job: Mapping[str, Any]) -> dict[str, Any]:
    """The controller ownerReference pointing at the FineTuneJob."""
    meta = job["metadata"]
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": name,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/managed-by": "kubetune-operator",
        LABEL_JOB: name,
    }


def worker_labels(name: str) -> dict[str, str]:
    """The labels that select the worker pods of FineTuneJob `name` (Service, NetworkPolicy, the operator)."""
    return {LABEL_JOB: name, LABEL_COMPONENT: TRAINER_COMPONENT}


def worker_selector(name: str | None = None) -> str:
    """worker_labels as a label selector; without a name, the worker pods of every job."""
    if name is None:
        return f"{LABEL_JOB},{LABEL_COMPONENT}={TRAINER_COMPONENT}"
    return ",".join(f"{k}={v}" for k, v in worker_labels(name).items())


def _meta(job: Mapping[str, Any], name: str, component: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job["metadata"]["namespace"],
        "labels": {**_labels(job["metadata"]["name"], component), **extra_labels},
        "ownerReferences": [owner_reference(job)],
    }


def current_attempt(job: Mapping[str, Any]) -> int:
    """The attempt the status says is current (1 before any)."""
    return int((job.get("status") or {}).get("attempt") or 1)


_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def job_manifest_yaml(job: Mapping[str, Any], spec: FineTuneJobSpec) -> str:
    """The effective FineTuneJob manifest the trainer reads (no status, no secret values)."""
    meta = job["metadata"]
    manifest = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    # libyaml's emitter when PyYAML has it (the wheels do): the pure-Python one was ~6% of the operator's
    # CPU at 1,000 jobs (bench/operator_scale.py); the output is the same YAML
    return yaml.dump(manifest, Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=False)


def _secret_env(ref_name: str, keys: list[tuple[str, bool]]) -> list[dict[str, Any]]:
    return [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": ref_name, "key": var, "optional": optional}}}
        for var, optional in keys
    ]


def secret_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Environment variables read from Secrets by reference (the values never pass through the operator).

    AWS keys come from output.credentialsSecretRef, else storage.credentialsSecretRef, else (for an
    s3:// model.source or model.adapter) model.credentialsSecretRef. HF_TOKEN from model.credentialsSecretRef, WANDB_API_KEY
    and MLFLOW_TRACKING_* from the tracking Secrets.
    """
    env: list[dict[str, Any]] = []
    model_ref = spec.model.credentials_secret_ref
    aws_ref = spec.output.credentials_secret_ref or spec.storage.credentials_secret_ref
    if aws_ref is not None:
        env += _secret_env(aws_ref.name, AWS_KEYS)
    elif model_ref is not None and any(
        location.startswith("s3://") for location in (spec.model.source, spec.model.adapter or "")
    ):
        env += _secret_env(model_ref.name, MODEL_S3_KEYS)
    if model_ref is not None:
        env += _secret_env(model_ref.name, HF_KEYS)
    wandb = spec.tracking.wandb
    if wandb is not None and wandb.api_key_secret_ref is not None:
        env += _secret_env(wandb.api_key_secret_ref.name, WANDB_KEYS)
    mlflow = spec.tracking.mlflow
    if mlflow is not None and mlflow.credentials_secret_ref is not None:
        env += _secret_env(mlflow.credentials_secret_ref.name, MLFLOW_KEYS)
    return env


def _env(job: Mapping[str, Any], spec: FineTuneJobSpec, attempt: int) -> list[dict[str, Any]]:
    """The trainer's environment: what kubetune_trainer reads (KUBETUNE_*), where libraries cache, the
    Secrets by reference. The launcher's command line carries the rendezvous (master address and port,
    nodes, processes per node) and the config path."""
    meta = job["metadata"]
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_JOB_NAME", "value": meta["name"]},  # status_reporter.py, metrics.py
        {"name": "KUBETUNE_JOB_NAMESPACE", "value": meta["namespace"]},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},  # metrics.py
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "KUBETUNE_CACHE", "value": f"{CACHE_DIR}/kubetune"},
        {"name": "KUBETUNE_WORKDIR", "value": f"{CACHE_DIR}/work"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/.cache"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/.triton"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "KUBETUNE_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)},
        {"name": "KUBETUNE_SA_DIR", "value": TOKEN_DIR},
    ]
    if spec.resources.gpus_per_node == 0:
        env.append({"name": "OMP_NUM_THREADS", "value": _omp_threads(spec.resources.cpu)})
    return env + secret_env(spec)


def _omp_threads(cpu: str | None) -> str:
    """Threads per CPU worker: the whole CPUs of its limit (at least 1)."""
    if not cpu:
        return "1"
    # the operator's dependency, imported here: `kubetune validate` (the base install) renders no pods
    from kubernetes.utils.quantity import parse_quantity

    return str(max(1, int(parse_quantity(cpu))))  # spec.Quantity has already checked the syntax


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.gpus_per_node > 0:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def render_config_map(job: Mapping[str, Any], spec: FineTuneJobSpec) -> dict[str, Any]:
    data = {"job.yaml": job_manifest_yaml(job, spec)}
    if uses_deepspeed(spec):
        data["deepspeed.json"] = json.dumps(deepspeed_config(spec), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, config_map_name(job["metadata"]["name"]), "config"),
        "data": data,
    }


def render_service(job: Mapping[str, Any]) -> dict[str, Any]:
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "selector": worker_labels(name),
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}
            ],
        },
    }


def render_rbac(job: Mapping[str, Any], defaults: PlatformDefaults | None = None) -> list[dict[str, Any]]:
    """The per-job ServiceAccount (the pods' only identity), Role and RoleBinding for status reporting."""
    name = job["metadata"]["name"]
    account = trainer_account_name(name)
    service_account: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(job, account, TRAINER_COMPONENT),
        "automountServiceAccountToken": False,
    }
    if defaults is not None and defaults.trainer_service_account_annotations:
        service_account["metadata"]["annotations"] = dict(defaults.trainer_service_account_annotations)
    objects: list[dict[str, Any]] = [service_account]
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(job, account, TRAINER_COMPONENT),
            "rules": [
                {"apiGroups": [API_GROUP], "resources": [PLURAL], "resourceNames": [name], "verbs": ["get"]},
                {
                    "apiGroups": [API_GROUP],
                    "resources": [f"{PLURAL}/status"],
                    "resourceNames": [name],
                    "verbs": ["get", "patch"],
                },
            ],
        }
    )
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(job, account, TRAINER_COMPONENT),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [
                {"kind": "ServiceAccount", "name": account, "namespace": job["metadata"]["namespace"]}
            ],
        }
    )
    return objects


def render_job(
    job: Mapping[str, Any], spec: FineTuneJobSpec, attempt: int, defaults: PlatformDefaults
) -> dict[str, Any]:
    """The Indexed batch/v1 Job of one attempt."""
    meta = job["metadata"]
    name = meta["name"]
    res = spec.resources
    nodes = res.nodes
    command = launcher_args(
        spec,
        master_addr=master_address(name, attempt, nodes),
        master_port=MASTER_PORT,
        node_rank_expr="$(JOB_COMPLETION_INDEX)",
        nproc_per_node=processes_per_node(spec),
        resume="latest" if attempt > 1 else None,
    )
    pod_labels = {**defaults.pod_labels, **_labels(name, TRAINER_COMPONENT), LABEL_ATTEMPT: str(attempt)}
    job_labels = {LABEL_ATTEMPT: str(attempt)}
    queue = spec.scheduling.queue_name
    if queue:
        job_labels[KUEUE_QUEUE_LABEL] = queue
    if spec.scheduling.priority_class_name:
        job_labels[KUEUE_PRIORITY_LABEL] = spec.scheduling.priority_class_name
    cache_volume: dict[str, Any] = {}
    if defaults.cache_size_limit:
        cache_volume["sizeLimit"] = defaults.cache_size_limit
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": res.image or defaults.image,
        "command": command,
        "env": _env(job, spec, attempt),
        "ports": [
            {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(spec),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "kubetune-token", "mountPath": TOKEN_DIR, "readOnly": True},
            *[
                {
                    "name": DATA_VOLUME_PREFIX + v["name"],
                    "mountPath": v["mountPath"],
                    "readOnly": bool(v.get("readOnly", True)),
                }
                for v in defaults.data_volumes
            ],
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "File",
    }
    if res.image_pull_policy:
        container["imagePullPolicy"] = res.image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": trainer_account_name(name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": defaults.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shared_memory}},
            {"name": "cache", "emptyDir": cache_volume},
            {"name": "tmp", "emptyDir": {}},
            _token_volume(),
            *[
                {
                    "name": DATA_VOLUME_PREFIX + v["name"],
                    **{k: val for k, val in v.items() if k not in ("name", "mountPath", "readOnly")},
                }
                for v in defaults.data_volumes
            ],
        ],
    }
    if nodes > 1:  # pod DNS names <job>-<attempt>-<index>.<service> for the rendezvous
        pod_spec["subdomain"] = service_name(name)
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = dict(res.affinity)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if res.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in res.image_pull_secrets]
    pod_annotations = {**defaults.pod_annotations, "kubectl.kubernetes.io/default-container": CONTAINER_NAME}
    scheduling.apply_to_pod(
        spec.scheduling.gang,
        job_name(name, attempt),
        defaults.gang_schedulers,
        pod_spec,
        pod_labels,
        pod_annotations,
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(job, job_name(name, attempt), TRAINER_COMPONENT, **job_labels),
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            "suspend": bool(queue),
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


def _token_volume() -> dict[str, Any]:
    """A pod-bound, short-lived ServiceAccount token with the cluster CA and the namespace."""
    return {
        "name": "kubetune-token",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_EXPIRATION_SECONDS}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ],
        },
    }


def render_network_policy(job: Mapping[str, Any], defaults: PlatformDefaults) -> dict[str, Any] | None:
    """The workers' NetworkPolicy: rendezvous and collectives only within the job, metrics only from the
    platform's scraper, egress as the platform allows (default: all but cloud metadata)."""
    settings = defaults.policy.network_policy
    if not settings.enabled:
        return None
    name = job["metadata"]["name"]
    own = {"podSelector": {"matchLabels": worker_labels(name)}}
    ingress: list[dict[str, Any]] = [{"from": [own]}]
    if settings.metrics_from:
        ingress.append(
            {
                "from": [dict(p) for p in settings.metrics_from],
                "ports": [{"protocol": "TCP", "port": TRAINER_METRICS_PORT}],
            }
        )
    dns = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    if settings.egress is None:
        platform_egress = [
            {
                "to": [
                    {"ipBlock": {"cidr": "0.0.0.0/0", "except": [c for c in METADATA_CIDRS if ":" not in c]}},
                    {"ipBlock": {"cidr": "::/0", "except": [c for c in METADATA_CIDRS if ":" in c]}},
                ]
            }
        ]
    else:
        platform_egress = [dict(rule) for rule in settings.egress]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(job, network_policy_name(name), "network"),
        "spec": {
            "podSelector": {"matchLabels": worker_labels(name)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": [{"to": [own]}, dns, *platform_egress],
        },
    }


def effective_spec(job: Mapping[str, Any], defaults: PlatformDefaults) -> FineTuneJobSpec:
    """The CR's spec validated, checked against the tenant policy and merged with the platform defaults.

    RenderError if unrunnable; PolicyViolation (a RenderError) if it breaks the policy."""
    meta = job["metadata"]
    spec = parse_spec(job.get("spec") or {})
    problems = check_policy(
        spec,
        defaults.policy,
        namespace=meta["namespace"],
        output_uri_prefix=defaults.output_uri_prefix,
        platform_image=defaults.image,
        platform_queue=defaults.queue_name,
    )
    problems += scheduling.check_gang(spec.scheduling.gang, spec.resources.nodes, defaults.gang_schedulers)
    if problems:
        raise PolicyViolation("; ".join(problems))
    return apply_defaults(spec, defaults, name=meta["name"], namespace=meta["namespace"])


def render_pod_group(job: Mapping[str, Any], spec: FineTuneJobSpec, attempt: int) -> dict[str, Any]:
    """The attempt's PodGroup for gang scheduling (kubetune.scheduling), named like its Job."""
    name = job_name(job["metadata"]["name"], attempt)
    return scheduling.render_pod_group(
        job,
        spec.scheduling.gang,
        spec.resources.nodes,
        name,
        _meta(job, name, "scheduling", **{LABEL_ATTEMPT: str(attempt)}),
    )


def render_children(
    job: Mapping[str, Any], defaults: PlatformDefaults, *, attempt: int | None = None
) -> list[dict[str, Any]]:
    """Every child of the FineTuneJob for `attempt` (default: status.attempt), in creation order.

    Raises RenderError when the spec cannot run (the operator then fails the job with the message).
    """
    spec = effective_spec(job, defaults)
    attempt = current_attempt(job) if attempt is None else attempt
    network_policy = render_network_policy(job, defaults)
    return [
        *render_rbac(job, defaults),
        *([network_policy] if network_policy else []),
        render_config_map(job, spec),
        *([render_service(job)] if spec.resources.nodes > 1 else []),
        *([render_pod_group(job, spec, attempt)] if spec.scheduling.gang else []),
        render_job(job, spec, attempt, defaults),
    ]
