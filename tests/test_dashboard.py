"""The chart's Grafana dashboard (charts/kubetune/dashboards/kubetune.json, opt-in ConfigMap).

Every PromQL query in it (panels and template variables) may only name metrics that the operator
(`kubetune.metrics.OperatorMetrics`) or the trainer (`kubetune_trainer.metrics.TrainerMetrics`)
really export: the names are read from those registries, with the sample suffixes Prometheus
exposes (`_total` of counters, `_bucket`/`_sum`/`_count` of histograms); label matchers and
`by`/`on` clauses may only use labels those metrics carry (plus the scrape's `namespace`/`pod`).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from kubetune.metrics import OperatorMetrics
from tests.support.controlplane import ensure_binaries

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubetune"
DASHBOARD = CHART / "dashboards" / "kubetune.json"
SCRAPE_LABELS = {"namespace", "pod", "instance", "job", "container", "endpoint", "le"}
PROMQL_WORDS = {
    "by",
    "on",
    "without",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "le",
}


def exported() -> dict[str, set[str]]:
    """{sample name: its label names} of every metric the operator and the trainer export."""
    from kubetune_trainer.metrics import TrainerMetrics

    registries = [TrainerMetrics().registry]
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    registries.append(registry)
    names: dict[str, set[str]] = {}
    for reg in registries:
        for family in reg.collect():
            labels = set(getattr(family, "_labelnames", ()) or ())
            for sample in family.samples:
                labels |= set(sample.labels)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""]
            )
            for suffix in suffixes:
                names[family.name + suffix] = labels
    # labels of metrics without samples yet (labelled, no child): from the collectors' definitions
    for reg in registries:
        for collector in list(getattr(reg, "_collector_to_names", {})):
            labelnames = set(getattr(collector, "_labelnames", ()) or ())
            for name in reg._collector_to_names[collector]:
                if name in names:
                    names[name] |= labelnames
    return names


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets (rows included) and query variables."""
    out: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            out.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            out.append(inner.group(1) if inner else query)
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords, labels or strings)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word in PROMQL_WORDS or word.startswith("__"):
            continue  # a function call, a keyword, or a Grafana variable like $__rate_interval
        if text[max(0, match.start() - 1)] == "$":
            continue
        names.add(word)
    return names


def labels_used(expr: str) -> dict[str, set[str]]:
    """{metric: label names in its matcher} plus {'': labels of by/on/group clauses}."""
    used: dict[str, set[str]] = {"": set()}
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        used.setdefault(match.group(1), set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2)))
    for match in re.finditer(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        used[""].update(w.strip() for w in match.group(1).split(",") if w.strip())
    return used


def test_metric_name_parsing() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(kubetune_job_time_to_running_seconds_bucket[$__rate_interval])))"
        ' + a_metric * on (namespace, pod) group_left (finetunejob) other{x="y", z=~"$v"}'
    )
    assert metric_names(expr) == {"kubetune_job_time_to_running_seconds_bucket", "a_metric", "other"}
    assert labels_used(expr)["other"] == {"x", "z"}
    assert labels_used(expr)[""] == {"le", "namespace", "pod", "finetunejob"}


def test_every_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    metrics = exported()
    assert {
        "kubetune_finetunejobs",
        "kubetune_job_restarts_total",
        "kubetune_trainer_loss",
        "kubetune_job_time_to_running_seconds_bucket",
    } <= set(metrics)  # the names are really read
    exprs = queries(dashboard)
    assert len(exprs) >= 15
    used: set[str] = set()
    all_labels = set().union(*metrics.values()) | SCRAPE_LABELS
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        unknown = names - set(metrics)
        assert not unknown, f"{expr}: {sorted(unknown)} is exported by neither the operator nor the trainer"
        used |= names
        for metric, labels in labels_used(expr).items():
            allowed = all_labels if metric == "" else metrics[metric] | SCRAPE_LABELS
            assert labels <= allowed, (
                f"{expr}: labels {sorted(labels - allowed)} not on {metric or 'any metric'}"
            )
    # what the issue asks the dashboard to show
    for name in (
        "kubetune_finetunejobs",
        "kubetune_job_time_to_running_seconds_bucket",
        "kubetune_job_restarts_total",
        "kubetune_trainer_loss",
        "kubetune_trainer_tokens_per_second",
    ):
        assert name in used


@pytest.mark.parametrize("unknown", ["kubetune_jobs_total", 'kubetune_trainer_lost{namespace="a"}'])
def test_a_misspelt_metric_is_caught(unknown: str) -> None:
    assert metric_names(f"sum(rate({unknown}[5m]))") - set(exported())


def _render(*values: str) -> list[dict[str, Any]]:
    helm = str(ensure_binaries(["helm"]) / "helm")
    args = [helm, "template", "r", str(CHART)] + [a for v in values for a in ("--set", v)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_dashboard_configmap_is_opt_in_with_the_sidecar_label() -> None:
    def dashboards(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]

    assert dashboards(_render()) == []
    [cm] = dashboards(
        _render(
            "metrics.grafanaDashboard.enabled=true",
            "metrics.grafanaDashboard.namespace=monitoring",
            "metrics.grafanaDashboard.annotations.grafana_folder=ML",
        )
    )
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["kubetune.json"]) == json.loads(DASHBOARD.read_text())
