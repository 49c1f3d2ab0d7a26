"""Tenant policies the tests run the operator with.

`TRUSTED_POLICY` allows every field the older tests set (a single-team cluster, where the platform
trusts whoever creates FineTuneJobs): rendering and lifecycle tests use it. The tenant-boundary tests
use the strict defaults of `policy.TenantPolicy` plus what each test allows on purpose.
"""

from __future__ import annotations

from typing import Any

TRUSTED_POLICY: dict[str, Any] = {
    "allowedImagePrefixes": [""],  # every image starts with ""
    "allowedImagePullPolicies": ["Always", "IfNotPresent", "Never"],
    "allowedPriorityClasses": ["training", "high"],
    "allowedWorkloadPriorityClasses": ["high", "low"],
    "allowedNodeSelectorKeys": ["gpu", "pool", "zone", "kubernetes.io/hostname"],
    "allowedTolerationKeys": ["gpu", "nvidia.com/gpu"],
    "allowAffinity": True,
    "allowTrustRemoteCode": True,
    "tenantSecretRefs": "VerifiedByAdmission",
    "allowedS3Endpoints": ["http://127.0.0.1", "http://minio:9000"],
    "allowedTrackingUris": ["http://", "https://", "file:"],
    "allowWandbOnline": True,
    "dataPaths": ["/data"],
    "allowedOutputPrefixes": ["s3://", "/"],  # anywhere
}
