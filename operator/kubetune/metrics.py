"""Prometheus metrics of the operator (`kubetune-operator --metrics-port 8080`, path `/metrics`).

| metric | type | labels | what |
|---|---|---|---|
| `kubetune_finetunejobs` | gauge | namespace, phase | FineTuneJobs this replica reconciles, by phase (every phase is reported, 0 included, for each namespace with a job) |
| `kubetune_reconcile_duration_seconds` | histogram | | one reconcile of one job (read, observe, patch, create/delete children) |
| `kubetune_reconcile_errors_total` | counter | reason | reconciles that raised: `api_<HTTP status>` for API errors, else the exception's class name |
| `kubetune_job_restarts_total` | counter | namespace, reason | new attempts started by this replica: `failure` (counted against `runPolicy.maxRestarts`) or `preemption` (not counted) |
| `kubetune_job_time_to_running_seconds` | histogram | | from a FineTuneJob's creation to all of its first attempt's workers running (queueing, scheduling and image pulls included); observed once per job, by the replica that sees the transition |
| `kubetune_operator_info` | gauge | version | always 1 |

Plus the client library's process and Python collectors. The handlers call `record_update()` after
each observation, `forget()` when a job's loop ends and time reconciles with `reconcile_timer()`;
nothing here talks to Kubernetes, and every function is cheap and never raises into the handlers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune import __version__
from kubetune.spec import Phase
from kubetune.status import parse_time

log = logging.getLogger("kubetune.metrics")

PHASES = tuple(p.value for p in Phase)
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TIME_TO_RUNNING_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


class _PhaseCollector(Collector):
    """`kubetune_finetunejobs{namespace, phase}` computed at scrape time from the jobs' last phases."""

    def __init__(self, metrics: OperatorMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kubetune_finetunejobs",
            "FineTuneJobs reconciled by this operator, by phase",
            labels=["namespace", "phase"],
        )
        counts: dict[tuple[str, str], int] = {}
        with self.metrics.lock:
            jobs = list(self.metrics.jobs.values())
        for namespace, phase in jobs:
            counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
        for namespace in sorted({ns for ns, _ in jobs}):
            phases = list(PHASES) + sorted({p for ns, p in jobs if ns == namespace and p not in PHASES})
            for phase in phases:
                family.add_metric([namespace, phase], counts.get((namespace, phase), 0))
        yield family


class OperatorMetrics:
    """The operator's metrics in one registry (the process default, or a fresh one in tests)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY):
        self.registry = registry
        self.lock = threading.Lock()
        self.jobs: dict[str, tuple[str, str]] = {}  # uid -> (namespace, phase)
        self.timed_to_running: set[str] = set()
        self.reconcile_duration = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Duration of one reconcile of one FineTuneJob",
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors_total",
            "Reconciles that failed, by reason",
            ["reason"],
            registry=registry,
        )
        self.restarts = Counter(
            "kubetune_job_restarts_total",
            "New attempts of FineTuneJobs after a failure or a preemption",
            ["namespace", "reason"],
            registry=registry,
        )
        self.time_to_running = Histogram(
            "kubetune_job_time_to_running_seconds",
            "Seconds from a FineTuneJob's creation to all workers of its first attempt running",
            buckets=TIME_TO_RUNNING_BUCKETS,
            registry=registry,
        )
        if registry is not None:
            registry.register(_PhaseCollector(self))
            registry.register(_InfoCollector())

    # ----- called by the handlers -----
    @contextmanager
    def reconcile_timer(self) -> Iterator[None]:
        """Time a reconcile; an exception is counted (and re-raised)."""
        started = time.perf_counter()
        try:
            yield
        except Exception as error:  # not CancelledError: a stopped loop is no error
            self.reconcile_errors.labels(reason=_reason(error)).inc()
            raise
        finally:
            self.reconcile_duration.observe(time.perf_counter() - started)

    def record_update(
        self, job_cr: Mapping[str, Any], new_status: Mapping[str, Any], now: datetime | None = None
    ) -> None:
        """After an observation: `job_cr` as read (its old status), `new_status` the operator-owned status."""
        try:
            self._record(job_cr, new_status, now)
        except Exception:  # noqa: BLE001 - metrics never break a reconcile
            log.debug("metrics: cannot record an update", exc_info=True)

    def forget(self, uid: str) -> None:
        """The job's loop ended (deleted, or this replica stopped handling it)."""
        with self.lock:
            self.jobs.pop(uid, None)
            self.timed_to_running.discard(uid)

    # ----- internals -----
    def _record(self, job_cr: Mapping[str, Any], new: Mapping[str, Any], now: datetime | None) -> None:
        meta = job_cr.get("metadata") or {}
        uid, namespace = meta.get("uid"), meta.get("namespace") or ""
        old = job_cr.get("status") or {}
        phase = new.get("phase")
        if not uid or not phase:
            return
        with self.lock:
            self.jobs[uid] = (namespace, phase)
        for field, reason in (("restarts", "failure"), ("preemptions", "preemption")):
            grew = int(new.get(field) or 0) - int(old.get(field) or 0)
            if grew > 0:
                self.restarts.labels(namespace=namespace, reason=reason).inc(grew)
        first_attempt = int(new.get("attempt") or 0) == 1
        if phase == Phase.running and old.get("phase") != Phase.running and first_attempt:
            with self.lock:
                seen = uid in self.timed_to_running
                self.timed_to_running.add(uid)
            created = parse_time(meta.get("creationTimestamp"))
            if not seen and created is not None:
                moment = now or datetime.now(created.tzinfo)
                self.time_to_running.observe(max(0.0, (moment - created).total_seconds()))


class _InfoCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kubetune_operator_info", "The running operator's version", labels=["version"]
        )
        family.add_metric([__version__], 1)
        yield family


def _reason(error: BaseException) -> str:
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return f"api_{status}"
    return type(error).__name__


METRICS = OperatorMetrics()


def serve(port: int, address: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> bool:
    """Serve `/metrics` on address:port in a daemon thread; False (logged) if the port cannot be bound."""
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as error:
        log.warning("metrics endpoint %s:%s not started: %s", address, port, error)
        return False
    log.info("metrics on http://%s:%s/metrics", address, port)
    return True
