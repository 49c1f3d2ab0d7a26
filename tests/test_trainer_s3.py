"""The trainer against a real S3 server: data and model from S3, checkpoints and exports to S3,
and a new pod with an empty disk resuming from the latest complete checkpoint in S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune import storage
from kubetune.checkpoints import CheckpointStore
from tests.support.trainer_fixtures import PYDOC
from tests.support.waiting import wait_for, while_running

pytestmark = pytest.mark.slow  # an S3 server and training


def trainer_env(server, workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_REGION": server.region,
        "KUBETUNE_WORKDIR": str(workdir),
        "PYTHONUNBUFFERED": "1",
    }


def test_s3_job_resumes_on_an_empty_disk(make_job, s3_server, s3_prefix, tiny_model, tmp_path: Path) -> None:
    options = s3_server.options()
    # Inputs live in S3 too: the model directory and the dataset.
    storage.upload_tree(tiny_model, f"{s3_prefix}/models/tiny/", last=(), options=options)
    storage.upload_file(PYDOC, f"{s3_prefix}/data/pydoc.jsonl", options=options)
    output = f"{s3_prefix}/run"
    job = make_job(
        "s3job",
        model={"source": f"{s3_prefix}/models/tiny/"},
        datasets=[{"source": f"{s3_prefix}/data/*.jsonl", "maxExamples": 60}],
        storage={"s3": {"endpointUrl": s3_server.endpoint_url, "addressingStyle": "path"}},
        training={"maxSteps": 10, "batchSizePerDevice": 2, "loggingSteps": 1, "learningRate": 1e-3},
        checkpoint={"everySteps": 3, "keepLast": 2},
        output={"uri": output, "exports": ["adapter", "merged"]},
    )
    store = CheckpointStore(output, options)
    first_pod = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(job)],
        env=trainer_env(s3_server, tmp_path / "pod-1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(
        while_running(first_pod, lambda: (latest := store.latest()) is not None and latest.step >= 3),
        600,
        "a complete checkpoint of step 3 or later in S3",
    )
    first_pod.send_signal(signal.SIGKILL)  # the node is lost
    first_pod.wait()
    assert not storage.exists(f"{output}/summary.json", options=options)
    resume_step = store.latest().step

    # A new pod on another node: an empty work directory, everything comes from S3.
    second = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(job)],
        env=trainer_env(s3_server, tmp_path / "pod-2"),
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from complete checkpoint step {resume_step}" in second.stdout
    summary = json.loads(storage.read_bytes(f"{output}/summary.json", options=options))
    assert summary["steps"] == 10 and summary["resumedFrom"] == f"step-{resume_step}"
    assert store.complete_steps()[-1] == 10 and len(store.complete_steps()) <= 2
    kinds = {a["kind"]: a for a in summary["artifacts"]}
    for kind in ("adapter", "merged"):
        artifact = kinds[kind]
        assert artifact["uri"] == f"{output}/exports/{kind}"
        manifest = storage.read_bytes(f"{artifact['uri']}/manifest.json", options=options)
        import hashlib

        assert hashlib.sha256(manifest).hexdigest() == artifact["sha256"]
        assert storage.exists(f"{artifact['uri']}/README.md", options=options)
    assert storage.exists(f"{output}/loss.png", options=options)
    # the secret never lands in what the trainer wrote
    for uri in storage.expand(f"{output}/**", options=options):
        if uri.endswith((".json", ".md", ".jsonl")):
            assert s3_server.secret_key not in storage.read_bytes(uri, options=options).decode(
                errors="ignore"
            )
    assert s3_server.secret_key not in second.stdout + second.stderr
