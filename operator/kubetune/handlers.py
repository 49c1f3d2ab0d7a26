"""kopf handlers: thin glue between the API and the pure functions in render.py and status.py.

One daemon per FineTuneJob runs a reconcile loop: read the CR, its Jobs and the current attempt's
pods; `status.observe()` says what the status is and what to do; the loop patches the status, posts
the events, and creates/deletes children (`render.render_children()`), then sleeps until a watch
event on the FineTuneJob or one of its Jobs wakes it, or the next interval. Every step is
idempotent and all state lives in the CR's status, so an operator restarted mid-job picks up where
it was: children are created by name, and an existing child owned by the job is adopted as is.

The operator never reads Secrets: pods get their values through secretKeyRef.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from kubetune.cache import FTJ, JOBS, PODS, ObjectCache, install_watch_hook
from kubetune.metrics import METRICS
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, TERMINAL_PHASES

log = logging.getLogger("kubetune.operator")

FINALIZER = f"{API_GROUP}/finalizer"
MERGE_PATCH = "application/merge-patch+json"
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
    # kopf processes at most this many objects (per watched resource) at once. Unbounded, an operator
    # starting with 1,000 existing jobs sent 1,000 finalizer patches at once over as many TLS
    # connections (350 MiB RSS, API Priority and Fairness answering 429).
    kopf_workers: int = 100


CONFIG = OperatorConfig(defaults=render.PlatformDefaults())
# FineTuneJobs, worker Jobs and worker pods as kopf's watches last saw them (kubetune.cache)
CACHE = ObjectCache(render.LABEL_JOB)
_WAKERS: dict[str, asyncio.Event] = {}
# uid -> metadata.generation of the FineTuneJob as the job's last reconcile read it. Watch events
# that bring no new generation (the operator's own status patches, the trainer's progress) do not
# wake the loop: nothing the operator decides on comes from them (status.py reads only fields the
# operator itself writes). At 1,000 jobs these wake-ups were most of the operator's API requests.
_SEEN_GENERATION: dict[str, int | None] = {}
# (namespace, FineTuneJob name) -> uid, for the jobs whose loop runs in this process (pods name their job
# by label; their ownerReference is the worker Job)
_JOB_UIDS: dict[tuple[str, str], str] = {}
# worker pod uid -> hash of status.pod_observation_key() as last seen: pod events that change nothing the
# loop reads do not wake it
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
        self._written: dict[str, dict[str, Any]] = {}

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
            # one INFO line per job (its worker Job); the other children at DEBUG
            (log.info if kind == "Job" else log.debug)("created %s %s/%s", kind, namespace, name)
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
        self._written[uid] = {k: v for k, v in update.status.items() if v is not None}
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
                    events.append(
                        st.Event(
                            "Normal",
                            "CreatedWorkers",
                            f"created Job {child['metadata']['name']} "
                            f"with {child['spec']['completions']} worker pod(s)",
                        )
                    )
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
        written = self._written.get(uid)
        if written is None:
            return []
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
        """The job's loop ended (deleted, or another replica took over)."""
        self._written.pop(uid, None)


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


def _wake(uid: str | None) -> None:
    if uid and uid in _WAKERS:
        _WAKERS[uid].set()


class NoDiffBaseStorage(kopf.DiffBaseStorage):
    """No "last-handled-configuration": kubetune has no on.create/on.update handlers to diff for.

    kopf builds and compares this essence on every watch event of every watched resource (~5% of the
    operator's CPU at 1,000 jobs); the operator decides from `metadata.generation` and the status."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> None:  # type: ignore[override]
        return None

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's bookkeeping under our prefix (the finalizer name is only used to remove one left by an
    older version); only explicit events are posted."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=CONFIG.workers, thread_name_prefix="kubetune-reconcile")
    )
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"kopf.{API_GROUP}")
    settings.persistence.diffbase_storage = NoDiffBaseStorage()
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # (re)list in pages: a restart with 3,000 jobs parsed every pod and Job in one response (629 MiB peak)
    settings.watching.chunk_size = 500
    settings.queueing.worker_limit = CONFIG.kopf_workers
    settings.queueing.idle_timeout = 0.5  # an idle per-object worker frees its slot soon (default 5 s)
    # Filter worker Jobs and pods on the server: kopf's `labels=` on a handler filters client-side, so
    # without these the operator would stream every Job and pod of the cluster to pick out its own.
    settings.watching.label_selectors["batch", "jobs"] = render.LABEL_JOB
    settings.watching.label_selectors["v1", "pods"] = render.worker_selector()
    install_watch_hook(CACHE)
    _reconciler()


async def _cache_synced(namespace: str, stopped: kopf.DaemonStopped, timeout: float = 30.0) -> None:
    """At start-up the FineTuneJobs' listing may end before those of the Jobs and pods: wait (up to
    `timeout`) until the cache holds them too, rather than list them for every job (an operator
    restarting with 1,000 jobs sent ~240 such lists)."""
    waited = 0.0
    while (
        waited < timeout
        and not stopped
        and not (CACHE.synced(JOBS, namespace) and CACHE.synced(PODS, namespace))
    ):
        await asyncio.sleep(0.2)
        waited += 0.2


async def _until_stopped(stopped: kopf.DaemonStopped) -> None:
    await stopped.wait()


# The arg-type ignore below: the resource is namespaced, so kopf's `str | None` namespace is always a str
@kopf.daemon(  # type: ignore[arg-type]
    API_GROUP, API_VERSION, PLURAL, id="reconcile", cancellation_backoff=5.0, cancellation_timeout=10.0
)
async def reconcile_daemon(
    name: str,
    namespace: str,
    uid: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: logging.Logger,
    **_: Any,
) -> None:
    """The per-job loop: reconcile, post events, sleep until woken, stopped or the next interval."""
    waker = _WAKERS.setdefault(uid, asyncio.Event())
    _JOB_UIDS[namespace, name] = uid
    stopping = asyncio.ensure_future(_until_stopped(stopped))
    try:
        await _cache_synced(namespace, stopped)
        while not stopped:
            waker.clear()
            try:
                with METRICS.reconcile_timer():
                    requeue, events, current = await asyncio.to_thread(
                        _reconciler().reconcile, namespace, name, uid
                    )
            except ApiException as error:
                logger.warning("reconcile failed: %s %s", error.status, error.reason)
                requeue, events, current = 5.0, [], None
            for event in events:
                kopf.event(current or body, type=event.type, reason=event.reason, message=event.message)
            if current is None and requeue is None:
                return  # the FineTuneJob is gone or being deleted: nothing left to do
            idle = CONFIG.interval
            if ((current or {}).get("status") or {}).get("phase") in TERMINAL_PHASES:
                idle *= CONFIG.finished_interval_factor
            delay = idle if requeue is None else min(requeue, idle)
            current = events = None  # type: ignore[assignment]  # not held by 10,000 sleeping loops
            woken = asyncio.ensure_future(waker.wait())
            await asyncio.wait({woken, stopping}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            if waker.is_set() and CONFIG.debounce > 0 and not stopped:
                await asyncio.wait({stopping}, timeout=CONFIG.debounce)
    finally:
        stopping.cancel()
        _WAKERS.pop(uid, None)
        _SEEN_GENERATION.pop(uid, None)
        if _JOB_UIDS.get((namespace, name)) == uid:
            del _JOB_UIDS[namespace, name]
        if _RECONCILER is not None:
            _RECONCILER.forget(uid)
        METRICS.forget(uid)


def _daemon_without_finalizer(handler_id: str, registry: kopf.OperatorRegistry | None = None) -> None:
    """Let kopf run the daemon without putting a finalizer on every FineTuneJob.

    kopf marks every daemon as needing a finalizer so that it can stop the daemon before the object
    goes, and has no public switch for it (kopf 1.45). This operator needs none: children are
    garbage-collected through their ownerReferences, S3 artifacts are left in place, and the loop
    ends by itself when it reads 404 after the deletion event woke it. Without it each job costs
    one patch less on creation and one on deletion (the costliest requests of a job: every update of a
    FineTuneJob runs the CRD's CEL rules; bench/README.md), deleting a job does not wait for the
    operator, and the finalizer of older versions is removed by kopf on the next event."""
    spawning = (registry or kopf.get_default_registry())._spawning
    found = [h for h in spawning._handlers if h.id == handler_id]
    if len(found) != 1:
        raise RuntimeError(f"kopf daemon {handler_id!r} not registered exactly once: kopf's registry changed")
    spawning._handlers = [
        dataclasses.replace(h, requires_finalizer=False) if h.id == handler_id else h
        for h in spawning._handlers
    ]


_daemon_without_finalizer("reconcile")


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def finetunejob_event(uid: str, meta: kopf.Meta, type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's name
    """Spec changes (a new generation) and deletion wake the job's loop; status-only changes do not."""
    if (
        type == "DELETED"
        or meta.get("deletionTimestamp")
        or meta.get("generation") != _SEEN_GENERATION.get(uid)
    ):
        _wake(uid)


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_JOB: kopf.PRESENT})
def worker_job_event(meta: kopf.Meta, type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's name
    """Changes of a worker Job (pods started, failed, finished) wake its FineTuneJob's loop.

    Not its creation (ADDED while watching): only the operator creates worker Jobs, and knows."""
    if type == "ADDED":
        return
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            _wake(ref.get("uid"))


# The arg-type ignore below: pods are namespaced, so kopf's `str | None` namespace is always a str
@kopf.on.event(  # type: ignore[arg-type]
    "v1", "pods", labels={render.LABEL_JOB: kopf.PRESENT, render.LABEL_COMPONENT: render.TRAINER_COMPONENT}
)
def worker_pod_event(
    namespace: str,
    uid: str,
    meta: kopf.Meta,
    body: kopf.Body,
    type: str | None,  # noqa: A002
    **_: Any,
) -> None:
    """A worker pod changed in a way the job's loop reads (scheduling, containers, exit, disruption,
    deletion): wake it. This is what lets the loop sleep for a long `--interval`.

    Not its creation (ADDED) nor the listing at start-up: the Job controller creates pods and updates
    its Job, which wakes the loop, and a starting loop lists the pods itself."""
    owner = _JOB_UIDS.get((namespace, (meta.get("labels") or {}).get(render.LABEL_JOB, "")))
    if type == "DELETED":
        _POD_KEYS.pop(uid, None)
        _wake(owner)
        return
    key = hash(st.pod_observation_key(body))
    before = _POD_KEYS.get(uid)
    _POD_KEYS[uid] = key
    if type in (None, "ADDED") or key == before:
        return
    _wake(owner)


@kopf.on.probe(id="jobs")
def probe_jobs(**_: Any) -> int:
    """Liveness detail: how many FineTuneJob loops run in this process."""
    return len(_WAKERS)


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
