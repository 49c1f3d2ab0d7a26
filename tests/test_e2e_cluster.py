"""End to end: `kubectl apply` of a FineTuneJob trains for real and ends Succeeded.

A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok), a real
S3 server (SeaweedFS) and the operator as a subprocess (running as a ServiceAccount bound to
`OPERATOR_RBAC_RULES` only). The FineTuneJob asks for 2 nodes x 1 process on CPU (gloo), LoRA on a
tiny llama read from S3, and writes checkpoints and exports to S3 with the keys from a Secret.

There is no container runtime here, so `tests/support/kubelet.py` plays the kubelet of the two
worker pods: it reads each pod the Job controller created from the API server and runs exactly
its command and environment (ConfigMap volume at /etc/kubetune, emptyDirs, the projected
ServiceAccount token from the TokenRequest API, `$(JOB_COMPLETION_INDEX)` expanded from the
Job controller's annotation, Secret values by secretKeyRef, pod DNS names on loopback) as local
processes in per-pod mount namespaces, as uid 1000, and reports each exit to the control plane.
Nothing the operator rendered is changed. kwok keeps the pods Running meanwhile (the platform
default pod annotation `kubetune.test/hold`).

Checked: the phase goes Pending -> Running -> Succeeded; rank 0 patches `status.progress` during
training through its own token (several distinct, increasing steps seen while Running, each at
most 30 s behind the trainer's own log line for that step); `status.checkpoint` names a complete
checkpoint (manifest present) in S3; exports, summary.json and `status.artifacts` with digests
that match the S3 manifests; baseline and final perplexity; both pods joined one world of 2; the
S3 secret key appears in no object, event, operator log line or pod log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch

from kubetune import storage
from kubetune.checkpoints import CheckpointStore
from tests.support.controlplane import HOLD_ANNOTATION, ControlPlane
from tests.support.kubelet import LocalKubelet
from tests.support.operator_process import OperatorProcess, install_crd, service_account_kubeconfig
from tests.support.policies import TRUSTED_POLICY
from tests.support.trainer_fixtures import PYDOC

NS = "e2e"
NAME = "tiny-e2e"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
STEPS = 40
CHECKPOINT_EVERY = 10
RENDEZVOUS_PORT = 29500  # fixed by the rendered command (each pod has its own network in a cluster)
PHASE_ORDER = ["Pending", "Initializing", "Running", "Succeeded"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test kubelet needs root for mount namespaces")


# ----- the operator -----

# The operator runs as a ServiceAccount with OPERATOR_RBAC_RULES; kwok keeps the worker pods Running
# while the test kubelet runs their processes.
OPERATOR_ENV = {
    "KUBETUNE_DEFAULT_IMAGE": "registry.invalid/kubetune/trainer:test",
    "KUBETUNE_DEFAULT_POD_ANNOTATIONS": json.dumps({HOLD_ANNOTATION: "true"}),
    "KUBETUNE_DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS": "30",
    "KUBETUNE_DEFAULT_POLICY": json.dumps(TRUSTED_POLICY),  # one trusted team: the older tests' fields
}


@pytest.fixture(scope="module")
def cp(request):
    failed_before = request.session.testsfailed
    with ControlPlane() as plane:
        for index in range(2):
            plane.add_fake_node(f"cpu-{index}", gpus=0, cpu="8", memory="32Gi")
        plane.create_namespace(NS, labels={"pod-security.kubernetes.io/enforce": "restricted",
                                           "pod-security.kubernetes.io/enforce-version": "latest"})
        install_crd(plane)
        yield plane
        if request.session.testsfailed > failed_before:
            print(plane.diagnostics(20))


@pytest.fixture(scope="module")
def operator(cp, s3_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("e2e-operator")
    # the job names this test's S3 server as its endpoint: the platform allows exactly that one
    policy = {**TRUSTED_POLICY, "allowedS3Endpoints": [s3_server.endpoint_url]}
    env = {**OPERATOR_ENV, "KUBETUNE_DEFAULT_POLICY": json.dumps(policy)}
    op = OperatorProcess(cp, directory / "operator.log", service_account_kubeconfig(cp, directory), env=env)
    op.start()
    yield op
    op.stop()


# ----- helpers -----

class StatusWatch:
    """Every version of the FineTuneJob's status, with the local time it was seen (a watch, not polling)."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str):
        self.custom = client.CustomObjectsApi(api)
        self.namespace, self.name = namespace, name
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._watch = watch.Watch()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftj-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        resource_version = None
        while not self._stopped.is_set():
            try:
                for event in self._watch.stream(
                        self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                        field_selector=f"metadata.name={self.name}", resource_version=resource_version,
                        timeout_seconds=60):
                    obj = event["object"]
                    resource_version = obj["metadata"]["resourceVersion"]
                    self.seen.append((time.time(), json.loads(json.dumps(obj.get("status") or {}))))
                    if self._stopped.is_set():
                        return
            except Exception:  # noqa: BLE001 - e.g. 410 Gone: start over from now
                resource_version = None
                time.sleep(0.2)

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()

    def phases(self) -> list[str]:
        out: list[str] = []
        for _, status in self.seen:
            phase = status.get("phase")
            if phase and (not out or out[-1] != phase):
                out.append(phase)
        return out


def wait_port_free(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} (the rendered rendezvous port) stays busy on this machine; "
                                       "another torchrun is running") from None
        time.sleep(1)


def job_manifest(prefix: str, endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "model": {"source": f"{prefix}/models/tiny/"},
            "method": {"type": "lora"},
            "task": {"type": "instruction"},
            "datasets": [{"source": f"{prefix}/data/pydoc.jsonl", "maxExamples": 200}],
            "training": {"maxSteps": STEPS, "batchSizePerDevice": 4, "maxSeqLength": 128, "loggingSteps": 1,
                         "learningRate": 1e-3},
            "checkpoint": {"everySteps": CHECKPOINT_EVERY, "keepLast": 2},
            "evaluation": {"numSamplePrompts": 1, "maxNewTokens": 4},
            "output": {"uri": f"{prefix}/run/", "exports": ["adapter", "merged"]},
            "storage": {"s3": {"endpointUrl": endpoint, "region": "us-east-1", "addressingStyle": "path"},
                        "credentialsSecretRef": {"name": "s3-creds"}},
            "tracking": {"tensorboard": False},
            "resources": {"nodes": 2, "gpusPerNode": 0, "strategy": "ddp", "cpu": "1", "memory": "4Gi",
                          "sharedMemory": "256Mi"},
        },
    }


def parse_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


# ----- the test -----

def test_apply_finetunejob_trains_to_succeeded(cp, operator, s3_server, s3_prefix, tiny_model, tmp_path: Path):
    api = cp.api_client()
    core = client.CoreV1Api(api)
    options = s3_server.options()
    storage.upload_tree(tiny_model, f"{s3_prefix}/models/tiny/", last=(), options=options)
    storage.upload_file(PYDOC, f"{s3_prefix}/data/pydoc.jsonl", options=options)
    secret_value = s3_server.secret_key
    cp.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": NS},
              "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": secret_value}})
    output = f"{s3_prefix}/run"

    statuses = StatusWatch(api, NS, NAME)
    kubelet = LocalKubelet(cp, tmp_path / "kubelet")
    started = time.monotonic()
    try:
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(job_manifest(s3_prefix, s3_server.endpoint_url)))

        # the Job controller creates the two indexed pods, kwok runs them (held)
        def running_pods() -> list[dict[str, Any]] | None:
            items = core.list_namespaced_pod(NS, label_selector=f"kubetune.io/job-name={NAME}").items
            pods = [api.sanitize_for_serialization(p) for p in items]
            running = [p for p in pods if p["status"].get("phase") == "Running"]
            return running if len(running) == 2 else None

        pods = sorted(cp.wait_for(running_pods, 90, "2 running worker pods"),
                      key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))
        assert [p["spec"]["hostname"] for p in pods] == [f"{NAME}-1-0", f"{NAME}-1-1"]
        wait_port_free(RENDEZVOUS_PORT, 120)

        # the kubelet's part: run each pod's container as a local process, report its exit
        workers = [kubelet.start_pod(NS, p["metadata"]["name"]) for p in pods]
        try:
            kubelet.wait(workers, timeout=240)
        finally:
            for worker in workers:
                print(f"===== {worker.name} (exit {worker.exit_code}) =====\n{worker.log()[-6000:]}")
        assert [w.exit_code for w in workers] == [0, 0]

        def succeeded() -> dict[str, Any] | None:
            obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
            return obj if (obj.get("status") or {}).get("phase") == "Succeeded" else None

        final_obj = cp.wait_for(succeeded, 60, f"{NAME} Succeeded")
        elapsed = time.monotonic() - started
    finally:
        time.sleep(0.5)  # the watch sees the last version
        statuses.stop()
        kubelet.close()
    print(f"apply -> Succeeded in {elapsed:.1f} s; phases {statuses.phases()}")
    status = final_obj["status"]

    # what ran is what the operator rendered: torchrun with node ranks 0 and 1 from the Job's index
    for index, worker in enumerate(workers):
        argv = worker.argv
        assert argv[:3] == ["python", "-m", "kubetune_trainer.launch"] and argv[argv.index("--node-rank") + 1] == str(index), argv
        assert argv[argv.index("--master-addr") + 1] == f"{NAME}-1-0.{NAME}"
        assert "JOB_COMPLETION_INDEX" in worker.env_names and "AWS_SECRET_ACCESS_KEY" in worker.env_names

    # phases: Pending (or Initializing) -> Running -> Succeeded, never backwards
    phases = statuses.phases()
    assert phases[0] in ("Pending", "Initializing") and phases[-1] == "Succeeded", phases
    assert "Running" in phases and all(p in PHASE_ORDER for p in phases), phases
    assert [PHASE_ORDER.index(p) for p in phases] == sorted(PHASE_ORDER.index(p) for p in phases), phases

    # progress: patched by rank 0 during training, fresh against the trainer's own log lines
    rank0_log = workers[0].lines
    printed: dict[int, float] = {}
    for moment, line in rank0_log:
        match = re.match(rf"step (\d+)/{STEPS}\b", line)
        if match:
            printed.setdefault(int(match.group(1)), moment)
    assert set(range(1, STEPS + 1)) <= set(printed), sorted(printed)
    running_progress = [(seen_at, st["progress"]) for seen_at, st in statuses.seen
                        if st.get("phase") == "Running" and st.get("progress")]
    steps = [p["step"] for _, p in running_progress]
    assert len({s for s in steps if s > 0}) >= 2, steps
    assert steps == sorted(steps), steps
    for seen_at, progress in running_progress:
        step = progress["step"]
        assert progress["totalSteps"] == STEPS
        if step == 0:
            continue
        updated = parse_time(progress["updatedAt"])
        assert seen_at - printed[step] <= 30, (step, seen_at - printed[step])
        assert abs(updated - printed[step]) <= 30, (step, progress["updatedAt"], printed[step])
    lags = [seen_at - printed[p["step"]] for seen_at, p in running_progress if p["step"] > 0]
    print(f"progress seen at {len(set(steps))} distinct steps while Running; lag behind the trainer's log: "
          f"max {max(lags):.2f} s, mean {sum(lags) / len(lags):.2f} s")
    assert status["progress"]["step"] == STEPS and status["progress"]["percent"] == 100

    # checkpoints: complete (manifest last) in S3, the status names the latest
    store = CheckpointStore(output, options)
    complete = store.complete_steps()
    assert complete == [STEPS - CHECKPOINT_EVERY, STEPS], complete
    for step in complete:
        assert storage.exists(f"{store.step_uri(step)}/manifest.json", options=options)
    assert status["checkpoint"]["step"] == STEPS
    assert status["checkpoint"]["uri"].rstrip("/") == store.step_uri(STEPS).rstrip("/")

    # exports and the summary in S3; artifacts in the status with digests matching S3
    summary = json.loads(storage.read_bytes(f"{output}/summary.json", options=options))
    assert summary["status"] == "Succeeded" and summary["steps"] == STEPS and summary["worldSize"] == 2
    artifacts = {a["kind"]: a for a in status["artifacts"]}
    assert {"adapter", "merged"} <= set(artifacts), status["artifacts"]
    for artifact in status["artifacts"]:
        assert set(artifact) >= {"kind", "uri", "sha256", "sizeBytes"}, artifact
        assert artifact["uri"].startswith(output + "/")
        if artifact["kind"] in ("adapter", "merged"):
            assert artifact["uri"] == f"{output}/exports/{artifact['kind']}"
            manifest_bytes = storage.read_bytes(f"{artifact['uri']}/manifest.json", options=options)
            manifest = json.loads(manifest_bytes)
            assert hashlib.sha256(manifest_bytes).hexdigest() == artifact["sha256"]
            assert sum(f["size"] for f in manifest["files"]) == artifact["sizeBytes"]
            for entry in manifest["files"]:
                assert storage.exists(f"{artifact['uri']}/{entry['path']}", options=options), entry
        else:  # single files (loss plot, metrics): the digest of the object itself
            data = storage.read_bytes(artifact["uri"], options=options)
            assert hashlib.sha256(data).hexdigest() == artifact["sha256"] and len(data) == artifact["sizeBytes"]
    summary_digests = {a["kind"]: a["sha256"] for a in summary["artifacts"]}
    assert {k: a["sha256"] for k, a in artifacts.items()} == summary_digests

    # metrics
    metrics = status["metrics"]
    assert metrics["baselinePerplexity"] > 0 and metrics["finalPerplexity"] > 0, metrics
    assert metrics["finalPerplexity"] < metrics["baselinePerplexity"], metrics

    # conditions and events
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    events = [api.sanitize_for_serialization(e) for e in core.list_namespaced_event(NS).items]
    reasons = [e["reason"] for e in events if e["involvedObject"].get("kind") == "FineTuneJob"]
    assert "CreatedWorkers" in reasons, reasons

    # the S3 secret key is nowhere: objects, events, operator log, pod logs
    haystacks = {
        "FineTuneJob": json.dumps(final_obj),
        "children": cp.kubectl("-n", NS, "get", "configmaps,services,jobs,pods,serviceaccounts,roles,rolebindings",
                               "-o", "json").stdout,
        "events": json.dumps(events),
        "operator log": operator.log(),
    }
    for worker in workers:
        haystacks[f"log of {worker.name}"] = worker.log() + worker.log_path.read_text(errors="replace")
    for what, text in haystacks.items():
        assert secret_value not in text, f"the S3 secret key appears in the {what}"
    assert elapsed < 240
