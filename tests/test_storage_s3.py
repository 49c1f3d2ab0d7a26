"""Storage and checkpoints against a real S3 server (SeaweedFS on loopback): no mocks.

Faults are real too: the outage test stops and restarts the server during a background upload,
and throttling / timeouts go through a proxy that answers 503 SlowDown or holds requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from kubetune import storage
from kubetune.checkpoints import (
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    CheckpointUploadError,
    config_hash,
    read_manifest,
    verify_checkpoint,
    write_manifest,
)
from kubetune.spec import S3Spec, StorageSpec
from kubetune.storage import S3Options, StorageError
from kubetune_trainer.model_cache import CACHE_MARKER, cached_model
from tests.support.s3server import FaultProxy, SeaweedS3

pytestmark = pytest.mark.slow  # an S3 server (SeaweedFS)

MB = 1_000_000


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tree(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def make_checkpoint(
    store: CheckpointStore, step: int, n_extra: int = 0, size: int = 200_000
) -> dict[str, str]:
    """Save a small checkpoint shaped like a trainer's into store.step_dir(step); returns rel -> sha256."""
    root = store.step_dir(step)
    files = {
        "model.safetensors": os.urandom(size),
        "optimizer.pt": os.urandom(2 * size),
        "trainer_state.json": json.dumps({"global_step": step}).encode(),
        "rng_state/rank0.pth": os.urandom(1000),
    }
    files.update({f"shards/part-{i:02d}.bin": os.urandom(size) for i in range(n_extra)})
    write_tree(root, files)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


class CallCounter:
    """Counts S3 API calls of the shared client for some options (botocore event hooks)."""

    def __init__(self, options: S3Options, operation: str, event: str = "before-parameter-build") -> None:
        self.client = storage.get_client(options)
        self.event = f"{event}.s3.{operation}"
        self.calls: list[dict] = []
        self._lock = threading.Lock()
        self.client.meta.events.register(self.event, self._hook)

    def _hook(self, params: dict | None = None, **kwargs: object) -> None:
        with self._lock:
            self.calls.append(params or {})

    @property
    def count(self) -> int:
        return len(self.calls)

    def close(self) -> None:
        self.client.meta.events.unregister(self.event, self._hook)


# ----- URIs and options -----


def test_split_and_is_s3() -> None:
    assert storage.is_s3("s3://b/k/x")
    assert not storage.is_s3("/data/x") and not storage.is_s3(Path("/x"))  # type: ignore[arg-type]
    assert storage.split_s3("s3://bucket/a/b.json") == ("bucket", "a/b.json")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        storage.split_s3("s3:///key")
    assert storage.join("s3://b/run/", "checkpoints", "step-1") == "s3://b/run/checkpoints/step-1"


def test_options_from_spec_and_env(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a CA")
    env = {"AWS_ENDPOINT_URL": "http://env:9000", "AWS_REGION": "eu-west-3", "AWS_CA_BUNDLE": str(ca)}
    opts = S3Options.from_env(env)
    assert (opts.endpoint_url, opts.region, opts.ca_bundle) == ("http://env:9000", "eu-west-3", str(ca))
    spec = StorageSpec(
        s3=S3Spec(endpoint_url="https://minio.storage:9000", addressing_style="path", verify_tls=False)
    )
    opts = S3Options.from_spec(
        spec,
        env={"AWS_DEFAULT_REGION": "us-west-2"},
        max_attempts=4,
        access_key_id="AK",
        secret_access_key="never-shown",
    )
    assert opts.endpoint_url == "https://minio.storage:9000" and opts.region == "us-west-2"
    assert opts.addressing_style == "path" and opts.verify_tls is False
    assert "never-shown" not in repr(opts)
    client = storage.make_s3_client(opts)
    config = client.meta.config
    assert config.s3 == {"addressing_style": "path"}
    assert config.retries == {"total_max_attempts": 4, "mode": "standard"}
    assert (config.connect_timeout, config.read_timeout) == (opts.connect_timeout, opts.read_timeout)
    assert client.meta.endpoint_url == "https://minio.storage:9000"
    assert client.meta.region_name == "us-west-2"
    with pytest.raises(TypeError):
        S3Options.from_env({}, no_such_field=1)


# ----- files and trees -----


def test_file_round_trip(s3_prefix: str, s3_options: S3Options, tmp_path: Path) -> None:
    src = tmp_path / "a.json"
    src.write_text('{"x": 1}')
    uri = f"{s3_prefix}/dir/a.json"
    assert not storage.exists(uri, options=s3_options)
    storage.upload_file(src, uri, options=s3_options)
    assert storage.exists(uri, options=s3_options)
    assert storage.read_bytes(uri, options=s3_options) == b'{"x": 1}'
    out = storage.download_file(uri, tmp_path / "out" / "a.json", options=s3_options)
    assert out.read_text() == '{"x": 1}'
    storage.write_bytes(f"{s3_prefix}/dir/b.txt", b"bee", options=s3_options)
    assert storage.list_dir(f"{s3_prefix}/dir", options=s3_options) == ["a.json", "b.txt"]
    storage.delete(uri, options=s3_options)
    storage.delete(uri, options=s3_options)  # deleting a missing object is fine
    assert not storage.exists(uri, options=s3_options)


def test_tree_round_trip_with_last_files(s3_prefix: str, s3_options: S3Options, tmp_path: Path) -> None:
    files = write_tree(
        tmp_path / "src",
        {
            "config.json": b"{}",
            "model.safetensors": os.urandom(300_000),
            "sub/deep/x.bin": os.urandom(5000),
            "sub/y.txt": b"y",
            MANIFEST: b'{"step": 1}',
        },
    )
    puts = CallCounter(s3_options, "PutObject")
    try:
        uris = storage.upload_tree(tmp_path / "src", f"{s3_prefix}/tree", options=s3_options)
    finally:
        puts.close()
    assert len(uris) == len(files) and uris[-1].endswith(MANIFEST)
    assert puts.calls[-1]["Key"].endswith(f"tree/{MANIFEST}")  # stored only after all the others
    assert storage.list_dir(f"{s3_prefix}/tree", options=s3_options) == sorted(
        ["config.json", "model.safetensors", "sub", MANIFEST]
    )
    assert storage.list_tree(f"{s3_prefix}/tree", options=s3_options) == {k: len(v) for k, v in files.items()}
    got = storage.download_tree(f"{s3_prefix}/tree/", tmp_path / "dst", options=s3_options)
    assert len(got) == len(files)
    for rel, data in files.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data
    assert storage.delete_tree(f"{s3_prefix}/tree", options=s3_options, first=(MANIFEST,)) == len(files)
    assert storage.list_tree(f"{s3_prefix}/tree", options=s3_options) == {}


def test_local_paths_use_the_same_functions(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a.jsonl": b"1", "b.jsonl": b"2", "sub/c.jsonl": b"3", "x.txt": b"4"})
    assert storage.expand(str(tmp_path / "src" / "*.jsonl")) == [
        str(tmp_path / "src" / n) for n in ("a.jsonl", "b.jsonl")
    ]
    assert len(storage.expand(str(tmp_path / "src" / "**" / "*.jsonl"))) == 3
    assert len(storage.expand(str(tmp_path / "src"))) == 4
    assert storage.expand(str(tmp_path / "missing*")) == []
    storage.upload_tree(tmp_path / "src", str(tmp_path / "copy"))
    assert storage.list_tree(str(tmp_path / "copy")) == storage.list_tree(str(tmp_path / "src"))
    storage.download_tree(str(tmp_path / "copy"), tmp_path / "copy2")
    assert storage.read_bytes(str(tmp_path / "copy2" / "sub" / "c.jsonl")) == b"3"
    assert storage.list_dir(str(tmp_path / "copy2")) == ["a.jsonl", "b.jsonl", "sub", "x.txt"]
    assert cached_model(str(tmp_path / "src")) == tmp_path / "src"
    storage.delete_tree(str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()


def test_multipart_upload_and_download_of_a_large_object(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(80):
            f.write(os.urandom(MB))
    uri = f"{s3_prefix}/big.bin"
    parts = CallCounter(s3_options, "UploadPart")
    try:
        storage.upload_file(big, uri, options=s3_options)
    finally:
        parts.close()
    assert parts.count == 5  # 80 MB in 16 MiB parts
    client = storage.get_client(s3_options)
    bucket, key = storage.split_s3(uri)
    head = client.head_object(Bucket=bucket, Key=key)
    assert "-" in head["ETag"], head["ETag"]  # a multipart ETag
    assert head["ContentLength"] == 80 * MB
    gets = CallCounter(s3_options, "GetObject")
    try:
        out = storage.download_file(uri, tmp_path / "back.bin", options=s3_options)
    finally:
        gets.close()
    assert gets.count >= 5 and all("Range" in c for c in gets.calls)  # parallel ranged GETs
    assert sha256(out) == sha256(big)
    big.unlink()
    out.unlink()


def test_glob_expansion_in_s3_keys(s3_prefix: str, s3_options: S3Options, tmp_path: Path) -> None:
    write_tree(
        tmp_path / "d",
        {
            "data/a.jsonl": b"a",
            "data/b.jsonl": b"b",
            "data/sub/c.jsonl": b"c",
            "data/x.txt": b"x",
            "data2/z.jsonl": b"z",
        },
    )
    storage.upload_tree(tmp_path / "d", s3_prefix, options=s3_options)

    def names(pattern: str) -> list[str]:
        return [u[len(s3_prefix) + 1 :] for u in storage.expand(f"{s3_prefix}/{pattern}", options=s3_options)]

    assert names("data/*.jsonl") == ["data/a.jsonl", "data/b.jsonl", "data/sub/c.jsonl"]  # fnmatch: * spans /
    assert names("data/?.jsonl") == ["data/a.jsonl", "data/b.jsonl"]
    assert names("data/[ab].*") == ["data/a.jsonl", "data/b.jsonl"]
    assert names("data*/*.jsonl") == ["data/a.jsonl", "data/b.jsonl", "data/sub/c.jsonl", "data2/z.jsonl"]
    assert names("data") == [
        "data/a.jsonl",
        "data/b.jsonl",
        "data/sub/c.jsonl",
        "data/x.txt",
    ]  # a "directory"
    assert names("data/") == names("data")
    assert names("data/x.txt") == ["data/x.txt"]
    assert names("data/*.parquet") == [] and names("nothing") == []


def test_cached_model_second_call_downloads_nothing(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    files = write_tree(
        tmp_path / "model",
        {
            "config.json": b'{"model_type": "llama"}',
            "model.safetensors": os.urandom(500_000),
            "tokenizer/tokenizer.json": b"{}",
        },
    )
    uri = f"{s3_prefix}/models/tiny-llama/"
    storage.upload_tree(tmp_path / "model", uri, options=s3_options)
    cache = tmp_path / "cache"
    gets = CallCounter(s3_options, "GetObject")
    try:
        first = cached_model(uri, cache, options=s3_options)
        assert gets.count == 3
        assert first.name.startswith("tiny-llama-") and (first / CACHE_MARKER).is_file()
        for rel, data in files.items():
            assert (first / rel).read_bytes() == data
        mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
        second = cached_model(uri.rstrip("/"), cache, options=s3_options)  # same prefix
        assert second == first
        assert gets.count == 3  # nothing downloaded the second time
        assert {p: p.stat().st_mtime_ns for p in second.rglob("*")} == mtimes
        # A changed object has another ETag: a new cache entry is downloaded.
        storage.write_bytes(f"{uri}config.json", b'{"model_type": "llama", "v": 2}', options=s3_options)
        third = cached_model(uri, cache, options=s3_options)
        assert third != first and gets.count == 6
        assert (third / "config.json").read_bytes() == b'{"model_type": "llama", "v": 2}'
    finally:
        gets.close()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(StorageError, match="no model files"):
        cached_model(f"{s3_prefix}/models/missing/", cache, options=s3_options)


def test_cached_model_waits_for_a_download_in_progress(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    """A second caller for a model that is being downloaded waits on the cache's file lock and then
    uses that download: the objects are fetched once."""
    write_tree(tmp_path / "model", {"config.json": b"{}", "model.safetensors": os.urandom(100_000)})
    uri = f"{s3_prefix}/models/locked/"
    storage.upload_tree(tmp_path / "model", uri, options=s3_options)
    cache = tmp_path / "cache"
    gets = CallCounter(s3_options, "GetObject")
    lists = CallCounter(s3_options, "ListObjectsV2")
    paused, release = threading.Event(), threading.Event()

    def hold(**kwargs: object) -> None:  # the first caller's GETs wait until released
        paused.set()
        release.wait(120)

    client = storage.get_client(s3_options)
    client.meta.events.register("before-parameter-build.s3.GetObject", hold)
    results: dict[str, Path] = {}

    def fetch(name: str) -> None:
        results[name] = cached_model(uri, cache, options=s3_options)

    first = threading.Thread(target=fetch, args=("first",))
    second = threading.Thread(target=fetch, args=("second",))
    try:
        first.start()
        assert paused.wait(120), "the first download never started"
        listed = lists.count
        second.start()
        while lists.count == listed and second.is_alive():  # the second caller has listed the objects
            release.wait(0.05)
        # ... and now waits for the lock: it fetches nothing while the first download holds it
        second.join(2.0)
        assert second.is_alive() and gets.count <= 2, gets.count
        release.set()
        first.join(120)
        second.join(120)
    finally:
        release.set()
        client.meta.events.unregister("before-parameter-build.s3.GetObject", hold)
        gets.close()
        lists.close()
    assert results["first"] == results["second"] and (results["first"] / CACHE_MARKER).is_file()
    assert gets.count == 2  # two objects, fetched once


# ----- checkpoints on S3 -----


def test_checkpoint_publish_then_resume_into_an_empty_directory(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    output = f"{s3_prefix}/run"
    cfg = {"model": "x", "lr": 2e-4}
    store = CheckpointStore(output, s3_options, staging_dir=tmp_path / "stage")
    digests = {}
    for step in (5, 10):
        digests[step] = make_checkpoint(store, step)
        started = time.monotonic()
        store.publish(
            tmp_path / "stage" / f"step-{step}",
            step,
            config_hash(cfg),
            {"loss": 1.0 / step, "epoch": step / 10},
        )
        assert time.monotonic() - started < 2  # returns while the upload runs in the background
    refs = store.wait(timeout=120)
    assert [r.step for r in refs] == [5, 10] and store.pending() == 0
    assert not (tmp_path / "stage" / "step-10").exists()  # staging copies are removed once uploaded
    store.close()

    # A new job on an empty disk.
    fresh = CheckpointStore(output, s3_options)
    assert fresh.complete_steps() == [5, 10]
    latest = fresh.latest()
    assert latest is not None and latest.step == 10 and latest.uri == f"{output}/checkpoints/step-10"
    assert latest.manifest["configHash"] == config_hash(cfg) and latest.manifest["loss"] == 0.1
    assert latest.created_at and latest.created_at.endswith("Z")
    local = fresh.fetch(latest.step, tmp_path / "resume")
    assert verify_checkpoint(local)
    assert {rel: sha256(local / rel) for rel in digests[10]} == digests[10]
    assert {f["path"] for f in read_manifest(local)["files"]} == set(digests[10])
    assert fresh.fetch(10, tmp_path / "resume") == local  # a verified copy is reused

    # An object changed behind the manifest's back is caught by sha256.
    bucket, key = storage.split_s3(f"{output}/checkpoints/step-10/model.safetensors")
    storage.get_client(s3_options).put_object(Bucket=bucket, Key=key, Body=os.urandom(200_000))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fresh.fetch(10, tmp_path / "resume2")
    fresh.close()


def test_checkpoint_without_manifest_is_ignored(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    output = f"{s3_prefix}/run"
    with CheckpointStore(output, s3_options, staging_dir=tmp_path / "stage") as store:
        make_checkpoint(store, 10)
        store.publish(tmp_path / "stage" / "step-10", 10, "h")
        store.wait(60)
        # A newer checkpoint whose upload never finished: files but no manifest.
        write_tree(tmp_path / "partial", {"model.safetensors": b"x" * 100, "optimizer.pt": b"y" * 10})
        storage.upload_tree(tmp_path / "partial", f"{output}/checkpoints/step-20", options=s3_options)
        # A broken manifest does not count either.
        storage.write_bytes(f"{output}/checkpoints/step-30/{MANIFEST}", b"{not json", options=s3_options)
        assert store.all_steps() == [10, 20, 30]
        latest = store.latest()
        assert latest is not None and latest.step == 10
        with pytest.raises(CheckpointError, match="not complete"):
            store.fetch(20, tmp_path / "x")


def test_prune_keeps_last_k_and_the_protected_step(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    output = f"{s3_prefix}/run"
    with CheckpointStore(output, s3_options, staging_dir=tmp_path / "stage") as store:
        for step in (10, 20, 30, 40):
            make_checkpoint(store, step, size=1000)
            store.publish(tmp_path / "stage" / f"step-{step}", step, "h")
        store.wait(120)
        write_tree(tmp_path / "partial", {"model.safetensors": b"x" * 100})
        for step in (25, 50):  # incomplete: a crashed upload (25) and one that may still be running (50)
            storage.upload_tree(tmp_path / "partial", f"{output}/checkpoints/step-{step}", options=s3_options)

        assert store.prune(keep_last=2, protect={10}) == [20, 25]
        assert store.all_steps() == [10, 30, 40, 50] and store.complete_steps() == [10, 30, 40]

        # 50 is not complete: 40 must stay whatever keep_last says.
        assert store.prune(keep_last=1) == [10, 30]
        assert store.prune(keep_last=1) == []
        assert store.complete_steps() == [40]
        # Once 50 is complete, 40 goes.
        make_checkpoint(store, 50, size=1000)
        store.publish(tmp_path / "stage" / "step-50", 50, "h", keep_last=1)
        store.wait(60)
        assert store.all_steps() == [50] and store.latest().step == 50  # type: ignore[union-attr]


def test_publish_prunes_in_the_background_after_each_upload(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    with CheckpointStore(f"{s3_prefix}/run", s3_options, staging_dir=tmp_path / "stage") as store:
        for step in (1, 2, 3, 4, 5):
            make_checkpoint(store, step, size=1000)
            store.publish(tmp_path / "stage" / f"step-{step}", step, "h", keep_last=2, protect={2})
        store.wait(120)
        assert store.complete_steps() == [2, 4, 5]


def test_stores_with_different_prefixes_never_see_each_other(
    s3_prefix: str, s3_options: S3Options, tmp_path: Path
) -> None:
    stores = {
        name: CheckpointStore(f"{s3_prefix}/{name}", s3_options, staging_dir=tmp_path / name)
        for name in ("run1", "run10", "run1-b")
    }
    for step, name in enumerate(stores, start=1):
        make_checkpoint(stores[name], step * 100, size=1000)
        stores[name].publish(tmp_path / name / f"step-{step * 100}", step * 100, name)
    for store in stores.values():
        store.wait(60)
    for step, (name, store) in enumerate(stores.items(), start=1):
        assert store.complete_steps() == [step * 100]
        assert store.latest().manifest["configHash"] == name  # type: ignore[union-attr]
        assert store.prune(keep_last=1) == []
        store.close()


def test_outage_during_background_upload_completes_later(tmp_path: Path) -> None:
    """The endpoint goes down mid-upload: training goes on, the upload completes after the restart,
    and no manifest (so no latest()) appears before all the files are there."""
    server = SeaweedS3(tmp_path / "seaweed").start()
    try:
        opts = server.options(max_attempts=2, connect_timeout=1.0, read_timeout=10.0)
        output = f"s3://{server.bucket}/job"
        store = CheckpointStore(
            output,
            opts,
            staging_dir=tmp_path / "stage",
            backoff_base=0.2,
            backoff_max=1.0,
            retry_deadline=300,
        )
        make_checkpoint(store, 1, size=1000)
        store.publish(tmp_path / "stage" / "step-1", 1, "h")
        store.wait(60)
        digests = make_checkpoint(store, 2, n_extra=10, size=300_000)

        # Stop the server right after the first object of step 2 is stored; hold the next
        # requests until it is down.
        stop_started, stop_done = threading.Event(), threading.Event()

        def stop_server() -> None:
            server.stop()
            stop_done.set()

        def after_put(**kwargs: object) -> None:
            if not stop_started.is_set():
                stop_started.set()
                threading.Thread(target=stop_server).start()

        def before_put(**kwargs: object) -> None:
            if stop_started.is_set():
                stop_done.wait(60)

        client = storage.get_client(opts)
        client.meta.events.register("after-call.s3.PutObject", after_put)
        client.meta.events.register("before-call.s3.PutObject", before_put)
        try:
            started = time.monotonic()
            future = store.publish(tmp_path / "stage" / "step-2", 2, "h")
            assert time.monotonic() - started < 1.0  # training is not held up
            assert stop_done.wait(60)
            assert store.pending() == 1 and not future.done()
            with pytest.raises(StorageError) as err:  # endpoint down: a retryable error
                store.latest()
            assert err.value.retryable and "cannot reach S3" in str(err.value)
            time.sleep(3)  # the outage lasts; the upload keeps retrying in the background
            assert store.pending() == 1
        finally:
            client.meta.events.unregister("after-call.s3.PutObject", after_put)
            client.meta.events.unregister("before-call.s3.PutObject", before_put)
        # Once the server is back, hold the retried uploads until the watcher below has looked at
        # least once, so the invariants are checked while the upload is still incomplete.
        observed = threading.Event()

        def gate(**kwargs: object) -> None:
            observed.wait(60)

        client.meta.events.register("before-call.s3.PutObject", gate)
        server.start()

        monitor = server.client()
        reader = CheckpointStore(output, server.options())
        step2 = "job/checkpoints/step-2/"
        observations = 0
        while not future.done():
            listing = {
                o["Key"][len(step2) :]: o["Size"]
                for o in monitor.list_objects_v2(Bucket=server.bucket, Prefix=step2).get("Contents", [])
            }
            if MANIFEST in listing:
                assert all(rel in listing for rel in digests), "manifest visible before all files"
            latest = reader.latest()
            assert latest is not None and latest.step in (1, 2)
            if latest.step == 2:
                assert set(digests) <= set(storage.list_tree(latest.uri, options=server.options()))
            observations += 1
            observed.set()
            time.sleep(0.05)  # deliberate: the pace of the observer, which looks while the upload runs
        client.meta.events.unregister("before-call.s3.PutObject", gate)
        refs = store.wait(120)
        assert [r.step for r in refs] == [2]
        assert observations >= 1
        latest = reader.latest()
        assert latest is not None and latest.step == 2
        local = reader.fetch(2, tmp_path / "resume")
        assert {rel: sha256(local / rel) for rel in digests} == digests
        store.close()
        reader.close()
    finally:
        server.close()


# ----- permanent errors: fail fast, name bucket and key, never the secret -----


def test_wrong_credentials_fail_fast_without_showing_the_secret(
    s3_server: SeaweedS3, s3_prefix: str, tmp_path: Path
) -> None:
    secret = "wrong-secret-0123456789abcdef"
    bad = s3_server.options(secret_access_key=secret, max_attempts=5)
    bucket, key = storage.split_s3(f"{s3_prefix}/x/model.bin")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: storage.read_bytes(f"s3://{bucket}/{key}", options=bad),
        lambda: storage.upload_file(src, f"s3://{bucket}/{key}", options=bad),
        lambda: storage.download_file(f"s3://{bucket}/{key}", tmp_path / "g", options=bad),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        assert time.monotonic() - started < 5  # 403 is not retried
        message = str(err.value)
        assert bucket in message and key in message and "access denied" in message
        assert "credentials Secret" in message
        assert secret not in message and s3_server.secret_key not in message
        assert not err.value.retryable
    with pytest.raises(StorageError) as err:
        storage.expand(f"s3://{bucket}/{key[:-3]}*", options=bad)
    assert "access denied" in str(err.value) and secret not in str(err.value)

    # A background checkpoint upload fails at once too, and is never reported complete.
    store = CheckpointStore(f"s3://{bucket}/{key}-run", bad, staging_dir=tmp_path / "stage", backoff_base=5)
    make_checkpoint(store, 1, size=100)
    started = time.monotonic()
    store.publish(tmp_path / "stage" / "step-1", 1, "h")
    with pytest.raises(CheckpointUploadError) as up:
        store.wait(30)
    assert time.monotonic() - started < 5
    assert up.value.steps == [1] and bucket in str(up.value) and secret not in str(up.value)
    store.close()
    assert CheckpointStore(f"s3://{bucket}/{key}-run", s3_server.options()).complete_steps() == []


def test_missing_bucket_names_bucket_and_key(s3_server: SeaweedS3, tmp_path: Path) -> None:
    opts = s3_server.options(max_attempts=5)
    uri = "s3://kubetune-no-such-bucket/models/llama/config.json"
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for call in (
        lambda: storage.read_bytes(uri, options=opts),
        lambda: storage.download_file(uri, tmp_path / "g", options=opts),  # HEAD 404 has no body
        lambda: storage.upload_file(src, uri, options=opts),
        lambda: storage.exists(uri, options=opts),
    ):
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        assert time.monotonic() - started < 5
        assert err.value.code == "NoSuchBucket" and not err.value.retryable
        assert "kubetune-no-such-bucket" in str(err.value) and "models/llama/config.json" in str(err.value)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        cached_model("s3://kubetune-no-such-bucket/models/llama/", tmp_path / "cache", options=opts)
    with pytest.raises(StorageError) as err:
        storage.read_bytes(f"s3://{s3_server.bucket}/no/such/key.json", options=opts)
    assert err.value.code == "NoSuchKey" and "no/such/key.json" in str(err.value)


# ----- transient errors: retried -----


def test_throttling_503_slowdown_is_retried(s3_server: SeaweedS3, s3_prefix: str, tmp_path: Path) -> None:
    _, prefix_key = storage.split_s3(s3_prefix)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        opts = s3_server.options(endpoint_url=proxy.endpoint_url, max_attempts=4)
        uri = f"s3://{s3_server.bucket}/{prefix_key}/throttled.bin"
        src = tmp_path / "f"
        src.write_bytes(os.urandom(10_000))
        proxy.fail_next(2)
        storage.upload_file(src, uri, options=opts)
        proxy.fail_next(3)
        assert storage.read_bytes(uri, options=opts) == src.read_bytes()
        assert proxy.injected == 5

        # More throttling than the client's attempts: a retryable error, named as throttling.
        proxy.fail_next(100)
        with pytest.raises(StorageError) as err:
            storage.read_bytes(uri, options=opts.with_(max_attempts=2))
        assert err.value.retryable and "SlowDown" in str(err.value)
        proxy.fail_next(0)

        # A background upload outlasts it: the store retries beyond the client's attempts.
        store = CheckpointStore(
            f"s3://{s3_server.bucket}/{prefix_key}/run",
            opts.with_(max_attempts=2),
            staging_dir=tmp_path / "stage",
            backoff_base=0.1,
            backoff_max=0.5,
        )
        digests = make_checkpoint(store, 7, size=2000)
        proxy.fail_next(9)
        store.publish(tmp_path / "stage" / "step-7", 7, "h")
        assert [r.step for r in store.wait(60)] == [7]
        local = store.fetch(7, tmp_path / "resume")
        assert {rel: sha256(local / rel) for rel in digests} == digests
        store.close()


def test_read_timeout_is_retried(s3_server: SeaweedS3, s3_prefix: str) -> None:
    _, prefix_key = storage.split_s3(s3_prefix)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        opts = s3_server.options(endpoint_url=proxy.endpoint_url, read_timeout=1.0, max_attempts=3)
        uri = f"s3://{s3_server.bucket}/{prefix_key}/slow.txt"
        storage.write_bytes(uri, b"patience", options=opts)
        proxy.delay_next(1, seconds=2.5)
        started = time.monotonic()
        assert storage.read_bytes(uri, options=opts) == b"patience"
        assert proxy.injected == 1 and time.monotonic() - started >= 1.0
        proxy.delay_next(10, seconds=2.5)
        with pytest.raises(StorageError) as err:
            storage.read_bytes(uri, options=opts.with_(max_attempts=1))
        assert err.value.retryable


# ----- local outputs and the manifest format -----


def test_local_checkpoint_store(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "out"))
    for step in (1, 2, 3):
        root = store.step_dir(step)
        assert root == tmp_path / "out" / "checkpoints" / f"step-{step}"
        write_tree(root, {"model.safetensors": os.urandom(1000), "sub/state.json": b"{}"})
        ref = store.publish(root, step, "abc", {"best": step == 2}, keep_last=1, protect={2}).result()
        assert ref.step == step
    assert store.complete_steps() == [2, 3]
    assert store.latest().step == 3 and store.latest().manifest["best"] is False  # type: ignore[union-attr]
    assert store.fetch(3, tmp_path / "ignored") == tmp_path / "out" / "checkpoints" / "step-3"
    # A truncated file makes a checkpoint incomplete.
    (tmp_path / "out" / "checkpoints" / "step-3" / "model.safetensors").write_bytes(b"short")
    assert store.complete_steps() == [2] and store.latest().step == 2  # type: ignore[union-attr]
    # Publishing from elsewhere copies into the output, manifest last.
    other = tmp_path / "elsewhere" / "step-9"
    write_tree(other, {"a.bin": b"a"})
    store.publish(other, 9, "abc")
    assert verify_checkpoint(tmp_path / "out" / "checkpoints" / "step-9")
    assert store.wait() == []


def test_manifest_format_and_config_hash(tmp_path: Path) -> None:
    write_tree(tmp_path / "c", {"b.bin": b"bb", "a/x.bin": b"x"})
    manifest = write_manifest(
        tmp_path / "c", 12, config_hash({"b": 1, "a": [1, 2]}), {"loss": 0.5, "step": 999}
    )
    on_disk = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["step"] == 12  # extra cannot override the fixed keys
    assert manifest["files"] == [
        {"path": "a/x.bin", "sha256": hashlib.sha256(b"x").hexdigest(), "size": 1},
        {"path": "b.bin", "sha256": hashlib.sha256(b"bb").hexdigest(), "size": 2},
    ]
    assert manifest["configHash"] == config_hash({"a": [1, 2], "b": 1})
    assert manifest["createdAt"].endswith("Z") and manifest["loss"] == 0.5
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # temp file renamed
    assert verify_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "b.bin").write_bytes(b"BB")  # same size, other content
    assert verify_checkpoint(tmp_path / "c", hashes=False) and not verify_checkpoint(tmp_path / "c")


def test_tls_endpoint_with_ca_bundle(s3_server: SeaweedS3, s3_prefix: str) -> None:
    _, prefix_key = storage.split_s3(s3_prefix)
    uri = f"s3://{s3_server.bucket}/{prefix_key}/tls.txt"
    tls = s3_server.options(endpoint_url=s3_server.https_endpoint_url, ca_bundle=s3_server.ca_bundle)
    storage.write_bytes(uri, b"over tls", options=tls)
    assert storage.read_bytes(uri, options=tls) == b"over tls"
    # The spec's caBundle reaches the client the same way.
    from_spec = S3Options.from_spec(
        S3Spec(
            endpoint_url=s3_server.https_endpoint_url, addressing_style="path", ca_bundle=s3_server.ca_bundle
        ),
        env={},
        region="us-east-1",
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
    )
    assert storage.read_bytes(uri, options=from_spec) == b"over tls"
    # Without the CA: a clear, permanent error.
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.read_bytes(uri, options=tls.with_(ca_bundle=None, max_attempts=5))
    assert time.monotonic() - started < 5 and not err.value.retryable
    assert "TLS verification failed" in str(err.value) and "caBundle" in str(err.value)
    # verifyTls false skips verification.
    with pytest.warns(Warning):
        assert storage.read_bytes(uri, options=tls.with_(ca_bundle=None, verify_tls=False)) == b"over tls"
