"""StorageError and the translation of botocore/s3transfer failures into it (bucket, key, cause,
retryable or not; never a secret)."""

from __future__ import annotations

from kubetune.storage.client import S3Options, get_client

# Error codes, by what they mean for the caller.
ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AllAccessDisabled",
    "AccountProblem",
    "403",
    "Forbidden",
}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestThrottled",
    "ProvisionedThroughputExceededException",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "BandwidthLimitExceeded",
    "PriorRequestNotComplete",
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


def redact(text: str, options: S3Options) -> str:
    for secret in options.secrets():
        text = text.replace(secret, "***")
    return text


def storage_error(exc: BaseException, bucket: str, key: str, action: str, options: S3Options) -> StorageError:
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
            redact(message, options), uri=uri, bucket=bucket, key=key, code=code, retryable=retryable
        )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code") or "")
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        server_message = str(err.get("Message") or "")
        if code in ACCESS_CODES or status == 403:
            cause = {
                "InvalidAccessKeyId": "the access key id is not known to the server",
                "SignatureDoesNotMatch": "the secret access key does not match the access key id",
                "ExpiredToken": "the session token has expired",
            }.get(code, "the credentials are not allowed this operation")
            return make(
                f"access denied ({code or status}) to {action} {uri} (bucket {bucket!r}, key {key!r}) at "
                f"{endpoint}: {cause}; check the credentials Secret (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY) or the service account's IAM role and the bucket policy",
                code or "403",
                False,
            )
        if code == "NoSuchBucket":
            return make(
                f"bucket {bucket!r} does not exist (NoSuchBucket) at {endpoint}; cannot {action} {uri} "
                f"(key {key!r}): check the bucket name, the endpoint URL and the region",
                code,
                False,
            )
        if code in NOT_FOUND_CODES or status == 404:
            return make(
                f"no such object (NoSuchKey): cannot {action} {uri} (bucket {bucket!r}, key {key!r}) at {endpoint}",
                "NoSuchKey",
                False,
            )
        if code in THROTTLE_CODES or (isinstance(status, int) and status >= 500) or status == 429:
            return make(
                f"S3 is unavailable or throttling ({code or status}: {server_message}) while trying to "
                f"{action} {uri} (after {options.max_attempts} attempts with backoff)",
                code or str(status),
                True,
            )
        return make(
            f"cannot {action} {uri} (bucket {bucket!r}, key {key!r}): {code or status}: {server_message}",
            code or str(status),
            False,
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return make(
            f"no usable AWS credentials to {action} {uri} (bucket {bucket!r}): set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY from the credentials Secret, or configure web identity (IRSA)",
            "NoCredentials",
            False,
        )
    from botocore.exceptions import SSLError

    if isinstance(exc, SSLError):
        return make(
            f"TLS verification failed for {endpoint} while trying to {action} {uri} (bucket {bucket!r}): "
            f"{exc}; set storage.s3.caBundle (or AWS_CA_BUNDLE) to the CA that signed the server's "
            f"certificate, or storage.s3.verifyTls false",
            "SSLError",
            False,
        )
    retryable_types: tuple[type[BaseException], ...] = (
        BotoConnectionError,
        HTTPClientError,
        TimeoutError,
        ConnectionError,
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
            type(exc).__name__,
            True,
        )
    if isinstance(exc, OSError):
        return make(f"local file error while trying to {action} {uri}: {exc}", type(exc).__name__, False)
    if isinstance(exc, BotoCoreError):
        return make(f"cannot {action} {uri}: {type(exc).__name__}: {exc}", type(exc).__name__, False)
    return make(f"cannot {action} {uri}: {type(exc).__name__}: {exc}", type(exc).__name__, False)


def not_found_error(bucket: str, key: str, action: str, options: S3Options) -> StorageError:
    """A 404 from HEAD has no body: tell a missing bucket from a missing key."""
    from botocore.exceptions import ClientError

    try:
        get_client(options).head_bucket(Bucket=bucket)
    except ClientError as exc:
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404", "NotFound"):
            exc.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
            return storage_error(exc, bucket, key, action, options)
    except Exception:  # noqa: BLE001 - the original 404 is the better message then
        pass
    return StorageError(
        f"no such object (NoSuchKey): cannot {action} s3://{bucket}/{key} (bucket {bucket!r}, key {key!r})",
        uri=f"s3://{bucket}/{key}",
        bucket=bucket,
        key=key,
        code="NoSuchKey",
        retryable=False,
    )


def classified_error(
    exc: BaseException, bucket: str, key: str, action: str, options: S3Options
) -> StorageError:
    err = storage_error(exc, bucket, key, action, options)
    if err.code == "NoSuchKey":
        err = not_found_error(bucket, key, action, options)
    return err
