"""How to reach S3 (:class:`S3Options`), the shared boto3 clients and the transfer manager."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.spec import S3Spec, StorageSpec

MiB = 1024 * 1024


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
        endpoint = (
            getattr(s3, "endpoint_url", None) or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        )
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
def transfer_manager(options: S3Options) -> Iterator[Any]:
    from boto3.s3.transfer import create_transfer_manager

    manager = create_transfer_manager(get_client(options), transfer_config(options))
    try:
        yield manager
    except BaseException:
        manager.shutdown(cancel=True)
        raise
    manager.shutdown()


def options_or_env(options: S3Options | None) -> S3Options:
    return options or S3Options.from_env()
