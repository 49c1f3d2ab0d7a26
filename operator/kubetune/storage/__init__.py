"""One storage layer for local paths and ``s3://bucket/key`` URIs.

Every place that takes a path (model source, dataset files and globs, output) goes through this
package, so an ``s3://`` URI works wherever a local path does. Import the public API from here
(``from kubetune import storage``); the modules are:

    uri          is_s3, split_s3, join, local_path
    client       S3Options (endpoint, TLS, addressing, retries, transfer tuning), the shared boto3 clients
    errors       StorageError and the translation of botocore failures into it
    listing      list_tree, list_dir, exists, expand (globs)
    objects      read_bytes, write_bytes, delete, download_file, upload_file
    trees        download_tree, upload_tree (some files last), delete_tree

The model cache (an S3 model prefix downloaded once per content) is the trainer's:
``kubetune_trainer.model_cache``.

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

from kubetune.storage.client import MiB, S3Options, get_client, make_s3_client, transfer_config
from kubetune.storage.errors import StorageError
from kubetune.storage.listing import exists, expand, list_dir, list_tree
from kubetune.storage.objects import delete, download_file, read_bytes, upload_file, write_bytes
from kubetune.storage.trees import delete_tree, download_tree, upload_tree
from kubetune.storage.uri import GLOB_CHARS, S3_SCHEME, is_s3, join, local_path, split_s3

__all__ = [
    "GLOB_CHARS",
    "MiB",
    "S3_SCHEME",
    "S3Options",
    "StorageError",
    "delete",
    "delete_tree",
    "download_file",
    "download_tree",
    "exists",
    "expand",
    "get_client",
    "is_s3",
    "join",
    "list_dir",
    "list_tree",
    "local_path",
    "make_s3_client",
    "read_bytes",
    "split_s3",
    "transfer_config",
    "upload_file",
    "upload_tree",
    "write_bytes",
]
