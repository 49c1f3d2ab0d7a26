"""The operator-on-a-control-plane helpers shared by test_operator_cluster and test_operator_failover:
the namespace and Secrets, manifests, an operator process, and reads of jobs, pods, events and status."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.spec import API_GROUP as GROUP
from kubetune.spec import API_VERSION as VERSION
from kubetune.spec import PLURAL
from tests.support.controlplane import HOLD_ANNOTATION, ControlPlane
from tests.support.manifests import job_with_secrets
from tests.support.operator_process import OperatorProcess
from tests.support.policies import TRUSTED_POLICY

NS = "ml"


SECRETS = {
    "s3-creds": {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": "sk-" + secrets.token_hex(20),
    },
    "hf-token": {"HF_TOKEN": "hf_" + secrets.token_hex(16)},
}


def operator_process(
    cp: ControlPlane, log_path: Path, kubeconfig: str, args: tuple[str, ...] = ()
) -> OperatorProcess:
    return OperatorProcess(cp, log_path, kubeconfig, args, env=OPERATOR_ENV)


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    body = job_with_secrets(name, NS, f"s3://runs/{name}/")
    for key, value in spec.items():
        body["spec"][key] = value
    return body


def status(api: client.ApiClient, name: str) -> dict[str, Any]:
    return (ftj(api, name) or {}).get("status") or {}


def wait_phase(
    cp: ControlPlane,
    api: client.ApiClient,
    name: str,
    phase: str,
    timeout: float = 60,
    check: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = status(api, name)
        return st if st.get("phase") == phase and (check is None or check(st)) else None

    try:
        return cp.wait_for(ready, timeout, f"{name} phase {phase}")
    except Exception:
        print(f"status of {name}: {json.dumps(status(api, name), indent=1)}")
        raise


def start_running(cp: ControlPlane, api: client.ApiClient, name: str, **spec: Any) -> dict[str, Any]:
    """Create the job `manifest(name, **spec)` and wait until it is Running: its status then."""
    cp.apply(manifest(name, **spec))
    return wait_phase(cp, api, name, "Running")


def jobs(api: client.ApiClient, name: str) -> list[dict[str, Any]]:
    items = (
        client.BatchV1Api(api).list_namespaced_job(NS, label_selector=f"kubetune.io/job-name={name}").items
    )
    return sorted((api.sanitize_for_serialization(j) for j in items), key=lambda j: j["metadata"]["name"])


def running_pods(cp: ControlPlane, api: client.ApiClient, name: str, attempt: int, count: int) -> list[dict]:
    return cp.wait_for(
        lambda: (lambda ps: ps if len(ps) == count else None)(pods(api, name, attempt, "Running")),
        60,
        f"{count} running pods of {name} attempt {attempt}",
    )


def event_reasons(api: client.ApiClient, name: str) -> list[str]:
    return [e["reason"] for e in events(api, name)]


def children(api: client.ApiClient, name: str) -> dict[str, list[str]]:
    """Names of every kind of child carrying the job's label."""
    selector = f"kubetune.io/job-name={name}"
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    return {
        "ServiceAccount": [
            o.metadata.name for o in core.list_namespaced_service_account(NS, label_selector=selector).items
        ],
        "Role": [o.metadata.name for o in rbac.list_namespaced_role(NS, label_selector=selector).items],
        "RoleBinding": [
            o.metadata.name for o in rbac.list_namespaced_role_binding(NS, label_selector=selector).items
        ],
        "ConfigMap": [
            o.metadata.name for o in core.list_namespaced_config_map(NS, label_selector=selector).items
        ],
        "Service": [o.metadata.name for o in core.list_namespaced_service(NS, label_selector=selector).items],
        "Job": [j["metadata"]["name"] for j in jobs(api, name)],
    }


def _peering_crd(kind: str, scope: str) -> dict[str, Any]:
    """kopf's peering CRDs (as in kopf's documentation)."""
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


# the platform defaults the operator runs with here (kwok holds the worker pods Running)
GANG_SCHEDULERS = {"coscheduling": "scheduler-plugins-scheduler", "volcano": "volcano"}


OPERATOR_ENV = {
    "KUBETUNE_DEFAULT_IMAGE": "registry.invalid/kubetune/trainer:test",
    "KUBETUNE_DEFAULT_POD_ANNOTATIONS": json.dumps({HOLD_ANNOTATION: "true"}),
    "KUBETUNE_DEFAULT_OUTPUT_URI_PREFIX": "s3://platform-runs",
    "KUBETUNE_DEFAULT_POLICY": json.dumps(TRUSTED_POLICY),  # one trusted team: the older tests' fields
    # gang scheduling enabled with both providers (no gang scheduler runs here: their pods stay Pending)
    "KUBETUNE_DEFAULT_GANG_SCHEDULERS": json.dumps(GANG_SCHEDULERS),
}


def ftj(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def pods(
    api: client.ApiClient, name: str, attempt: int | None = None, phase: str | None = None
) -> list[dict]:
    selector = f"kubetune.io/job-name={name}"
    if attempt is not None:
        selector += f",kubetune.io/attempt={attempt}"
    items = client.CoreV1Api(api).list_namespaced_pod(NS, label_selector=selector).items
    out = [api.sanitize_for_serialization(p) for p in items]
    return [p for p in out if phase is None or p["status"].get("phase") == phase]


def finetunejob_events(api: client.ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    """The Events about the FineTuneJob NAME in NAMESPACE, in the API's order."""
    items = (
        client.CoreV1Api(api)
        .list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
        )
        .items
    )
    return [api.sanitize_for_serialization(e) for e in items]


def events(api: client.ApiClient, name: str) -> list[dict[str, Any]]:
    return sorted(
        finetunejob_events(api, NS, name),
        key=lambda e: (e.get("firstTimestamp") or e.get("eventTime") or "", e["metadata"]["name"]),
    )
