"""pytest fixtures for a real S3 server (SeaweedFS on loopback), registered in tests/conftest.py.

- ``s3_server`` (session): one running :class:`tests.support.s3server.SeaweedS3` (HTTP, and HTTPS
  with a test CA).
- ``s3_options``: :class:`kubetune.storage.S3Options` for it (explicit test keys, path style).
- ``s3_prefix``: a unique ``s3://bucket/<test-name>-<id>`` for one test, deleted afterwards.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from kubetune import storage
from kubetune.storage import S3Options
from tests.support.s3server import SeaweedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    # Never let the AWS credential chain reach for an instance metadata service from a test.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_options(s3_server: SeaweedS3) -> S3Options:
    return s3_server.options()


@pytest.fixture
def s3_prefix(s3_server: SeaweedS3, request: pytest.FixtureRequest) -> Iterator[str]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60].strip("-")
    prefix = f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}"
    yield prefix
    if s3_server.running():
        try:
            storage.delete_tree(prefix, options=s3_server.options())
        except storage.StorageError:
            pass
