"""The operator as a subprocess against the test control plane (shared by the cluster tests and the
scale benchmark).

* `install_crd(cp)`: apply the generated CRD and wait until it is Established.
* `service_account_kubeconfig(cp, directory)`: ServiceAccount kubetune-system/kubetune-operator bound
  to exactly `handlers.OPERATOR_RBAC_RULES` (what the chart grants), and a kubeconfig with its token.
* `OperatorProcess`: `python -m kubetune.operator_main` with its log in a file, liveness and metrics
  endpoints on free loopback ports; start, kill (SIGKILL, as when a node dies), stop (SIGTERM), scrape.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubetune.handlers import OPERATOR_RBAC_RULES
from tests.support.controlplane import ControlPlane, free_port

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
OPERATOR_NS = "kubetune-system"
OPERATOR_SA = "kubetune-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"


def install_crd(cp: ControlPlane, crd_file: Path = CRD_FILE) -> None:
    """Apply the FineTuneJob CRD and wait for the API server to serve it."""
    cp.kubectl("apply", "-f", str(crd_file))
    cp.wait_for(
        lambda: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in cp.get_json("crd", "finetunejobs.kubetune.io").get("status", {}).get("conditions", [])
        ),
        60,
        "CRD Established",
        interval=0.5,
    )


def token_kubeconfig(
    cp: ControlPlane, namespace: str, account: str, path: Path, context: str = "test"
) -> str:
    """Write a kubeconfig authenticating as ServiceAccount `namespace/account` (a 2-hour token)."""
    token = cp.kubectl("-n", namespace, "create", "token", account, "--duration=2h").stdout.strip()
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": context,
                "clusters": [
                    {"name": context, "cluster": {"server": cp.server, "certificate-authority": cp.ca_cert}}
                ],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": context, "context": {"cluster": context, "user": account}}],
            }
        )
    )
    return str(path)


def service_account_kubeconfig(cp: ControlPlane, directory: Path) -> str:
    """The operator's ServiceAccount bound to OPERATOR_RBAC_RULES only; returns its kubeconfig path."""
    cp.create_namespace(OPERATOR_NS)
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": OPERATOR_SA, "namespace": OPERATOR_NS},
        }
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": OPERATOR_SA},
            "rules": OPERATOR_RBAC_RULES,
        }
    )
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": OPERATOR_SA},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR_SA},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": OPERATOR_NS}],
        }
    )
    return token_kubeconfig(cp, OPERATOR_NS, OPERATOR_SA, directory / "operator.kubeconfig")


class OperatorProcess:
    """`python -m kubetune.operator_main ARGS` as a subprocess with its log in a file.

    `env` replaces the inherited KUBETUNE_DEFAULT_* platform defaults; the liveness and metrics
    endpoints get free loopback ports at each start (`health_port`, `metrics_port`).
    """

    def __init__(
        self,
        cp: ControlPlane,
        log_path: Path,
        kubeconfig: str | os.PathLike,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str = "operator",
    ):
        self.cp, self.log_path, self.kubeconfig, self.name = cp, log_path, str(kubeconfig), name
        self.args = tuple(args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.health_port = self.metrics_port = 0

    def command(self) -> list[str]:
        """The command line (subclasses derive it from elsewhere, e.g. the chart's Deployment)."""
        return [
            sys.executable,
            "-m",
            "kubetune.operator_main",
            "--verbose",
            "--interval",
            "2",
            *self.endpoint_args(),
            *self.args,
        ]

    def endpoint_args(self) -> list[str]:
        """The liveness and metrics flags, on this process's ports on 127.0.0.1."""
        return [
            "--liveness",
            f"http://127.0.0.1:{self.health_port}/healthz",
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-address",
            "127.0.0.1",
        ]

    def start(self) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_DEFAULT")}
        env.update({"KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1", **self.env})
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        self.cp.wait_for(self.healthy, 90, f"{self.name} liveness endpoint")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=2
            ) as response:
                return response.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics: {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def reconciles(self) -> float:
        """How many reconciles (of any job) this process has finished since it started."""
        return self.metrics().get(("kubetune_reconcile_duration_seconds_count", ()), 0.0)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a node dies."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (as the kubelet stops a pod), SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
