"""Gang scheduling without Kueue: a PodGroup per attempt and the gang scheduler's name (pure).

A multi-node job must never hold some GPUs while its other pods wait. With `spec.scheduling.gang`
the attempt's worker pods form a PodGroup that a gang scheduler places all together or not at all:

* `coscheduling` (kubernetes-sigs/scheduler-plugins, `scheduling.x-k8s.io/v1alpha1` PodGroup with
  `minMember` and `scheduleTimeoutSeconds`; pods carry the label `scheduling.x-k8s.io/pod-group`);
* `volcano` (`scheduling.volcano.sh/v1beta1` PodGroup with `minMember`; pods carry the annotation
  `scheduling.k8s.io/group-name`).

The tenant picks only the provider. The platform enables providers and names their schedulers
(`PlatformDefaults.gangSchedulers`, e.g. `{coscheduling: scheduler-plugins-scheduler, volcano:
volcano}`); a spec asking for a provider the platform did not enable is a policy violation, and no
spec field sets a pod's `schedulerName`. The PodGroup is named like the attempt's Job
(`<name>-<attempt>`), owned by the FineTuneJob, and created before the Job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COSCHEDULING, VOLCANO = "coscheduling", "volcano"
PROVIDERS = (COSCHEDULING, VOLCANO)
COSCHEDULING_API = "scheduling.x-k8s.io/v1alpha1"
VOLCANO_API = "scheduling.volcano.sh/v1beta1"
COSCHEDULING_POD_LABEL = "scheduling.x-k8s.io/pod-group"
VOLCANO_POD_ANNOTATION = "scheduling.k8s.io/group-name"
# apiVersion of the PodGroup -> (group, version, plural), for the operator's create/read
POD_GROUP_RESOURCES: dict[str, tuple[str, str, str]] = {
    COSCHEDULING_API: ("scheduling.x-k8s.io", "v1alpha1", "podgroups"),
    VOLCANO_API: ("scheduling.volcano.sh", "v1beta1", "podgroups"),
}
# what the operator's RBAC needs for them (handlers.OPERATOR_RBAC_RULES, the chart)
RBAC_RULE: dict[str, Any] = {
    "apiGroups": ["scheduling.x-k8s.io", "scheduling.volcano.sh"],
    "resources": ["podgroups"],
    "verbs": ["get", "create"],
}


def check_gang(gang: Any, nodes: int, schedulers: Mapping[str, str]) -> list[str]:
    """Problems of `spec.scheduling.gang` (a GangSpec or None) on this platform: each names the field."""
    if gang is None:
        return []
    problems = []
    if gang.provider not in schedulers:
        enabled = ", ".join(sorted(schedulers)) or "none"
        problems.append(
            f"spec.scheduling.gang.provider: {gang.provider} is not enabled on this platform "
            f"(enabled: {enabled}; the platform sets gangSchedulers)"
        )
    if gang.min_member is not None and gang.min_member > nodes:
        problems.append(
            f"spec.scheduling.gang.minMember: {gang.min_member} is more than the job's "
            f"{nodes} pod(s) (resources.nodes); at most {nodes}"
        )
    if gang.provider == VOLCANO and gang.schedule_timeout_seconds is not None:
        problems.append(
            "spec.scheduling.gang.scheduleTimeoutSeconds: coscheduling only (a Volcano PodGroup has "
            "no timeout); remove it or use provider coscheduling"
        )
    return problems


def render_pod_group(
    job: Mapping[str, Any], gang: Any, nodes: int, group_name: str, meta: dict[str, Any]
) -> dict[str, Any]:
    """The PodGroup of one attempt (`meta`: its metadata, owner reference included)."""
    spec: dict[str, Any] = {"minMember": gang.min_member or nodes}
    if gang.provider == COSCHEDULING:
        if gang.schedule_timeout_seconds is not None:
            spec["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
        api = COSCHEDULING_API
    else:
        api = VOLCANO_API
    return {"apiVersion": api, "kind": "PodGroup", "metadata": {**meta, "name": group_name}, "spec": spec}


def apply_to_pod(
    gang: Any,
    group_name: str,
    schedulers: Mapping[str, str],
    pod_spec: dict[str, Any],
    pod_labels: dict[str, str],
    pod_annotations: dict[str, str],
) -> None:
    """Put the worker pod template into the group: the platform's scheduler name and the group's
    label (coscheduling) or annotation (Volcano)."""
    if gang is None:
        return
    pod_spec["schedulerName"] = schedulers[gang.provider]
    if gang.provider == COSCHEDULING:
        pod_labels[COSCHEDULING_POD_LABEL] = group_name
    else:
        pod_annotations[VOLCANO_POD_ANNOTATION] = group_name
