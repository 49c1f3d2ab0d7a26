"""Whole trees: download, upload (some files last) and delete everything under a prefix or directory."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from s3transfer.subscribers import BaseSubscriber

from kubetune.storage.client import S3Options, get_client, options_or_env, transfer_manager
from kubetune.storage.errors import THROTTLE_CODES, StorageError, classified_error
from kubetune.storage.listing import list_objects
from kubetune.storage.objects import atomic_copy
from kubetune.storage.uri import dir_key, is_s3, split_s3
from kubetune.storage.uri import local_path as _local


class _SizeSubscriber(BaseSubscriber):
    """Tells the transfer manager an object's size (known from the listing) so it skips a HEAD request."""

    def __init__(self, size: int) -> None:
        self.size = size

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.size)


class _DoneSubscriber(BaseSubscriber):
    """Calls `callback()` once a transfer has succeeded."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def on_done(self, future: Any, **kwargs: Any) -> None:
        try:
            future.result()
        except BaseException:  # noqa: BLE001 - failures are reported by the caller
            return
        self.callback()


def local_files(root: Path) -> list[str]:
    if not root.is_dir():
        raise StorageError(f"not a directory: {root}")
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


def download_tree(
    prefix_uri: str,
    local_dir: str | os.PathLike[str],
    *,
    options: S3Options | None = None,
    only: Collection[str] | None = None,
) -> list[Path]:
    """Copy every file under a prefix or directory into ``local_dir``, several files at once.

    ``only`` restricts the copy to these relative paths. Returns the local files written.
    """
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if not is_s3(prefix_uri):
        root = _local(prefix_uri)
        rels = [r for r in local_files(root) if only is None or r in only]
        for rel in rels:
            atomic_copy(root / rel, dest / rel)
        return [dest / rel for rel in rels]
    opts = options_or_env(options)
    bucket, key = split_s3(prefix_uri)
    prefix = dir_key(key)
    objects = [
        (o["Key"], int(o["Size"]))
        for o in list_objects(bucket, prefix, opts)
        if not o["Key"].endswith("/") and (only is None or o["Key"][len(prefix) :] in only)
    ]
    return download_objects(bucket, prefix, objects, dest, opts)


def download_objects(
    bucket: str, prefix: str, objects: list[tuple[str, int]], dest: Path, options: S3Options
) -> list[Path]:
    written: list[Path] = []
    with transfer_manager(options) as manager:
        futures = []
        for obj_key, size in objects:
            target = dest / obj_key[len(prefix) :]
            if not target.resolve().is_relative_to(dest.resolve()):
                raise StorageError(f"refusing to write s3://{bucket}/{obj_key} outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            future = manager.download(bucket, obj_key, str(target), subscribers=[_SizeSubscriber(size)])
            futures.append((obj_key, target, future))
        for obj_key, target, future in futures:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001
                raise classified_error(exc, bucket, obj_key, "download", options) from exc
            written.append(target)
    return written


def upload_tree(
    local_dir: str | os.PathLike[str],
    prefix_uri: str,
    last: Collection[str] = ("manifest.json",),
    *,
    options: S3Options | None = None,
    skip: Collection[str] = (),
    on_uploaded: Callable[[str], None] | None = None,
) -> list[str]:
    """Copy every file under ``local_dir`` to a prefix or directory, several files at once.

    Files whose relative path is in ``last`` are uploaded only after all the others succeeded, so a
    reader that sees them knows the rest is there. ``skip`` leaves out relative paths;
    ``on_uploaded(rel)`` is called after each file is stored. Returns the destination URIs.
    """
    root = Path(local_dir)
    rels = [r for r in local_files(root) if r not in skip]
    first = [r for r in rels if r not in last]
    final = [r for r in rels if r in last]
    if not is_s3(prefix_uri):
        dest = _local(prefix_uri)
        for rel in first + final:
            atomic_copy(root / rel, dest / rel)
            if on_uploaded:
                on_uploaded(rel)
        return [str(dest / rel) for rel in first + final]
    opts = options_or_env(options)
    bucket, key = split_s3(prefix_uri)
    prefix = dir_key(key)
    with transfer_manager(opts) as manager:
        for batch in (first, final):
            futures = []
            for rel in batch:
                subscribers = [_DoneSubscriber(functools.partial(on_uploaded, rel))] if on_uploaded else None
                futures.append(
                    (rel, manager.upload(str(root / rel), bucket, prefix + rel, subscribers=subscribers))
                )
            errors = []
            for rel, future in futures:
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001
                    errors.append((rel, exc))
            if errors:
                rel, error = errors[0]
                raise classified_error(error, bucket, prefix + rel, "upload", opts) from error
    return [f"s3://{bucket}/{prefix}{rel}" for rel in first + final]


def delete_tree(prefix_uri: str, *, options: S3Options | None = None, first: Collection[str] = ()) -> int:
    """Delete everything under a prefix or directory; returns the number of files deleted.

    Relative paths in ``first`` are deleted before the rest (a manifest, so that a reader never
    sees a manifest whose files are gone).
    """
    if not is_s3(prefix_uri):
        root = _local(prefix_uri)
        if not root.exists():
            return 0
        count = len(local_files(root))
        for rel in first:
            with contextlib.suppress(FileNotFoundError):
                (root / rel).unlink()
        shutil.rmtree(root, ignore_errors=False)
        return count
    opts = options_or_env(options)
    bucket, key = split_s3(prefix_uri)
    prefix = dir_key(key)
    if not prefix:
        raise StorageError(f"refusing to delete a whole bucket: {prefix_uri}", bucket=bucket)
    keys = [o["Key"] for o in list_objects(bucket, prefix, opts)]
    early = [k for k in keys if k[len(prefix) :] in first]
    rest = [k for k in keys if k not in early]
    # Servers backed by a file system (SeaweedFS, MinIO in some modes) keep emptied "directories",
    # which would still show in delimiter listings: delete those keys too, deepest first (on AWS
    # these keys usually do not exist and deleting them is a no-op).
    dirs = {prefix}
    for k in keys:
        parts = k[len(prefix) :].split("/")[:-1]
        dirs.update(prefix + "/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
    by_depth = sorted({d.count("/") for d in dirs}, reverse=True)
    dir_batches = [[d for d in dirs if d.count("/") == depth] for depth in by_depth]
    client = get_client(opts)
    for batch_keys in (early, rest, *dir_batches):
        for start in range(0, len(batch_keys), 1000):
            chunk = batch_keys[start : start + 1000]
            try:
                response = client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except Exception as exc:  # noqa: BLE001
                raise classified_error(exc, bucket, chunk[0], "delete", opts) from exc
            failed = [e for e in response.get("Errors", []) or [] if e.get("Code") != "NoSuchKey"]
            if failed:
                e = failed[0]
                raise StorageError(
                    f"cannot delete s3://{bucket}/{e.get('Key')}: {e.get('Code')}: {e.get('Message')}",
                    uri=f"s3://{bucket}/{e.get('Key')}",
                    bucket=bucket,
                    key=e.get("Key"),
                    code=e.get("Code"),
                    retryable=e.get("Code") in THROTTLE_CODES,
                )
    return len(keys)
