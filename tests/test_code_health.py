"""The project's static checks, run by `make test` as by `make lint`: ruff's linter, ruff's formatter
(check only) and mypy, each with the configuration in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's own executables, not whatever PATH has


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
        f"`{' '.join(command)}` failed (exit {result.returncode}); run it in the repository root:\n"
        f"{result.stdout[-8000:]}{result.stderr[-4000:]}"
    )
