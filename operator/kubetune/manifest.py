"""Loading and validating FineTuneJob manifests, with messages that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.spec import FineTuneJob


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every problem with its field path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid FineTuneJob:\n" + "\n".join(f"  - {p}" for p in problems))


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(manifest)"


def format_validation_error(error: ValidationError) -> list[str]:
    """Turn pydantic errors into 'field.path: problem (got value)' lines."""
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see `kubectl explain finetunejob.spec`)"
        elif item["type"] == "missing":
            message = "required field is missing"
        elif "input" in item and item["type"] not in ("model_type", "value_error"):
            message += f" (got {item['input']!r})"
        problems.append(f"{_field_path(loc)}: {message}")
    return problems


def parse_job(document: Any, source: str = "manifest") -> FineTuneJob:
    """Validate a parsed manifest (a dict) into a FineTuneJob."""
    if not isinstance(document, dict):
        raise ManifestError(source, [f"(manifest): expected a mapping with apiVersion, kind, metadata and spec, "
                                     f"got {type(document).__name__}"])
    try:
        return FineTuneJob.model_validate(document)
    except ValidationError as error:
        raise ManifestError(source, format_validation_error(error)) from None


def load_job(path: str | Path) -> FineTuneJob:
    """Read and validate a FineTuneJob YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ManifestError(str(path), [f"cannot read the file: {error.strerror}"]) from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ManifestError(where, [f"not valid YAML: {getattr(error, 'problem', error)}"]) from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if len(documents) == 1:
        jobs = documents
    if len(jobs) != 1:
        raise ManifestError(str(path), [f"expected exactly one FineTuneJob document, found {len(jobs)}"])
    return parse_job(jobs[0], str(path))


def dump_job(job: FineTuneJob) -> dict[str, Any]:
    """The manifest as a plain dict with camelCase keys (defaults filled in)."""
    return job.model_dump(mode="json", by_alias=True, exclude_none=True)
