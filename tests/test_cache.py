"""cache.py: the watch-fed store (pure; the cluster tests run it under the real operator)."""

from __future__ import annotations

from typing import Any

from kubetune.cache import FTJ, JOBS, PODS, ObjectCache, slim

LABEL = "kubetune.io/job-name"


def obj(name: str, rv: int, owner: str = "a", namespace: str = "ns", **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": str(rv),
            "labels": {LABEL: owner},
            "managedFields": [{"manager": "x"}],
        },
        "spec": {"suspend": False, "template": {"spec": {"containers": [{"name": "big"}]}}},
        "status": {"active": 1},
        **extra,
    }


def listed(cache: ObjectCache, kind: str, *objects: dict[str, Any], namespace: str | None = None) -> None:
    cache.begin_listing(kind, namespace)
    for o in objects:
        cache.apply_event(kind, None, o)
    cache.listed(kind, namespace)


def test_not_synced_until_a_listing_completes_then_reads_by_owner() -> None:
    cache = ObjectCache(LABEL)
    cache.begin_listing(JOBS, None)
    cache.apply_event(JOBS, None, obj("a-1", 5))
    assert not cache.synced(JOBS, "ns")
    cache.listed(JOBS, None)
    assert cache.synced(JOBS, "ns") and not cache.synced(PODS, "ns")
    assert [j["metadata"]["name"] for j in cache.owned(JOBS, "ns", "a")] == ["a-1"]
    assert cache.owned(JOBS, "ns", "b") == [] and cache.owned(JOBS, "other", "a") == []


def test_namespaced_listing_syncs_only_its_namespace() -> None:
    cache = ObjectCache(LABEL)
    listed(cache, PODS, obj("p", 1), namespace="ns")
    assert cache.synced(PODS, "ns") and not cache.synced(PODS, "ns2")


def test_jobs_and_pods_are_slimmed_finetunejobs_lose_only_managed_fields() -> None:
    job = slim(JOBS, obj("a-1", 1))
    assert job["spec"] == {"suspend": False} and "managedFields" not in job["metadata"]
    assert job["status"] == {"active": 1} and job["metadata"]["labels"] == {LABEL: "a"}
    ftj = slim(FTJ, obj("a", 1))
    assert "template" in ftj["spec"] and "managedFields" not in ftj["metadata"]


def test_an_own_write_is_not_replaced_by_an_older_watch_event() -> None:
    cache = ObjectCache(LABEL)
    listed(cache, FTJ, obj("a", 10, status={"attempt": 1}))
    cache.record(FTJ, obj("a", 12, status={"attempt": 2}))  # the operator's status patch returned rv 12
    cache.apply_event(FTJ, "MODIFIED", obj("a", 11, status={"attempt": 1}))  # in flight before it
    assert cache.get(FTJ, "ns", "a")["status"] == {"attempt": 2}
    cache.apply_event(FTJ, "MODIFIED", obj("a", 13, status={"attempt": 2, "phase": "Running"}))
    assert cache.get(FTJ, "ns", "a")["status"]["phase"] == "Running"


def test_a_deletion_of_an_older_object_does_not_remove_a_newer_one_of_the_same_name() -> None:
    cache = ObjectCache(LABEL)
    listed(cache, JOBS)
    cache.record(JOBS, obj("a-1", 20))  # created again after an earlier a-1 was deleted
    cache.apply_event(JOBS, "DELETED", obj("a-1", 15))
    assert cache.get(JOBS, "ns", "a-1") is not None
    cache.apply_event(JOBS, "DELETED", obj("a-1", 21))
    assert cache.get(JOBS, "ns", "a-1") is None and cache.owned(JOBS, "ns", "a") == []


def test_own_delete_reads_as_deleting_until_the_watch_says_more_and_404_removes() -> None:
    cache = ObjectCache(LABEL)
    listed(cache, JOBS, obj("a-1", 3))
    cache.record_deleting(JOBS, "ns", "a-1")
    assert cache.get(JOBS, "ns", "a-1")["metadata"]["deletionTimestamp"]
    cache.record_gone(JOBS, "ns", "a-1")
    assert cache.get(JOBS, "ns", "a-1") is None
    cache.record_deleting(JOBS, "ns", "a-1")  # nothing to mark
    assert cache.get(JOBS, "ns", "a-1") is None


def test_a_relisting_drops_what_was_deleted_while_no_watch_was_open() -> None:
    """After 410 Gone or an API server restart kopf lists again: no DELETED event comes for objects
    deleted in between, so the listing replaces what the store holds."""
    cache = ObjectCache(LABEL)
    listed(cache, PODS, obj("a-1-0", 1), obj("b-1-0", 2, owner="b"), obj("c", 3, namespace="other"))
    listed(cache, PODS, obj("b-1-0", 4, owner="b"), namespace="ns")  # namespaced relisting
    assert cache.get(PODS, "ns", "a-1-0") is None and cache.get(PODS, "other", "c") is not None
    listed(cache, PODS, obj("b-1-0", 4, owner="b"))  # cluster-wide relisting
    assert cache.size()[PODS] == 1 and cache.relists[PODS] == 3


def test_objects_written_or_watched_during_a_listing_survive_its_end() -> None:
    cache = ObjectCache(LABEL)
    listed(cache, JOBS, obj("a-1", 1))
    cache.begin_listing(JOBS, None)
    cache.record(JOBS, obj("a-2", 7))  # created by the operator while kopf lists
    cache.listed(JOBS, None)
    assert cache.get(JOBS, "ns", "a-2") is not None and cache.get(JOBS, "ns", "a-1") is None


def test_relabelled_object_moves_between_owners_and_reads_are_copies() -> None:
    cache = ObjectCache(LABEL)
    listed(cache, PODS, obj("p", 1, owner="a"))
    cache.apply_event(PODS, "MODIFIED", obj("p", 2, owner="b"))
    assert cache.owned(PODS, "ns", "a") == [] and len(cache.owned(PODS, "ns", "b")) == 1
    cache.owned(PODS, "ns", "b")[0]["status"]["phase"] = "changed by a reader"
    assert "phase" not in cache.owned(PODS, "ns", "b")[0]["status"]
