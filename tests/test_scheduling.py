"""scheduling.py via render.py: gang scheduling (PodGroup + scheduler name), pure (no cluster).

The API server's verdict on what is rendered is checked in tests/test_operator_cluster.py against the
upstream PodGroup CRDs vendored in tests/data/crds/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import scheduling
from kubetune.render import PlatformDefaults, PolicyViolation, render_children
from kubetune.spec import FineTuneJobSpec
from tests.support.render_objects import by_kind, cr, trusted

SCHEDULERS = {"coscheduling": "scheduler-plugins-scheduler", "volcano": "volcano"}
CRDS = Path(__file__).parent / "data" / "crds"


def gang(**gang_spec: Any) -> dict[str, Any]:
    return {"scheduling": {"gang": gang_spec}}


def test_coscheduling_pod_group_is_created_before_the_job_and_pods_join_it() -> None:
    children = render_children(
        cr(gang(provider="coscheduling", scheduleTimeoutSeconds=120), attempt=2),
        trusted(gang_schedulers=SCHEDULERS),
    )
    assert [c["kind"] for c in children][-2:] == ["PodGroup", "Job"]
    group = by_kind(children)["PodGroup"]
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["metadata"]["name"] == "legal-lora-2"  # one group per attempt, named like its Job
    assert group["metadata"]["labels"]["kubetune.io/attempt"] == "2"
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
    assert group["spec"] == {"minMember": 2, "scheduleTimeoutSeconds": 120}  # minMember: resources.nodes
    template = by_kind(children)["Job"]["spec"]["template"]
    assert template["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    assert template["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "legal-lora-2"
    assert "scheduling.k8s.io/group-name" not in template["metadata"]["annotations"]


def test_volcano_pod_group_and_annotation() -> None:
    children = render_children(cr(gang(provider="volcano", minMember=1)), trusted(gang_schedulers=SCHEDULERS))
    group = by_kind(children)["PodGroup"]
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1" and group["spec"] == {"minMember": 1}
    template = by_kind(children)["Job"]["spec"]["template"]
    assert template["spec"]["schedulerName"] == "volcano"
    assert template["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "legal-lora-1"
    assert "scheduling.x-k8s.io/pod-group" not in template["metadata"]["labels"]


def test_without_gang_no_pod_group_and_the_default_scheduler() -> None:
    children = render_children(cr(), trusted(gang_schedulers=SCHEDULERS))
    assert "PodGroup" not in by_kind(children)
    assert "schedulerName" not in by_kind(children)["Job"]["spec"]["template"]["spec"]


def test_a_provider_the_platform_did_not_enable_is_a_policy_violation() -> None:
    with pytest.raises(
        PolicyViolation,
        match=r"spec.scheduling.gang.provider: coscheduling is not enabled on this "
        r"platform \(enabled: none",
    ):
        render_children(cr(gang(provider="coscheduling")), trusted())
    with pytest.raises(
        PolicyViolation, match=r"gang.provider: volcano is not enabled .*enabled: coscheduling"
    ):
        render_children(cr(gang(provider="volcano")), trusted(gang_schedulers={"coscheduling": "sp"}))


def test_min_member_above_the_pods_and_a_volcano_timeout_are_refused_naming_the_field() -> None:
    with pytest.raises(
        PolicyViolation, match=r"spec.scheduling.gang.minMember: 3 is more than the job's 2 pod"
    ):
        render_children(cr(gang(provider="coscheduling", minMember=3)), trusted(gang_schedulers=SCHEDULERS))
    with pytest.raises(
        PolicyViolation, match=r"spec.scheduling.gang.scheduleTimeoutSeconds: coscheduling only"
    ):
        render_children(
            cr(gang(provider="volcano", scheduleTimeoutSeconds=5)), trusted(gang_schedulers=SCHEDULERS)
        )


def test_spec_fields_are_validated_and_no_scheduler_name_field_exists() -> None:
    base = cr()["spec"]
    with pytest.raises(ValueError, match="provider"):
        FineTuneJobSpec.model_validate({**base, "scheduling": {"gang": {"provider": "kube-batch"}}})
    with pytest.raises(ValueError, match="schedulerName|extra"):
        FineTuneJobSpec.model_validate(
            {**base, "scheduling": {"gang": {"provider": "volcano", "schedulerName": "mine"}}}
        )
    with pytest.raises(ValueError, match="minMember|min_member"):
        FineTuneJobSpec.model_validate(
            {**base, "scheduling": {"gang": {"provider": "volcano", "minMember": 0}}}
        )


def test_platform_gang_schedulers_are_checked() -> None:
    with pytest.raises(ValueError, match="gangSchedulers.kube-batch: providers are coscheduling, volcano"):
        PlatformDefaults(gang_schedulers={"kube-batch": "x"})
    loaded = PlatformDefaults.from_env({"KUBETUNE_DEFAULT_GANG_SCHEDULERS": '{"volcano": "volcano"}'})
    assert loaded.gang_schedulers == {"volcano": "volcano"}


def test_rendered_pod_groups_fit_the_vendored_upstream_crds() -> None:
    """Every field rendered exists in the upstream schema (the cluster test has the API server admit them)."""
    for provider, crd_file in (
        ("coscheduling", "scheduling.x-k8s.io_podgroups.yaml"),
        ("volcano", "scheduling.volcano.sh_podgroups.yaml"),
    ):
        crd = yaml.safe_load((CRDS / crd_file).read_text())
        spec = {"provider": provider, "minMember": 2}
        if provider == "coscheduling":
            spec["scheduleTimeoutSeconds"] = 60
        group = by_kind(render_children(cr(gang(**spec)), trusted(gang_schedulers=SCHEDULERS)))["PodGroup"]
        version = next(v for v in crd["spec"]["versions"] if v["storage"])
        assert group["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        assert group["apiVersion"] in scheduling.POD_GROUP_RESOURCES
        properties = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        assert set(group["spec"]) <= set(properties), (provider, set(group["spec"]) - set(properties))
