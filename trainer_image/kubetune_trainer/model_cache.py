"""The local model cache: an S3 model prefix downloaded once per content (URI, keys, sizes, ETags), and
a base model with an adapter merged in (model.adapter), merged once per content of both.

Only the trainer loads models, so the cache lives here and not in the base `kubetune.storage`; its
file lock (the `filelock` package) comes with the trainer's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from kubetune.storage import S3Options, StorageError
from kubetune.storage.client import options_or_env
from kubetune.storage.listing import list_objects
from kubetune.storage.objects import atomic_write
from kubetune.storage.trees import download_objects
from kubetune.storage.uri import dir_key, is_s3, split_s3
from kubetune.storage.uri import local_path as _local

log = logging.getLogger(__name__)

CACHE_MARKER = ".kubetune-complete"
DEFAULT_CACHE_ROOT = Path("~/.cache/kubetune/models")


def cached_model(
    uri: str,
    cache_root: str | os.PathLike[str] | None = None,
    *,
    options: S3Options | None = None,
) -> Path:
    """A local directory with the model files under ``uri``.

    Local paths are returned as they are. An S3 prefix is downloaded (files in parallel, large ones
    in parallel parts) into ``cache_root/<name>-<hash>``, where the hash covers the URI and every
    object's key, size and ETag: a second call (another job on the same node) with unchanged
    objects downloads nothing, and a changed object gives a new directory. A marker file written
    last (and an atomic rename of the whole directory) means a half-finished download is never
    used; a file lock keeps concurrent jobs from downloading the same model twice.
    """
    if not is_s3(uri):
        path = _local(uri)
        if not path.exists():
            raise StorageError(f"model path {path} does not exist", uri=str(uri))
        return path
    opts = options_or_env(options)
    bucket, key = split_s3(uri)
    prefix = dir_key(key)
    listing = sorted(
        (o["Key"][len(prefix) :], int(o["Size"]), str(o.get("ETag", "")).strip('"'), o["Key"])
        for o in list_objects(bucket, prefix, opts)
        if not o["Key"].endswith("/")
    )
    if not listing:
        raise StorageError(
            f"no model files under s3://{bucket}/{prefix} (bucket {bucket!r}, prefix {prefix!r})",
            uri=uri,
            bucket=bucket,
            key=prefix,
            code="NoSuchKey",
        )
    identity = {
        "uri": f"s3://{bucket}/{prefix}",
        "endpoint": opts.endpoint_url,
        "objects": [[rel, size, etag] for rel, size, etag, _ in listing],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(
        c if c.isalnum() or c in "-._" else "-" for c in (prefix.rstrip("/").rsplit("/", 1)[-1] or bucket)
    )
    root = Path(cache_root if cache_root is not None else DEFAULT_CACHE_ROOT).expanduser()

    def download(tmp: Path) -> None:
        started = time.monotonic()
        download_objects(bucket, prefix, [(k, size) for _, size, _, k in listing], tmp, opts)
        for rel, size, _etag, _key in listing:
            if (tmp / rel).stat().st_size != size:
                raise StorageError(
                    f"downloaded s3://{bucket}/{prefix}{rel} has the wrong size",
                    uri=uri,
                    bucket=bucket,
                    key=prefix + rel,
                    retryable=True,
                )
        total = sum(size for _, size, _, _ in listing)
        log.info("model %s: downloaded %.1f MB in %.1fs", uri, total / 1e6, time.monotonic() - started)

    return build_once(root, f"{name}-{digest}", identity, download, f"model {uri}")


def build_once(
    root: Path, name: str, identity: Mapping[str, Any], build: Callable[[Path], None], what: str
) -> Path:
    """``root/name``, made by `build(directory)` once: written to a temporary directory, marked
    complete (the marker holds `identity`) and renamed, under a file lock, so that concurrent
    processes (ranks, jobs on the node) build it once and never read a partial one."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if (target / CACHE_MARKER).is_file():
        log.info("%s: cached at %s", what, target)
        return target
    with FileLock(root / f".{name}.lock"):
        if (target / CACHE_MARKER).is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            build(tmp)
            atomic_write(tmp / CACHE_MARKER, json.dumps(identity, indent=1).encode())
            if target.exists():
                shutil.rmtree(target)  # an unfinished leftover (no marker)
            tmp.chmod(0o755)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tree_identity(path: Path, names: tuple[str, ...] | None = None) -> list[list[object]]:
    """[relative path, size, mtime or sha256] of the files under `path` that make the model.

    `names` given (an adapter's few files): those files' contents are hashed. Otherwise (a base model,
    perhaps many GB): every file but hidden ones (cache markers), by size and modification time, which a
    rewritten file changes and the model cache's downloads (written once) keep."""
    entries: list[list[object]] = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if names is not None and relative not in names:
            continue
        if names is None and any(part.startswith(".") for part in relative.split("/")):
            continue
        stat = file.stat()
        if names is not None:
            entries.append([relative, stat.st_size, hashlib.sha256(file.read_bytes()).hexdigest()])
        else:
            entries.append([relative, stat.st_size, stat.st_mtime_ns])
    return entries


def merged_base(
    base_dir: Path,
    adapter_dir: Path,
    merge: Callable[[Path], None],
    cache_root: str | os.PathLike[str],
    *,
    adapter_files: tuple[str, ...],
) -> Path:
    """The directory of `base_dir` with the adapter in `adapter_dir` merged in, made by `merge(target)` once.

    Kept under ``cache_root/merged/<base>-with-adapter-<hash>``, the hash covering the base's files (path,
    sizes, modification times) and the adapter's (`adapter_files`, their contents): a resumed run, another
    rank or another job on the node merges nothing, and a changed base or adapter gives a new directory.
    Written to a temporary directory, marked complete and renamed, under a file lock, as cached_model."""
    identity = {
        "base": str(base_dir.resolve()),
        "baseFiles": _tree_identity(base_dir),
        "adapterFiles": _tree_identity(adapter_dir, adapter_files),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    # named by the base only: the same adapter read from another place (a local copy, S3) is the same merge
    name = "".join(c if c.isalnum() or c in "-._" else "-" for c in base_dir.name)[:60] + "-with-adapter"

    def merge_into(tmp: Path) -> None:
        started = time.monotonic()
        merge(tmp)
        log.info("model.adapter %s: merged in %.1fs", adapter_dir, time.monotonic() - started)

    return build_once(
        Path(cache_root).expanduser() / "merged",
        f"{name}-{digest}",
        identity,
        merge_into,
        f"model.adapter {adapter_dir}",
    )
