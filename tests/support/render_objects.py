"""Objects for the pure render tests: a FineTuneJob custom resource, trusted platform defaults, and
lookups into the rendered children."""

from __future__ import annotations

from typing import Any

from kubetune.render import PlatformDefaults
from tests.support.policies import TRUSTED_POLICY


def cr(
    spec: dict[str, Any] | None = None, name: str = "legal-lora", attempt: int | None = None
) -> dict[str, Any]:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-1234", "generation": 1},
        "spec": {
            "model": {"source": "s3://models/llama/", "credentialsSecretRef": {"name": "hf"}},
            "method": {"type": "qlora", "quantization": {"bits": 4}},
            "task": {"type": "instruction"},
            "datasets": [{"source": "s3://data/legal.jsonl"}],
            "output": {"uri": "s3://runs/team-a/", "credentialsSecretRef": {"name": "s3"}},
            "tracking": {
                "wandb": {"project": "x", "apiKeySecretRef": {"name": "wandb"}},
                "mlflow": {"trackingUri": "http://mlflow", "credentialsSecretRef": {"name": "mlflow"}},
            },
            "resources": {
                "nodes": 2,
                "gpusPerNode": 8,
                "strategy": "deepspeed-zero3",
                "cpu": "32",
                "memory": "256Gi",
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                            ]
                        }
                    }
                },
                "priorityClassName": "training",
                "imagePullSecrets": ["regcred"],
                "imagePullPolicy": "IfNotPresent",
            },
            "scheduling": {"queueName": "team-a", "priorityClassName": "high"},
            **(spec or {}),
        },
    }
    if attempt is not None:
        body["status"] = {"attempt": attempt}
    return body


def trusted(**fields: Any) -> PlatformDefaults:
    """Platform defaults with a policy that allows every field the fixture sets."""
    return PlatformDefaults(policy=fields.pop("policy", TRUSTED_POLICY), **fields)


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in children}


def container(children: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(children)["Job"]["spec"]["template"]["spec"]["containers"][0]


def env_of(children: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(children)["env"]}
