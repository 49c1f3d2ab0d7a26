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


# string maps: their entries are named `nodeSelector[key]`, as the API server names them
MAP_FIELDS = {"nodeSelector", "labels", "annotations"}


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    previous: Any = None
    for part in loc:
        if part == "[key]":  # a dict key that is itself invalid: the path already ends with it
            continue
        if isinstance(part, int) or previous in MAP_FIELDS:
            path += f"[{part}]"
        elif not isinstance(part, str):
            path += f"[{part!r}]"
        else:
            path += ("." if path else "") + str(part)
        previous = part
    return path or "(manifest)"


# A validator's message may start with the path of the field it is about, relative to the model it checks
# ("quantization: required ..."): that path is appended to the error's location.
_RELATIVE_PATH = re.compile(r"^([A-Za-z][A-Za-z0-9]*(\[[0-9]+\])?)(\.[A-Za-z][A-Za-z0-9]*(\[[0-9]+\])?)*: ")
MAX_SHOWN = 40  # characters of an offending value shown back (it may be a secret pasted into the wrong field)

_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "str": "a string",
    "dict": "a mapping",
    "list": "a list",
    "NoneType": "null",
}


_PATTERNS = {
    spec.NAME_PATTERN: f"a DNS-1035 label of at most {spec.MAX_NAME_LENGTH} characters (lowercase letters, digits "
    "and '-', starting with a letter and ending with a letter or digit)",
    spec.GENERATE_NAME_PATTERN: "a prefix of lowercase letters, digits and '-', starting with a letter",
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
        return message[len("Value error, ") :]
    if kind == "extra_forbidden":
        return "unknown field (field names are camelCase; see `kubectl explain finetunejob.spec`)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return (
            f"expected a mapping, got {_TYPE_NAMES.get(type(item.get('input')).__name__, 'something else')}"
        )
    if kind == "string_pattern_mismatch":
        wanted = _PATTERNS.get(item.get("ctx", {}).get("pattern", ""), "")
        if wanted:
            return f"must be {wanted} (got {shorten(item.get('input'))})"
    if kind in ("finite_number",):
        return "must be a finite number (not NaN or infinity)"
    if kind.endswith("_type") and "input" in item:
        value = item["input"]
        got = _TYPE_NAMES.get(type(value).__name__, type(value).__name__)
        shown = "" if value is None or isinstance(value, (dict, list)) else f" {shorten(value)}"
        return f"{message}, got {got}{shown}"
    if "input" in item and not isinstance(item["input"], (dict, list)):
        return f"{message} (got {shorten(item['input'])})"
    return message


def format_validation_error(error: ValidationError, prefix: tuple[Any, ...] = ()) -> list[str]:
    """Turn pydantic errors into 'field.path: problem (got a short value)' lines."""
    problems = []
    for item in error.errors(include_url=False):
        loc = prefix + tuple(
            p
            for p in item["loc"]
            if not (
                isinstance(p, str)
                and (
                    p.startswith("function-")
                    or p in ("lax-or-strict", "json-or-python")
                    or p.startswith("enum[")
                )
            )
        )
        message = _message(item)
        match = _RELATIVE_PATH.match(message) if item["type"] == "value_error" else None
        path = _field_path(loc)
        if match:
            relative = match.group(0)[:-2]
            path = f"{path}.{relative}" if loc else relative
            message = message[len(match.group(0)) :]
        problems.append(f"{path}: {message}")
    return problems


def parse_job(document: Any, source: str = "manifest") -> FineTuneJob:
    """Validate a parsed manifest (a dict) into a FineTuneJob."""
    if not isinstance(document, dict):
        raise ManifestError(
            source,
            [
                f"(manifest): expected a mapping with apiVersion, kind, metadata and spec, "
                f"got {type(document).__name__}"
            ],
        )
    try:
        return FineTuneJob.model_validate(document, by_alias=True, by_name=False)
    except ValidationError as error:
        raise ManifestError(source, format_validation_error(error)) from None


MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: an object the API server takes is at most ~1.5 MiB of JSON
MAX_EXPANDED_NODES = 100_000  # YAML nodes after aliases are expanded (a "billion laughs" file has 10^9)
_GO_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _ManifestLoader(yaml.SafeLoader):
    """SafeLoader that reads scalars as kubectl does (1e9 is a number, 2024-01-01 a string), refuses
    duplicate keys, and refuses alias expansion beyond MAX_EXPANDED_NODES."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key that is not a string", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {shorten(key)} (first on line {seen[key]}); every field once",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


_ManifestLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ManifestLoader.add_implicit_resolver("tag:yaml.org,2002:float", _GO_FLOAT, list("-+.0123456789"))


def _check_expansion(root: yaml.Node) -> None:
    """Refuse alias bombs and recursive aliases before anything is built from them."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.composer.ComposerError(
                None, None, "a recursive alias (a node that contains itself)", node.start_mark
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases expand to more than {MAX_EXPANDED_NODES:,} YAML nodes (an alias bomb?)",
                node.start_mark,
            )
        sizes[key] = total
        return total

    size(root)


def _decode(path: Path, data: bytes) -> str:
    for bom, name in (
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if data.startswith(bom):
            raise ManifestError(str(path), [f"the file is {name} text; save it as UTF-8"])
    if data.startswith((b"\x1f\x8b", b"PK\x03\x04", b"BZh", b"\xfd7zXZ")):
        raise ManifestError(
            str(path), ["the file is compressed (gzip, zip, bzip2 or xz), not a YAML manifest"]
        )
    if b"\x00" in data[:8192]:
        raise ManifestError(
            str(path),
            ["the file is binary (NUL bytes) or UTF-16 text, not a YAML manifest; save it as UTF-8"],
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ManifestError(
            f"{path}:{line}", [f"not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"]
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def load_documents(text: str, source: str) -> list[Any]:
    """Every non-empty YAML document of a manifest, parsed as kubectl parses it."""
    try:
        return [d for d in yaml.load_all(text, Loader=_ManifestLoader) if d is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ManifestError(where, [f"not valid YAML: {getattr(error, 'problem', None) or error}"]) from None
    except RecursionError:
        raise ManifestError(source, ["not valid YAML: nested too deeply"]) from None


def load_job(path: str | Path) -> FineTuneJob:
    """Read and validate a FineTuneJob YAML file.

    A file with several documents must hold exactly one FineTuneJob; errors name the document."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise ManifestError(str(path), [f"cannot read the file: {error.strerror or error}"]) from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            str(path),
            [
                f"the file is larger than {MAX_MANIFEST_BYTES >> 20} MiB; a FineTuneJob "
                "manifest is a few kilobytes"
            ],
        )
    documents = load_documents(_decode(path, data), str(path))
    if len(documents) == 1:
        return parse_job(documents[0], str(path))
    jobs = [
        (i, d)
        for i, d in enumerate(documents, start=1)
        if isinstance(d, dict) and d.get("kind") == "FineTuneJob"
    ]
    if len(jobs) != 1:
        kinds = (
            ", ".join(
                f"{i}: {shorten(d.get('kind')) if isinstance(d, dict) else 'not a mapping'}"
                for i, d in enumerate(documents, start=1)
            )
            or "none"
        )
        raise ManifestError(
            str(path), [f"expected exactly one FineTuneJob document, found {len(jobs)} (documents {kinds})"]
        )
    index, document = jobs[0]
    return parse_job(document, f"{path} (document {index} of {len(documents)})")


def dump_job(job: FineTuneJob) -> dict[str, Any]:
    """The manifest as a plain dict with camelCase keys (defaults filled in)."""
    return job.model_dump(mode="json", by_alias=True, exclude_none=True)
