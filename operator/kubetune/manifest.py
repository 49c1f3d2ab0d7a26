"""Loading and validating FineTuneJob manifests, with messages that name the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune import spec
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
        if part == "[key]":  # a dict key that is itself invalid: the path already ends with it
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(manifest)"


# A validator's message may start with the path of the field it is about, relative to the model it checks
# ("quantization: required ..."): that path is appended to the error's location.
_RELATIVE_PATH = re.compile(r"^([A-Za-z][A-Za-z0-9]*(\[[0-9]+\])?)(\.[A-Za-z][A-Za-z0-9]*(\[[0-9]+\])?)*: ")
MAX_SHOWN = 40  # characters of an offending value shown back (it may be a secret pasted into the wrong field)

_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "a boolean", "str": "a string",
               "dict": "a mapping", "list": "a list", "NoneType": "null"}


_PATTERNS = {
    spec.NAME_PATTERN: f"a DNS-1035 label of at most {spec.MAX_NAME_LENGTH} characters (lowercase letters, digits "
                       "and '-', starting with a letter and ending with a letter or digit)",
    spec.DNS_LABEL.pattern: "a DNS label (lowercase letters, digits and '-', at most 63 characters)",
    spec.DNS_SUBDOMAIN: "a Kubernetes object name (lowercase letters, digits, '-' and '.')",
    spec.LABEL_VALUE: "a label value (letters, digits, '-', '_' and '.', starting and ending with a letter or digit)",
    spec.QUALIFIED_NAME: "a qualified name such as nvidia.com/gpu (an optional DNS prefix and a name)",
}


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """A short, truncated rendering of an offending value: never the whole of a long free-form input."""
    if isinstance(value, (dict, list, tuple)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(str(value))} characters)"


def _message(item: Any) -> str:
    kind, message = item["type"], item["msg"]
    if message.startswith("Value error, "):
        return message[len("Value error, "):]
    if kind == "extra_forbidden":
        return "unknown field (field names are camelCase; see `kubectl explain finetunejob.spec`)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {_TYPE_NAMES.get(type(item.get('input')).__name__, 'something else')}"
    if kind == "string_pattern_mismatch":
        wanted = _PATTERNS.get(item.get("ctx", {}).get("pattern", ""), "")
        if wanted:
            return f"must be {wanted} (got {shorten(item.get('input'))})"
    if kind in ("finite_number",):
        return "must be a finite number (not NaN or infinity)"
    if kind.endswith("_type") and "input" in item:
        got = type(item["input"]).__name__
        return f"{message[:1].lower()}{message[1:]}, got {_TYPE_NAMES.get(got, got)} {shorten(item['input'])}"
    if "input" in item and not isinstance(item["input"], (dict, list)):
        return f"{message} (got {shorten(item['input'])})"
    return message


def format_validation_error(error: ValidationError, prefix: tuple[Any, ...] = ()) -> list[str]:
    """Turn pydantic errors into 'field.path: problem (got a short value)' lines."""
    problems = []
    for item in error.errors(include_url=False):
        loc = prefix + tuple(p for p in item["loc"] if not (isinstance(p, str) and (
            p.startswith("function-") or p in ("lax-or-strict", "json-or-python") or p.startswith("enum["))))
        message = _message(item)
        match = _RELATIVE_PATH.match(message) if item["type"] == "value_error" else None
        path = _field_path(loc)
        if match:
            relative = match.group(0)[:-2]
            path = f"{path}.{relative}" if loc else relative
            message = message[len(match.group(0)):]
        problems.append(f"{path}: {message}")
    return problems


def parse_job(document: Any, source: str = "manifest") -> FineTuneJob:
    """Validate a parsed manifest (a dict) into a FineTuneJob."""
    if not isinstance(document, dict):
        raise ManifestError(source, [f"(manifest): expected a mapping with apiVersion, kind, metadata and spec, "
                                     f"got {type(document).__name__}"])
    try:
        return FineTuneJob.model_validate(document, by_alias=True, by_name=False)
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
