"""Operator scale: N FineTuneJobs against the real test control plane (tests/support/controlplane.py).

Starts etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, the CRD, and the
operator (`python -m kubetune.operator_main`, production defaults) as a subprocess running as a
ServiceAccount bound to `OPERATOR_RBAC_RULES` only. Then creates N FineTuneJobs (server-side apply,
8 client threads) and measures:

* the time from the first apply until every job has all its children (ServiceAccount, Role,
  RoleBinding, ConfigMap, Job, and with `--nodes` > 1 the headless Service) and a `status.phase`
  (polled with metadata-only lists by the admin, which the operator's figures do not include);
* the operator's peak RSS and CPU seconds (psutil on the subprocess, sampled every 0.2 s);
* the operator's API requests, counted by the API server itself: an audit policy logs every
  request of the operator's ServiceAccount (level Metadata, nothing else is logged), so the counts
  are exact and include kopf's own requests (watches, finalizers, events); also their latencies
  and the mean number in flight;
* the CPU seconds of every control-plane process and how busy the machine was (it is shared);
* then, with nothing changing, the idle cost for `--settle` seconds (requests/s and CPU %).

Pods: `--pods pending` (default) asks for a GPU on a cluster with no GPU node, so every worker pod
stays Pending/Unschedulable (phase Pending); `--pods held` adds fake GPU nodes and the hold
annotation, so kwok runs every pod and the jobs go Running (more Job status churn).

`--mode catch-up` creates every job first and then starts the operator (a restart with 1,000
jobs). Figures and the changes they led to: bench/README.md.

    .venv/bin/python bench/operator_scale.py [--jobs 1000] [--pods pending|held] [--mode live|catch-up]
        [--settle 30] [--operator-arg=--workers=8 ...] [--json result.json] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.controlplane import HOLD_ANNOTATION, ControlPlane  # noqa: E402
from tests.support.operator_process import (  # noqa: E402
    OPERATOR_USER,
    OperatorProcess,
    install_crd,
    service_account_kubeconfig,
)
from tests.support.policies import TRUSTED_POLICY  # noqa: E402

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
CHILD_KINDS = {  # list path (namespaced) -> kind
    "/api/v1/namespaces/{ns}/serviceaccounts": "ServiceAccount",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles": "Role",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings": "RoleBinding",
    "/api/v1/namespaces/{ns}/configmaps": "ConfigMap",
    "/api/v1/namespaces/{ns}/services": "Service",
    "/apis/batch/v1/namespaces/{ns}/jobs": "Job",
}
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  users: ["{OPERATOR_USER}"]
- level: None
"""


class AuditedControlPlane(ControlPlane):
    """The test control plane with an audit log of the operator's requests only."""

    audit_log: Path

    def _spawn(self, name: str, args: list[str], env: Any = None) -> Any:
        if name == "kube-apiserver":
            assert self.dir is not None
            policy = self.dir / "cfg" / "audit-policy.yaml"
            policy.write_text(AUDIT_POLICY)
            self.audit_log = self.dir / "logs" / "audit.log"
            args = [
                *args,
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-maxsize=0",
                "--audit-log-mode=blocking",
            ]
        return super()._spawn(name, args, env)


# ----- the operator -----


class BenchOperator(OperatorProcess):
    """The operator with production settings (no --verbose, default interval and workers)."""

    def __init__(
        self,
        cp: ControlPlane,
        directory: Path,
        env: dict[str, str],
        args: list[str],
        script: str | None = None,
    ):
        super().__init__(
            cp, directory / "operator.log", service_account_kubeconfig(cp, directory), args, env=env
        )
        self.script = script

    def command(self) -> list[str]:
        return [
            sys.executable,
            *([self.script] if self.script else ["-m", "kubetune.operator_main"]),
            *self.endpoint_args(),
            *self.args,
        ]


def start_operator(
    cp: ControlPlane, directory: Path, pods: str, extra_args: list[str], script: str | None = None
) -> tuple[subprocess.Popen, Path]:
    proc, log_path, _ = start_operator_process(cp, directory, pods, extra_args, script)
    return proc, log_path


def start_operator_process(
    cp: ControlPlane, directory: Path, pods: str, extra_args: list[str], script: str | None = None
) -> tuple[subprocess.Popen, Path, BenchOperator]:
    env = {
        "KUBETUNE_DEFAULT_IMAGE": "registry.invalid/kubetune/trainer:bench",
        "KUBETUNE_DEFAULT_OUTPUT_URI_PREFIX": "s3://bench-runs",
        "KUBETUNE_DEFAULT_POLICY": json.dumps(TRUSTED_POLICY),
    }
    if pods == "held":
        env["KUBETUNE_DEFAULT_POD_ANNOTATIONS"] = json.dumps({HOLD_ANNOTATION: "true"})
    operator = BenchOperator(cp, directory, env, extra_args, script)
    operator.start()
    assert operator.proc is not None
    return operator.proc, operator.log_path, operator


def reconciles(operator: OperatorProcess) -> float:
    """Reconciles the operator has run (its kubetune_reconcile_duration_seconds count); 0 while its
    metrics endpoint does not answer (an operator starting 10,000 loops may not, within 5 s)."""
    try:
        metrics = operator.metrics()
    except OSError:
        return 0.0
    return sum(
        v for (sample, _), v in metrics.items() if sample == "kubetune_reconcile_duration_seconds_count"
    )


class Sampler:
    """Peak RSS and CPU seconds of a process (and its children), sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _processes(self) -> list[psutil.Process]:
        return [self.proc, *self.proc.children(recursive=True)]

    def rss(self) -> int:
        total = 0
        for p in self._processes():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.rss())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ----- the jobs -----


def job_body(name: str, namespace: str, nodes: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "s3://models/smollm2-135m/"},
            "task": {"type": "instruction"},
            "datasets": [{"source": f"s3://data/{name}.jsonl"}],
            "storage": {"credentialsSecretRef": {"name": "s3-creds"}},
            "resources": {"nodes": nodes, "gpusPerNode": 1},
        },
    }


def apply_jobs(cp: ControlPlane, namespace: str, names: list[str], threads: int, nodes: int = 1) -> None:
    from kubernetes import client

    api = cp.api_client()
    api.configuration.connection_pool_maxsize = threads
    custom = client.CustomObjectsApi(api)

    def apply(name: str) -> None:
        for attempt in range(5):
            try:
                custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    job_body(name, namespace, nodes),
                    field_manager="bench",
                    force=True,
                    _content_type="application/apply-patch+yaml",
                )
                return
            except client.ApiException as error:
                if error.status not in (429, 500, 503, 504) or attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(apply, names))


class Progress:
    """Which jobs have all children and a phase, from watches (as the admin; a list, then a watch each).

    Watches cost the API server far less than polling lists of 1,000 objects would; children are
    watched as metadata only (PartialObjectMetadata).
    """

    def __init__(self, cp: ControlPlane, namespace: str, names: list[str], nodes: int = 1):
        self.api = cp.api_client()
        self.names = set(names)
        self.phase: dict[str, str] = {}
        # a single-node job has no Service (it rendezvouses on loopback)
        kinds = {path: kind for path, kind in CHILD_KINDS.items() if nodes > 1 or kind != "Service"}
        self.children: dict[str, set[str]] = {kind: set() for kind in kinds.values()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._watch,
                args=(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", None),
                daemon=True,
            )
        ]
        for path, kind in kinds.items():
            self._threads.append(
                threading.Thread(target=self._watch, args=(path.format(ns=namespace), kind), daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def _request(self, path: str, kind: str | None, query: list[tuple[str, str]]) -> Any:
        accept = (
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
            if kind
            else "application/json"
        )
        if kind and ("watch", "1") in query:
            accept = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
        response = self.api.call_api(
            path,
            "GET",
            query_params=query,
            header_params={"Accept": accept},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=None,
        )
        return response[0] if isinstance(response, tuple) else response

    def _record(self, kind: str | None, event_type: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        with self._lock:
            if kind is None:
                phase = (obj.get("status") or {}).get("phase")
                if event_type != "DELETED" and phase:
                    self.phase[meta["name"]] = phase
            else:
                owner = (meta.get("labels") or {}).get("kubetune.io/job-name")
                if owner and event_type != "DELETED":
                    self.children[kind].add(owner)

    def _watch(self, path: str, kind: str | None) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        while not self._stop.is_set():
            try:
                listed = json.loads(self._request(path, kind, []).data)
                for obj in listed.get("items") or []:
                    self._record(kind, "ADDED", obj)
                version = listed["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    response = self._request(
                        path,
                        kind,
                        [
                            ("watch", "1"),
                            ("resourceVersion", version),
                            ("allowWatchBookmarks", "true"),
                            ("timeoutSeconds", "120"),
                        ],
                    )
                    for line in iter_resp_lines(response):
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            raise RuntimeError(event)
                        version = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._record(kind, event["type"], event["object"])
            except Exception:  # noqa: BLE001 - expired version or a dropped stream: list again
                time.sleep(0.5)

    def poll(self) -> dict[str, int]:
        """Counts: jobs with a phase, with all children, and with both ('done')."""
        with self._lock:
            phased = set(self.phase) & self.names
            children = set.intersection(*self.children.values()) & self.names
        return {"phase": len(phased), "children": len(children), "done": len(phased & children)}

    def stop(self) -> None:
        self._stop.set()


# ----- the audit log -----


def read_audit(path: Path) -> list[dict[str, Any]]:
    """One record per request of the operator (ResponseComplete, or ResponseStarted for open watches)."""
    by_id: dict[str, dict[str, Any]] = {}
    with open(path) as handle:
        for line in handle:
            event = json.loads(line)
            if event.get("user", {}).get("username") != OPERATOR_USER:
                continue
            if event["auditID"] not in by_id or event["stage"] == "ResponseComplete":
                by_id[event["auditID"]] = event
    return list(by_id.values())


def _ts(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def summarize(events: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Request counts by verb and resource, response codes, latencies (ms) and mean concurrency."""
    chosen = [e for e in events if start <= _ts(e["requestReceivedTimestamp"]) < end]
    kinds: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    busy = 0.0
    for e in chosen:
        ref = e.get("objectRef") or {}
        resource = ref.get("resource", e.get("requestURI", "?"))
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        key = f"{e['verb']} {resource}"
        kinds[key] += 1
        codes[str((e.get("responseStatus") or {}).get("code", "?"))] += 1
        if e["verb"] != "watch" and e["stage"] == "ResponseComplete":
            latency = _ts(e["stageTimestamp"]) - _ts(e["requestReceivedTimestamp"])
            latencies[key].append(latency)
            busy += latency

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    all_latencies = [v for values in latencies.values() for v in values]
    return {
        "requests": len(chosen),
        "by_verb_resource": dict(kinds.most_common()),
        "codes": dict(codes),
        "latency_ms": {
            "p50": pct(all_latencies, 0.5),
            "p90": pct(all_latencies, 0.9),
            "p99": pct(all_latencies, 0.99),
        }
        if all_latencies
        else {},
        "latency_ms_p50_by_kind": {k: pct(v, 0.5) for k, v in sorted(latencies.items())},
        "mean_requests_in_flight": round(busy / max(end - start, 1e-9), 2),
    }


# ----- main -----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--namespace", default="scale")
    parser.add_argument("--pods", choices=["pending", "held"], default="pending")
    parser.add_argument(
        "--mode",
        choices=["live", "catch-up"],
        default="live",
        help="live: apply while the operator runs; catch-up: apply first, then start the operator",
    )
    parser.add_argument("--threads", type=int, default=8, help="client threads applying the jobs")
    parser.add_argument(
        "--nodes", type=int, default=1, help="worker nodes per job (> 1 adds the headless Service)"
    )
    parser.add_argument("--settle", type=float, default=30.0, help="idle seconds measured after all are done")
    parser.add_argument(
        "--settle-delay",
        type=float,
        default=0.0,
        help="seconds to wait after all are done before "
        "the idle window (the scheduler may still be posting first verdicts on a busy machine)",
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--operator-arg", action="append", default=[], help="extra operator argument (repeatable)"
    )
    parser.add_argument(
        "--operator-script",
        help="run this Python script (e.g. a profiler wrapper around "
        "kubetune.operator_main.main) instead of `-m kubetune.operator_main`",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="after the idle window, restart the operator and "
        "measure its catch-up: every existing job reconciled once (its reconcile count)",
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the control plane directory (logs, audit)")
    args = parser.parse_args(argv)

    names = [f"job-{i:04d}" for i in range(args.jobs)]
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    result: dict[str, Any] = {
        "jobs": args.jobs,
        "nodes": args.nodes,
        "pods": args.pods,
        "mode": args.mode,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "operator_args": args.operator_arg,
        "cpus": os.cpu_count(),
    }
    with AuditedControlPlane(keep=args.keep) as cp:
        if args.pods == "held":
            for index in range(max(1, -(-args.jobs * args.nodes // 100))):
                cp.add_fake_node(f"gpu-{index}", gpus=100, pods="110")
        cp.create_namespace(args.namespace)
        install_crd(cp)
        components = {name: psutil.Process(c.proc.pid) for name, c in cp.components.items()}
        components["bench (this process)"] = psutil.Process()

        def cpu_of(p: psutil.Process) -> float:
            t = p.cpu_times()
            return t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)

        progress = Progress(cp, args.namespace, names, args.nodes)
        if args.mode == "catch-up":  # every job exists before the operator starts
            started = time.time()
            apply_jobs(cp, args.namespace, names, args.threads, args.nodes)
            result["apply_seconds_without_operator"] = round(time.time() - started, 1)
            print(
                f"applied {args.jobs} FineTuneJobs in {result['apply_seconds_without_operator']} s with no "
                "operator running; starting the operator ...",
                flush=True,
            )
            components_before = {name: cpu_of(p) for name, p in components.items()}
            machine_before = psutil.cpu_times()
            t0 = time.time()
        proc, log_path, operator = start_operator_process(
            cp, workdir, args.pods, args.operator_arg, args.operator_script
        )
        sampler = Sampler(proc.pid)
        try:
            if args.mode == "catch-up":
                rss_idle = 0
                cpu_before = 0.0
                applier = None
                applied_at = 0.0
            else:
                time.sleep(2.0)  # let kopf finish its start-up listing
                rss_idle = sampler.rss()
                cpu_before = sampler.cpu_seconds()
                components_before = {name: cpu_of(p) for name, p in components.items()}
                time.sleep(1.0)  # the watches are established
                machine_before = psutil.cpu_times()
                print(
                    f"operator up (RSS {rss_idle / 2**20:.0f} MiB); applying {args.jobs} FineTuneJobs ...",
                    flush=True,
                )
                t0 = time.time()
                applier = threading.Thread(
                    target=apply_jobs, args=(cp, args.namespace, names, args.threads, args.nodes)
                )
                applier.start()
                applied_at = None
            counts: dict[str, int] = {}
            timeline: list[tuple[float, dict[str, int]]] = []
            marks: dict[str, float] = {}
            while True:
                if applied_at is None and applier is not None and not applier.is_alive():
                    applied_at = time.time() - t0
                counts = progress.poll()
                elapsed = time.time() - t0
                timeline.append((elapsed, counts))
                for key in ("phase", "children", "done"):
                    if counts[key] == args.jobs and key not in marks:
                        marks[key] = elapsed
                for fraction in (0.25, 0.5, 0.75):
                    label = f"done {int(fraction * 100)}%"
                    if counts["done"] >= fraction * args.jobs and label not in marks:
                        marks[label] = elapsed
                if len(timeline) % 20 == 1:
                    print(
                        f"  t={elapsed:6.1f}s  phase {counts['phase']:5d}  children {counts['children']:5d}  "
                        f"done {counts['done']:5d}  operator peak RSS {sampler.peak_rss / 2**20:.0f} MiB, "
                        f"CPU {sampler.cpu_seconds() - cpu_before:.0f} s",
                        flush=True,
                    )
                if counts["done"] == args.jobs and applied_at is not None:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"operator exited with {proc.returncode}")
                if elapsed > args.timeout:
                    raise RuntimeError(f"not done after {args.timeout}s: {counts}")
                time.sleep(0.5)
            t_done = time.time()
            cpu_run = sampler.cpu_seconds() - cpu_before
            components_run = {
                name: round(cpu_of(p) - components_before[name], 1) for name, p in components.items()
            }
            machine_after = psutil.cpu_times()
            busy = sum(
                getattr(machine_after, f) - getattr(machine_before, f)
                for f in ("user", "system", "nice")
                if hasattr(machine_after, f)
            )
            machine_busy = busy / max(t_done - t0, 1e-9)
            progress.stop()
            peak_run = sampler.peak_rss
            print(
                f"  t={t_done - t0:6.1f}s  all {args.jobs} done; measuring {args.settle:.0f} s idle ...",
                flush=True,
            )
            time.sleep(args.settle_delay)
            t_idle = time.time()
            time.sleep(args.settle)
            t_settled = time.time()
            cpu_settle = sampler.cpu_seconds() - cpu_before - cpu_run
            rss_end = sampler.rss()
            peak_live = max(peak_run, sampler.peak_rss)  # the first operator's, before any restart
            if args.restart:
                sampler.stop()
                operator.stop()
                print("operator stopped; starting it again (catch-up of the existing jobs) ...", flush=True)
                t_restart = time.time()
                operator.start()
                assert operator.proc is not None
                proc = operator.proc
                sampler = Sampler(proc.pid)
                while reconciles(operator) < args.jobs:
                    if time.time() - t_restart > args.timeout:
                        raise RuntimeError(f"catch-up not done after {args.timeout}s")
                    time.sleep(0.5)
                t_caught_up = time.time()
                result["restart_catch_up"] = {
                    "seconds_to_every_job_reconciled": round(t_caught_up - t_restart, 1),
                    "operator_peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
                    "operator_cpu_seconds": round(sampler.cpu_seconds(), 1),
                }
        finally:
            sampler.stop()
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        events = read_audit(cp.audit_log)
        startup = summarize(events, 0, t0)
        run = summarize(events, t0, t_done)
        idle = summarize(events, t_idle, t_settled)
        minutes = [
            summarize(events, t, min(t + 60, t_settled))["requests"]
            for t in [t_idle + 60 * i for i in range(int(-(-(t_settled - t_idle) // 60)))]
        ]
        if "restart_catch_up" in result:
            catch_up = summarize(events, t_restart, t_caught_up)
            result["restart_catch_up"].update(
                {
                    "requests": catch_up["requests"],
                    "requests_per_job": round(catch_up["requests"] / args.jobs, 2),
                    "breakdown": catch_up["by_verb_resource"],
                }
            )
        log_text = log_path.read_text(errors="replace")
        result.update(
            {
                "apply_seconds": round(applied_at or 0.0, 1),
                "seconds_to_all_done": round(t_done - t0, 1),
                "marks_seconds": {k: round(v, 1) for k, v in marks.items()},
                "operator_peak_rss_mib": round(peak_live / 2**20, 1),
                "operator_rss_idle_before_mib": round(rss_idle / 2**20, 1),
                "operator_rss_end_mib": round(rss_end / 2**20, 1),
                "operator_cpu_seconds_run": round(cpu_run, 1),
                "operator_cpu_percent_idle": round(100 * cpu_settle / max(t_settled - t_done, 1e-9), 1),
                "requests_startup": startup["requests"],
                "requests_run": run["requests"],
                "requests_per_job": round(run["requests"] / args.jobs, 2),
                "requests_run_breakdown": run["by_verb_resource"],
                "response_codes_run": run["codes"],
                "api_latency_ms_run": run["latency_ms"],
                "api_latency_ms_p50_by_kind_run": run["latency_ms_p50_by_kind"],
                "operator_requests_in_flight_mean_run": run["mean_requests_in_flight"],
                "cpu_seconds_run_by_process": {"operator": round(cpu_run, 1), **components_run},
                "machine_cpu_busy_cores_run": round(machine_busy, 2),
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "idle_requests_per_second": round(idle["requests"] / max(t_settled - t_idle, 1e-9), 2),
                "idle_requests_per_minute": minutes,
                "settle_delay_seconds": args.settle_delay,
                "idle_breakdown": idle["by_verb_resource"],
                "operator_log_lines": log_text.count("\n"),
                "operator_log_errors": [
                    line[:300]
                    for line in log_text.splitlines()
                    if " ERROR " in line or "Traceback" in line or "[ERROR" in line
                ][:5],
            }
        )
        if args.keep:
            result["control_plane_dir"] = str(cp.dir)
    print(json.dumps(result, indent=1))
    print(
        f"\n{args.jobs} FineTuneJobs ({args.pods} pods): all children + phase in {result['seconds_to_all_done']} s "
        f"(apply took {result['apply_seconds']} s); operator peak RSS {result['operator_peak_rss_mib']} MiB, "
        f"CPU {result['operator_cpu_seconds_run']} s; {result['requests_per_job']} API requests per job; "
        f"idle {result['idle_requests_per_second']} requests/s at {result['operator_cpu_percent_idle']}% CPU"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"operator log and kubeconfig in {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
