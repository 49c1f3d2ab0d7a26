"""The one factory for the cluster tests' fixtures: a started test control plane with its fake GPU
nodes, namespaces, Secrets and (optionally) the FineTuneJob CRD; the operator as a subprocess; and
the shared fixtures built on a module's `cp` (registered in tests/conftest.py).

A cluster test module writes its `cp` fixture with `make_cluster(...)`:

    @pytest.fixture(scope="module")
    def cp(request):
        with make_cluster(request, nodes=[FakeNode("gpu-0")], namespaces=["ml"], crd=True) as plane:
            ...  # anything else the module needs
            yield plane

and gets `api` (an admin ApiClient) and `operator` (the operator with the module's
`operator_env`, as the ServiceAccount the chart grants) from here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.controlplane import ControlPlane
from tests.support.operator_process import OperatorProcess, install_crd, service_account_kubeconfig


@dataclass(frozen=True)
class FakeNode:
    """A kwok node with `gpus` nvidia.com/gpu (ControlPlane.add_fake_node)."""

    name: str
    gpus: int = 8
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, Any]] = ()


@contextmanager
def make_cluster(
    request: pytest.FixtureRequest,
    *,
    nodes: Sequence[FakeNode] = (),
    namespaces: Sequence[str] = (),
    namespace_labels: Mapping[str, str] | None = None,
    secrets: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None,
    crd: bool = False,
    extra_tokens: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    stages: str | os.PathLike[str] | None = None,
    diagnostics_lines: int = 20,
) -> Iterator[ControlPlane]:
    """A started control plane with `nodes`, `namespaces` (labelled `namespace_labels`), `secrets`
    ({namespace: {name: stringData}}) and, with `crd`, the FineTuneJob CRD. When a test of the
    module failed meanwhile, the components' last log lines are printed at teardown."""
    failed_before = request.session.testsfailed
    with ControlPlane(extra_tokens=extra_tokens, stages=stages) as plane:
        for node in nodes:
            plane.add_fake_node(node.name, gpus=node.gpus, labels=node.labels, taints=node.taints)
        for namespace in namespaces:
            plane.create_namespace(namespace, labels=namespace_labels)
        if crd:
            install_crd(plane)
        for namespace, by_name in (secrets or {}).items():
            for name, data in by_name.items():
                plane.apply(
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {"name": name, "namespace": namespace},
                        "stringData": dict(data),
                    }
                )
        yield plane
        if request.session.testsfailed > failed_before:
            print(plane.diagnostics(diagnostics_lines))


@contextmanager
def running_operator(
    cp: ControlPlane, directory: Path, env: Mapping[str, str] | None = None, args: Sequence[str] = ()
) -> Iterator[OperatorProcess]:
    """The operator as the chart's ServiceAccount (exactly OPERATOR_RBAC_RULES), started, stopped after."""
    op = OperatorProcess(
        cp, directory / "operator.log", service_account_kubeconfig(cp, directory), args, env=env
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def wait_reconciles(cp: ControlPlane, op: OperatorProcess, rounds: int = 2, timeout: float = 120) -> None:
    """Until the operator has reconciled each FineTuneJob about `rounds` more times (its reconcile
    count, over all jobs, has grown by `rounds` times the number of FineTuneJobs): what a test waits
    for before asserting that something did *not* happen."""
    jobs = max(1, len(cp.get_json("finetunejobs.kubetune.io", "-A")["items"]))
    (before,) = cp.wait_for(lambda: (op.reconciles(),), 60, f"{op.name}'s metrics endpoint")
    target = before + rounds * jobs
    cp.wait_for(
        lambda: op.reconciles() >= target,
        timeout,
        f"{rounds} more reconcile(s) of each of {jobs} job(s)",
        interval=0.5,
    )


# ----- fixtures (a plugin: tests/conftest.py) -----


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    """The KUBETUNE_DEFAULT_* platform defaults the module's operator runs with; modules override it."""
    return {}


@pytest.fixture(scope="module")
def operator(
    cp: ControlPlane, operator_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator against the module's `cp`."""
    with running_operator(cp, tmp_path_factory.mktemp("operator"), operator_env) as op:
        yield op


@pytest.fixture(scope="module")
def api(cp: ControlPlane) -> Any:
    """An admin kubernetes ApiClient for the module's `cp`."""
    return cp.api_client()
