"""The Helm chart in tests: `helm template` it, pick documents, apply it to the test control plane,
wait for its quotas to be counted (tests/test_chart.py, tests/test_admission.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.controlplane import ControlPlane, ensure_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
SYSTEM_NS = "kubetune-system"
RELEASE = "kubetune"


def helm_bin() -> str:
    return str(ensure_binaries(["helm"]) / "helm")


def values_args(values: dict[str, Any] | None, tmp: Path) -> list[str]:
    if not values:
        return []
    path = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def helm(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    result = subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def render_chart(
    tmp: Path,
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = SYSTEM_NS,
    crds: bool = False,
) -> list[dict[str, Any]]:
    """`helm template` -> the documents (CRDs too with crds=True)."""
    args = ["template", release, str(CHART), "--namespace", namespace, *values_args(values, tmp)]
    if crds:
        args.append("--include-crds")
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def find(
    docs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (name is None or d["metadata"]["name"] == name)
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def apply_chart(cp: ControlPlane, docs: list[dict[str, Any]], manager: str = "kubetune-chart") -> None:
    """CRDs first (and Established), then everything else, all with server-side apply."""
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    if crds:
        cp.kubectl(
            "apply", "--server-side", f"--field-manager={manager}", "-f", "-", input=yaml.safe_dump_all(crds)
        )
        for d in crds:
            cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{d['metadata']['name']}")
    cp.kubectl(
        "apply", "--server-side", f"--field-manager={manager}", "-f", "-", input=yaml.safe_dump_all(rest)
    )


def wait_counted(cp: ControlPlane, namespace: str, name: str = "kubetune", timeout: float = 150) -> None:
    """Until the quota controller has counted every resource of the quota (quota admission refuses
    what it has no count for: "status unknown for quota"). A count of a custom resource
    (count/finetunejobs.kubetune.io) starts once the controller's discovery (every 30 s) has seen
    the CRD, but the quota is only recounted at its next full resync (5 minutes) or when its
    spec.hard changes (an annotation does not do it): so add and remove a key."""
    touch = "count/touches.kubetune.test"

    def counted() -> bool:
        quota = cp.get_json("-n", namespace, "resourcequota", name)
        if set(quota["spec"]["hard"]) <= set(quota.get("status", {}).get("used", {})):
            return True
        for op in (
            {"op": "add", "path": "/spec/hard/" + touch.replace("/", "~1"), "value": "1"},
            {"op": "remove", "path": "/spec/hard/" + touch.replace("/", "~1")},
        ):
            cp.kubectl("-n", namespace, "patch", "resourcequota", name, "--type=json", "-p", json.dumps([op]))
        return False

    cp.wait_for(counted, timeout, f"ResourceQuota {namespace}/{name} counted", interval=3)


TENANT_QUOTAS = ("kubetune", "kubetune-priority-classes", "kubetune-cross-namespace-affinity")


def install_chart(
    cp: ControlPlane, tmp: Path, values: dict[str, Any], tenant_namespaces: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Render the chart with its CRDs, apply it, and wait for the quota controller's first count of
    every tenant quota in TENANT_NAMESPACES (quota admission needs it): the documents."""
    docs = render_chart(tmp, values, crds=True)
    apply_chart(cp, docs)
    for namespace in tenant_namespaces:
        for name in TENANT_QUOTAS:
            wait_counted(cp, namespace, name)
    return docs
