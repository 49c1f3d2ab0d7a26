"""Single files and objects: read, write, delete, download, upload (atomic on local disks)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from kubetune.storage.client import S3Options, get_client, options_or_env, transfer_manager
from kubetune.storage.errors import StorageError, classified_error
from kubetune.storage.uri import is_s3, split_s3
from kubetune.storage.uri import local_path as _local


def read_bytes(uri: str, *, options: S3Options | None = None) -> bytes:
    """The whole content of a file or object."""
    if not is_s3(uri):
        return _local(uri).read_bytes()
    opts = options_or_env(options)
    bucket, key = split_s3(uri)
    try:
        response = get_client(opts).get_object(Bucket=bucket, Key=key)
        return response["Body"].read()
    except Exception as exc:  # noqa: BLE001
        raise classified_error(exc, bucket, key, "read", opts) from exc


def write_bytes(uri: str, data: bytes, *, options: S3Options | None = None) -> None:
    """Write a small file or object in one request (atomic for both)."""
    if not is_s3(uri):
        atomic_write(_local(uri), data)
        return
    opts = options_or_env(options)
    bucket, key = split_s3(uri)
    try:
        get_client(opts).put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as exc:  # noqa: BLE001
        raise classified_error(exc, bucket, key, "write", opts) from exc


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() == dst.resolve():
        return
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def delete(uri: str, *, options: S3Options | None = None) -> None:
    """Delete one file or object; a missing one is not an error."""
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            _local(uri).unlink()
        return
    opts = options_or_env(options)
    bucket, key = split_s3(uri)
    try:
        get_client(opts).delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001
        err = classified_error(exc, bucket, key, "delete", opts)
        if err.code != "NoSuchKey":
            raise err from exc


def download_file(uri: str, local_path: str | os.PathLike[str], *, options: S3Options | None = None) -> Path:
    """Copy a file or object to ``local_path`` (parallel ranged GETs above the multipart threshold).

    The file appears atomically (written under a temporary name, then renamed).
    """
    dest = Path(local_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        atomic_copy(_local(uri), dest)
        return dest
    opts = options_or_env(options)
    bucket, key = split_s3(uri)
    with transfer_manager(opts) as manager:
        try:
            manager.download(bucket, key, str(dest)).result()
        except Exception as exc:  # noqa: BLE001
            raise classified_error(exc, bucket, key, "download", opts) from exc
    return dest


def upload_file(local_path: str | os.PathLike[str], uri: str, *, options: S3Options | None = None) -> str:
    """Copy a local file to a path or object (multipart, parts in parallel, above the threshold)."""
    src = Path(local_path)
    if not is_s3(uri):
        atomic_copy(src, _local(uri))
        return uri
    opts = options_or_env(options)
    bucket, key = split_s3(uri)
    if not src.is_file():
        raise StorageError(f"cannot upload {src} to {uri}: not a file", uri=uri, bucket=bucket, key=key)
    with transfer_manager(opts) as manager:
        try:
            manager.upload(str(src), bucket, key).result()
        except Exception as exc:  # noqa: BLE001
            raise classified_error(exc, bucket, key, "upload", opts) from exc
    return uri
