"""Listing: the files under a prefix or directory, the children of one, existence, glob expansion."""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
from collections.abc import Iterator
from typing import Any

from kubetune.storage.client import S3Options, get_client, options_or_env
from kubetune.storage.errors import classified_error, not_found_error, storage_error
from kubetune.storage.uri import GLOB_CHARS, dir_key, has_glob, is_s3, split_s3
from kubetune.storage.uri import local_path as _local


def list_objects(bucket: str, prefix: str, options: S3Options) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix`` (recursive), as ListObjectsV2 ``Contents`` entries."""
    paginator = get_client(options).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", []) or []
    except Exception as exc:  # noqa: BLE001
        raise classified_error(exc, bucket, prefix, "list", options) from exc


def list_tree(prefix_uri: str, *, options: S3Options | None = None) -> dict[str, int]:
    """Every file under a prefix or directory, recursively: relative path -> size in bytes."""
    if is_s3(prefix_uri):
        opts = options_or_env(options)
        bucket, key = split_s3(prefix_uri)
        prefix = dir_key(key)
        return {
            obj["Key"][len(prefix) :]: int(obj["Size"])
            for obj in list_objects(bucket, prefix, opts)
            if not obj["Key"].endswith("/")
        }
    root = _local(prefix_uri)
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def list_dir(prefix_uri: str, *, options: S3Options | None = None) -> list[str]:
    """Names of the immediate children (files and "directories") of a prefix, sorted."""
    if not is_s3(prefix_uri):
        root = _local(prefix_uri)
        return sorted(os.listdir(root)) if root.is_dir() else []
    opts = options_or_env(options)
    bucket, key = split_s3(prefix_uri)
    prefix = dir_key(key)
    names: set[str] = set()
    paginator = get_client(opts).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []) or []:
                name = common["Prefix"][len(prefix) :].rstrip("/")
                if name:
                    names.add(name)
            for obj in page.get("Contents", []) or []:
                name = obj["Key"][len(prefix) :]
                if name and "/" not in name:
                    names.add(name)
    except Exception as exc:  # noqa: BLE001
        raise classified_error(exc, bucket, prefix, "list", opts) from exc
    return sorted(names)


def exists(uri: str, *, options: S3Options | None = None) -> bool:
    """True if a file (local) or an object (S3) exists at ``uri``."""
    if not is_s3(uri):
        return _local(uri).exists()
    opts = options_or_env(options)
    bucket, key = split_s3(uri)
    from botocore.exceptions import ClientError

    try:
        get_client(opts).head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        err = storage_error(exc, bucket, key, "check", opts)
        if err.code == "NoSuchKey":
            # A missing bucket is an error, not "no such object".
            err = not_found_error(bucket, key, "check", opts)
            if err.code == "NoSuchKey":
                return False
        raise err from exc
    except Exception as exc:  # noqa: BLE001
        raise storage_error(exc, bucket, key, "check", opts) from exc


def expand(uri_or_glob: str, *, options: S3Options | None = None) -> list[str]:
    """The files a path, directory, prefix or glob names, sorted.

    - a file or object: itself;
    - a directory or prefix (``s3://b/dir`` or ``s3://b/dir/``): every file under it, recursively;
    - a glob (``*``, ``?``, ``[...]``): local paths with :mod:`glob` (``**`` recursive); S3 keys with
      :func:`fnmatch.fnmatchcase` over a listing of the longest prefix without glob characters
      (``*`` there also matches ``/``).

    Nothing found gives an empty list.
    """
    if not is_s3(uri_or_glob):
        path = _local(uri_or_glob)
        if has_glob(str(path)):
            return sorted(p for p in globlib.glob(str(path), recursive=True) if os.path.isfile(p))
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file())
        return [str(path)] if path.is_file() else []
    opts = options_or_env(options)
    bucket, key = split_s3(uri_or_glob)
    if has_glob(key):
        cut = min(i for i in (key.find(c) for c in GLOB_CHARS) if i >= 0)
        keys = [o["Key"] for o in list_objects(bucket, key[:cut], opts)]
        return sorted(
            f"s3://{bucket}/{k}" for k in keys if not k.endswith("/") and fnmatch.fnmatchcase(k, key)
        )
    keys = [o["Key"] for o in list_objects(bucket, key, opts)]
    if key and not key.endswith("/") and key in keys:
        return [f"s3://{bucket}/{key}"]
    prefix = dir_key(key)
    return sorted(f"s3://{bucket}/{k}" for k in keys if k.startswith(prefix) and not k.endswith("/"))
