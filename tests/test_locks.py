"""The hashed locks the images install from (locks/operator.txt, locks/trainer.txt; scripts/lock.sh).

* every line is `name==version` with sha256 hashes, and the version is constraints.txt's pin (pip,
  setuptools and wheel: the Dockerfiles' ARGs);
* each lock is exactly the closure of pyproject.toml's base + extra requirements: walked offline
  through the installed distributions' metadata (the project's environment is installed with the
  same constraints), markers evaluated for Linux x86_64 and this Python;
* the committed locks are what scripts/lock.sh generates now (uv, from PyPI);
* the hashes are real: each hash of a few small packages is one of PyPI's own digests for that
  version (checked from the wheelhouse the image build uses when there is one, else by a download).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.support.pins import canonical, constraint_pins

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s]+)((?: --hash=sha256:[0-9a-f]{64})+)$")
TOOLS = {"pip": "PIP_VERSION", "setuptools": "SETUPTOOLS_VERSION", "wheel": "WHEEL_VERSION"}


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"{path.name}: not `name==version --hash=sha256:...`: {line[:120]}"
        out[canonical(match.group(1))] = (
            match.group(2),
            re.findall(r"sha256:([0-9a-f]{64})", match.group(3)),
        )
    return out


def dockerfile_arg(path: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.M)
    assert match, (path, name)
    return match.group(1).strip('"')


def closure(requirements: list[str]) -> set[str]:
    """Names reachable from requirements through the installed distributions' Requires-Dist."""
    env = {
        **default_environment(),
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
    }
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonical(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None:
                todo.append((sub, ""))
            else:
                for chosen in sorted(req.extras) or [""]:
                    if sub.marker.evaluate({**env, "extra": chosen}):
                        todo.append((sub, chosen))
                        break
    return {k.split("[", 1)[0] for k in seen}


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_lock_pins_are_the_constraints(image: str) -> None:
    lock = read_lock(LOCKS / f"{image}.txt")
    pinned = constraint_pins()
    dockerfile = REPO / ("operator" if image == "operator" else "trainer_image") / "Dockerfile"
    for name, (version, hashes) in lock.items():
        assert hashes and len(set(hashes)) == len(hashes), name
        if name in TOOLS:
            assert version == dockerfile_arg(dockerfile, TOOLS[name]), name
        else:
            assert pinned.get(name) == version, (
                f"{image}: {name}=={version}, constraints.txt has {pinned.get(name)}"
            )
    assert set(TOOLS) <= set(lock)


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_lock_is_the_closure_of_the_requirements(image: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # pip, setuptools and wheel are in the lock, with what they need (wheel: packaging)
    wanted = closure(project["dependencies"] + project["optional-dependencies"][image] + sorted(TOOLS))
    locked = set(read_lock(LOCKS / f"{image}.txt"))
    assert locked == wanted, (sorted(locked - wanted), sorted(wanted - locked))
    if image == "operator":
        assert not {n for n in locked if n in {"torch", "triton", "deepspeed"} or n.startswith("nvidia-")}


@pytest.mark.slow  # runs the lock script (pip resolution)
def test_locks_are_what_the_script_generates(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "lock.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "LOCK_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for image in ("operator", "trainer"):
        assert (tmp_path / f"{image}.txt").read_text() == (LOCKS / f"{image}.txt").read_text(), (
            f"locks/{image}.txt is stale: run `make lock`"
        )


def test_hashes_match_the_files(tmp_path: Path) -> None:
    """A few files, checked against the lock: the downloaded bytes' sha256 is one of the listed hashes."""
    lock = read_lock(LOCKS / "operator.txt")
    names = ["pyyaml", "kopf", "prometheus-client"]
    req = tmp_path / "req.txt"
    req.write_text("".join(f"{n}=={lock[n][0]}\n" for n in names))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(tmp_path / "d"),
            "-r",
            str(req),
        ],
        check=True,
        timeout=300,
        env={**os.environ, "PIP_FIND_LINKS": ""},
    )
    files = list((tmp_path / "d").iterdir())
    assert len(files) == len(names)
    for path in files:
        name = canonical(path.name.split("-")[0])
        assert hashlib.sha256(path.read_bytes()).hexdigest() in lock[name][1], path.name
