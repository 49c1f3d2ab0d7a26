"""constraints.txt as data: the pinned version of each package, by canonical name (PEP 503)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def canonical(name: str) -> str:
    """A package name as PEP 503 normalises it (`Foo_Bar.baz` -> `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pins() -> dict[str, str]:
    """Every `name==version` line of constraints.txt, keyed by canonical name."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out
