"""The cluster commands (`kubetune submit|get|describe|watch|logs|checkpoints|artifacts|suspend|resume|cancel`)
against the real test control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) with the
operator running as a subprocess.

kwok holds the worker pods Running (the platform default annotation `kubetune.test/hold`); what a
trainer would write into the status (progress, checkpoint, artifacts, metrics) is patched in through
the status subresource, as the trainer does. Most commands run in-process (`cli.main`, output captured);
`submit --wait`, `watch`, `logs -f` and the plugin run as real processes.

Logs: the two GPU nodes' kubelet endpoint is kwok's own server (127.0.0.1, kwok's port), and a kwok
`ClusterLogs` serves one CRI-format file as every trainer container's log in the namespace, so
`kubetune logs` goes through the API server's `pods/log` for real (`-f` sees lines appended to the
file). A third node (`mute-0`) has no kubelet endpoint: the API server's refusal is what users see
when a node cannot serve logs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune import cli, cluster
from tests.support.cluster import make_cluster, running_operator
from tests.support.controlplane import HOLD_ANNOTATION, STAGES_FILE, ControlPlane
from tests.support.manifests import chat_job, role, user_role_binding
from tests.support.operator_process import install_crd
from tests.support.policies import TRUSTED_POLICY
from tests.support.waiting import ProcessOutput

pytestmark = pytest.mark.slow  # a control plane and the operator

REPO = Path(__file__).resolve().parents[1]
NS = "ml"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
OPERATOR_ENV = {
    "KUBETUNE_DEFAULT_IMAGE": "registry.invalid/kubetune/trainer:test",
    "KUBETUNE_DEFAULT_POD_ANNOTATIONS": json.dumps({HOLD_ANNOTATION: "true"}),
    "KUBETUNE_DEFAULT_OUTPUT_URI_PREFIX": "s3://platform-runs",
    "KUBETUNE_DEFAULT_POLICY": json.dumps(TRUSTED_POLICY),
}
USERS = {
    "viewer": (secrets.token_hex(16), []),
    "nobody": (secrets.token_hex(16), []),
    "podlister": (secrets.token_hex(16), []),
}
SHA = "ab" * 32


# ----- fixtures -----


def cri_line(text: str) -> str:
    """One line of a container log file as the container runtime writes it (what the kubelet serves)."""
    return f"2026-01-01T00:00:00.000000000Z stdout F {text}\n"


def kwok_config(directory: Path, log_file: Path, namespace: str = NS) -> Path:
    """The test stages plus a ClusterLogs: kwok serves `log_file` as the trainer container's log in `namespace`."""
    path = directory / "kwok.yaml"
    path.write_text(
        STAGES_FILE.read_text()
        + "\n---\n"
        + yaml.safe_dump(
            {
                "apiVersion": "kwok.x-k8s.io/v1alpha1",
                "kind": "ClusterLogs",
                "metadata": {"name": "trainer-logs"},
                "spec": {
                    "selector": {"matchNamespaces": [namespace]},
                    "logs": [{"containers": ["trainer"], "logsFile": str(log_file), "follow": True}],
                },
            }
        )
    )
    return path


def add_node(cp: ControlPlane, name: str, pool: str, serves_logs: bool) -> None:
    """A kwok node with 8 GPUs; with serves_logs its kubelet endpoint is kwok's server on 127.0.0.1 (the
    API server's `pods/log` goes there, and kwok answers from its ClusterLogs)."""
    resources = {
        "cpu": "64",
        "memory": "512Gi",
        "pods": "110",
        "nvidia.com/gpu": "8",
        "ephemeral-storage": "1Ti",
    }
    status: dict[str, Any] = {"capacity": resources, "allocatable": dict(resources)}
    if serves_logs:
        status["addresses"] = [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": "127.0.0.1"},
        ]
        status["daemonEndpoints"] = {"kubeletEndpoint": {"Port": cp.ports["kwok"]}}
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "status": status,
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "type": "kwok",
                    "pool": pool,
                },
            },
        }
    )

    def ready() -> bool:
        node = cp.get_json("node", name)
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = {t["key"] for t in node.get("spec", {}).get("taints") or []}
        return conditions.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints

    cp.wait_for(ready, 60, f"node {name} Ready")


@pytest.fixture(scope="module")
def log_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("logs") / "trainer.log"
    path.write_text(cri_line("rank log: step 1 loss 2.0000") + cri_line("rank log: step 2 loss 1.9000"))
    return path


@pytest.fixture(scope="module")
def cp(request, log_file):
    with make_cluster(
        request, extra_tokens=USERS, stages=kwok_config(log_file.parent, log_file), namespaces=[NS]
    ) as plane:
        for index in range(2):
            add_node(plane, f"gpu-{index}", "gpu", serves_logs=True)
        add_node(plane, "mute-0", "mute", serves_logs=False)
        # viewer: read FineTuneJobs in ml, nothing else
        plane.apply(
            role(
                "ftj-view",
                NS,
                [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch"]}],
            )
        )
        plane.apply(user_role_binding("ftj-view", NS, "viewer", "ftj-view"))
        # podlister: read FineTuneJobs and list pods, but not their logs
        plane.apply(
            role(
                "pod-list",
                NS,
                [
                    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list"]},
                    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                ],
            )
        )
        plane.apply(user_role_binding("pod-list", NS, "podlister", "pod-list"))
        yield plane


@pytest.fixture(scope="module")
def crd(cp):
    """The CRD, installed by the first test that needs it (the earlier ones run without it)."""
    install_crd(cp)
    return cp


@pytest.fixture(scope="module")
def operator(crd, tmp_path_factory):
    with running_operator(crd, tmp_path_factory.mktemp("operator"), OPERATOR_ENV) as op:
        yield op


@pytest.fixture()
def kube(cp, monkeypatch, tmp_path):
    """The admin's kubeconfig in KUBECONFIG, HOME elsewhere (nothing else can be found)."""
    monkeypatch.setenv("KUBECONFIG", cp.kubeconfig)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return cp


def kubetune(capsys, *args: str) -> tuple[int, str, str]:
    """`kubetune ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    return chat_job(
        name,
        **{
            "output": {"uri": f"s3://runs/{name}/"},
            "resources": {"nodes": 2, "gpusPerNode": 1, "nodeSelector": {"pool": "gpu"}},
            **spec,
        },
    )


def apply_job(cp: ControlPlane, name: str, **spec: Any) -> None:
    """Apply `manifest(name, **spec)` in namespace ml as the admin."""
    cp.apply({**manifest(name, **spec), "metadata": {"name": name, "namespace": NS}})


def cli_env(cp: ControlPlane, **extra: str) -> dict[str, str]:
    """The environment of a `kubetune` process of this checkout with the admin's kubeconfig."""
    return {
        **os.environ,
        "KUBECONFIG": cp.kubeconfig,
        "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer_image'}",
        **extra,
    }


def cli_process(cp: ControlPlane, *args: str, **extra_env: str) -> subprocess.Popen[str]:
    """`python -m kubetune.cli ARGS` as a process, stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=cli_env(cp, **extra_env),
    )


def write(tmp_path: Path, body: dict[str, Any]) -> str:
    path = tmp_path / f"{body['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def ftj(api: client.ApiClient, name: str) -> dict[str, Any] | None:
    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
    except client.exceptions.ApiException as error:
        if error.status == 404:
            return None
        raise


def wait_status(cp: ControlPlane, api: client.ApiClient, name: str, check, what: str, timeout: float = 60):
    return cp.wait_for(
        lambda: (lambda st: st if check(st) else None)((ftj(api, name) or {}).get("status") or {}),
        timeout,
        f"{name}: {what}",
    )


def patch_status(api: client.ApiClient, name: str, status: dict[str, Any]) -> None:
    """Write what the trainer writes (merge patch of .status)."""
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, name, {"status": status}
    )


def worker_pods(api: client.ApiClient, name: str, attempt: int, phase: str = "Running") -> list[dict]:
    items = (
        client.CoreV1Api(api)
        .list_namespaced_pod(NS, label_selector=f"kubetune.io/job-name={name},kubetune.io/attempt={attempt}")
        .items
    )
    return [api.sanitize_for_serialization(p) for p in items if p.status.phase == phase]


def running(
    cp: ControlPlane, api: client.ApiClient, name: str, attempt: int = 1, count: int = 2
) -> list[dict]:
    return cp.wait_for(
        lambda: (lambda ps: ps if len(ps) == count else None)(worker_pods(api, name, attempt)),
        60,
        f"{count} running pods of {name}",
    )


def progress(step: int, total: int = 100) -> dict[str, Any]:
    return {
        "step": step,
        "totalSteps": total,
        "percent": step * 100 // total,
        "loss": 2.0 - step / 100,
        "tokensPerSecond": 1234.0,
        "trainedTokens": step * 4096,
        "etaSeconds": (total - step) * 2,
    }


FINISHED = {
    "progress": progress(100),
    "checkpoint": {
        "step": 100,
        "uri": "s3://runs/{name}/checkpoints/step-100",
        "time": "2026-01-01T00:00:00Z",
    },
    "artifacts": [
        {"kind": "adapter", "uri": "s3://runs/{name}/exports/adapter", "sha256": SHA, "sizeBytes": 1234567},
        {
            "kind": "merged",
            "uri": "s3://runs/{name}/exports/merged",
            "sha256": "cd" * 32,
            "sizeBytes": 270000000,
        },
    ],
    "metrics": {
        "baselinePerplexity": 12.5,
        "finalPerplexity": 6.25,
        "baselineEvalLoss": 2.5257,
        "finalEvalLoss": 1.8326,
    },
}


def finished(name: str) -> dict[str, Any]:
    return json.loads(json.dumps(FINISHED).replace("{name}", name))


# ----- errors before anything is installed -----


def test_crd_not_installed_is_named(cp, kube, capsys) -> None:
    installed = cp.kubectl("get", "crd", f"{PLURAL}.{GROUP}", check=False).returncode == 0
    if installed:  # run out of order (-k, -p randomly): take it away for this test and put it back after
        cp.kubectl("delete", "crd", f"{PLURAL}.{GROUP}", "--wait=true", timeout=120)
        cp.wait_for(
            lambda: cp.kubectl("api-resources", "--api-group", GROUP, "-o", "name").stdout.strip() == "",
            60,
            "FineTuneJob API gone",
        )
    try:
        code, out, err = kubetune(capsys, "get", "-n", NS)
        assert code == cluster.EXIT_CLUSTER
        assert "FineTuneJob CRD (finetunejobs.kubetune.io) is not installed" in err
        assert "helm install kubetune charts/kubetune" in err and "kubetune crd | kubectl apply -f -" in err
        code, _, err = kubetune(capsys, "describe", "anything", "-n", NS)
        assert code == cluster.EXIT_CLUSTER and "is not installed" in err
    finally:
        if installed:
            install_crd(cp)


def test_no_kubeconfig(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = kubetune(capsys, "get")
    assert code == cluster.EXIT_CLUSTER
    assert "no kubeconfig: set KUBECONFIG or pass --kubeconfig FILE" in err and str(tmp_path) in err
    code, _, err = kubetune(capsys, "get", "--kubeconfig", str(tmp_path / "missing.yaml"))
    assert code == cluster.EXIT_CLUSTER and "missing.yaml (--kubeconfig) does not exist" in err


def test_unknown_context_and_unreachable_server(kube, tmp_path, capsys) -> None:
    code, _, err = kubetune(capsys, "get", "--context", "prod")
    assert code == cluster.EXIT_CLUSTER
    assert "context 'prod' (--context) is not in" in err and "kubetune-test" in err
    config = json.loads(Path(kube.kubeconfig).read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    path = tmp_path / "down.kubeconfig"
    path.write_text(json.dumps(config))
    code, _, err = kubetune(capsys, "get", "--kubeconfig", str(path))
    assert code == cluster.EXIT_CLUSTER and "cannot reach the API server https://127.0.0.1:1" in err


# ----- with the CRD and the operator -----


def test_submit_refuses_an_invalid_manifest_with_validates_messages(kube, operator, tmp_path, capsys) -> None:
    body = manifest("bad-one", method={"type": "qlora"})
    path = write(tmp_path, body)
    code, _, submitted = kubetune(capsys, "submit", path, "-n", NS)
    assert code == 3
    vcode, _, validated = kubetune(capsys, "validate", path)
    assert (
        vcode == 3
        and submitted == validated
        and "spec.method.quantization: required when type is qlora" in submitted
    )
    assert kube.kubectl("-n", NS, "get", "ftj", "bad-one", check=False).returncode != 0  # nothing was sent
    clash = write(tmp_path, {**manifest("ns-clash"), "metadata": {"name": "ns-clash", "namespace": "other"}})
    code, _, err = kubetune(capsys, "submit", clash, "-n", NS)
    assert code == cluster.EXIT_CLUSTER and "does not match -n 'ml'" in err


def test_submit_get_describe_and_server_side_apply(kube, operator, api, tmp_path, capsys) -> None:
    path = write(tmp_path, manifest("alpha"))
    code, out, err = kubetune(capsys, "submit", path, "-n", NS)
    assert code == 0, err
    assert "finetunejob.kubetune.io/alpha created in namespace ml" in out
    assert "kubetune watch alpha -n ml" in out and "kubetune logs alpha -n ml -f" in out
    managers = {m["manager"]: m["operation"] for m in ftj(api, "alpha")["metadata"]["managedFields"]}
    assert managers.get("kubetune") == "Apply"
    code, out, _ = kubetune(capsys, "submit", path, "-n", NS)
    assert code == 0 and "alpha unchanged" in out
    body = manifest("alpha", runPolicy={"maxRestarts": 5})
    code, out, err = kubetune(capsys, "submit", write(tmp_path, body), "-n", NS)
    assert code == 0 and "alpha configured" in out, err
    assert ftj(api, "alpha")["spec"]["runPolicy"]["maxRestarts"] == 5
    body = manifest("alpha", training={"learningRate": 0.0005})  # the API server's refusal, as it says it
    code, out, err = kubetune(capsys, "submit", write(tmp_path, body), "-n", NS)
    assert (
        code == cluster.EXIT_CLUSTER and "the API server rejected patch finetunejobs.kubetune.io alpha" in err
    )
    assert "spec.training is immutable" in err

    running(kube, api, "alpha")
    wait_status(kube, api, "alpha", lambda st: st.get("phase") == "Running", "Running")
    patch_status(api, "alpha", {"progress": progress(40)})
    code, out, _ = kubetune(capsys, "get", "-n", NS)
    assert code == 0
    header, row = (
        out.splitlines()[0].split(),
        next(line for line in out.splitlines() if line.startswith("alpha")),
    )
    assert header == ["NAME", "PHASE", "PROGRESS", "LOSS", "TOKENS/S", "ETA", "RESTARTS", "AGE"]
    assert row.split()[:5] == ["alpha", "Running", "40/100", "(40%)", "1.6000"]
    assert "1234" in row and "2m00s" in row
    code, out, _ = kubetune(capsys, "get", "alpha", "-n", NS, "-o", "json")
    assert code == 0 and json.loads(out)["status"]["progress"]["step"] == 40
    code, out, _ = kubetune(capsys, "get", "-n", NS, "-o", "yaml")
    listed = yaml.safe_load(out)
    assert listed["kind"] == "List" and "alpha" in [i["metadata"]["name"] for i in listed["items"]]
    code, out, _ = kubetune(capsys, "get", "-A")
    assert code == 0 and out.splitlines()[0].startswith("NAMESPACE") and "ml" in out

    code, out, _ = kubetune(capsys, "describe", "alpha", "-n", NS)
    assert code == 0
    for text in (
        "Name:         alpha",
        "Model:      bundled://smollm2-135m-instruct",
        "2 node(s) x 1 GPU(s), ddp",
        "Phase:      Running",
        "step 40/100 (40%), loss 1.6000",
        "Conditions:",
        "Running",
        "Events:",
        "Checkpoint:   <none>",
        "Artifacts:    <none>",
    ):
        assert text in out, (text, out)
    code, _, err = kubetune(capsys, "describe", "nope", "-n", NS)
    assert (
        code == cluster.EXIT_CLUSTER and "finetunejobs.kubetune.io 'nope' not found in namespace 'ml'" in err
    )


def test_context_namespace_is_the_default(kube, operator, tmp_path, capsys, monkeypatch) -> None:
    config = json.loads(Path(kube.kubeconfig).read_text())
    config["contexts"][0]["context"]["namespace"] = NS
    path = tmp_path / "ml.kubeconfig"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    apply_job(kube, "ctx-ns")
    code, out, _ = kubetune(capsys, "get")
    assert code == 0 and "ctx-ns" in out
    code, out, _ = kubetune(capsys, "get", "--context", "kubetune-test", "-n", "default")
    assert code == 0 and "ctx-ns" not in out


def test_watch_succeeds_with_the_summary(kube, operator, api, tmp_path, capsys) -> None:
    apply_job(kube, "beta")
    pods = running(kube, api, "beta")
    wait_status(kube, api, "beta", lambda st: st.get("phase") == "Running", "Running")
    patch_status(api, "beta", {"progress": progress(10)})
    proc = cli_process(kube, "watch", "beta", "-n", NS, "--timeout", "90", PYTHONUNBUFFERED="1")
    output = ProcessOutput(proc)
    output.wait_for_stdout("step 10/100", 60)
    for step in (50, 90):
        patch_status(api, "beta", {"progress": progress(step)})
        output.wait_for_stdout(f"step {step}/100", 60)
    patch_status(api, "beta", finished("beta"))
    for pod in pods:
        kube.release_pod(NS, pod["metadata"]["name"])
    out, err = output.communicate(timeout=90)
    assert proc.returncode == 0, (out, err)
    assert "beta: Running  step 10/100 (10%)" in out
    assert "step 50/100 (50%)  loss 1.5000  1234 tokens/s  ETA 1m40s" in out and "step 90/100" in out
    assert "Finished beta: 100 steps, 409,600 tokens trained" in out
    assert "held-out perplexity 12.500 -> 6.250  (loss 2.5257 -> 1.8326)" in out
    assert f"adapter    s3://runs/beta/exports/adapter  sha256:{SHA[:12]}  1,234,567 bytes" in out

    code, out, _ = kubetune(capsys, "artifacts", "beta", "-n", NS)
    assert code == 0 and f"adapter   s3://runs/beta/exports/adapter   {SHA}   1.2 MiB" in out
    code, out, _ = kubetune(capsys, "artifacts", "beta", "-n", NS, "-o", "json")
    assert json.loads(out)[0]["sha256"] == SHA
    code, out, _ = kubetune(capsys, "checkpoints", "beta", "-n", NS)
    assert (
        code == 0
        and "100    s3://runs/beta/checkpoints/step-100   2026-01-01T00:00:00Z   status (latest)" in out
    )
    code, out, _ = kubetune(capsys, "describe", "beta", "-n", NS)
    assert "perplexity 12.500 -> 6.250, eval loss 2.5257 -> 1.8326" in out and SHA in out
    assert "Succeeded" in out and "step 100 s3://runs/beta/checkpoints/step-100" in out
    code, out, _ = kubetune(capsys, "watch", "beta", "-n", NS, "--quiet")  # already finished: at once
    assert code == 0 and "Finished beta" in out
    code, _, err = kubetune(capsys, "suspend", "beta", "-n", NS)
    assert code == cluster.EXIT_CLUSTER and "already Succeeded" in err


def test_submit_wait_exits_with_the_failure(kube, operator, api, tmp_path) -> None:
    path = write(tmp_path, manifest("gamma", runPolicy={"maxRestarts": 0}))
    proc = cli_process(kube, "submit", path, "-n", NS, "--wait", "--timeout", "90", PYTHONUNBUFFERED="1")
    output = ProcessOutput(proc)
    pods = running(kube, api, "gamma")
    wait_status(kube, api, "gamma", lambda st: st.get("phase") == "Running", "Running")
    patch_status(api, "gamma", {"progress": progress(5)})
    output.wait_for_stdout("step 5/100", 60)
    kube.fail_pod(NS, pods[0]["metadata"]["name"], exit_code=3, message="bad row data.jsonl:7")
    out, err = output.communicate(timeout=90)
    assert proc.returncode == cluster.EXIT_FAILED, (out, err)
    assert "finetunejob.kubetune.io/gamma created in namespace ml" in out
    assert "gamma: Running  step 5/100 (5%)" in out
    assert "FineTuneJob gamma failed: ConfigError: pod gamma-1-" in err and "exit code 3" in err


def test_watch_timeout_and_deleted(kube, operator, api, capsys) -> None:
    apply_job(kube, "delta")
    running(kube, api, "delta")
    code, out, err = kubetune(capsys, "watch", "delta", "-n", NS, "--timeout", "2")
    assert code == cluster.EXIT_TIMEOUT and "delta is still Running after 2s (--timeout)" in err


def test_suspend_resume_cancel(kube, operator, api, capsys) -> None:
    apply_job(kube, "eps")
    running(kube, api, "eps")
    patch_status(api, "eps", {"checkpoint": {"step": 20, "uri": "s3://runs/eps/checkpoints/step-20"}})
    code, out, err = kubetune(capsys, "suspend", "eps", "-n", NS)
    assert code == 0, err
    assert "eps suspended" in out and "kubetune resume eps -n ml" in out
    assert ftj(api, "eps")["spec"]["suspend"] is True
    wait_status(kube, api, "eps", lambda st: st.get("phase") == "Suspended", "Suspended")
    kube.wait_for(lambda: not worker_pods(api, "eps", 1), 60, "eps's pods gone")
    code, out, _ = kubetune(capsys, "resume", "eps", "-n", NS)
    assert code == 0 and "eps resumed" in out and ftj(api, "eps")["spec"]["suspend"] is False
    attempt = wait_status(
        kube,
        api,
        "eps",
        lambda st: st.get("phase") == "Running" and st.get("attempt", 0) > 1,
        "Running again",
    )["attempt"]
    running(kube, api, "eps", attempt)

    code, out, _ = kubetune(capsys, "cancel", "eps", "-n", NS, "--wait", "--timeout", "60")
    assert code == 0
    assert "finetunejob.kubetune.io/eps deleted (cancelled)" in out
    assert "outputs under s3://runs/eps/ are kept; latest complete checkpoint: step 20" in out
    assert ftj(api, "eps") is None
    kube.wait_for(
        lambda: (
            not client.BatchV1Api(api)
            .list_namespaced_job(NS, label_selector="kubetune.io/job-name=eps")
            .items
        ),
        60,
        "eps's Jobs garbage-collected",
    )
    code, _, err = kubetune(capsys, "cancel", "eps", "-n", NS)
    assert code == cluster.EXIT_CLUSTER and "'eps' not found" in err


def test_watch_reports_a_deletion(kube, operator, api) -> None:
    apply_job(kube, "zeta")
    proc = cli_process(kube, "watch", "zeta", "-n", NS, "--timeout", "60", PYTHONUNBUFFERED="1")
    output = ProcessOutput(proc)
    running(kube, api, "zeta")
    output.wait_for_stdout("zeta: Running", 60)  # the watch has seen the job
    kube.kubectl("-n", NS, "delete", "ftj", "zeta", "--wait=false")
    out, err = output.communicate(timeout=60)
    assert proc.returncode == cluster.EXIT_FAILED and "FineTuneJob zeta was deleted" in err


def test_logs_selects_the_current_attempt_and_rank(kube, operator, api, capsys, monkeypatch) -> None:
    apply_job(kube, "eta")
    code, _, err = kubetune(
        capsys, "logs", "eta", "-n", NS
    )  # before the operator's first reconcile, or no pods
    assert code in (0, cluster.EXIT_CLUSTER)
    pods = running(kube, api, "eta")
    code, _, err = kubetune(capsys, "logs", "eta", "-n", NS, "--rank", "5")
    assert code == cluster.EXIT_CLUSTER and "no pods for rank 5 of attempt 1 of eta" in err
    asked: list[tuple[str, dict]] = []

    def fake_stream(cl, pod, follow, tail, prefix, lock) -> None:  # what the API would be asked
        asked.append((pod["metadata"]["name"], {"follow": follow, "tail": tail, "prefix": prefix}))

    monkeypatch.setattr(cluster, "_stream_log", fake_stream)
    code, _, _ = kubetune(capsys, "logs", "eta", "-n", NS, "--rank", "1", "-f", "--tail", "5")
    rank1 = next(p["metadata"]["name"] for p in pods if cluster.rank_of(p) == 1)
    assert code == 0 and asked == [(rank1, {"follow": True, "tail": 5, "prefix": ""})]
    asked.clear()
    code, _, _ = kubetune(capsys, "logs", "eta", "-n", NS)
    assert sorted(p for _, p in [(n, a["prefix"]) for n, a in asked]) == ["[rank 0] ", "[rank 1] "]
    monkeypatch.undo()


def test_logs_of_the_pods(kube, operator, api, log_file, tmp_path, capsys) -> None:
    """kwok serves the trainer container's log (a ClusterLogs file) through the API server's pods/log."""
    apply_job(kube, "theta")
    running(kube, api, "theta")
    code, out, err = kubetune(capsys, "logs", "theta", "-n", NS, "--rank", "0")
    assert code == 0, err
    assert out == "rank log: step 1 loss 2.0000\nrank log: step 2 loss 1.9000\n"
    code, out, err = kubetune(capsys, "logs", "theta", "-n", NS, "--tail", "1")
    assert code == 0, err
    assert sorted(out.splitlines()) == [
        "[rank 0] rank log: step 2 loss 1.9000",
        "[rank 1] rank log: step 2 loss 1.9000",
    ]
    proc = cli_process(kube, "logs", "theta", "-n", NS, "--rank", "1", "-f")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "rank log: step 1 loss 2.0000\n"
        assert proc.stdout.readline() == "rank log: step 2 loss 1.9000\n"
        with open(log_file, "a") as handle:
            handle.write(cri_line("rank log: step 3 loss 1.8000"))
        assert proc.stdout.readline() == "rank log: step 3 loss 1.8000\n"  # followed
    finally:
        proc.terminate()
        proc.wait(10)


def test_logs_when_the_node_serves_none(kube, operator, api, capsys) -> None:
    """A node without a kubelet endpoint: the API server's refusal is reported with the pod."""
    apply_job(kube, "mute", resources={"nodes": 1, "gpusPerNode": 1, "nodeSelector": {"pool": "mute"}})
    running(kube, api, "mute", count=1)
    code, _, err = kubetune(capsys, "logs", "mute", "-n", NS)
    assert code == cluster.EXIT_CLUSTER
    assert "cannot read the log of pod mute-1-0-" in err and "(rank 0, Running on mute-0)" in err, err


def test_rbac_denials_name_verb_and_resource(kube, operator, capsys) -> None:
    apply_job(kube, "iota")
    nobody = kube.kubeconfig_for("nobody")
    code, _, err = kubetune(capsys, "get", "-n", NS, "--kubeconfig", nobody)
    assert code == cluster.EXIT_CLUSTER
    assert "RBAC denied: cannot list finetunejobs.kubetune.io in namespace 'ml'" in err
    assert 'User "nobody"' in err and "granting 'list' on 'finetunejobs.kubetune.io'" in err
    viewer = kube.kubeconfig_for("viewer")
    code, out, _ = kubetune(capsys, "get", "-n", NS, "--kubeconfig", viewer)
    assert code == 0 and "iota" in out
    code, _, err = kubetune(capsys, "suspend", "iota", "-n", NS, "--kubeconfig", viewer)
    assert code == cluster.EXIT_CLUSTER and "RBAC denied: cannot patch finetunejobs.kubetune.io" in err
    code, _, err = kubetune(capsys, "cancel", "iota", "-n", NS, "--kubeconfig", viewer)
    assert code == cluster.EXIT_CLUSTER and "RBAC denied: cannot delete finetunejobs.kubetune.io" in err
    code, _, err = kubetune(
        capsys, "submit", write(Path(kube.dir), manifest("iota2")), "-n", NS, "--kubeconfig", viewer
    )
    assert code == cluster.EXIT_CLUSTER and "RBAC denied: cannot patch finetunejobs.kubetune.io" in err
    code, _, err = kubetune(capsys, "logs", "iota", "-n", NS, "--kubeconfig", viewer)
    assert code == cluster.EXIT_CLUSTER and "RBAC denied: cannot list pods in namespace 'ml'" in err
    running(kube, kube.api_client(), "iota")
    code, _, err = kubetune(
        capsys, "logs", "iota", "-n", NS, "--rank", "0", "--kubeconfig", kube.kubeconfig_for("podlister")
    )
    assert code == cluster.EXIT_CLUSTER and "RBAC denied: cannot get pods/log in namespace 'ml'" in err
    assert "granting 'get' on 'pods/log'" in err
    code, out, _ = kubetune(capsys, "describe", "iota", "-n", NS, "--kubeconfig", viewer)
    assert code == 0 and "Events:       <RBAC denied: cannot list events" in out


def test_kubectl_plugin(kube, operator, tmp_path) -> None:
    """`kubectl kubetune get` finds kubectl-kubetune on PATH and runs the same commands."""
    apply_job(kube, "kappa")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    plugin = bindir / "kubectl-kubetune"
    plugin.write_text(
        f"#!{sys.executable}\nimport sys\nfrom kubetune.cluster import plugin_main\nsys.exit(plugin_main())\n"
    )
    plugin.chmod(0o755)
    env = cli_env(kube, PATH=f"{bindir}:{os.environ['PATH']}")

    def kubectl_kubetune(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kube.bin_dir / "kubectl"), "kubetune", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    result = kubectl_kubetune("get", "kappa", "-n", NS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:2] == ["NAME", "PHASE"] and "kappa" in result.stdout
    result = kubectl_kubetune("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: kubectl kubetune")
    result = kubectl_kubetune("get", "nope", "-n", NS)
    assert result.returncode == cluster.EXIT_CLUSTER and "'nope' not found" in result.stderr


# ----- without a cluster -----


def test_readme_cluster_commands_parse() -> None:
    """Every `kubetune ...` line of the README's "Use it on a cluster" block is a valid command line."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Use it on a cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].split() for line in block.splitlines() if line.strip()]
    parser = cli.build_parser()
    commands = set()
    for words in lines:
        words = words[1:] if words[0] == "kubectl" else words
        assert words[0] == "kubetune", words
        args = parser.parse_args(words[1:])
        commands.add(args.command)
    assert commands == {
        "submit",
        "get",
        "describe",
        "watch",
        "logs",
        "checkpoints",
        "artifacts",
        "suspend",
        "resume",
        "cancel",
    }


def test_watch_draws_a_bar_on_a_terminal(monkeypatch) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    bar = cluster._Bar("job", quiet=False)
    assert bar.live is not None
    bar.update({"phase": "Running", "progress": progress(30)})
    bar.update({"phase": "Succeeded", "progress": progress(100)})
    bar.stop()
    monkeypatch.undo()
    assert "step 100/100 (100%)" in screen.getvalue() and "Succeeded" in screen.getvalue()


def test_plugin_entry_point(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["kubectl-kubetune", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cluster.plugin_main()
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: kubectl kubetune")


def test_checkpoints_from_storage(kube, operator, api, tmp_path, capsys) -> None:
    """--storage lists the output's complete checkpoints (here a local output directory)."""
    from kubetune.checkpoints import write_manifest

    output = tmp_path / "out"
    for step in (100, 200, 300):
        directory = output / "checkpoints" / f"step-{step}"
        directory.mkdir(parents=True)
        (directory / "adapter_model.safetensors").write_bytes(b"w" * step)
        if step != 300:  # step 300 is still being written: no manifest, not complete
            write_manifest(directory, step, "cfg")
    apply_job(kube, "lam", output={"uri": str(output)})
    wait_status(kube, api, "lam", lambda st: st.get("phase") in ("Pending", "Running"), "reconciled")
    patch_status(api, "lam", {"checkpoint": {"step": 200, "uri": f"{output}/checkpoints/step-200"}})
    code, out, err = kubetune(capsys, "checkpoints", "lam", "-n", NS, "--storage")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("100", f"{output}/checkpoints/step-100"),
        ("200", f"{output}/checkpoints/step-200"),
    ]
    assert rows[0][-1] == "storage" and rows[1][-2:] == ["status", "(latest)"]
    code, out, _ = kubetune(capsys, "checkpoints", "lam", "-n", NS, "--storage", "-o", "json")
    assert [c["step"] for c in json.loads(out)] == [100, 200]
    code, out, err = kubetune(capsys, "checkpoints", "alpha-missing", "-n", NS)
    assert code == cluster.EXIT_CLUSTER and "'alpha-missing' not found" in err
