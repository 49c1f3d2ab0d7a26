"""kopf handlers: thin glue between the API and the pure functions in render.py, status.py and planner.py.

A reconcile of one FineTuneJob reads the CR, its Jobs and the current attempt's pods from the
watch-fed cache (kubetune.cache); `status.observe()` says what the status is and what to do; the
reconcile patches the status, posts the events, and creates/deletes children as `planner` plans
them. Which job to reconcile when comes from one work queue (kubetune.workqueue), not one task per
job: watch events on the FineTuneJob, its Jobs and its worker pods add its key, each reconcile
requeues it for its next deadline or the resync interval, and a fixed set of workers run the due
ones. Every step is idempotent and all state lives in the CR's status, so an operator restarted
mid-job picks up where it was: children are created by name, and an existing child owned by the job
is adopted as is.

kopf lists and watches (reconnecting after 410 Gone), coordinates replicas (peering), and serves the
probes; the watch events themselves stop at the cache hook and never reach kopf's per-object
processing.

The operator never reads Secrets: pods get their values through secretKeyRef.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import kopf
from kubernetes import client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from kubetune import planner, render, scheduling
from kubetune import status as st
from kubetune.cache import FTJ, JOBS, PODS, ObjectCache, WatchTap, install_watch_hook
from kubetune.metrics import METRICS
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, TERMINAL_PHASES
from kubetune.workqueue import WorkQueue

log = logging.getLogger("kubetune.operator")

FINALIZER = f"{API_GROUP}/finalizer"  # only removed: earlier versions put it on every job
EVENT_COMPONENT = "kubetune-operator"
EVENT_INSTANCE = os.environ.get("HOSTNAME") or "kubetune-operator"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
KEEP_FINISHED_ATTEMPTS = planner.KEEP_FINISHED_ATTEMPTS


# What the operator's ClusterRole must grant (docs/operator.md; the cluster test runs the operator with
# exactly these). No Secrets: pods get their values by secretKeyRef. The per-job Role's rules are
# included (get on finetunejobs, get/patch on finetunejobs/status): RBAC only lets the operator grant
# what it holds.
OPERATOR_RBAC_RULES: list[dict[str, Any]] = [
    {"apiGroups": [API_GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    # children carry blockOwnerDeletion: clusters with OwnerReferencesPermissionEnforcement check this
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services", "serviceaccounts"], "verbs": ["get", "create"]},
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["get", "create"],
    },
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "create"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    # kopf watches CRDs to notice its resources appear or go
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["kopfpeerings", "clusterkopfpeerings"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    # PodGroups of gang-scheduled jobs (spec.scheduling.gang; kubetune.scheduling)
    scheduling.RBAC_RULE,
]
# Children by server-side apply instead of create-or-adopt: an experiment for the benchmark only
# (bench/README.md). It needs `patch` on every child kind, which create-or-adopt does not.
SSA_CHILDREN = os.environ.get("KUBETUNE_CHILDREN_SSA") == "1"
if SSA_CHILDREN:
    OPERATOR_RBAC_RULES = [
        {**rule, "verbs": [*rule["verbs"], "patch"]}
        if "create" in rule["verbs"] and "patch" not in rule["verbs"]
        else rule
        for rule in OPERATOR_RBAC_RULES
    ]


@dataclass
class OperatorConfig:
    """Settings of a running operator (set by operator_main before kopf starts)."""

    defaults: render.PlatformDefaults
    # Seconds between reconciles of one job when nothing wakes it: a resync only. Everything the loop
    # decides on wakes it through a watch (a new generation of the job, its Jobs, its worker pods) or
    # is scheduled (deadline, TTL). At 10 s, 1,000 idle jobs cost ~300 requests/s (bench/README.md).
    interval: float = 60.0
    # Reconciles are blocking API calls run in threads; asyncio's default pool (cpu count + 4) left the
    # operator latency-bound at 1,000 jobs. On the 2-core test machine 8-16 was best and 32 worse (the
    # API server queues; bench/README.md). KUBETUNE_RECONCILE_WORKERS or --workers.
    workers: int = 16
    # A finished job (Succeeded/Failed) has nothing to poll for: its loop wakes on watch events and
    # for the TTL, otherwise only every interval x this.
    finished_interval_factor: float = 30.0
    # After a wake-up, wait this long before reconciling so that a burst of watch events (the Job
    # controller updates a new Job several times in a row) costs one reconcile, not one each.
    debounce: float = 0.5
    # At start-up (or when this replica takes over) a job waits this long at most for the first
    # listing of Jobs and pods to complete rather than list its own (1,000 jobs sent ~240 lists).
    sync_timeout: float = 30.0


CONFIG = OperatorConfig(defaults=render.PlatformDefaults())
# FineTuneJobs, worker Jobs and worker pods as the watches last saw them (kubetune.cache)
CACHE = ObjectCache(render.LABEL_JOB)
# (namespace, FineTuneJob name): the jobs to reconcile and when
QUEUE: WorkQueue[tuple[str, str]] = WorkQueue()
# uid -> metadata.generation of the FineTuneJob as the job's last reconcile read it. Watch events
# that bring no new generation (the operator's own status patches, the trainer's progress) do not
# requeue the job: nothing the operator decides on comes from them (status.py reads only fields the
# operator itself writes). At 1,000 jobs these wake-ups were most of the operator's API requests.
_SEEN_GENERATION: dict[str, int | None] = {}
# (namespace, FineTuneJob name) -> uid of the FineTuneJob last reconciled under that name
_JOB_UIDS: dict[tuple[str, str], str] = {}
# worker pod uid -> hash of status.pod_observation_key() as last seen: pod events that change nothing the
# reconcile reads do not requeue the job
_POD_KEYS: dict[str, int] = {}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


_attempt_of = planner.attempt_of


def _raw(call: Any, *args: Any, **kwargs: Any) -> bytes:
    """The response body of a kubernetes client call, as bytes.

    Skips the client's model deserialization (and our conversion back to dicts): at 1,000 jobs that
    was a large part of the operator's CPU (bench/operator_scale.py). Errors still raise ApiException.
    """
    response = call(*args, _preload_content=False, **kwargs)
    try:
        return response.data
    finally:
        response.release_conn()


# 4xx answers to creating a child that retrying cannot fix (admission webhooks, quotas, invalid objects,
# forbidden fields): the FineTuneJob fails with the server's message. 404 (namespace going away), 408 and
# 429 (load) are retried; 409 means the child exists.
RETRIED_STATUSES = {404, 408, 409, 429}


class ChildRefused(Exception):
    """The API server refused to create a child object; the message is the server's own (clipped)."""

    def __init__(self, kind: str, name: str, error: ApiException):
        detail = error.reason or ""
        try:
            detail = json.loads(error.body or b"{}").get("message") or detail
        except (ValueError, AttributeError):
            pass
        detail = " ".join(str(detail).split())
        if len(detail) > 800:
            detail = detail[:797] + "..."
        super().__init__(f"the API server refused to create {kind} {name} ({error.status}): {detail}")


class Reconciler:
    """Applies observations through the Kubernetes API (synchronous client; run in a worker thread)."""

    def __init__(
        self, api: client.ApiClient, defaults: render.PlatformDefaults, cache: ObjectCache | None = None
    ):
        self.api = api
        self.defaults = defaults
        # the watch-fed store the loop reads from (kubetune.cache); None: every read goes to the API
        self.cache = cache
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.networking = client.NetworkingV1Api(api)
        # uid -> the operator-owned status fields as this process last wrote (or read, at its first look)
        # them: a change by anyone else (the trainer's token may patch the status subresource) is undone
        # (compact JSON: 10,000 jobs' conditions as Python dicts were tens of MB)
        self._written: dict[str, bytes] = {}

    # ----- reads -----
    def get_job_cr(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.cache is not None:
            cached = self.cache.get(FTJ, namespace, name)
            if cached is not None or self.cache.synced(FTJ, namespace):
                return cached
        try:
            job_cr = self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        if self.cache is not None:
            self.cache.record(FTJ, job_cr)
        return job_cr

    def _list(self, kind: str, call: Any, namespace: str, name: str, selector: str) -> list[dict[str, Any]]:
        """The FineTuneJob's children of `kind`: from the cache once it is synced, else listed (and recorded)."""
        if self.cache is not None and self.cache.synced(kind, namespace):
            return self.cache.owned(kind, namespace, name)
        items = json.loads(_raw(call, namespace, label_selector=selector)).get("items") or []
        if self.cache is not None:
            for item in items:
                self.cache.record(kind, item)
        return items

    def worker_jobs(self, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
        items = self._list(
            JOBS, self.batch.list_namespaced_job, namespace, name, f"{render.LABEL_JOB}={name}"
        )
        return [j for j in items if _owned_by(j, uid)]

    def worker_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return self._list(PODS, self.core.list_namespaced_pod, namespace, name, render.worker_selector(name))

    # ----- writes -----
    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        patched = self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": patch}
        )
        if self.cache is not None and isinstance(patched, dict):
            self.cache.record(FTJ, patched)  # read-your-writes: the next reconcile sees this status

    def delete_job(self, namespace: str, job_name: str, propagation: str = "Background") -> None:
        try:
            self.batch.delete_namespaced_job(job_name, namespace, propagation_policy=propagation)
            log.info("deleted Job %s/%s (%s)", namespace, job_name, propagation)
            if self.cache is not None:
                self.cache.record_deleting(JOBS, namespace, job_name)
        except ApiException as error:
            if error.status != 404:
                raise
            if self.cache is not None:
                self.cache.record_gone(JOBS, namespace, job_name)

    def _create_fn(self, kind: str):
        return {
            "ServiceAccount": (
                self.core.create_namespaced_service_account,
                self.core.read_namespaced_service_account,
            ),
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "Role": (self.rbac.create_namespaced_role, self.rbac.read_namespaced_role),
            "RoleBinding": (self.rbac.create_namespaced_role_binding, self.rbac.read_namespaced_role_binding),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "NetworkPolicy": (
                self.networking.create_namespaced_network_policy,
                self.networking.read_namespaced_network_policy,
            ),
        }[kind]

    def _create_pod_group(self, namespace: str, body: dict[str, Any], **kwargs: Any) -> Any:
        group, version, plural = scheduling.POD_GROUP_RESOURCES[body["apiVersion"]]
        return self.custom.create_namespaced_custom_object(group, version, namespace, plural, body, **kwargs)

    def apply_child(self, obj: dict[str, Any]) -> str:
        """Server-side apply of `obj` (field manager kubetune-operator, no force): one request whether it
        exists or not. Only with KUBETUNE_CHILDREN_SSA=1, for the benchmark (bench/README.md): unlike
        create-or-adopt, it would also add this job's ownerReference to a same-named object that someone
        else created with the same field values."""
        meta = obj["metadata"]
        group_version = obj["apiVersion"]
        plural = {
            "ServiceAccount": "serviceaccounts",
            "ConfigMap": "configmaps",
            "Service": "services",
            "Role": "roles",
            "RoleBinding": "rolebindings",
            "Job": "jobs",
            "NetworkPolicy": "networkpolicies",
            "PodGroup": "podgroups",
        }[obj["kind"]]
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        response = self.api.call_api(
            f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}",
            "PATCH",
            query_params=[("fieldManager", "kubetune-operator")],
            header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
            body=obj,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        applied, created = json.loads(response.data), response.status == 201
        response.release_conn()
        if obj["kind"] == "Job" and self.cache is not None:
            self.cache.record(JOBS, applied)
        return "created" if created else "exists"

    def ensure_child(self, obj: dict[str, Any], uid: str) -> str:
        """Create `obj`, or adopt the existing one of that name; returns created|exists|conflict|deleting."""
        namespace, name, kind = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["kind"]
        if SSA_CHILDREN:
            try:
                return self.apply_child(obj)
            except ApiException as error:
                if error.status and 400 <= error.status < 500 and error.status not in RETRIED_STATUSES:
                    raise ChildRefused(kind, name, error) from None
                raise
        if kind == "PodGroup":
            group, version, plural = scheduling.POD_GROUP_RESOURCES[obj["apiVersion"]]
            create = self._create_pod_group

            def read(n: str, ns: str, **kwargs: Any) -> Any:
                return self.custom.get_namespaced_custom_object(group, version, ns, plural, n, **kwargs)
        else:
            create, read = self._create_fn(kind)
        try:
            created = _raw(create, namespace, obj)
            if kind == "Job" and self.cache is not None:
                self.cache.record(JOBS, json.loads(created))  # read-your-writes
            log.debug("created %s %s/%s", kind, namespace, name)
            return "created"
        except ApiException as error:
            if error.status and 400 <= error.status < 500 and error.status not in RETRIED_STATUSES:
                raise ChildRefused(kind, name, error) from None
            if error.status != 409:
                raise
        existing = json.loads(_raw(read, name, namespace))
        if not _owned_by(existing, uid):
            return "conflict"
        if existing["metadata"].get("deletionTimestamp"):
            return "deleting"
        if kind == "ConfigMap" and existing.get("data") != obj.get("data"):
            # resources may change while suspended; the next attempt reads the new config
            self.core.patch_namespaced_config_map(
                name, namespace, {"data": obj["data"]}, _content_type=MERGE_PATCH
            )
            log.info("updated ConfigMap %s/%s", namespace, name)
        return "exists"

    # ----- the loop body -----
    def reconcile(
        self, namespace: str, name: str, uid: str
    ) -> tuple[float | None, list[st.Event], dict | None]:
        """One observation and its consequences: (requeue_after, events, the CR or None once it is gone)."""
        job_cr = self.get_job_cr(namespace, name)
        if job_cr is None or job_cr["metadata"].get("uid") != uid:
            return None, [], None
        if job_cr["metadata"].get("deletionTimestamp"):
            return None, [], None  # garbage collection removes the children (ownerReferences)
        _SEEN_GENERATION[uid] = job_cr["metadata"].get("generation")
        now = _now()
        tamper_events = self._undo_tampering(job_cr, uid)
        attempt = int((job_cr.get("status") or {}).get("attempt") or 0)
        # status first, then children: before attempt 1 is recorded no child exists, nothing to list
        jobs = self.worker_jobs(namespace, name, uid) if attempt else []
        current = next((j for j in jobs if j["metadata"]["name"] == render.job_name(name, attempt)), None)
        pods = self.worker_pods(namespace, name) if attempt else []
        current_pods = [p for p in pods if _attempt_of(p) == attempt]
        phase = (job_cr.get("status") or {}).get("phase")
        update = None
        spec = None
        if phase not in TERMINAL_PHASES:
            try:
                spec = render.effective_spec(job_cr, self.defaults)
            except render.RenderError as error:
                reason = "PolicyViolation" if isinstance(error, render.PolicyViolation) else "InvalidSpec"
                update = st.config_error(job_cr, str(error), now, reason)
        if update is None:
            update = st.observe(job_cr, current, current_pods, now, spec)
        if update.patch:
            self.patch_status(namespace, name, update.patch)
            log.info(
                "%s/%s: phase %s, attempt %s, %s (status: %s)",
                namespace,
                name,
                update.phase,
                update.status.get("attempt"),
                update.status.get("message", ""),
                ", ".join(sorted(update.patch)),
            )
        self._written[uid] = json.dumps(
            {k: v for k, v in update.status.items() if v is not None}, separators=(",", ":")
        ).encode()
        update.events[:0] = tamper_events
        METRICS.record_update(job_cr, update.status, now)
        job_cr = {**job_cr, "status": {**(job_cr.get("status") or {}), **update.status}}
        requeue = update.requeue_after
        if update.action == st.Action.STOP:
            for step in planner.plan_stop(jobs):
                self.delete_job(namespace, step.name, step.propagation)
        elif update.action == st.Action.ENSURE:
            try:
                wait = self.ensure(job_cr, jobs, pods, uid, update.events)
            except ChildRefused as error:
                return self._fail_refused(job_cr, jobs, str(error), update.events)
            if wait:
                requeue = min(requeue or wait, wait)
        elif update.action == st.Action.DELETE:
            self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
            log.info("%s/%s: deleted after ttlSecondsAfterFinished", namespace, name)
            return None, update.events, None
        return requeue, update.events, job_cr

    def ensure(
        self,
        job_cr: dict[str, Any],
        jobs: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        uid: str,
        events: list[st.Event],
    ) -> float | None:
        """Children of the current attempt exist; earlier attempts are stopped first. Returns a retry delay."""
        meta = job_cr["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        attempt = int(job_cr["status"]["attempt"])
        steps = planner.plan_ensure(
            name, attempt, jobs, pods, lambda: render.render_children(job_cr, self.defaults, attempt=attempt)
        )
        for step in steps:
            if step.kind == planner.StepKind.DELETE_JOB:
                self.delete_job(namespace, step.name, step.propagation)
            elif step.kind == planner.StepKind.WAIT:
                log.info("%s/%s: %s", namespace, name, step.reason)
                return step.seconds
            elif step.kind == planner.StepKind.ENSURE and step.child is not None:
                child = dict(step.child)
                result = self.ensure_child(child, uid)
                if result == "conflict":
                    message = (
                        f"{child['kind']} {child['metadata']['name']} exists and is not owned by this "
                        "FineTuneJob; delete or rename it"
                    )
                    if not any(e.reason == "ChildConflict" for e in events):
                        events.append(st.Event("Warning", "ChildConflict", message))
                    return 30.0
                if result == "deleting":
                    return 2.0
                if result == "created" and child["kind"] == "Job":
                    # posted at once (after this reconcile's earlier events, which are then done),
                    # not at its end: a replica killed right after creating the Job would otherwise
                    # lose the event, and the next one creates nothing
                    created_workers = st.Event(
                        "Normal",
                        "CreatedWorkers",
                        f"created Job {child['metadata']['name']} "
                        f"with {child['spec']['completions']} worker pod(s)",
                    )
                    self.post_events(job_cr, [*events, created_workers])
                    events.clear()
                    log.info("created Job %s/%s", namespace, child["metadata"]["name"])
        return None

    def _fail_refused(
        self, job_cr: dict[str, Any], jobs: list[dict[str, Any]], message: str, events: list[st.Event]
    ) -> tuple[None, list[st.Event], dict[str, Any]]:
        """A child was refused: Failed with a ChildRefused condition and Warning event; no retry loop."""
        namespace, name = job_cr["metadata"]["namespace"], job_cr["metadata"]["name"]
        failed = st.config_error(job_cr, message, _now(), "ChildRefused")
        if failed.patch:
            self.patch_status(namespace, name, failed.patch)
        log.warning("%s/%s: %s", namespace, name, message)
        for job in jobs:
            if not job["metadata"].get("deletionTimestamp"):
                self.delete_job(namespace, job["metadata"]["name"])
        return None, events + failed.events, {**job_cr, "status": {**job_cr["status"], **failed.status}}

    def _undo_tampering(self, job_cr: dict[str, Any], uid: str) -> list[st.Event]:
        """Put back operator-owned status fields that someone else changed since this process wrote them.

        Updates `job_cr` in place so that the loop decides on the operator's own values."""
        stored = self._written.get(uid)
        if stored is None:
            return []
        written = json.loads(stored)
        current = job_cr.get("status") or {}
        patch = st.restore_patch(current, written)
        if not patch:
            return []
        meta = job_cr["metadata"]
        self.patch_status(meta["namespace"], meta["name"], patch)
        job_cr["status"] = {**{k: v for k, v in current.items() if k not in patch}, **written}
        fields = ", ".join(f"status.{k}" for k in sorted(patch))
        log.warning("%s/%s: %s changed by another client; restored", meta["namespace"], meta["name"], fields)
        return [
            st.Event(
                "Warning",
                "StatusTampered",
                f"{fields} changed by a client other than the operator (only "
                "progress, checkpoint, metrics and artifacts are the trainer's); restored",
            )
        ]

    def forget(self, uid: str) -> None:
        """The job is gone: drop what this process remembers of it."""
        self._written.pop(uid, None)

    def drop_legacy_finalizer(self, job_cr: dict[str, Any]) -> None:
        """Remove the finalizer that earlier versions put on every job (children go by
        ownerReferences; nothing needs to run before a job goes)."""
        finalizers = job_cr["metadata"].get("finalizers") or []
        if FINALIZER not in finalizers:
            return
        meta = job_cr["metadata"]
        index = finalizers.index(FINALIZER)
        patch = [
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        try:
            patched = self.custom.patch_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                patch,
                _content_type=JSON_PATCH,
            )
        except ApiException as error:
            if error.status in (404, 422):  # gone, or the list changed meanwhile: the next reconcile
                return
            raise
        log.info("%s/%s: removed the finalizer of an older version", meta["namespace"], meta["name"])
        if self.cache is not None and isinstance(patched, dict):
            self.cache.record(FTJ, patched)
        job_cr["metadata"] = {**meta, "finalizers": [f for f in finalizers if f != FINALIZER]}

    def post_events(self, job_cr: Mapping[str, Any], events: list[st.Event]) -> None:
        """Post core/v1 Events about the FineTuneJob (as `kubectl describe ftj` shows them). A refused
        event is logged and dropped: events are informational, the status is what counts."""
        meta = job_cr.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        involved = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "FineTuneJob",
            "name": meta.get("name"),
            "namespace": namespace,
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        }
        for event in events:
            now = _now().isoformat()
            message = event.message if len(event.message) <= 1024 else event.message[:1021] + "..."
            body = {
                "metadata": {"namespace": namespace, "generateName": f"{meta.get('name')}."},
                "involvedObject": involved,
                "type": event.type,
                "reason": event.reason,
                "message": message,
                "source": {"component": EVENT_COMPONENT},
                "reportingComponent": EVENT_COMPONENT,
                "reportingInstance": EVENT_INSTANCE,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            try:
                _raw(self.core.create_namespaced_event, namespace, body)
            except ApiException as error:
                log.warning(
                    "%s/%s: event %s not posted: %s %s",
                    namespace,
                    meta.get("name"),
                    event.reason,
                    error.status,
                    error.reason,
                )


# ----- kopf wiring -----

_RECONCILER: Reconciler | None = None


def _reconciler() -> Reconciler:
    global _RECONCILER
    if _RECONCILER is None:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        # one pooled connection per worker thread (urllib3 would otherwise open and drop extra ones)
        configuration.connection_pool_maxsize = max(
            configuration.connection_pool_maxsize or 1, CONFIG.workers
        )
        _RECONCILER = Reconciler(client.ApiClient(configuration), CONFIG.defaults, CACHE)
    return _RECONCILER


def _forget_job(key: tuple[str, str]) -> None:
    """The FineTuneJob under `key` is gone (or replaced by a new one of that name): drop its state."""
    uid = _JOB_UIDS.pop(key, None)
    if uid is None:
        return
    _SEEN_GENERATION.pop(uid, None)
    if _RECONCILER is not None:
        _RECONCILER.forget(uid)
    METRICS.forget(uid)


def reconcile_key(key: tuple[str, str]) -> tuple[float | None, list[st.Event], dict | None]:
    """Reconcile the FineTuneJob now stored under `key` (run in a worker thread)."""
    namespace, name = key
    reconciler = _reconciler()
    job_cr = reconciler.get_job_cr(namespace, name)
    uid = (job_cr or {}).get("metadata", {}).get("uid")
    if _JOB_UIDS.get(key) not in (None, uid):
        _forget_job(key)  # deleted and created again under the same name
    if job_cr is None or uid is None:
        return None, [], None
    _JOB_UIDS[key] = uid
    reconciler.drop_legacy_finalizer(job_cr)
    return reconciler.reconcile(namespace, name, uid)


async def _reconcile_worker(tap: WatchTap, started: float) -> None:
    """Take due jobs off the queue, one at a time, for as long as the operator runs."""
    loop = asyncio.get_running_loop()
    while True:
        await tap.wait_until_active()  # a standby replica (peering) does nothing
        key = await QUEUE.get()
        requeue: float | None = None
        try:
            if tap.paused():
                requeue = 0.0  # paused while waiting: the key waits for the replica's return
                continue
            namespace = key[0]
            if not (CACHE.synced(JOBS, namespace) and CACHE.synced(PODS, namespace)) and (
                loop.time() - started < CONFIG.sync_timeout
            ):
                requeue = 0.0  # the first listing of Jobs and pods is not complete yet: wait a little
                await asyncio.sleep(0.2)
                continue
            try:
                with METRICS.reconcile_timer():
                    delay, events, current = await asyncio.to_thread(reconcile_key, key)
            except ApiException as error:
                log.warning("%s/%s: reconcile failed: %s %s", *key, error.status, error.reason)
                delay, events, current = 5.0, [], None
            except Exception:
                log.exception("%s/%s: reconcile failed", *key)
                requeue = 10.0
                continue
            if events:
                target = current or CACHE.get(FTJ, *key)
                if target is not None:
                    await asyncio.to_thread(_reconciler().post_events, target, events)
            if current is None and delay is None:
                _forget_job(key)  # gone or being deleted: nothing left to do
                continue
            idle = CONFIG.interval
            if (current or {}).get("status", {}).get("phase") in TERMINAL_PHASES:
                idle *= CONFIG.finished_interval_factor
            requeue = idle if delay is None else min(delay, idle)
        finally:
            QUEUE.done(key, requeue)


def on_watch_event(kind: str, event_type: str | None, obj: Mapping[str, Any]) -> None:
    """A watch event (type None: an object of a listing), after the cache took it: queue the FineTuneJob
    it concerns if the reconcile may decide differently now. This is what lets a job sleep for a long
    `--interval`."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or ""
    if kind == FTJ:
        key = (namespace, meta.get("name") or "")
        uid = meta.get("uid")
        if event_type in (None, "ADDED") or event_type == "DELETED":
            QUEUE.add(key)  # a new (or listed) job, or one gone: reconcile it now
        elif meta.get("deletionTimestamp") or meta.get("generation") != _SEEN_GENERATION.get(str(uid)):
            QUEUE.add(key, CONFIG.debounce)  # a new generation or a deletion
        return
    owner = (meta.get("labels") or {}).get(render.LABEL_JOB)
    if not owner:
        return
    key = (namespace, owner)
    if kind == JOBS:
        # Not its creation (ADDED while watching) nor a listing: only the operator creates worker
        # Jobs and knows, and a job's first reconcile reads them.
        if event_type in ("MODIFIED", "DELETED"):
            QUEUE.add(key, CONFIG.debounce)
        return
    if (meta.get("labels") or {}).get(render.LABEL_COMPONENT) != render.TRAINER_COMPONENT:
        return
    pod_uid = str(meta.get("uid"))
    if event_type == "DELETED":
        _POD_KEYS.pop(pod_uid, None)
        QUEUE.add(key, CONFIG.debounce)
        return
    # Not its creation nor a listing: the Job controller creates pods and updates its Job, which
    # queues the job, and a job's first reconcile reads its pods.
    pod_key = hash(st.pod_observation_key(obj))
    before = _POD_KEYS.get(pod_uid)
    _POD_KEYS[pod_uid] = pod_key
    if event_type in (None, "ADDED") or pod_key == before:
        return
    QUEUE.add(key, CONFIG.debounce)


TAP = WatchTap(CACHE, on_watch_event)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Settings of kopf's watches; the cache hook; the reconcile workers."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=CONFIG.workers, thread_name_prefix="kubetune-reconcile")
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # (re)list in pages: a restart with 3,000 jobs parsed every pod and Job in one response (629 MiB peak)
    settings.watching.chunk_size = 500
    # Filter worker Jobs and pods on the server: without these the operator would stream every Job
    # and pod of the cluster to pick out its own.
    settings.watching.label_selectors["batch", "jobs"] = render.LABEL_JOB
    settings.watching.label_selectors["v1", "pods"] = render.worker_selector()
    install_watch_hook(TAP)
    _reconciler()
    started = asyncio.get_running_loop().time()
    for index in range(CONFIG.workers):
        asyncio.get_running_loop().create_task(
            _reconcile_worker(TAP, started), name=f"kubetune-reconcile-{index}"
        )


# kopf watches a resource only if a handler is registered for it. These three are never called: the
# watch hook (kubetune.cache) hands every event to `on_watch_event` and keeps it from kopf's
# per-object processing, which would hold a task, a memory and a body for each of 10,000 jobs, Jobs
# and pods.
@kopf.on.event(API_GROUP, API_VERSION, PLURAL, id="watch-finetunejobs")
def _watch_finetunejobs(**_: Any) -> None:
    """Registers the FineTuneJob watch (events go to `on_watch_event`)."""


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_JOB: kopf.PRESENT}, id="watch-jobs")
def _watch_worker_jobs(**_: Any) -> None:
    """Registers the worker Job watch (events go to `on_watch_event`)."""


@kopf.on.event(
    "v1",
    "pods",
    labels={render.LABEL_JOB: kopf.PRESENT, render.LABEL_COMPONENT: render.TRAINER_COMPONENT},
    id="watch-pods",
)
def _watch_worker_pods(**_: Any) -> None:
    """Registers the worker pod watch (events go to `on_watch_event`)."""


@kopf.on.probe(id="jobs")
def probe_jobs(**_: Any) -> int:
    """Liveness detail: how many FineTuneJobs this replica has queued or is reconciling."""
    return len(QUEUE)


def configure_operator(
    defaults: render.PlatformDefaults | None = None, interval: float | None = None, workers: int | None = None
) -> None:
    """Set the operator's settings before kopf starts."""
    if defaults is not None:
        CONFIG.defaults = defaults
    env_workers = os.environ.get("KUBETUNE_RECONCILE_WORKERS")
    if workers is not None or env_workers:
        CONFIG.workers = max(1, int(workers) if workers is not None else int(env_workers or 1))
    if interval is not None:
        CONFIG.interval = interval
    env_interval = os.environ.get("KUBETUNE_RECONCILE_INTERVAL")
    if interval is None and env_interval:
        CONFIG.interval = float(env_interval)
