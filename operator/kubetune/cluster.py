"""`kubetune submit|get|describe|watch|logs|checkpoints|artifacts|suspend|resume|cancel`: FineTuneJobs on a cluster.

Everything here reads what the operator and the trainer already maintain (the FineTuneJob's status,
its events, the worker pods of the current attempt); there is no server of its own. The same entry
point is the kubectl plugin `kubectl-kubetune` (`kubectl kubetune get`).

Connection: `--kubeconfig`, else `KUBECONFIG`, else `~/.kube/config`, else the in-cluster service
account; `--context` picks a context; the namespace is `-n`, else the context's, else the pod's
(in-cluster), else `default`.

Exit codes: 0 done (for `watch`/`submit --wait`: Succeeded); 1 the job Failed (or was deleted while
watched); 2 a cluster problem (no kubeconfig, unreachable, CRD not installed, RBAC denied, not
found, conflict); 3 an invalid manifest (`submit`, the messages of `kubetune validate`); 124 the
`--timeout` of a watch ran out.

`cancel` deletes the FineTuneJob: the operator's children (Jobs, pods, ConfigMap, Service,
ServiceAccount, Role) go with it through their owner references; checkpoints and exports in the
output stay, and submitting the same manifest again resumes from the latest complete checkpoint.
To pause and keep the resource, `suspend` (and `resume`) instead.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from kubetune.spec import API_GROUP, API_VERSION, KIND, PLURAL, TERMINAL_PHASES, Phase
from kubetune.status import parse_time

RESOURCE = f"{PLURAL}.{API_GROUP}"
FIELD_MANAGER = "kubetune"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
TRAINING_SUMMARY = (
    "epochs",
    "maxSteps",
    "learningRate",
    "scheduler",
    "batchSizePerDevice",
    "gradientAccumulationSteps",
    "maxSeqLength",
    "packing",
)
EXIT_FAILED, EXIT_CLUSTER, EXIT_TIMEOUT = 1, 2, 124
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
INSTALL_HINT = (
    "install it with the chart (helm install kubetune charts/kubetune -n kubetune-system "
    "--create-namespace) or `kubetune crd | kubectl apply -f -`"
)


class ClusterError(Exception):
    """A problem talking to the cluster, with a message naming what to fix."""

    def __init__(self, message: str, code: int = EXIT_CLUSTER, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status  # the API server's HTTP status, when it answered


class CrdMissing(ClusterError):
    """The API server does not serve finetunejobs.kubetune.io."""


# ----- connection -----


class Cluster:
    """An API client for one kubeconfig context (or in-cluster) and a namespace."""

    def __init__(
        self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
    ):
        try:
            from kubernetes import client, config
            from kubernetes.config.config_exception import ConfigException
        except ImportError:
            raise ClusterError(
                "the cluster commands need the Kubernetes client: pip install 'kubetune[operator]'"
            ) from None

        cfg = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        paths = [p for p in path.split(os.pathsep) if p]
        context_namespace = None
        if kubeconfig and not os.path.exists(kubeconfig):
            raise ClusterError(f"kubeconfig {kubeconfig} (--kubeconfig) does not exist")
        if any(os.path.exists(p) for p in paths):
            existing = os.pathsep.join(p for p in paths if os.path.exists(p))
            try:
                contexts, active = config.list_kube_config_contexts(config_file=existing)
                names = [c["name"] for c in contexts or []]
                if context and context not in names:
                    raise ClusterError(
                        f"context {context!r} (--context) is not in {existing}; its contexts: "
                        f"{', '.join(names) or 'none'}"
                    )
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                context_namespace = ((chosen or {}).get("context") or {}).get("namespace")
                config.load_kube_config(
                    config_file=existing, context=context, client_configuration=cfg, persist_config=False
                )
            except ConfigException as error:
                raise ClusterError(
                    f"cannot use kubeconfig {existing}: {error} (pick a context with --context)"
                ) from None
            self.where = f"context {context or (chosen or {}).get('name')!r} of {existing}"
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except ConfigException:
                raise ClusterError(
                    "no kubeconfig: set KUBECONFIG or pass --kubeconfig FILE (looked for "
                    f"{path}), or run in a pod with a service account"
                ) from None
            self.where = "the in-cluster service account"
            if os.path.exists(SA_NAMESPACE_FILE):
                with open(SA_NAMESPACE_FILE) as handle:
                    context_namespace = handle.read().strip() or None
        self.server = cfg.host
        self.api = client.ApiClient(cfg)
        self.namespace = namespace or context_namespace or "default"
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    # -- errors --
    def call(
        self,
        verb: str,
        resource: str,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """fn(*args, **kwargs) with API errors turned into ClusterErrors naming the verb and resource."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as error:
            raise self._explain(error, verb, resource, name) from None
        except HTTPError as error:
            raise ClusterError(f"cannot reach the API server {self.server} ({self.where}): {error}") from None

    def _explain(self, error: Any, verb: str, resource: str, name: str | None) -> ClusterError:
        try:
            body = json.loads(error.body or "{}")
        except ValueError:
            body = {}
        message = body.get("message") or error.reason or ""
        where = f" in namespace {self.namespace!r}" if resource != "customresourcedefinitions" else ""
        explained = self._explain_status(error.status, message, verb, resource, name, where)
        explained.status = error.status
        return explained

    def _explain_status(
        self, status: int, message: str, verb: str, resource: str, name: str | None, where: str
    ) -> ClusterError:
        if status == 401:
            return ClusterError(
                f"the API server {self.server} refused the credentials of {self.where} "
                f"(401 Unauthorized): log in again or renew the token"
            )
        if status == 403:
            return ClusterError(
                f"RBAC denied: cannot {verb} {resource}{where} ({message}); ask a cluster admin "
                f"for a Role granting {verb!r} on {resource!r} (the chart's kubetune-edit and "
                f"kubetune-view ClusterRoles aggregate into edit and view)"
            )
        if status == 404:
            if resource == RESOURCE and not self.crd_installed():
                return CrdMissing(
                    f"the FineTuneJob CRD ({RESOURCE}) is not installed in the cluster at "
                    f"{self.server}: {INSTALL_HINT}"
                )
            if name:
                return ClusterError(
                    f"{resource} {name!r} not found{where} (kubetune get -n {self.namespace} lists them)"
                    if resource == RESOURCE
                    else f"{resource} {name!r} not found{where}"
                )
            return ClusterError(f"{verb} {resource}{where}: not found: {message}")
        if status == 409:
            return ClusterError(f"conflict on {resource} {name or ''}{where}: {message}")
        if status in (400, 422):
            return ClusterError(f"the API server rejected {verb} {resource} {name or ''}: {message}")
        return ClusterError(
            f"{verb} {resource} {name or ''}{where} failed: {status} {message}".replace("  ", " ")
        )

    def crd_installed(self) -> bool:
        """True when the API server serves kubetune.io/v1alpha1 finetunejobs."""
        from kubernetes.client.exceptions import ApiException

        try:
            data = self.api.call_api(
                f"/apis/{API_GROUP}/{API_VERSION}",
                "GET",
                response_types_map={200: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException:
            return False
        return any(r.get("name") == PLURAL for r in (data or {}).get("resources", []))

    # -- FineTuneJobs --
    def get(self, name: str) -> dict[str, Any]:
        return self.call(
            "get",
            RESOURCE,
            self.custom.get_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            name,
            name=name,
        )

    def find(self, name: str) -> dict[str, Any] | None:
        """The FineTuneJob, or None when it does not exist (the CRD does)."""
        try:
            return self.get(name)
        except CrdMissing:
            raise
        except ClusterError as error:
            if error.status == 404:
                return None
            raise

    def list(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        if all_namespaces:
            data = self.call(
                "list", RESOURCE, self.custom.list_cluster_custom_object, API_GROUP, API_VERSION, PLURAL
            )
        else:
            data = self.call(
                "list",
                RESOURCE,
                self.custom.list_namespaced_custom_object,
                API_GROUP,
                API_VERSION,
                self.namespace,
                PLURAL,
            )
        return sorted(
            data.get("items", []), key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        )

    def apply(self, body: dict[str, Any], force: bool = False) -> dict[str, Any]:
        """Server-side apply (field manager `kubetune`)."""
        name = body["metadata"]["name"]
        return self.call(
            "patch",
            RESOURCE,
            self.custom.patch_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            name,
            body,
            field_manager=FIELD_MANAGER,
            force=force or None,
            _content_type="application/apply-patch+yaml",
            name=name,
        )

    def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.call(
            "patch",
            RESOURCE,
            self.custom.patch_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            name,
            {"spec": spec},
            field_manager=FIELD_MANAGER,
            name=name,
        )

    def delete(self, name: str) -> None:
        self.call(
            "delete",
            RESOURCE,
            self.custom.delete_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            name,
            propagation_policy="Background",
            name=name,
        )

    def watch(self, name: str, resource_version: str, timeout: int) -> Iterator[dict[str, Any]]:
        """Watch events of one FineTuneJob from resource_version (raw dicts: type, object)."""
        from kubernetes import watch

        stream = watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=timeout,
            allow_watch_bookmarks=False,
        )
        return stream

    def events(self, name: str) -> builtins.list[dict[str, Any]]:  # `list` is a method of this class
        data = self.call(
            "list",
            "events",
            self.core.list_namespaced_event,
            self.namespace,
            field_selector=f"involvedObject.name={name},involvedObject.kind={KIND}",
        )
        items = [self.api.sanitize_for_serialization(e) for e in data.items]
        return sorted(
            items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or ""
        )

    def pods(self, name: str, attempt: int | None) -> builtins.list[dict[str, Any]]:
        from kubetune.render import LABEL_ATTEMPT, worker_selector  # imported when used: a fast CLI start

        selector = worker_selector(name)
        if attempt is not None:
            selector += f",{LABEL_ATTEMPT}={attempt}"
        data = self.call(
            "list", "pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector
        )
        return sorted((self.api.sanitize_for_serialization(p) for p in data.items), key=rank_of)


def rank_of(pod: dict[str, Any]) -> int:
    """The pod's rank: its Indexed Job completion index."""
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(
        COMPLETION_INDEX
    )
    try:
        return int(value or 0)
    except ValueError:
        return 0


# ----- formatting -----


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def _age(value: str | None) -> str:
    moment = parse_time(value)
    return "-" if moment is None else _duration((datetime.now(timezone.utc) - moment).total_seconds())


def format_number(value: Any, fmt: str = "{:.4f}") -> str:
    """`fmt` applied to a metric, `-` when it is missing (e.g. a non-finite perplexity)."""
    return "-" if value is None else fmt.format(value)


def held_out_lines(metrics: dict[str, Any], objective: str | None) -> list[str]:
    """The held-out figures of a finished run (RunSummary or status metrics), one indented line each.

    SFT: perplexity and loss before -> after. Preference tasks (`objective` dpo, kto or orpo): the
    objective's held-out loss, the held-out pairs' reward accuracy and margin and preference accuracy,
    then perplexity and loss of the chosen completions (named so: they are not the objective's)."""

    def known(*keys: str) -> bool:
        return any(metrics.get(key) is not None for key in keys)

    perplexity = (
        f"held-out perplexity {format_number(metrics.get('baselinePerplexity'), '{:.3f}')} -> "
        f"{format_number(metrics.get('finalPerplexity'), '{:.3f}')}  (loss "
        f"{format_number(metrics.get('baselineEvalLoss'))} -> {format_number(metrics.get('finalEvalLoss'))})"
    )
    has_perplexity = known("baselinePerplexity", "finalPerplexity", "baselineEvalLoss", "finalEvalLoss")
    if not objective:
        return [f"  {perplexity}"] if has_perplexity else []
    lines = []
    if known("baselineObjectiveLoss", "finalObjectiveLoss"):
        lines.append(
            f"  held-out {objective.upper()} loss {format_number(metrics.get('baselineObjectiveLoss'))} -> "
            f"{format_number(metrics.get('finalObjectiveLoss'))}"
        )
    if known("finalRewardAccuracy"):
        count = f" ({metrics['heldOutPairs']})" if metrics.get("heldOutPairs") is not None else ""
        lines.append(
            f"  held-out pairs{count}: reward accuracy {format_number(metrics.get('finalRewardAccuracy'), '{:.3f}')}, "
            f"reward margin {format_number(metrics.get('finalRewardMargin'))}, preference accuracy "
            f"{format_number(metrics.get('baselinePreferenceAccuracy'), '{:.3f}')} -> "
            f"{format_number(metrics.get('finalPreferenceAccuracy'), '{:.3f}')}"
        )
    if has_perplexity:
        lines.append(f"  chosen completions: {perplexity}")
    return lines


def progress_text(status: dict[str, Any]) -> str:
    """`step/total (pct%)` from status.progress, `-` before the first report."""
    progress = status.get("progress") or {}
    if not progress:
        return "-"
    total = progress.get("totalSteps")
    text = f"{progress.get('step', 0)}/{total if total else '?'}"
    if progress.get("percent") is not None:
        text += f" ({progress['percent']}%)"
    return text


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by three spaces (as kubectl prints)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def get_table(jobs: list[dict[str, Any]], all_namespaces: bool = False) -> str:
    """The `kubetune get` table."""
    header = ["NAME", "PHASE", "PROGRESS", "LOSS", "TOKENS/S", "ETA", "RESTARTS", "AGE"]
    rows = [(["NAMESPACE"] if all_namespaces else []) + header]
    for job in jobs:
        status = job.get("status") or {}
        progress = status.get("progress") or {}
        eta = progress.get("etaSeconds") if status.get("phase") not in TERMINAL_PHASES else None
        row = [
            job["metadata"]["name"],
            status.get("phase") or "-",
            progress_text(status),
            format_number(progress.get("loss")),
            format_number(progress.get("tokensPerSecond"), "{:.0f}"),
            _duration(eta),
            str(status.get("restarts", 0)),
            _age(job["metadata"].get("creationTimestamp")),
        ]
        rows.append(([job["metadata"].get("namespace", "")] if all_namespaces else []) + row)
    return table(rows)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def artifacts_table(status: dict[str, Any]) -> str:
    rows = [["KIND", "URI", "SHA256", "SIZE"]]
    for artifact in status.get("artifacts") or []:
        rows.append(
            [
                artifact.get("kind", "?"),
                artifact.get("uri", "?"),
                artifact.get("sha256", "-"),
                _size(artifact.get("sizeBytes")),
            ]
        )
    return table(rows)


def summary_text(job: dict[str, Any]) -> str:
    """What `kubetune run` prints at the end, from a finished job's status."""
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    name = job["metadata"]["name"]
    started, finished = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    seconds = int((finished - started).total_seconds()) if started and finished else None
    minutes, secs = divmod(seconds or 0, 60)
    took = f" in {minutes}m{secs:02d}s" if seconds is not None else ""
    tokens = progress.get("trainedTokens")
    speed = progress.get("tokensPerSecond")
    lines = [
        "",
        f"Finished {name}: {progress.get('step', 0)} steps, "
        f"{f'{tokens:,}' if tokens is not None else '?'} tokens trained{took}"
        f"{f' ({speed:.0f} tokens/s)' if speed is not None else ''}",
    ]
    task = (job.get("spec") or {}).get("task") or {}
    objective = (
        (task.get("preference") or {}).get("objective", "dpo") if task.get("type") == "preference" else None
    )
    lines += held_out_lines(metrics, objective)
    for artifact in status.get("artifacts") or []:
        lines.append(
            f"  {artifact.get('kind', '?'):<10} {artifact.get('uri', '?')}  "
            f"sha256:{str(artifact.get('sha256', ''))[:12]}  {artifact.get('sizeBytes', 0):,} bytes"
        )
    return "\n".join(lines)


def failure_reason(status: dict[str, Any]) -> str:
    """`Reason: message` of a Failed job."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == Phase.failed and cond.get("status") == "True":
            return f"{cond.get('reason')}: {cond.get('message') or status.get('message') or ''}".rstrip(": ")
    return status.get("message") or "no reason recorded"


def describe_text(job: dict[str, Any], events: list[dict[str, Any]] | str) -> str:
    """The `kubetune describe` report."""
    meta, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    res, method, out = spec.get("resources") or {}, spec.get("method") or {}, spec.get("output") or {}
    training = spec.get("training") or {}
    lines = [
        f"Name:         {meta['name']}",
        f"Namespace:    {meta.get('namespace')}",
        f"Created:      {meta.get('creationTimestamp')} ({_age(meta.get('creationTimestamp'))} ago)",
        "Spec:",
        f"  Model:      {(spec.get('model') or {}).get('source')}",
        f"  Method:     {method.get('type', 'lora')}   Task: {(spec.get('task') or {}).get('type')}",
        f"  Datasets:   {', '.join(d.get('source', '?') for d in spec.get('datasets') or [])}",
        "  Training:   "
        + (", ".join(f"{k}={training[k]}" for k in TRAINING_SUMMARY if k in training) or "defaults"),
        f"  Resources:  {res.get('nodes', 1)} node(s) x {res.get('gpusPerNode', 1)} GPU(s), "
        f"{res.get('strategy', 'ddp')}",
        f"  Output:     {out.get('uri') or '(platform default)'}; exports "
        f"{', '.join(out.get('exports') or []) or 'default'}",
        f"  Suspend:    {bool(spec.get('suspend'))}",
        "Status:",
        f"  Phase:      {status.get('phase') or '-'}",
        f"  Message:    {status.get('message') or '-'}",
        f"  Attempt:    {status.get('attempt', 0)} (restarts {status.get('restarts', 0)}, preemptions "
        f"{status.get('preemptions', 0)})",
        f"  Started:    {status.get('startTime') or '-'}   Completed: {status.get('completionTime') or '-'}",
    ]
    progress = status.get("progress") or {}
    if progress:
        lines.append(
            f"  Progress:   step {progress_text(status)}, loss {format_number(progress.get('loss'))}, eval loss "
            f"{format_number(progress.get('evalLoss'))}, {format_number(progress.get('tokensPerSecond'), '{:.0f}')} tokens/s, "
            f"ETA {_duration(progress.get('etaSeconds'))}"
        )
    metrics = status.get("metrics") or {}
    if metrics:
        lines.append(
            f"  Metrics:    perplexity {format_number(metrics.get('baselinePerplexity'), '{:.3f}')} -> "
            f"{format_number(metrics.get('finalPerplexity'), '{:.3f}')}, eval loss "
            f"{format_number(metrics.get('baselineEvalLoss'))} -> {format_number(metrics.get('finalEvalLoss'))}"
            + (" (of the chosen completions)" if "finalObjectiveLoss" in metrics else "")
        )
        if "finalObjectiveLoss" in metrics:  # a preference task
            lines.append(
                f"  Preference: objective loss {format_number(metrics.get('baselineObjectiveLoss'))} -> "
                f"{format_number(metrics.get('finalObjectiveLoss'))}, reward accuracy "
                f"{format_number(metrics.get('finalRewardAccuracy'), '{:.3f}')}, reward margin "
                f"{format_number(metrics.get('finalRewardMargin'))}, preference accuracy "
                f"{format_number(metrics.get('baselinePreferenceAccuracy'), '{:.3f}')} -> "
                f"{format_number(metrics.get('finalPreferenceAccuracy'), '{:.3f}')}"
            )
    checkpoint = status.get("checkpoint")
    lines.append(
        "Checkpoint:   "
        + (
            f"step {checkpoint.get('step')} {checkpoint.get('uri')} ({checkpoint.get('time') or '-'})"
            if checkpoint
            else "<none>"
        )
    )
    conditions = status.get("conditions") or []
    lines.append("Conditions:" + ("" if conditions else "   <none>"))
    if conditions:
        rows = [["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]]
        rows += [
            [
                c.get("type", ""),
                c.get("status", ""),
                c.get("reason", ""),
                _age(c.get("lastTransitionTime")),
                c.get("message", ""),
            ]
            for c in conditions
        ]
        lines += ["  " + line for line in table(rows).splitlines()]
    lines.append("Artifacts:" + ("" if status.get("artifacts") else "    <none>"))
    if status.get("artifacts"):
        lines += ["  " + line for line in artifacts_table(status).splitlines()]
    if isinstance(events, str):
        lines.append(f"Events:       {events}")
    else:
        lines.append("Events:" + ("" if events else "       <none>"))
        if events:
            rows = [["TYPE", "REASON", "AGE", "MESSAGE"]]
            rows += [
                [
                    e.get("type", ""),
                    e.get("reason", ""),
                    _age(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp")),
                    e.get("message", ""),
                ]
                for e in events
            ]
            lines += ["  " + line for line in table(rows).splitlines()]
    return "\n".join(lines)


def dump(obj: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(obj, indent=2)
    import yaml

    return yaml.safe_dump(obj, sort_keys=False).rstrip()


# ----- commands -----


def _connect(args: argparse.Namespace) -> Cluster:
    return Cluster(args.kubeconfig, args.context, args.namespace)


def _handled(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a ClusterError as `error: ...` and return its exit code."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ClusterError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.code
        except KeyboardInterrupt:
            return 130

    return wrapper


@_handled
def cmd_submit(args: argparse.Namespace) -> int:
    """Validate locally, then server-side apply; optionally watch."""
    from kubetune.manifest import ManifestError, load_job
    from kubetune.spec import EXIT_CONFIG_ERROR

    try:
        job = load_job(args.manifest)
    except ManifestError as error:  # printed by _handled, like every other refusal
        raise ClusterError(str(error), code=EXIT_CONFIG_ERROR) from error
    body = job.model_dump(mode="json", by_alias=True, exclude_unset=True)
    manifest_ns = job.metadata.namespace
    if manifest_ns and args.namespace and manifest_ns != args.namespace:
        raise ClusterError(
            f"the namespace of {args.manifest} ({manifest_ns!r}) does not match -n "
            f"{args.namespace!r}: drop one of them"
        )
    cluster = Cluster(args.kubeconfig, args.context, args.namespace or manifest_ns)
    body["metadata"]["namespace"] = cluster.namespace
    name = job.metadata.name
    if name is None:
        raise ClusterError(
            f"{args.manifest}: metadata.name is required by submit (server-side apply); "
            "metadata.generateName is not supported",
            code=EXIT_CONFIG_ERROR,
        )
    before = cluster.find(name)
    try:
        after = cluster.apply(body, force=args.force_conflicts)
    except ClusterError as error:
        if error.status == 409:
            raise ClusterError(
                f"{error}; another field manager owns these fields: pass --force-conflicts to take them over"
            ) from None
        raise
    if before is None:
        verb = "created"
    elif after["metadata"].get("resourceVersion") != before["metadata"].get("resourceVersion"):
        verb = "configured"
    else:
        verb = "unchanged"
    ns = cluster.namespace
    print(f"finetunejob.{API_GROUP}/{name} {verb} in namespace {ns}")
    if not args.wait:
        print(
            f"follow it:  kubetune watch {name} -n {ns}   logs: kubetune logs {name} -n {ns} -f   "
            f"status: kubetune describe {name} -n {ns}"
        )
        return 0
    return _watch(cluster, name, args.timeout, getattr(args, "quiet", False))


@_handled
def cmd_get(args: argparse.Namespace) -> int:
    cluster = _connect(args)
    if args.name:
        jobs = [cluster.get(args.name)]
    else:
        jobs = cluster.list(args.all_namespaces)
    if args.output in ("json", "yaml"):
        obj = jobs[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": jobs}
        print(dump(obj, args.output))
    elif not jobs:
        where = "any namespace" if args.all_namespaces else f"namespace {cluster.namespace}"
        print(f"No FineTuneJobs in {where}.", file=sys.stderr)
    else:
        print(get_table(jobs, args.all_namespaces))
    return 0


@_handled
def cmd_describe(args: argparse.Namespace) -> int:
    cluster = _connect(args)
    job = cluster.get(args.name)
    try:
        events: list[dict[str, Any]] | str = cluster.events(args.name)
    except ClusterError as error:
        events = f"<{error}>"
    print(describe_text(job, events))
    return 0


class _Bar:
    """A live progress line (a rich bar on a terminal; a plain line per change otherwise)."""

    def __init__(self, name: str, quiet: bool):
        self.name, self.quiet = name, quiet
        self.last = ""
        self.live = None
        if not quiet and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            self.live = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[detail]}"),
            )
            self.task = self.live.add_task(name, total=None, detail="")
            self.live.start()

    def update(self, status: dict[str, Any]) -> None:
        if self.quiet:
            return
        progress = status.get("progress") or {}
        phase = status.get("phase") or Phase.pending.value
        detail = f"{phase}"
        if progress:
            detail += (
                f"  step {progress_text(status)}  loss {format_number(progress.get('loss'))}  "
                f"{format_number(progress.get('tokensPerSecond'), '{:.0f}')} tokens/s"
            )
            if phase not in TERMINAL_PHASES:
                detail += f"  ETA {_duration(progress.get('etaSeconds'))}"
        elif status.get("message"):
            detail += f"  {status['message']}"
        if self.live is not None:
            self.live.update(
                self.task,
                total=progress.get("totalSteps") or None,
                completed=progress.get("step", 0),
                detail=detail,
            )
        elif detail != self.last:
            print(f"{self.name}: {detail}", flush=True)
        self.last = detail

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def _watch(cluster: Cluster, name: str, timeout: float | None, quiet: bool = False) -> int:
    """Follow one job until it finishes: 0 Succeeded, 1 Failed or deleted, 124 timeout."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    deadline = None if timeout is None else time.monotonic() + timeout
    bar = _Bar(name, quiet)
    job = cluster.get(name)
    try:
        while True:
            status = job.get("status") or {}
            bar.update(status)
            phase = status.get("phase")
            if phase in TERMINAL_PHASES:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                bar.stop()
                print(
                    f"error: {name} is still {phase or Phase.pending.value} after {timeout:g}s (--timeout)",
                    file=sys.stderr,
                )
                return EXIT_TIMEOUT
            window = int(min(left, 60)) if left is not None else 60
            try:
                for event in cluster.watch(name, job["metadata"]["resourceVersion"], max(1, window)):
                    if event["type"] == "DELETED":
                        bar.stop()
                        print(f"error: FineTuneJob {name} was deleted", file=sys.stderr)
                        return EXIT_FAILED
                    if event["type"] in ("ADDED", "MODIFIED"):
                        job = event["object"]
                        bar.update(job.get("status") or {})
                        if (job.get("status") or {}).get("phase") in TERMINAL_PHASES:
                            break
                        if deadline is not None and time.monotonic() >= deadline:
                            break
            except ApiException as error:
                if error.status != 410:  # 410 Gone: resourceVersion too old; read again
                    raise cluster._explain(error, "watch", RESOURCE, name) from None
            except HTTPError:  # the connection dropped: read again (a dead server fails the read)
                time.sleep(1)
            fresh = cluster.find(name)
            if fresh is None:
                bar.stop()
                print(f"error: FineTuneJob {name} was deleted", file=sys.stderr)
                return EXIT_FAILED
            if (fresh.get("status") or {}).get("phase") in TERMINAL_PHASES or fresh["metadata"][
                "resourceVersion"
            ] != job["metadata"]["resourceVersion"]:
                job = fresh
    finally:
        bar.stop()
    status = job.get("status") or {}
    if status.get("phase") == Phase.succeeded:
        print(summary_text(job))
        return 0
    print(f"FineTuneJob {name} failed: {failure_reason(status)}", file=sys.stderr)
    return EXIT_FAILED


@_handled
def cmd_watch(args: argparse.Namespace) -> int:
    cluster = _connect(args)
    return _watch(cluster, args.name, args.timeout, args.quiet)


def _stream_log(
    cluster: Cluster, pod: dict[str, Any], follow: bool, tail: int | None, prefix: str, lock: threading.Lock
) -> None:
    from kubetune.render import CONTAINER_NAME

    name = pod["metadata"]["name"]
    kwargs: dict[str, Any] = {"container": CONTAINER_NAME, "follow": follow, "_preload_content": False}
    if tail is not None:
        kwargs["tail_lines"] = tail
    try:
        response = cluster.call(
            "get",
            "pods/log",
            cluster.core.read_namespaced_pod_log,
            name,
            cluster.namespace,
            name=name,
            **kwargs,
        )
    except ClusterError as error:
        if error.status in (401, 403):
            raise
        node = (pod.get("spec") or {}).get("nodeName") or "no node yet"
        phase = (pod.get("status") or {}).get("phase") or "?"
        raise ClusterError(
            f"cannot read the log of pod {name} (rank {rank_of(pod)}, {phase} on {node}): "
            f"{str(error).split(': ', 1)[-1]}"
        ) from None
    pending = b""
    try:
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            with lock:
                for line in lines:
                    sys.stdout.write(prefix + line.decode(errors="replace") + "\n")
                sys.stdout.flush()
        if pending:
            with lock:
                sys.stdout.write(prefix + pending.decode(errors="replace") + "\n")
    finally:
        response.release_conn()


@_handled
def cmd_logs(args: argparse.Namespace) -> int:
    """Logs of the current attempt's trainer pods (one rank, or all prefixed by rank)."""
    cluster = _connect(args)
    job = cluster.get(args.name)
    status = job.get("status") or {}
    attempt = args.attempt if args.attempt is not None else status.get("attempt")
    if not attempt:
        raise ClusterError(
            f"{args.name} has no worker pods yet (phase {status.get('phase') or Phase.pending.value}: "
            f"{status.get('message') or 'not reconciled'})"
        )
    pods = cluster.pods(args.name, attempt)
    if args.rank is not None:
        pods = [p for p in pods if rank_of(p) == args.rank]
    if not pods:
        which = f"rank {args.rank} of " if args.rank is not None else ""
        raise ClusterError(
            f"no pods for {which}attempt {attempt} of {args.name} (phase "
            f"{status.get('phase') or '-'}; the operator deletes the pods of earlier attempts)"
        )
    lock = threading.Lock()
    errors: list[ClusterError] = []

    def one(pod: dict[str, Any]) -> None:
        prefix = f"[rank {rank_of(pod)}] " if len(pods) > 1 else ""
        try:
            _stream_log(cluster, pod, args.follow, args.tail, prefix, lock)
        except ClusterError as error:
            errors.append(error)

    if len(pods) == 1:
        one(pods[0])
    else:
        threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in pods]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return EXIT_CLUSTER if errors else 0


def _output_uri(job: dict[str, Any]) -> str | None:
    uri = ((job.get("spec") or {}).get("output") or {}).get("uri")
    if uri:
        return uri
    checkpoint = (job.get("status") or {}).get("checkpoint") or {}
    marker = "/checkpoints/"
    if marker in (checkpoint.get("uri") or ""):
        return checkpoint["uri"].split(marker)[0]
    return None


@_handled
def cmd_checkpoints(args: argparse.Namespace) -> int:
    """The latest complete checkpoint from the status; with --storage every complete one in the output."""
    cluster = _connect(args)
    job = cluster.get(args.name)
    status = job.get("status") or {}
    checkpoint = status.get("checkpoint")
    rows = [["STEP", "URI", "COMPLETED", "SOURCE"]]
    if checkpoint:
        rows.append(
            [
                str(checkpoint.get("step")),
                checkpoint.get("uri", "?"),
                checkpoint.get("time") or "-",
                "status (latest)",
            ]
        )
    if args.storage:
        from kubetune.checkpoints import CheckpointStore

        uri = _output_uri(job)
        if not uri:
            raise ClusterError(f"{args.name} has no spec.output.uri and no checkpoint yet: nothing to list")
        try:
            store = CheckpointStore(uri)
            try:
                for step in store.complete_steps():
                    if checkpoint and step == checkpoint.get("step"):
                        continue
                    manifest = store.manifest(step) or {}
                    rows.append(
                        [str(step), store.step_uri(step), manifest.get("createdAt") or "-", "storage"]
                    )
            finally:
                store.close(wait=False)
        except Exception as error:  # noqa: BLE001 - storage errors are reported, not raised
            raise ClusterError(
                f"cannot list checkpoints under {uri} (credentials: AWS_* variables of this shell): {error}"
            ) from None
        rows[1:] = sorted(rows[1:], key=lambda r: int(r[0]))
    if args.output in ("json", "yaml"):
        items = [
            {"step": int(r[0]), "uri": r[1], "time": None if r[2] == "-" else r[2], "source": r[3]}
            for r in rows[1:]
        ]
        print(dump(items, args.output))
    elif len(rows) == 1:
        print(
            f"{args.name} has no complete checkpoint yet (phase {status.get('phase') or '-'})",
            file=sys.stderr,
        )
    else:
        print(table(rows))
    return 0


@_handled
def cmd_artifacts(args: argparse.Namespace) -> int:
    cluster = _connect(args)
    job = cluster.get(args.name)
    status = job.get("status") or {}
    if args.output in ("json", "yaml"):
        print(dump(status.get("artifacts") or [], args.output))
    elif not status.get("artifacts"):
        print(
            f"{args.name} has no artifacts yet (phase {status.get('phase') or '-'}; they are listed when "
            "training finishes)",
            file=sys.stderr,
        )
    else:
        print(artifacts_table(status))
    return 0


def _set_suspend(args: argparse.Namespace, value: bool) -> int:
    cluster = _connect(args)
    job = cluster.get(args.name)
    phase = (job.get("status") or {}).get("phase")
    if phase in TERMINAL_PHASES:
        raise ClusterError(f"{args.name} already {phase}: nothing to {'suspend' if value else 'resume'}")
    cluster.patch_spec(args.name, {"suspend": value})
    if value:
        print(
            f"finetunejob.{API_GROUP}/{args.name} suspended: the operator removes its workers and keeps its "
            f"checkpoints (kubetune resume {args.name} -n {cluster.namespace} continues)"
        )
    else:
        print(
            f"finetunejob.{API_GROUP}/{args.name} resumed: a new attempt starts from the latest complete checkpoint"
        )
    return 0


@_handled
def cmd_suspend(args: argparse.Namespace) -> int:
    return _set_suspend(args, True)


@_handled
def cmd_resume(args: argparse.Namespace) -> int:
    return _set_suspend(args, False)


@_handled
def cmd_cancel(args: argparse.Namespace) -> int:
    """Delete the FineTuneJob (its children follow); outputs stay in storage."""
    cluster = _connect(args)
    job = cluster.get(args.name)
    status = job.get("status") or {}
    cluster.delete(args.name)
    print(f"finetunejob.{API_GROUP}/{args.name} deleted (cancelled); its Jobs and pods are removed with it")
    uri = _output_uri(job)
    checkpoint = status.get("checkpoint")
    if uri:
        kept = f"; latest complete checkpoint: step {checkpoint['step']}" if checkpoint else ""
        print(f"outputs under {uri} are kept{kept}; submitting the same manifest again resumes from there")
    if args.wait:
        deadline = time.monotonic() + (args.timeout or 120)
        while cluster.find(args.name) is not None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{args.name} still exists after {args.timeout or 120:g}s", EXIT_TIMEOUT)
            time.sleep(0.5)
    return 0


# ----- argument parsing -----


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current context)")


def add_cluster_commands(sub: Any) -> None:
    """Register the cluster subcommands on the `kubetune` subparsers."""
    p = sub.add_parser(
        "submit", help="validate a manifest, then create or update the FineTuneJob in a cluster"
    )
    p.add_argument("manifest", help="FineTuneJob YAML")
    p.add_argument(
        "--wait", action="store_true", help="then follow it until it finishes (exit code: its outcome)"
    )
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds (exit 124)")
    p.add_argument("--force-conflicts", action="store_true", help="take over fields another manager owns")
    p.add_argument("--quiet", action="store_true", help="with --wait: no progress output")
    _common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("get", help="list FineTuneJobs: phase, progress, loss, tokens/s, ETA, restarts, age")
    p.add_argument("name", nargs="?")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser(
        "describe", help="spec summary, status, conditions, events, checkpoint, artifacts, metrics"
    )
    p.add_argument("name")
    _common(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser(
        "watch", help="a live progress bar until the job finishes (exit 0 Succeeded, 1 Failed)"
    )
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 124)")
    p.add_argument("--quiet", action="store_true", help="no progress output, only the outcome")
    _common(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("logs", help="logs of the trainer pods of the current attempt")
    p.add_argument("name")
    p.add_argument("--rank", type=int, help="only this rank (the pod's Job completion index)")
    p.add_argument("-f", "--follow", action="store_true", help="stream new lines")
    p.add_argument("--tail", type=int, help="last N lines only")
    p.add_argument("--attempt", type=int, help="an earlier attempt (while its pods still exist)")
    _common(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "checkpoints", help="the latest complete checkpoint (status); --storage: all in the output"
    )
    p.add_argument("name")
    p.add_argument(
        "--storage",
        action="store_true",
        help="also list the output's complete checkpoints (S3 credentials from this shell's AWS_* variables)",
    )
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _common(p)
    p.set_defaults(func=cmd_checkpoints)

    p = sub.add_parser("artifacts", help="exported artifacts with sha256 and size (from the status)")
    p.add_argument("name")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _common(p)
    p.set_defaults(func=cmd_artifacts)

    for command, func, text in (
        ("suspend", cmd_suspend, "remove the workers, keep the job and its checkpoints"),
        ("resume", cmd_resume, "start a suspended job again from its latest checkpoint"),
    ):
        p = sub.add_parser(command, help=text + f" (spec.suspend={command == 'suspend'})".lower())
        p.add_argument("name")
        _common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("cancel", help="delete the FineTuneJob and its pods; outputs in storage are kept")
    p.add_argument("name")
    p.add_argument("--wait", action="store_true", help="wait until it is gone")
    p.add_argument("--timeout", type=float, help="with --wait: seconds (default 120)")
    _common(p)
    p.set_defaults(func=cmd_cancel)


def plugin_main() -> int:
    """Entry point of `kubectl-kubetune` (`kubectl kubetune ...`)."""
    from kubetune.cli import build_parser

    parser = build_parser()
    parser.prog = "kubectl kubetune"
    args = parser.parse_args(sys.argv[1:])
    return int(args.func(args) or 0)
