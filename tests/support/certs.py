"""Pieces of throwaway test certificates, shared by the control plane and the S3 server.

`cryptography` is imported on use: callers import this module even where it is not installed."""

from __future__ import annotations

import datetime
from typing import Any


def cert_builder(
    subject: Any, issuer: Any, public_key: Any, not_before: datetime.datetime, not_after: datetime.datetime
) -> Any:
    """An x509.CertificateBuilder with subject, issuer, key, a random serial and the validity set."""
    from cryptography import x509

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def pem_private_key(key: Any) -> bytes:
    """`key` as unencrypted PKCS#8 PEM."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
