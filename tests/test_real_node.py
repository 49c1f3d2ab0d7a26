"""On a real node: `helm install` runs the operator image, `kubectl apply` trains in the trainer image.

tests/support/node.py starts a one-node cluster on this machine: the control plane of
tests/support/controlplane.py, containerd + runc, a real kubelet, kube-proxy and CoreDNS, pods on a
bridge that reaches nothing beyond this machine. The two images are built from the project's own
Dockerfiles by scripts/build-images.sh (Debian bookworm base, every Python package from the hashed
locks) and imported into containerd. A real S3 server (SeaweedFS) listens on the node's bridge
gateway, on this machine.

Checked, in order (the tests share the cluster and run in file order):

* the operator: `helm install` of charts/kubetune with the operator image, into a namespace that
  enforces the `restricted` Pod Security Standard; `--wait` returns once the pod is Ready (kopf's
  /healthz through the real kubelet's probes); `kubectl logs` shows kopf started; inside the
  container (`kubectl exec`) the root filesystem is read-only, the user is 1000 and the API is
  reached at the `kubernetes` Service's ClusterIP (kube-proxy) with the projected token;
* cluster DNS from a pod: the API's Service name resolves, a name outside the cluster does not;
* a 2-node LoRA FineTuneJob (2 pods x 1 process on CPU, gloo, DDP) applied with kubectl in a
  restricted namespace: both pods run in the trainer image on the node, find each other by their
  DNS names, train, checkpoint to S3, export, and the job ends Succeeded with progress patched
  by rank 0 while Running, complete checkpoints, artifacts whose digests match S3, a world of 2,
  the S3 secret in no object, event or log;
* a worker killed mid-training (its container SIGKILLed through containerd) fails the attempt; the
  operator starts attempt 2, which resumes from the latest complete checkpoint and succeeds;
* the operator pod deleted: the Deployment's next pod is Ready;
* two operator replicas (kopf peering): the acting one SIGKILLed, a job created right after is
  still reconciled;
* Pod Security: a privileged pod is refused in the restricted namespace.

The figures (helm install -> Ready, apply -> first step, apply -> Succeeded, kill -> resumed) are
printed, never asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import storage
from kubetune.checkpoints import CheckpointStore
from tests.support.controlplane import ensure_binaries
from tests.support.node import GATEWAY, NODE_NAME, RealNodeCluster
from tests.support.s3server import SeaweedS3
from tests.support.status_watch import PHASE_ORDER, StatusWatch
from tests.support.trainer_fixtures import PYDOC

pytestmark = pytest.mark.slow  # a real node: containerd, CNI, the images

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubetune"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
SYSTEM_NS, NS = "kubetune-system", "ml-team"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
RELEASE = "kubetune"
DEPLOYMENT = "kubetune-operator"
STEPS = 40
CHECKPOINT_EVERY = 10
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def node(request):
    failed_before = request.session.testsfailed
    with RealNodeCluster(images=("operator", "trainer")) as cluster:
        for namespace in (SYSTEM_NS, NS):
            cluster.cp.create_namespace(namespace, labels=RESTRICTED)
        yield cluster
        if request.session.testsfailed > failed_before:
            print(cluster.diagnostics(40))
    print("real node start phases (s): " + json.dumps({k: round(v, 1) for k, v in cluster.timings.items()}))
    print("real node figures (s): " + json.dumps({k: round(v, 1) for k, v in FIGURES.items()}))


@pytest.fixture(scope="module")
def s3(node, tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed-node"), host=GATEWAY)
    server.start()
    yield server
    server.stop()


def helm(node: RealNodeCluster, *args: str, timeout: float = 600) -> str:
    cmd = [str(ensure_binaries(["helm"]) / "helm"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=node.cp.env)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n{node.diagnostics(20)}"
    )
    return r.stdout


def pods(node: RealNodeCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return node.cp.get_json("-n", namespace, "pods", "-l", selector)["items"]


def ftj(node: RealNodeCluster, name: str) -> dict[str, Any]:
    return node.cp.get_json("-n", NS, f"{PLURAL}.{GROUP}", name)


def operator_pod(node: RealNodeCluster) -> dict[str, Any] | None:
    items = [
        p
        for p in pods(node, SYSTEM_NS, "app.kubernetes.io/name=kubetune")
        if not p["metadata"].get("deletionTimestamp")
    ]
    ready = [
        p
        for p in items
        if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]
    return ready[0] if len(ready) == 1 else None


def logs(node: RealNodeCluster, namespace: str, pod: str, *extra: str) -> str:
    return node.cp.kubectl("-n", namespace, "logs", pod, *extra, timeout=60).stdout


def job_manifest(name: str, prefix: str, endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"source": f"{prefix}/models/tiny/"},
            "method": {"type": "lora"},
            "task": {"type": "instruction"},
            "datasets": [{"source": f"{prefix}/data/pydoc.jsonl", "maxExamples": 200}],
            "training": {
                "maxSteps": STEPS,
                "batchSizePerDevice": 4,
                "maxSeqLength": 128,
                "loggingSteps": 1,
                "learningRate": 1e-3,
            },
            "checkpoint": {"everySteps": CHECKPOINT_EVERY, "keepLast": 2},
            "evaluation": {"numSamplePrompts": 1, "maxNewTokens": 4},
            "output": {"uri": f"{prefix}/run/", "exports": ["adapter", "merged"]},
            "storage": {
                "s3": {"endpointUrl": endpoint, "region": "us-east-1", "addressingStyle": "path"},
                "credentialsSecretRef": {"name": "s3-creds"},
            },
            "tracking": {"tensorboard": False},
            # one node has 2 CPUs: the two workers and the operator share them
            "resources": {
                "nodes": 2,
                "gpusPerNode": 0,
                "strategy": "ddp",
                "cpu": "900m",
                "memory": "4Gi",
                "sharedMemory": "256Mi",
            },
        },
    }


def worker_pods(node: RealNodeCluster, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = f"kubetune.io/job-name={name}" + (f",kubetune.io/attempt={attempt}" if attempt else "")
    items = pods(node, NS, selector)
    return sorted(
        items, key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
    )


def parse_stamp(stamp: str) -> float:
    """An RFC 3339 time (the kubelet's log timestamps have nanoseconds) as epoch seconds."""
    base, _, rest = stamp.rstrip("Z").partition(".")
    fraction = float("0." + re.sub(r"\D.*", "", rest)) if rest else 0.0
    return datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp() + fraction


def first_step_time(node: RealNodeCluster, pod: str) -> float | None:
    """Timestamp (kubelet's CRI log) of the first `step N/` line of a pod, or None."""
    r = node.cp.kubectl("-n", NS, "logs", pod, "--timestamps", check=False, timeout=60)
    for line in r.stdout.splitlines():
        stamp, _, text = line.partition(" ")
        if re.match(r"step \d+/", text):
            return parse_stamp(stamp)
    return None


def set_replicas(node: RealNodeCluster, replicas: int) -> None:
    """`helm upgrade --reuse-values --wait` of the release with `replicas` operator replicas."""
    helm(
        node,
        "upgrade",
        RELEASE,
        str(CHART),
        "--namespace",
        SYSTEM_NS,
        "--reuse-values",
        "--wait",
        "--timeout",
        "300s",
        "--set",
        f"replicas={replicas}",
    )


def apply_s3_secret(node: RealNodeCluster, s3: SeaweedS3) -> None:
    """The Secret `s3-creds` in NS (the job manifests' credentialsSecretRef) with the server's keys."""
    node.cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": NS},
            "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
        }
    )


def wait_finished(node: RealNodeCluster, name: str) -> Any:
    """The FineTuneJob `name` once its phase is Succeeded or Failed (15 minutes at most)."""
    return node.wait_for(
        lambda: (o := ftj(node, name)).get("status", {}).get("phase") in ("Succeeded", "Failed") and o,
        900,
        f"{name} finished",
        interval=1.0,
    )


def upload_inputs(s3: SeaweedS3, prefix: str, tiny_model: Path) -> None:
    options = s3.options()
    storage.upload_tree(tiny_model, f"{prefix}/models/tiny/", last=(), options=options)
    storage.upload_file(PYDOC, f"{prefix}/data/pydoc.jsonl", options=options)


# ----- the operator -----


def test_helm_install_runs_the_operator_image(node: RealNodeCluster, s3: SeaweedS3) -> None:
    started = time.monotonic()
    # the chart's tenant policy and admission policies stay on: the platform allows exactly this S3 endpoint
    out = helm(
        node,
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        SYSTEM_NS,
        "--wait",
        "--timeout",
        "300s",
        "--set-json",
        f"policy.allowedS3Endpoints={json.dumps([s3.endpoint_url])}",
        # tenants may name images of the node's own repository (the missing-image test does)
        "--set-json",
        f"policy.allowedImagePrefixes={json.dumps([node.image('trainer').rsplit(':', 1)[0]])}",
        "--set",
        f"image.repository={node.image('operator').rsplit(':', 1)[0]}",
        "--set",
        f"image.tag={node.image('operator').rsplit(':', 1)[1]}",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        f"defaults.image={node.image('trainer')}",
        "--set",
        "defaults.imagePullPolicy=Never",
        "--set",
        "defaults.terminationGracePeriodSeconds=30",
    )
    FIGURES["helm install -> operator Ready"] = time.monotonic() - started
    assert "STATUS: deployed" in out
    pod = node.wait_for(lambda: operator_pod(node), 60, "operator pod Ready")
    assert pod["spec"]["nodeName"] == NODE_NAME and pod["status"]["podIP"].startswith("10.250.0.")
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["image"].endswith(node.image("operator").split("/", 1)[1])
    name = pod["metadata"]["name"]
    node.wait_for(lambda: "kopf" in logs(node, SYSTEM_NS, name).lower() or None, 60, "operator log lines")

    # inside the container: uid 1000, read-only root, the API through the Service's ClusterIP
    probe = (
        "import json, os, ssl, urllib.request\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "print(json.dumps({k: st[k].strip() for k in ('NoNewPrivs', 'Seccomp', 'CapEff')}))\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "try:\n    open('/probe', 'w')\n    ro = False\n"
        "except OSError:\n    ro = True\n"
        "host, port = os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT']\n"
        "ctx = ssl.create_default_context(cafile=sa + '/ca.crt')\n"
        "req = urllib.request.Request(f'https://{host}:{port}/apis/kubetune.io/v1alpha1',\n"
        "    headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})\n"
        "body = json.load(urllib.request.urlopen(req, context=ctx, timeout=10))\n"
        "print(json.dumps({'uid': os.getuid(), 'readOnly': ro, 'host': host, 'group': body['groupVersion']}))\n"
    )
    out = node.cp.kubectl("-n", SYSTEM_NS, "exec", name, "--", "python", "-c", probe, timeout=60).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"uid": 1000, "readOnly": True, "host": "10.250.1.1", "group": "kubetune.io/v1alpha1"}, (
        seen
    )
    # the securityContext as the runtime applied it: no privilege escalation, seccomp filter, no capabilities
    applied = json.loads(out.strip().splitlines()[0])
    assert applied == {"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0000000000000000"}, applied


def test_cluster_dns_from_a_pod(node: RealNodeCluster) -> None:
    name = operator_pod(node)["metadata"]["name"]
    probe = (
        "import socket\n"
        "print(socket.gethostbyname('kubernetes.default.svc.cluster.local'))\n"
        "try:\n    socket.gethostbyname('pypi.org')\n    print('resolved')\n"
        "except OSError:\n    print('unresolved')\n"
    )
    out = node.cp.kubectl(
        "-n", SYSTEM_NS, "exec", name, "--", "python", "-c", probe, timeout=60
    ).stdout.split()
    assert out == ["10.250.1.1", "unresolved"], out


# ----- a 2-node LoRA job -----


def test_apply_finetunejob_trains_on_the_node(
    node: RealNodeCluster, s3: SeaweedS3, tiny_model: Path, tmp_path: Path
) -> None:
    name = "tiny-lora"
    prefix = f"s3://{s3.bucket}/node-{int(time.time())}"
    options = s3.options()
    upload_inputs(s3, prefix, tiny_model)
    apply_s3_secret(node, s3)
    output = f"{prefix}/run"
    statuses = StatusWatch(node.cp.api_client(), NS, name)
    applied = time.time()
    try:
        node.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(job_manifest(name, prefix, s3.endpoint_url)))

        def finished() -> dict[str, Any] | None:
            obj = ftj(node, name)
            return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

        final = node.wait_for(finished, 900, f"{name} finished", interval=1.0)
        elapsed = time.time() - applied
    finally:
        time.sleep(0.5)  # the watch sees the last version
        statuses.stop()
    workers = worker_pods(node, name)
    texts = {p["metadata"]["name"]: logs(node, NS, p["metadata"]["name"]) for p in workers}
    for pod_name, text in texts.items():
        print(f"===== {pod_name} =====\n{text[-4000:]}")
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    first = first_step_time(node, workers[0]["metadata"]["name"])
    FIGURES["apply -> first training step"] = first - applied
    FIGURES["apply -> Succeeded"] = elapsed

    # what a user sees with the kubetune command: rank 0's real log through the kubelet, the summary
    cli = [sys.executable, "-m", "kubetune.cli"]
    env = {**os.environ, "KUBECONFIG": str(node.cp.kubeconfig)}
    shown = subprocess.run(
        [*cli, "logs", name, "-n", NS, "--rank", "0"], capture_output=True, text=True, timeout=120, env=env
    )
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"^step {STEPS}/{STEPS}", shown.stdout, re.M), shown.stdout[-2000:]
    described = subprocess.run(
        [*cli, "describe", name, "-n", NS], capture_output=True, text=True, timeout=120, env=env
    )
    assert described.returncode == 0 and "Succeeded" in described.stdout and "adapter" in described.stdout
    watched = subprocess.run(
        [*cli, "watch", name, "-n", NS], capture_output=True, text=True, timeout=120, env=env
    )
    assert watched.returncode == 0, watched.stdout + watched.stderr  # the job's outcome as the exit code

    # the pods: the trainer image on the real node, ranks from the Job's index, DNS rendezvous
    assert len(workers) == 2
    for index, pod in enumerate(workers):
        assert pod["spec"]["nodeName"] == NODE_NAME
        (container,) = pod["spec"]["containers"]
        assert container["image"] == node.image("trainer")
        assert container["command"][:3] == [
            "python",
            "-m",
            "kubetune_trainer.launch",
        ]  # torchrun, exit codes kept
        assert container["command"][container["command"].index("--master-addr") + 1] == f"{name}-1-0.{name}"
        (cs,) = pod["status"]["containerStatuses"]
        assert cs["state"]["terminated"]["exitCode"] == 0, cs
        assert pod["status"]["phase"] == "Succeeded"
        assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)

    # the command is what the operator rendered; the real kubelet expanded the Job's index
    for pod in workers:
        command = pod["spec"]["containers"][0]["command"]
        assert command[command.index("--node-rank") + 1] == "$(JOB_COMPLETION_INDEX)"
        env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
        assert {"JOB_COMPLETION_INDEX", "AWS_SECRET_ACCESS_KEY"} <= env

    # phases: Pending (or Initializing) -> Running -> Succeeded, never backwards
    phases = statuses.phases()
    assert phases[0] in ("Pending", "Initializing") and phases[-1] == "Succeeded", phases
    assert "Running" in phases and all(p in PHASE_ORDER for p in phases), phases
    assert [PHASE_ORDER.index(p) for p in phases] == sorted(PHASE_ORDER.index(p) for p in phases), phases

    # progress: patched by rank 0 (its own token, the API through the Service) while Running,
    # fresh against the trainer's own log lines (the kubelet's CRI timestamps)
    printed: dict[int, float] = {}
    stamped = node.cp.kubectl("-n", NS, "logs", workers[0]["metadata"]["name"], "--timestamps").stdout
    for line in stamped.splitlines():
        stamp, _, text = line.partition(" ")
        match = re.match(rf"step (\d+)/{STEPS}\b", text)
        if match:
            printed.setdefault(int(match.group(1)), parse_stamp(stamp))
    assert set(range(1, STEPS + 1)) <= set(printed), sorted(printed)
    running = [
        (seen_at, st["progress"])
        for seen_at, st in statuses.seen
        if st.get("phase") == "Running" and st.get("progress")
    ]
    steps = [p["step"] for _, p in running]
    assert len({s for s in steps if s > 0}) >= 2 and steps == sorted(steps), steps
    for seen_at, progress in running:
        assert progress["totalSteps"] == STEPS
        if progress["step"] > 0:
            assert seen_at - printed[progress["step"]] <= 30, (progress, seen_at - printed[progress["step"]])
            assert abs(parse_stamp(progress["updatedAt"]) - printed[progress["step"]]) <= 30, progress
    lags = [seen_at - printed[p["step"]] for seen_at, p in running if p["step"] > 0]
    print(
        f"progress seen at {len(set(steps))} distinct steps while Running; lag behind the trainer's log: "
        f"max {max(lags):.2f} s, mean {sum(lags) / len(lags):.2f} s"
    )
    assert status["progress"]["step"] == STEPS and status["progress"]["percent"] == 100

    # checkpoints and exports in S3, digests in the status
    store = CheckpointStore(output, options)
    assert store.complete_steps() == [STEPS - CHECKPOINT_EVERY, STEPS]
    for step in store.complete_steps():
        assert storage.exists(f"{store.step_uri(step)}/manifest.json", options=options)
    assert status["checkpoint"]["step"] == STEPS
    assert status["checkpoint"]["uri"].rstrip("/") == store.step_uri(STEPS).rstrip("/")
    summary = json.loads(storage.read_bytes(f"{output}/summary.json", options=options))
    assert summary["status"] == "Succeeded" and summary["steps"] == STEPS and summary["worldSize"] == 2
    artifacts = {a["kind"]: a for a in status["artifacts"]}
    assert {"adapter", "merged"} <= set(artifacts)
    for artifact in status["artifacts"]:
        assert set(artifact) >= {"kind", "uri", "sha256", "sizeBytes"} and artifact["uri"].startswith(
            output + "/"
        )
        if artifact["kind"] in ("adapter", "merged"):
            assert artifact["uri"] == f"{output}/exports/{artifact['kind']}"
            manifest_bytes = storage.read_bytes(f"{artifact['uri']}/manifest.json", options=options)
            assert hashlib.sha256(manifest_bytes).hexdigest() == artifact["sha256"]
            manifest = json.loads(manifest_bytes)
            assert sum(f["size"] for f in manifest["files"]) == artifact["sizeBytes"]
            for entry in manifest["files"]:
                assert storage.exists(f"{artifact['uri']}/{entry['path']}", options=options), entry
        else:  # single files (loss plot, metrics): the digest of the object itself
            data = storage.read_bytes(artifact["uri"], options=options)
            assert (
                hashlib.sha256(data).hexdigest() == artifact["sha256"] and len(data) == artifact["sizeBytes"]
            )
    assert {k: a["sha256"] for k, a in artifacts.items()} == {
        a["kind"]: a["sha256"] for a in summary["artifacts"]
    }
    metrics = status["metrics"]
    assert 0 < metrics["finalPerplexity"] < metrics["baselinePerplexity"], metrics
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"

    # the secret key is in no object, event or log
    secret = s3.secret_key
    events = node.cp.kubectl("-n", NS, "get", "events", "-o", "json").stdout
    reasons = [
        e["reason"] for e in json.loads(events)["items"] if e["involvedObject"].get("kind") == "FineTuneJob"
    ]
    assert "CreatedWorkers" in reasons, reasons
    children = node.cp.kubectl(
        "-n", NS, "get", "configmaps,services,jobs,pods,serviceaccounts,roles,rolebindings", "-o", "json"
    ).stdout
    assert secret not in json.dumps(final) and secret not in events and secret not in children
    assert all(secret not in text for text in texts.values())
    assert secret not in logs(node, SYSTEM_NS, operator_pod(node)["metadata"]["name"])


def test_preference_finetunejob_succeeds_on_the_node(
    node: RealNodeCluster, s3: SeaweedS3, tiny_model: Path
) -> None:
    """A DPO FineTuneJob (TRL's DPOTrainer in the trainer image), two workers, pairs from S3: Succeeded, with
    the held-out reward accuracy in the status (the Reward-Acc column) and the adapter in S3."""
    name = "tiny-dpo"
    prefix = f"s3://{s3.bucket}/node-dpo-{int(time.time())}"
    options = s3.options()
    storage.upload_tree(tiny_model, f"{prefix}/models/tiny/", last=(), options=options)
    storage.upload_file(
        REPO / "examples" / "data" / "pydoc_preferences.jsonl", f"{prefix}/data/pairs.jsonl", options=options
    )
    apply_s3_secret(node, s3)
    manifest = job_manifest(name, prefix, s3.endpoint_url)
    manifest["spec"].update(
        {
            "task": {
                "type": "preference",
                "template": "plain",
                "preference": {"objective": "dpo", "beta": 0.1},
            },
            "datasets": [{"source": f"{prefix}/data/pairs.jsonl", "maxExamples": 64}],
            "validation": {"fraction": 0.1, "maxExamples": 4},
            "training": {
                "maxSteps": 6,
                "batchSizePerDevice": 4,
                "maxSeqLength": 64,
                "loggingSteps": 1,
                "learningRate": 1e-2,
                "precision": "fp32",
            },
            "checkpoint": {"everySteps": 3, "keepLast": 1},
        }
    )
    node.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    final = wait_finished(node, name)
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert (
        0 <= status["metrics"]["finalRewardAccuracy"] <= 1
        and "baselinePreferenceAccuracy" in status["metrics"]
    )
    assert {"adapter"} <= {a["kind"] for a in status["artifacts"]}
    listed = node.cp.kubectl("-n", NS, "get", "ftj", name).stdout
    assert "REWARD-ACC" in listed, listed
    summary = json.loads(storage.read_bytes(f"{prefix}/run/summary.json", options=options))
    assert summary["objective"] == "dpo" and summary["worldSize"] == 2 and summary["steps"] == 6


def test_killed_worker_resumes_from_checkpoint(
    node: RealNodeCluster, s3: SeaweedS3, tiny_model: Path
) -> None:
    name = "tiny-resume"
    prefix = f"s3://{s3.bucket}/node-resume-{int(time.time())}"
    upload_inputs(s3, prefix, tiny_model)
    options = s3.options()
    manifest = job_manifest(name, prefix, s3.endpoint_url)
    manifest["spec"]["runPolicy"] = {"maxRestarts": 2}
    node.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    store = CheckpointStore(f"{prefix}/run", options)
    node.wait_for(lambda: store.complete_steps() or None, 900, "a complete checkpoint", interval=1.0)
    checkpoint = max(store.complete_steps())  # at least this one is complete when the worker dies

    # the trainer container as the runtime runs it: uid 1000, read-only root, no privilege escalation,
    # seccomp, no capabilities; the short-lived projected token only, not the automounted one
    (victim,) = [
        p
        for p in worker_pods(node, name, attempt=1)
        if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
    ]
    probe = (
        "import json, os\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "try:\n    open('/probe', 'w')\n    ro = False\n"
        "except OSError:\n    ro = True\n"
        "print(json.dumps({'uid': os.getuid(), 'readOnly': ro, 'token': os.path.exists("
        "'/var/run/secrets/kubetune/token'), 'automounted': os.path.exists('/var/run/secrets/kubernetes.io'), "
        "**{k: st[k].strip() for k in ('NoNewPrivs', 'Seccomp', 'CapEff')}}))\n"
    )
    out = node.cp.kubectl(
        "-n", NS, "exec", victim["metadata"]["name"], "--", "python", "-c", probe, timeout=60
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {
        "uid": 1000,
        "readOnly": True,
        "token": True,
        "automounted": False,
        "NoNewPrivs": "1",
        "Seccomp": "2",
        "CapEff": "0000000000000000",
    }, out

    # SIGKILL rank 1's container through containerd, as an OOM kill or a crash would
    container_id = victim["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    killed = time.time()
    node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id)

    def attempt2_running() -> bool:
        running = [p for p in worker_pods(node, name, attempt=2) if p["status"].get("phase") == "Running"]
        return len(running) == 2

    node.wait_for(attempt2_running, 300, "attempt 2's pods Running", interval=1.0)
    FIGURES["worker killed -> attempt 2 pods Running"] = time.time() - killed

    final = wait_finished(node, name)
    attempt2 = worker_pods(node, name, attempt=2)
    rank0 = logs(node, NS, attempt2[0]["metadata"]["name"])
    print(f"===== attempt 2 rank 0 =====\n{rank0[-3000:]}")
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["attempt"] == 2 and status["restarts"] == 1
    resumed = first_step_time(node, attempt2[0]["metadata"]["name"])
    FIGURES["worker killed -> first step of attempt 2"] = resumed - killed
    match = re.search(r"resuming from complete checkpoint step (\d+)", rank0)
    assert match, rank0[-3000:]
    resumed_from = int(match.group(1))
    assert checkpoint <= resumed_from < STEPS, (checkpoint, resumed_from)
    steps = [int(m) for m in re.findall(rf"^step (\d+)/{STEPS}\b", rank0, re.M)]
    assert steps and min(steps) == resumed_from + 1 and max(steps) == STEPS, (resumed_from, steps[:5])


def test_evicted_worker_is_a_preemption(
    node: RealNodeCluster, s3: SeaweedS3, tiny_model: Path, tmp_path: Path
) -> None:
    """A worker evicted through the Eviction API (as a drain does): SIGTERM, a checkpoint, exit 143 from the
    launcher; the operator counts a preemption, not a restart, and attempt 2 finishes the job. Submitted with
    `kubetune submit --wait`, which follows the progress and exits with the job's outcome."""
    from kubernetes import client

    name = "tiny-evict"
    prefix = f"s3://{s3.bucket}/node-evict-{int(time.time())}"
    upload_inputs(s3, prefix, tiny_model)
    apply_s3_secret(node, s3)
    manifest_file = tmp_path / "job.yaml"
    manifest_file.write_text(yaml.safe_dump(job_manifest(name, prefix, s3.endpoint_url)))
    submitted = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "submit", str(manifest_file), "-n", NS, "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KUBECONFIG": str(node.cp.kubeconfig)},
    )

    def rank0_training() -> dict[str, Any] | None:
        running = [p for p in worker_pods(node, name, attempt=1) if p["status"].get("phase") == "Running"]
        rank0 = [
            p
            for p in running
            if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
        ]
        return rank0[0] if rank0 and first_step_time(node, rank0[0]["metadata"]["name"]) else None

    victim = node.wait_for(rank0_training, 600, "rank 0 training", interval=1.0)
    core = client.CoreV1Api(node.cp.api_client())
    core.create_namespaced_pod_eviction(
        victim["metadata"]["name"],
        NS,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=victim["metadata"]["name"], namespace=NS)),
    )
    final = wait_finished(node, name)
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["preemptions"] >= 1 and status["restarts"] == 0 and status["attempt"] >= 2, status
    reasons = [
        e["reason"]
        for e in json.loads(node.cp.kubectl("-n", NS, "get", "events", "-o", "json").stdout)["items"]
        if e["involvedObject"].get("name") == name
    ]
    assert "Preempted" in reasons and "Restarting" not in reasons, reasons
    out, err = submitted.communicate(timeout=120)
    assert submitted.returncode == 0, out + err
    assert re.search(rf"{name}: Running  step \d+/{STEPS}", out) and "Succeeded" in out, out[-3000:]


def test_missing_image_and_unschedulable_jobs_say_so(node: RealNodeCluster, s3: SeaweedS3) -> None:
    """Jobs that cannot start show why, in their status and as a Warning event, within a bounded time."""
    prefix = f"s3://{s3.bucket}/node-stuck-{int(time.time())}"
    missing = job_manifest("no-image", prefix, s3.endpoint_url)
    missing["spec"]["resources"].update(
        nodes=1, image=node.image("trainer").rsplit(":", 1)[0] + ":does-not-exist"
    )
    too_big = job_manifest("too-big", prefix, s3.endpoint_url)
    too_big["spec"]["resources"]["cpu"] = "64"
    for manifest in (missing, too_big):
        node.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def said(name: str, reason: str, text: str) -> bool:
        status = ftj(node, name).get("status") or {}
        events = json.loads(node.cp.kubectl("-n", NS, "get", "events", "-o", "json").stdout)["items"]
        return text in (status.get("message") or "") and any(
            e["involvedObject"].get("name") == name
            and e["type"] == "Warning"
            and e["reason"] == reason
            and text in e["message"]
            for e in events
        )

    node.wait_for(
        lambda: said("no-image", "WorkerProblem", "ErrImageNeverPull"), 180, "missing image reported"
    )
    node.wait_for(lambda: said("too-big", "Unschedulable", "Insufficient cpu"), 180, "unschedulable reported")
    running = {c["type"]: c for c in ftj(node, "too-big")["status"]["conditions"]}["Running"]
    assert running["status"] == "False" and running["reason"] == "Unschedulable"
    for manifest in (missing, too_big):
        node.cp.kubectl("-n", NS, "delete", "ftj", manifest["metadata"]["name"], "--wait=true", timeout=120)


def test_operator_pod_replaced(node: RealNodeCluster) -> None:
    old = operator_pod(node)["metadata"]["name"]
    deleted = time.time()
    node.cp.kubectl("-n", SYSTEM_NS, "delete", "pod", old, "--wait=false")
    new = node.wait_for(
        lambda: (p := operator_pod(node)) and p["metadata"]["name"] != old and p,
        300,
        "a new operator pod Ready",
        interval=0.5,
    )
    FIGURES["operator pod deleted -> new pod Ready"] = time.time() - deleted
    # the new operator acts: a change to a finished job's spec is seen (status observedGeneration)
    node.wait_for(
        lambda: "kopf" in logs(node, SYSTEM_NS, new["metadata"]["name"]).lower() or None,
        60,
        "new operator log",
    )


def test_operator_failover_after_the_active_replica_is_killed(node: RealNodeCluster, s3: SeaweedS3) -> None:
    """Two replicas (kopf peering): SIGKILL the acting one's container; a job created right after is
    still reconciled (by the standby once the dead peer's record expires, or by the restarted
    container, whichever comes first)."""
    set_replicas(node, 2)

    def replicas() -> list[dict[str, Any]] | None:
        """The two Ready replicas once both have registered in the ClusterKopfPeering."""
        items = [
            p
            for p in pods(node, SYSTEM_NS, "app.kubernetes.io/name=kubetune")
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]
        if len(items) != 2:
            return None
        peers = node.cp.get_json("clusterkopfpeering", "kubetune").get("status") or {}
        registered = [p for p in items if any(p["metadata"]["name"] in peer for peer in peers)]
        return items if len(registered) == 2 else None

    try:
        items = node.wait_for(replicas, 300, "two replicas in the peering", interval=1.0)
    except Exception:
        for p in pods(node, SYSTEM_NS, "app.kubernetes.io/name=kubetune"):
            print(
                f"--- {p['metadata']['name']} {p['status'].get('phase')}\n"
                f"{node.cp.kubectl('-n', SYSTEM_NS, 'logs', p['metadata']['name'], check=False).stdout[-3000:]}"
            )
        print(node.cp.kubectl("get", "clusterkopfpeering", "-o", "yaml", check=False).stdout)
        raise
    # the acting replica: the higher `--priority auto` (operator_main: crc32 of the pod's hostname)
    priority = {
        p["metadata"]["name"]: zlib.crc32(p["metadata"]["name"].encode()) % 1_000_000 + 1 for p in items
    }
    active = max(items, key=lambda p: priority[p["metadata"]["name"]])
    (standby,) = [p for p in items if p is not active]
    container_id = active["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    name = "after-failover"
    killed = time.time()
    node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id)
    manifest = job_manifest(name, f"s3://{s3.bucket}/failover", s3.endpoint_url)
    manifest["spec"]["suspend"] = True  # reconciled, but no pods: nothing to train
    node.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    node.wait_for(
        lambda: (ftj(node, name).get("status") or {}).get("phase") == "Suspended",
        300,
        f"{name} reconciled after the kill",
        interval=0.5,
    )
    FIGURES["active operator SIGKILLed -> next job reconciled"] = time.time() - killed
    standby_log = logs(node, SYSTEM_NS, standby["metadata"]["name"])
    print("reconciled by the " + ("standby" if "Resuming operations" in standby_log else "restarted replica"))
    node.cp.kubectl("-n", NS, "delete", f"{PLURAL}.{GROUP}", name, "--wait=true", timeout=120)
    set_replicas(node, 1)


def test_privileged_pod_is_refused_under_restricted(node: RealNodeCluster) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": NS},
        "spec": {
            "containers": [
                {"name": "c", "image": node.image("operator"), "securityContext": {"privileged": True}}
            ]
        },
    }
    r = node.cp.kubectl("apply", "-f", "-", input=json.dumps(pod), check=False)
    assert r.returncode != 0 and "violates PodSecurity" in r.stderr and "restricted" in r.stderr, r.stderr
