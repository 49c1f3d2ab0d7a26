"""One storage layer for local paths and ``s3://bucket/key`` URIs.

Every place that takes a path (model source, dataset files and globs, output) goes through this
module, so an ``s3://`` URI works wherever a local path does.

S3 access uses boto3 only: the client is built with a botocore ``Config`` (retry mode
standard/adaptive with exponential backoff and jitter, connect/read timeouts, addressing style,
TLS verification or a CA bundle), and files move through boto3's transfer manager (multipart above
a threshold, parts in parallel, several files at once). Credentials come from the standard AWS
chain (environment, shared config/credentials files, web identity / IRSA, instance metadata)
unless they are given explicitly in :class:`S3Options`.

Errors are raised as :class:`StorageError`. Its message names the bucket and key and the likely
cause, and never contains a secret value. ``retryable`` tells transient failures (endpoint down,
timeouts, throttling, 5xx) from permanent ones (403 access denied, 404 no such bucket/key), which
callers must not retry.

All functions are thread-safe: S3 clients are cached per :class:`S3Options` and botocore clients
may be shared between threads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob as globlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.spec import S3Spec, StorageSpec

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
MiB = 1024 * 1024
GLOB_CHARS = "*?["
CACHE_MARKER = ".kubetune-complete"
DEFAULT_CACHE_ROOT = Path("~/.cache/kubetune/models")

# Error codes, by what they mean for the caller.
_ACCESS_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "TokenRefreshRequired", "InvalidClientTokenId", "AllAccessDisabled", "AccountProblem", "403", "Forbidden",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_THROTTLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestThrottled", "ProvisionedThroughputExceededException", "ServiceUnavailable", "InternalError",
    "RequestTimeout", "RequestTimeTooSkewed", "BandwidthLimitExceeded", "PriorRequestNotComplete",
}


class StorageError(Exception):
    """A storage operation failed.

    ``retryable`` is true for transient causes (connection refused, timeouts, throttling, 5xx) and
    false for 403/404 and invalid arguments. The message names the URI (bucket and key) and the
    likely cause; it never contains secret values.
    """

    def __init__(
        self,
        message: str,
        *,
        uri: str | None = None,
        bucket: str | None = None,
        key: str | None = None,
        code: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.uri = uri
        self.bucket = bucket
        self.key = key
        self.code = code
        self.retryable = retryable


# ----- URIs -----


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI or path components with single slashes (works for both kinds)."""
    out = str(base)
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def local_path(uri: str | os.PathLike[str]) -> Path:
    """A local path or ``file://`` URI as a Path (``~`` expanded)."""
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser()


_local = local_path


def _dir_key(key: str) -> str:
    """A key used as a directory prefix: '' or ending with '/'."""
    return key if not key or key.endswith("/") else key + "/"


def _has_glob(text: str) -> bool:
    return any(c in text for c in GLOB_CHARS)


# ----- options and clients -----


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: endpoint, region, addressing, TLS, retries, timeouts and transfer tuning.

    Credentials are taken from the standard AWS chain unless ``access_key_id`` and
    ``secret_access_key`` are set here (the secret is never shown in ``repr``).
    """

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    verify_tls: bool = True
    ca_bundle: str | None = None
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    max_attempts: int = 6
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> S3Options:
        """Options from ``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION`` and ``AWS_CA_BUNDLE``."""
        return cls.from_spec(None, env=env, **overrides)

    @classmethod
    def from_spec(
        cls,
        spec: S3Spec | StorageSpec | None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> S3Options:
        """Options from a ``spec.storage.s3`` (or ``spec.storage``) block, the environment filling gaps.

        The spec wins over the environment; ``overrides`` win over both.
        """
        env = os.environ if env is None else env
        s3 = getattr(spec, "s3", spec)  # StorageSpec -> its S3Spec
        endpoint = getattr(s3, "endpoint_url", None) or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = getattr(s3, "region", None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        ca_bundle = getattr(s3, "ca_bundle", None) or env.get("AWS_CA_BUNDLE") or None
        values: dict[str, Any] = {
            "endpoint_url": endpoint or None,
            "region": region or None,
            "addressing_style": getattr(s3, "addressing_style", None) or "auto",
            "verify_tls": bool(getattr(s3, "verify_tls", True)),
            "ca_bundle": ca_bundle,
        }
        if env.get("AWS_RETRY_MODE") in ("standard", "adaptive", "legacy"):
            values["retry_mode"] = env["AWS_RETRY_MODE"]
        if (env.get("AWS_MAX_ATTEMPTS") or "").isdigit():
            values["max_attempts"] = int(env["AWS_MAX_ATTEMPTS"])
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown S3Options fields: {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes: Any) -> S3Options:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def secrets(self) -> list[str]:
        """Secret values that must never appear in messages."""
        values = [self.secret_access_key, self.session_token]
        values += [os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")]
        return [v for v in values if v and len(v) >= 4]


def make_s3_client(options: S3Options | None = None) -> Any:
    """A new boto3 S3 client for these options (see :func:`get_client` for the shared one)."""
    import boto3
    from botocore.config import Config

    opts = options or S3Options.from_env()
    session = boto3.session.Session(
        aws_access_key_id=opts.access_key_id,
        aws_secret_access_key=opts.secret_access_key,
        aws_session_token=opts.session_token,
        profile_name=opts.profile,
    )
    config_args: dict[str, Any] = {
        "region_name": opts.region,
        "signature_version": "s3v4",
        "retries": {"total_max_attempts": opts.max_attempts, "mode": opts.retry_mode},
        "connect_timeout": opts.connect_timeout,
        "read_timeout": opts.read_timeout,
        "s3": {"addressing_style": opts.addressing_style},
        "max_pool_connections": max(10, 2 * opts.max_concurrency),
        "tcp_keepalive": True,
    }
    if opts.endpoint_url:
        # Self-hosted servers (MinIO, Ceph RGW, SeaweedFS, older versions of each) do not all accept
        # the CRC checksums that newer botocore adds to every request by default.
        config_args["request_checksum_calculation"] = "when_required"
        config_args["response_checksum_validation"] = "when_required"
    verify: bool | str = opts.ca_bundle if (opts.ca_bundle and opts.verify_tls) else opts.verify_tls
    return session.client("s3", endpoint_url=opts.endpoint_url, verify=verify, config=Config(**config_args))


_clients: dict[S3Options, Any] = {}
_clients_lock = threading.Lock()


def get_client(options: S3Options | None = None) -> Any:
    """The shared (cached, thread-safe) S3 client for these options."""
    opts = options or S3Options.from_env()
    with _clients_lock:
        client = _clients.get(opts)
        if client is None:
            client = _clients[opts] = make_s3_client(opts)
        return client


def transfer_config(options: S3Options) -> Any:
    """boto3 ``TransferConfig`` for these options (multipart threshold/chunk size, concurrency)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=options.multipart_threshold,
        multipart_chunksize=options.multipart_chunksize,
        max_concurrency=options.max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


@contextlib.contextmanager
def _transfer_manager(options: S3Options) -> Iterator[Any]:
    from boto3.s3.transfer import create_transfer_manager

    manager = create_transfer_manager(get_client(options), transfer_config(options))
    try:
        yield manager
    except BaseException:
        manager.shutdown(cancel=True)
        raise
    manager.shutdown()


# ----- errors -----


def _redact(text: str, options: S3Options) -> str:
    for secret in options.secrets():
        text = text.replace(secret, "***")
    return text


def _error(exc: BaseException, bucket: str, key: str, action: str, options: S3Options) -> StorageError:
    """Translate a botocore/s3transfer exception into a StorageError naming bucket and key."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, StorageError):
        return exc
    uri = f"s3://{bucket}/{key}"
    endpoint = options.endpoint_url or "the default AWS endpoint"

    def make(message: str, code: str | None, retryable: bool) -> StorageError:
        return StorageError(
            _redact(message, options), uri=uri, bucket=bucket, key=key, code=code, retryable=retryable
        )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code") or "")
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        server_message = str(err.get("Message") or "")
        if code in _ACCESS_CODES or status == 403:
            cause = {
                "InvalidAccessKeyId": "the access key id is not known to the server",
                "SignatureDoesNotMatch": "the secret access key does not match the access key id",
                "ExpiredToken": "the session token has expired",
            }.get(code, "the credentials are not allowed this operation")
            return make(
                f"access denied ({code or status}) to {action} {uri} (bucket {bucket!r}, key {key!r}) at "
                f"{endpoint}: {cause}; check the credentials Secret (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY) or the service account's IAM role and the bucket policy",
                code or "403", False,
            )
        if code == "NoSuchBucket":
            return make(
                f"bucket {bucket!r} does not exist (NoSuchBucket) at {endpoint}; cannot {action} {uri} "
                f"(key {key!r}): check the bucket name, the endpoint URL and the region",
                code, False,
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return make(
                f"no such object (NoSuchKey): cannot {action} {uri} (bucket {bucket!r}, key {key!r}) at {endpoint}",
                "NoSuchKey", False,
            )
        if code in _THROTTLE_CODES or (isinstance(status, int) and status >= 500) or status == 429:
            return make(
                f"S3 is unavailable or throttling ({code or status}: {server_message}) while trying to "
                f"{action} {uri} (after {options.max_attempts} attempts with backoff)",
                code or str(status), True,
            )
        return make(
            f"cannot {action} {uri} (bucket {bucket!r}, key {key!r}): {code or status}: {server_message}",
            code or str(status), False,
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return make(
            f"no usable AWS credentials to {action} {uri} (bucket {bucket!r}): set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY from the credentials Secret, or configure web identity (IRSA)",
            "NoCredentials", False,
        )
    from botocore.exceptions import SSLError

    if isinstance(exc, SSLError):
        return make(
            f"TLS verification failed for {endpoint} while trying to {action} {uri} (bucket {bucket!r}): "
            f"{exc}; set storage.s3.caBundle (or AWS_CA_BUNDLE) to the CA that signed the server's "
            f"certificate, or storage.s3.verifyTls false",
            "SSLError", False,
        )
    retryable_types: tuple[type[BaseException], ...] = (
        BotoConnectionError, HTTPClientError, TimeoutError, ConnectionError,
    )
    try:
        from s3transfer.exceptions import RetriesExceededError

        retryable_types += (RetriesExceededError,)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, retryable_types):
        return make(
            f"cannot reach S3 at {endpoint} to {action} {uri} (bucket {bucket!r}, key {key!r}): "
            f"{type(exc).__name__}: {exc}",
            type(exc).__name__, True,
        )
    if isinstance(exc, OSError):
        return make(f"local file error while trying to {action} {uri}: {exc}", type(exc).__name__, False)
    if isinstance(exc, BotoCoreError):
        return make(f"cannot {action} {uri}: {type(exc).__name__}: {exc}", type(exc).__name__, False)
    return make(f"cannot {action} {uri}: {type(exc).__name__}: {exc}", type(exc).__name__, False)


def _not_found_error(bucket: str, key: str, action: str, options: S3Options) -> StorageError:
    """A 404 from HEAD has no body: tell a missing bucket from a missing key."""
    from botocore.exceptions import ClientError

    try:
        get_client(options).head_bucket(Bucket=bucket)
    except ClientError as exc:
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404", "NotFound"):
            exc.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
            return _error(exc, bucket, key, action, options)
    except Exception:  # noqa: BLE001 - the original 404 is the better message then
        pass
    return StorageError(
        f"no such object (NoSuchKey): cannot {action} s3://{bucket}/{key} (bucket {bucket!r}, key {key!r})",
        uri=f"s3://{bucket}/{key}", bucket=bucket, key=key, code="NoSuchKey", retryable=False,
    )


def _raise(exc: BaseException, bucket: str, key: str, action: str, options: S3Options) -> StorageError:
    err = _error(exc, bucket, key, action, options)
    if err.code == "NoSuchKey":
        err = _not_found_error(bucket, key, action, options)
    return err


def _opts(options: S3Options | None) -> S3Options:
    return options or S3Options.from_env()


# ----- listing -----


def _list_objects(bucket: str, prefix: str, options: S3Options) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix`` (recursive), as ListObjectsV2 ``Contents`` entries."""
    paginator = get_client(options).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", []) or []
    except Exception as exc:  # noqa: BLE001
        raise _raise(exc, bucket, prefix, "list", options) from exc


def list_tree(prefix_uri: str, *, options: S3Options | None = None) -> dict[str, int]:
    """Every file under a prefix or directory, recursively: relative path -> size in bytes."""
    if is_s3(prefix_uri):
        opts = _opts(options)
        bucket, key = split_s3(prefix_uri)
        prefix = _dir_key(key)
        return {
            obj["Key"][len(prefix):]: int(obj["Size"])
            for obj in _list_objects(bucket, prefix, opts)
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
    opts = _opts(options)
    bucket, key = split_s3(prefix_uri)
    prefix = _dir_key(key)
    names: set[str] = set()
    paginator = get_client(opts).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []) or []:
                name = common["Prefix"][len(prefix):].rstrip("/")
                if name:
                    names.add(name)
            for obj in page.get("Contents", []) or []:
                name = obj["Key"][len(prefix):]
                if name and "/" not in name:
                    names.add(name)
    except Exception as exc:  # noqa: BLE001
        raise _raise(exc, bucket, prefix, "list", opts) from exc
    return sorted(names)


def exists(uri: str, *, options: S3Options | None = None) -> bool:
    """True if a file (local) or an object (S3) exists at ``uri``."""
    if not is_s3(uri):
        return _local(uri).exists()
    opts = _opts(options)
    bucket, key = split_s3(uri)
    from botocore.exceptions import ClientError

    try:
        get_client(opts).head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        err = _error(exc, bucket, key, "check", opts)
        if err.code == "NoSuchKey":
            # A missing bucket is an error, not "no such object".
            err = _not_found_error(bucket, key, "check", opts)
            if err.code == "NoSuchKey":
                return False
        raise err from exc
    except Exception as exc:  # noqa: BLE001
        raise _error(exc, bucket, key, "check", opts) from exc


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
        if _has_glob(str(path)):
            return sorted(p for p in globlib.glob(str(path), recursive=True) if os.path.isfile(p))
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file())
        return [str(path)] if path.is_file() else []
    opts = _opts(options)
    bucket, key = split_s3(uri_or_glob)
    if _has_glob(key):
        cut = min(i for i in (key.find(c) for c in GLOB_CHARS) if i >= 0)
        keys = [o["Key"] for o in _list_objects(bucket, key[:cut], opts)]
        return sorted(f"s3://{bucket}/{k}" for k in keys if not k.endswith("/") and fnmatch.fnmatchcase(k, key))
    keys = [o["Key"] for o in _list_objects(bucket, key, opts)]
    if key and not key.endswith("/") and key in keys:
        return [f"s3://{bucket}/{key}"]
    prefix = _dir_key(key)
    return sorted(f"s3://{bucket}/{k}" for k in keys if k.startswith(prefix) and not k.endswith("/"))


# ----- single objects -----


def read_bytes(uri: str, *, options: S3Options | None = None) -> bytes:
    """The whole content of a file or object."""
    if not is_s3(uri):
        return _local(uri).read_bytes()
    opts = _opts(options)
    bucket, key = split_s3(uri)
    try:
        response = get_client(opts).get_object(Bucket=bucket, Key=key)
        return response["Body"].read()
    except Exception as exc:  # noqa: BLE001
        raise _raise(exc, bucket, key, "read", opts) from exc


def write_bytes(uri: str, data: bytes, *, options: S3Options | None = None) -> None:
    """Write a small file or object in one request (atomic for both)."""
    if not is_s3(uri):
        _atomic_write(_local(uri), data)
        return
    opts = _opts(options)
    bucket, key = split_s3(uri)
    try:
        get_client(opts).put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as exc:  # noqa: BLE001
        raise _raise(exc, bucket, key, "write", opts) from exc


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_copy(src: Path, dst: Path) -> None:
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
    opts = _opts(options)
    bucket, key = split_s3(uri)
    try:
        get_client(opts).delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001
        err = _raise(exc, bucket, key, "delete", opts)
        if err.code != "NoSuchKey":
            raise err from exc


class _SizeSubscriber:
    """Tells the transfer manager an object's size so that it skips a HEAD request."""

    def __init__(self, size: int) -> None:
        self.size = size

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.size)

    def on_progress(self, **kwargs: Any) -> None:
        pass

    def on_done(self, **kwargs: Any) -> None:
        pass


class _DoneSubscriber:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def on_queued(self, **kwargs: Any) -> None:
        pass

    def on_progress(self, **kwargs: Any) -> None:
        pass

    def on_done(self, future: Any, **kwargs: Any) -> None:
        try:
            future.result()
        except BaseException:  # noqa: BLE001 - failures are reported by the caller
            return
        self.callback()


def download_file(uri: str, local_path: str | os.PathLike[str], *, options: S3Options | None = None) -> Path:
    """Copy a file or object to ``local_path`` (parallel ranged GETs above the multipart threshold).

    The file appears atomically (written under a temporary name, then renamed).
    """
    dest = Path(local_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        _atomic_copy(_local(uri), dest)
        return dest
    opts = _opts(options)
    bucket, key = split_s3(uri)
    with _transfer_manager(opts) as manager:
        try:
            manager.download(bucket, key, str(dest)).result()
        except Exception as exc:  # noqa: BLE001
            raise _raise(exc, bucket, key, "download", opts) from exc
    return dest


def upload_file(local_path: str | os.PathLike[str], uri: str, *, options: S3Options | None = None) -> str:
    """Copy a local file to a path or object (multipart, parts in parallel, above the threshold)."""
    src = Path(local_path)
    if not is_s3(uri):
        _atomic_copy(src, _local(uri))
        return uri
    opts = _opts(options)
    bucket, key = split_s3(uri)
    if not src.is_file():
        raise StorageError(f"cannot upload {src} to {uri}: not a file", uri=uri, bucket=bucket, key=key)
    with _transfer_manager(opts) as manager:
        try:
            manager.upload(str(src), bucket, key).result()
        except Exception as exc:  # noqa: BLE001
            raise _raise(exc, bucket, key, "upload", opts) from exc
    return uri


# ----- trees -----


def _local_files(root: Path) -> list[str]:
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
        rels = [r for r in _local_files(root) if only is None or r in only]
        for rel in rels:
            _atomic_copy(root / rel, dest / rel)
        return [dest / rel for rel in rels]
    opts = _opts(options)
    bucket, key = split_s3(prefix_uri)
    prefix = _dir_key(key)
    objects = [
        (o["Key"], int(o["Size"]))
        for o in _list_objects(bucket, prefix, opts)
        if not o["Key"].endswith("/") and (only is None or o["Key"][len(prefix):] in only)
    ]
    return _download_objects(bucket, prefix, objects, dest, opts)


def _download_objects(
    bucket: str, prefix: str, objects: list[tuple[str, int]], dest: Path, options: S3Options
) -> list[Path]:
    written: list[Path] = []
    with _transfer_manager(options) as manager:
        futures = []
        for obj_key, size in objects:
            target = dest / obj_key[len(prefix):]
            if not target.resolve().is_relative_to(dest.resolve()):
                raise StorageError(f"refusing to write s3://{bucket}/{obj_key} outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            future = manager.download(bucket, obj_key, str(target), subscribers=[_SizeSubscriber(size)])
            futures.append((obj_key, target, future))
        for obj_key, target, future in futures:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001
                raise _raise(exc, bucket, obj_key, "download", options) from exc
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
    rels = [r for r in _local_files(root) if r not in skip]
    first = [r for r in rels if r not in last]
    final = [r for r in rels if r in last]
    if not is_s3(prefix_uri):
        dest = _local(prefix_uri)
        for rel in first + final:
            _atomic_copy(root / rel, dest / rel)
            if on_uploaded:
                on_uploaded(rel)
        return [str(dest / rel) for rel in first + final]
    opts = _opts(options)
    bucket, key = split_s3(prefix_uri)
    prefix = _dir_key(key)
    with _transfer_manager(opts) as manager:
        for batch in (first, final):
            futures = []
            for rel in batch:
                subscribers = [_DoneSubscriber(functools.partial(on_uploaded, rel))] if on_uploaded else None
                futures.append((rel, manager.upload(str(root / rel), bucket, prefix + rel, subscribers=subscribers)))
            errors = []
            for rel, future in futures:
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001
                    errors.append((rel, exc))
            if errors:
                rel, error = errors[0]
                raise _raise(error, bucket, prefix + rel, "upload", opts) from error
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
        count = len(_local_files(root))
        for rel in first:
            with contextlib.suppress(FileNotFoundError):
                (root / rel).unlink()
        shutil.rmtree(root, ignore_errors=False)
        return count
    opts = _opts(options)
    bucket, key = split_s3(prefix_uri)
    prefix = _dir_key(key)
    if not prefix:
        raise StorageError(f"refusing to delete a whole bucket: {prefix_uri}", bucket=bucket)
    keys = [o["Key"] for o in _list_objects(bucket, prefix, opts)]
    early = [k for k in keys if k[len(prefix):] in first]
    rest = [k for k in keys if k not in early]
    # Servers backed by a file system (SeaweedFS, MinIO in some modes) keep emptied "directories",
    # which would still show in delimiter listings: delete those keys too, deepest first (on AWS
    # these keys usually do not exist and deleting them is a no-op).
    dirs = {prefix}
    for k in keys:
        parts = k[len(prefix):].split("/")[:-1]
        dirs.update(prefix + "/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
    by_depth = sorted({d.count("/") for d in dirs}, reverse=True)
    dir_batches = [[d for d in dirs if d.count("/") == depth] for depth in by_depth]
    client = get_client(opts)
    for batch_keys in (early, rest, *dir_batches):
        for start in range(0, len(batch_keys), 1000):
            chunk = batch_keys[start:start + 1000]
            try:
                response = client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except Exception as exc:  # noqa: BLE001
                raise _raise(exc, bucket, chunk[0], "delete", opts) from exc
            failed = [e for e in response.get("Errors", []) or [] if e.get("Code") != "NoSuchKey"]
            if failed:
                e = failed[0]
                raise StorageError(
                    f"cannot delete s3://{bucket}/{e.get('Key')}: {e.get('Code')}: {e.get('Message')}",
                    uri=f"s3://{bucket}/{e.get('Key')}", bucket=bucket, key=e.get("Key"), code=e.get("Code"),
                    retryable=e.get("Code") in _THROTTLE_CODES,
                )
    return len(keys)


# ----- model cache -----


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
    opts = _opts(options)
    bucket, key = split_s3(uri)
    prefix = _dir_key(key)
    listing = sorted(
        (o["Key"][len(prefix):], int(o["Size"]), str(o.get("ETag", "")).strip('"'), o["Key"])
        for o in _list_objects(bucket, prefix, opts)
        if not o["Key"].endswith("/")
    )
    if not listing:
        raise StorageError(
            f"no model files under s3://{bucket}/{prefix} (bucket {bucket!r}, prefix {prefix!r})",
            uri=uri, bucket=bucket, key=prefix, code="NoSuchKey",
        )
    identity = {"uri": f"s3://{bucket}/{prefix}", "endpoint": opts.endpoint_url,
                "objects": [[rel, size, etag] for rel, size, etag, _ in listing]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "-._" else "-" for c in (prefix.rstrip("/").rsplit("/", 1)[-1] or bucket))
    root = Path(cache_root if cache_root is not None else DEFAULT_CACHE_ROOT).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{digest}"
    if (target / CACHE_MARKER).is_file():
        log.info("model %s: cache hit at %s", uri, target)
        return target
    with _file_lock(root / f".{name}-{digest}.lock"):
        if (target / CACHE_MARKER).is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            started = time.monotonic()
            _download_objects(bucket, prefix, [(k, size) for _, size, _, k in listing], tmp, opts)
            for rel, size, _etag, _key in listing:
                if (tmp / rel).stat().st_size != size:
                    raise StorageError(f"downloaded s3://{bucket}/{prefix}{rel} has the wrong size", uri=uri,
                                       bucket=bucket, key=prefix + rel, retryable=True)
            _atomic_write(tmp / CACHE_MARKER, json.dumps(identity, indent=1).encode())
            if target.exists():
                shutil.rmtree(target)  # an unfinished leftover (no marker)
            os.replace(tmp, target)
            total = sum(size for _, size, _, _ in listing)
            log.info("model %s: downloaded %.1f MB in %.1fs to %s", uri, total / 1e6,
                     time.monotonic() - started, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
