"""Storage URIs: ``s3://bucket/key`` or a local path (``file://`` accepted), joined and split."""

from __future__ import annotations

import os
from pathlib import Path

S3_SCHEME = "s3://"
GLOB_CHARS = "*?["


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
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
        text = text[len("file://") :]
    return Path(text).expanduser()


_local = local_path


def dir_key(key: str) -> str:
    """A key used as a directory prefix: '' or ending with '/'."""
    return key if not key or key.endswith("/") else key + "/"


def has_glob(text: str) -> bool:
    return any(c in text for c in GLOB_CHARS)
