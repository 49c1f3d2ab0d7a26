"""Objects the cluster tests apply: FineTuneJobs, RBAC Roles and RoleBindings, pod specs of the tests.

Plain dicts (no cluster, no kubernetes client), so tests/manifest_cases.py can use them without a cluster.
"""

from __future__ import annotations

from typing import Any

RBAC = "rbac.authorization.k8s.io"

# A pod anti-affinity that selects pods in every namespace: a tenant's way to keep others off its nodes.
CROSS_NAMESPACE_ANTI_AFFINITY: dict[str, Any] = {
    "podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {
                "labelSelector": {},
                "namespaceSelector": {},
                "topologyKey": "kubernetes.io/hostname",
            }
        ]
    }
}


def finetunejob(name: str, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob named NAME (in NAMESPACE unless None) with exactly the spec groups given."""
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": metadata, "spec": spec}


def chat_job(
    name: str, namespace: str | None = None, dataset: str = "s3://data/chat.jsonl", **spec: Any
) -> dict[str, Any]:
    """The bundled model fine-tuned on one chat DATASET, 2 nodes of 1 GPU; SPEC adds or replaces groups."""
    body = finetunejob(
        name,
        namespace,
        model={"source": "bundled://smollm2-135m-instruct"},
        task={"type": "chat"},
        datasets=[{"source": dataset}],
        resources={"nodes": 2, "gpusPerNode": 1},
    )
    body["spec"].update(spec)
    return body


def job_with_secrets(name: str, namespace: str, output_uri: str) -> dict[str, Any]:
    """A valid job on the `gpu` pool that reads the model with Secret hf-token and writes with s3-creds."""
    return chat_job(
        name,
        namespace,
        model={"source": "bundled://smollm2-135m-instruct", "credentialsSecretRef": {"name": "hf-token"}},
        output={"uri": output_uri, "credentialsSecretRef": {"name": "s3-creds"}},
        resources={"nodes": 2, "gpusPerNode": 1, "nodeSelector": {"pool": "gpu"}},
    )


def role(name: str, namespace: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{RBAC}/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": rules,
    }


def user_role_binding(
    name: str, namespace: str, user: str, role_name: str, role_kind: str = "Role"
) -> dict[str, Any]:
    """A RoleBinding of the user USER to the Role (or ClusterRole) ROLE_NAME in NAMESPACE."""
    return {
        "apiVersion": f"{RBAC}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role_name},
        "subjects": [{"apiGroup": RBAC, "kind": "User", "name": user}],
    }
