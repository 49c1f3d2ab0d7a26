"""Datasets: read files, check every row, clean, split, mix by weight, tokenize with loss masks.

Reading is plain Python so that every rejected row can be named by file:line and field.
The pipeline, top to bottom:

    read_rows -> check_row -> clean -> split (validation) -> mix (weights) -> tokenize -> pack/blocks

Mixture weights count *examples*: with weights w_i the training mixture holds
N = sum of the cleaned dataset sizes examples, of which round(N * w_i / sum(w)) come from dataset i
(sampled without replacement while it lasts, then repeated). Tokens per example vary by dataset,
so the token shares follow the example shares times each dataset's mean length; the run summary
reports both.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.checkpoints import sha256_file
from kubetune.spec import CleaningSpec, DatasetFormat, DatasetSpec, FineTuneJobSpec, TaskType, default_format
from kubetune.storage import S3Options
from kubetune_trainer import preference_data
from kubetune_trainer.errors import DataError

IGNORE_INDEX = -100  # label of a token the loss skips (torch's cross_entropy default ignore_index)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
CHAT_ROLES = {"system", "user", "assistant", "tool"}
SUFFIX_TYPES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "txt",
    ".md": "txt",
}


@dataclass
class Row:
    """One checked row: where it came from and its normalized content."""

    origin: str  # file:line
    format: str  # alpaca | messages | text
    content: dict[str, Any]


@dataclass
class DatasetReport:
    """What happened to one dataset's rows."""

    source: str
    files: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    read: int = 0
    invalid: int = 0
    empty: int = 0
    duplicates: int = 0
    too_short: int = 0
    too_long: int = 0
    kept: int = 0
    invalid_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------- reading files


def resolve_files(source: str, cache_dir: Path, s3: S3Options | None = None) -> list[tuple[str, Path]]:
    """Expand a path, directory, glob or s3:// URI to (display name, local path) pairs."""
    if storage.is_s3(source):
        uris = storage.expand(source, options=s3)
        if not uris:
            raise DataError(f"{source}: no objects match")
        pairs = []
        for uri in uris:
            local = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(uri).name
            local.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(uri, local, options=s3)
            pairs.append((uri, local))
        return pairs
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIX_TYPES)
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{source}: no such file or directory")
    if not files:
        raise DataError(f"{source}: no data files match (looked for {', '.join(sorted(SUFFIX_TYPES))})")
    return [(str(p), p) for p in files]


def _file_type(spec: DatasetSpec, name: str) -> str:
    if spec.file_type != "auto":
        return spec.file_type
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIX_TYPES:
        raise DataError(
            f"{name}: cannot tell the file type from {suffix!r}; set fileType to one of "
            "jsonl, json, parquet, csv, txt"
        )
    return SUFFIX_TYPES[suffix]


def _number_problem(error: ValueError) -> str:
    return "a number too long to read" if "digits" in str(error) else " ".join(str(error).split())[:120]


def _json_array_items(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """Yield (line, item) for each element of a top-level JSON array, keeping line numbers."""
    decoder = json.JSONDecoder()
    index = 0
    length = len(text)

    def skip_ws(i: int) -> int:
        while i < length and text[i] in " \t\r\n":
            i += 1
        return i

    index = skip_ws(index)
    if index >= length or text[index] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{name}:{error.lineno}: not valid JSON: {error.msg}") from None
        except ValueError as error:  # a number of more than 4300 digits
            raise DataError(f"{name}: not valid JSON: {_number_problem(error)}") from None
        if isinstance(value, dict):
            for key in ("data", "rows", "examples", "train"):
                if isinstance(value.get(key), list):
                    for i, item in enumerate(value[key]):
                        yield 1, item if not isinstance(item, dict) else {**item, "__index__": i}
                    return
        raise DataError(
            f"{name}:1: expected a JSON array of rows (or use a .jsonl file with one row per line)"
        )

    def closed(i: int) -> bool:
        rest = skip_ws(i + 1)
        if rest < length:
            raise DataError(
                f"{name}:{text.count(chr(10), 0, rest) + 1}: not valid JSON: text after the closing ']'"
            )
        return True

    index = skip_ws(index + 1)
    if index < length and text[index] == "]" and closed(index):
        return
    while index < length:
        line = text.count("\n", 0, index) + 1
        try:
            item, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise DataError(f"{name}:{error.lineno}: not valid JSON: {error.msg}") from None
        except ValueError as error:  # a number of more than 4300 digits
            raise DataError(f"{name}:{line}: not valid JSON: {_number_problem(error)}") from None
        yield line, item
        index = skip_ws(index)
        if index < length and text[index] == ",":
            index = skip_ws(index + 1)
        elif index < length and text[index] == "]" and closed(index):
            return
        else:
            line = text.count("\n", 0, index) + 1
            raise DataError(f"{name}:{line}: not valid JSON: expected ',' or ']' between rows")
    raise DataError(f"{name}: not valid JSON: the array is not closed")


# Leading bytes of files that are not text (compressed, archives, other binary formats) and of text that is
# not UTF-8: they are refused by name before any line is parsed.
_MAGIC = [
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (b"PK\x03\x04", "a zip archive (extract it first)"),
    (b"BZh", "a bzip2-compressed file (decompress it first)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file (decompress it first)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file (decompress it first)"),
    (b"PAR1", "a Parquet file (name it .parquet or set fileType: parquet)"),
    (b"\x00\x00\xfe\xff", "UTF-32 text (save it as UTF-8)"),
    (b"\xff\xfe\x00\x00", "UTF-32 text (save it as UTF-8)"),
    (b"\xff\xfe", "UTF-16 text (save it as UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (save it as UTF-8)"),
]
CSV_MAX_FIELD = 64 << 20  # characters in one CSV field
MAX_NESTING = 200  # JSON nesting depth a row may have (far beyond any chat or alpaca row)
_BOM = "\ufeff"


def _sniff(name: str, path: Path, file_type: str) -> None:
    """Refuse binary, compressed and non-UTF-8 files named as text, before reading a line of them."""
    with path.open("rb") as handle:
        head = handle.read(8192)
    if file_type == "parquet":
        if head[:4] != b"PAR1":
            raise DataError(f"{name}: not a Parquet file (it does not start with PAR1)")
        return
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{name}: this is {what}, not a {file_type} text file")
    if b"\x00" in head:
        even, odd, half = head[0::2].count(0), head[1::2].count(0), max(1, len(head) // 2)
        if (odd > 0.8 * half and even < 0.05 * half) or (even > 0.8 * half and odd < 0.05 * half):
            raise DataError(f"{name}: looks like UTF-16 text without a byte-order mark (save it as UTF-8)")
        raise DataError(f"{name}: binary data (NUL bytes) in a {file_type} text file")


def _decode(name: str, number: int, raw: bytes) -> str:
    """One line as text; undecodable bytes name the line and column. A UTF-8 BOM on line 1 is dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{name}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
            f"{error.start + 1}); save the file as UTF-8"
        ) from None
    return text[1:] if number == 1 and text.startswith(_BOM) else text


def _text_lines(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, BOM dropped, with universal newlines kept per line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, _decode(name, number, raw)


def _csv_lines(name: str, path: Path) -> Iterator[str]:
    """Lines for the csv module, old Mac line ends (a lone CR) included."""
    for _, text in _text_lines(name, path):
        if "\r" in text.rstrip("\r\n"):
            yield from (part for part in re.split(r"(?<=\r)(?!\n)", text) if part)
        else:
            yield text


def _read_text(name: str, path: Path) -> str:
    return "".join(text for _, text in _text_lines(name, path))


def _check_depth(text: str) -> None:
    """Refuse JSON nested deeper than MAX_NESTING (json would hit a RecursionError)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise ValueError(f"nested more than {MAX_NESTING} levels deep")
        elif ch in "]}":
            depth -= 1


def _loads(text: str) -> Any:
    """json.loads of one row, refusing nesting deeper than MAX_NESTING."""
    _check_depth(text)
    return json.loads(text)


def _read_parquet(name: str, path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            yield from parquet.read_row_group(group).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as error:
        detail = " ".join(str(error).split())[:200]
        raise DataError(f"{name}: not a readable Parquet file (truncated or corrupt?): {detail}") from None


def read_raw(name: str, path: Path, file_type: str) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (origin, raw row, parse error) from one file; origin is 'file:line'.

    Never raises anything but DataError: binary, compressed, UTF-16 and undecodable files, broken
    Parquet and over-deep JSON are named with file (and line where there is one)."""
    _sniff(name, path, file_type)
    if file_type == "jsonl":
        for number, line in _text_lines(name, path):
            if not line.strip():
                continue
            try:
                yield f"{name}:{number}", _loads(line), None
            except json.JSONDecodeError as error:
                yield f"{name}:{number}", None, f"not valid JSON: {error.msg} at column {error.colno}"
            except ValueError as error:  # nesting, or a number of more than 4300 digits
                yield f"{name}:{number}", None, f"not valid JSON: {_number_problem(error)}"
    elif file_type == "json":
        text = _read_text(name, path)
        try:
            _check_depth(text)
        except ValueError as error:
            raise DataError(f"{name}: not valid JSON: {error}") from None
        for number, item in _json_array_items(text, name):
            if isinstance(item, dict):
                item.pop("__index__", None)
            yield f"{name}:{number}", item, None
    elif file_type == "csv":
        lines = _csv_lines(name, path)
        csv.field_size_limit(CSV_MAX_FIELD)  # the default (128 KiB) refuses long documents
        reader = csv.DictReader(lines)
        start = 2
        try:
            for record in reader:
                if None in record:
                    yield (
                        f"{name}:{start}",
                        None,
                        (
                            f"{len(record[None])} more value(s) than the "
                            f"{len(reader.fieldnames or [])} columns of the header"
                        ),
                    )
                else:
                    yield f"{name}:{start}", dict(record), None
                start = reader.line_num + 1
        except csv.Error as error:
            raise DataError(f"{name}:{max(1, reader.line_num)}: not valid CSV: {error}") from None
    elif file_type == "parquet":
        for number, record in enumerate(_read_parquet(name, path), start=1):
            yield f"{name}:row {number}", record, None
    elif file_type == "txt":
        paragraph: list[str] = []
        first_line = 0
        for number, line in _text_lines(name, path):
            if line.strip():
                if not paragraph:
                    first_line = number
                paragraph.append(line.rstrip("\r\n"))
            elif paragraph:
                yield f"{name}:{first_line}", {"text": "\n".join(paragraph)}, None
                paragraph = []
        if paragraph:
            yield f"{name}:{first_line}", {"text": "\n".join(paragraph)}, None
    else:  # pragma: no cover - the spec enum prevents this
        raise DataError(f"{name}: unsupported file type {file_type}")


# ---------------------------------------------------------------- checking rows


def _require_string(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing required field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__} {value!r:.40}")
    return _encodable(value, f"field '{key}'")


def _encodable(value: str, where: str) -> str:
    """The text itself, if it can be encoded as UTF-8 (a lone surrogate from a JSON \\ud800 escape cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where} holds an unpaired surrogate (\\u{ord(value[error.start]):04x} at character "
            f"{error.start + 1}), which is not text; fix the escape in the file"
        ) from None
    return value


def check_row(raw: Any, fmt: str, spec: DatasetSpec) -> dict[str, Any]:
    """Validate one raw row for its format; raises ValueError naming the field."""
    if fmt in preference_data.FORMATS:
        return preference_data.check_row(raw, fmt, spec)
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object with fields, got {type(raw).__name__}")
    if fmt == DatasetFormat.alpaca.value:
        return {
            "instruction": _require_string(raw, "instruction"),
            "input": _require_string(raw, "input", required=False),
            "output": _require_string(raw, "output"),
        }
    if fmt == DatasetFormat.messages.value:
        messages = raw.get(spec.messages_field)
        if messages is None:
            raise ValueError(f"missing required field '{spec.messages_field}' (a list of {{role, content}})")
        if isinstance(messages, str):
            try:
                messages = _loads(messages)
            except ValueError:
                raise ValueError(
                    f"field '{spec.messages_field}' must be a list of {{role, content}}"
                ) from None
        checked = check_messages(messages, spec.messages_field)
        if not any(m["role"] == "assistant" for m in checked):
            raise ValueError(f"field '{spec.messages_field}' has no assistant message to learn from")
        return {"messages": checked}
    return {"text": _require_string(raw, spec.text_field)}


def check_messages(messages: Any, key: str) -> list[dict[str, str]]:
    """A non-empty list of {role, content} (roles from CHAT_ROLES, string contents), or a ValueError
    naming `key[index].field` and what would be valid."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field '{key}' must be a non-empty list of {{role, content}}")
    checked = []
    for index, message in enumerate(messages):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {role!r:.40}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": _encodable(content, f"{where}.content")})
    return checked


def _strip(content: dict[str, Any]) -> dict[str, Any]:
    if preference_data.is_preference(content):
        return preference_data.strip(content)
    if "messages" in content:
        return {
            "messages": [{"role": m["role"], "content": m["content"].strip()} for m in content["messages"]]
        }
    return {k: v.strip() for k, v in content.items()}


def _is_empty(content: dict[str, Any]) -> bool:
    if preference_data.is_preference(content):
        return preference_data.is_empty(content)
    if "messages" in content:
        return any(m["role"] == "assistant" and not m["content"] for m in content["messages"])
    if "output" in content:
        return not content["output"] or not content["instruction"]
    return not content["text"]


def _char_count(content: dict[str, Any]) -> int:
    if preference_data.is_preference(content):
        return preference_data.char_count(content)
    if "messages" in content:
        return sum(len(m["content"]) for m in content["messages"])
    return sum(len(v) for v in content.values())


def load_dataset_rows(
    spec: DatasetSpec, task: str, cleaning: CleaningSpec, cache_dir: Path, s3: S3Options | None = None
) -> tuple[list[Row], DatasetReport]:
    """Read, check and clean one dataset; invalid rows fail with file:line unless skipping is on."""
    fmt = spec.format or default_format(task)
    report = DatasetReport(source=spec.source)
    seen: set[str] = set()
    rows: list[Row] = []
    for name, path in resolve_files(spec.source, cache_dir, s3):
        try:
            _load_file(name, path, spec, fmt, cleaning, report, seen, rows)
        except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError) as error:
            raise DataError(f"{name}: cannot read the file: {error.strerror or error}") from None
        if spec.max_examples is not None and len(rows) >= spec.max_examples:
            break
    report.kept = len(rows)
    if not rows:
        raise DataError(
            f"{spec.source}: no usable rows after cleaning (read {report.read}, invalid "
            f"{report.invalid}, empty {report.empty}, duplicates {report.duplicates}, too short "
            f"{report.too_short}, too long {report.too_long})"
        )
    return rows, report


def _load_file(
    name: str,
    path: Path,
    spec: DatasetSpec,
    fmt: str,
    cleaning: CleaningSpec,
    report: DatasetReport,
    seen: set[str],
    rows: list[Row],
) -> None:
    """Read, check and clean one file of a dataset into `rows` (see load_dataset_rows)."""
    report.files.append(name)
    report.hashes[name] = sha256_file(path)
    file_type = _file_type(spec, name)
    if file_type == "txt" and fmt != DatasetFormat.text.value:
        raise DataError(f"{name}: a .txt file holds plain text; set format: text (it is {fmt})")
    for origin, raw, parse_error in read_raw(name, path, file_type):
        report.read += 1
        try:
            if parse_error:
                raise ValueError(parse_error)
            content = check_row(raw, fmt, spec)
        except ValueError as error:
            message = f"{origin}: {error}"
            if not cleaning.skip_invalid_rows:
                raise DataError(message + " (set cleaning.skipInvalidRows: true to skip such rows)") from None
            report.invalid += 1
            if len(report.invalid_examples) < 5:
                report.invalid_examples.append(message)
            continue
        if cleaning.strip:
            content = _strip(content)
        if cleaning.drop_empty and _is_empty(content):
            report.empty += 1
            continue
        chars = _char_count(content)
        if chars < cleaning.min_chars:
            report.too_short += 1
            continue
        if cleaning.max_chars is not None and chars > cleaning.max_chars:
            report.too_long += 1
            continue
        if cleaning.drop_duplicates:
            key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
        rows.append(Row(origin=origin, format=fmt, content=content))
        if spec.max_examples is not None and len(rows) >= spec.max_examples:
            return


# ---------------------------------------------------------------- split and mix


def mixture_quotas(sizes: list[int], weights: list[float], total: int | None = None) -> list[int]:
    """Examples drawn from each dataset: proportional to weight, summing to `total` (default sum of sizes)."""
    total = sum(sizes) if total is None else total
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights]
    quotas = [int(x) for x in exact]
    # Largest-remainder rounding keeps the sum exact and the shares as close as possible.
    for index in sorted(range(len(exact)), key=lambda i: exact[i] - quotas[i], reverse=True)[
        : total - sum(quotas)
    ]:
        quotas[index] += 1
    return quotas


def mix(datasets: list[list[Row]], weights: list[float], seed: int) -> list[Row]:
    """Sample a weighted mixture (weights count examples) and shuffle it."""
    rng = random.Random(seed)
    mixed: list[Row] = []
    for rows, quota in zip(datasets, mixture_quotas([len(r) for r in datasets], weights), strict=True):
        order = list(rows)
        rng.shuffle(order)
        repeats, remainder = divmod(quota, len(order))
        mixed.extend(order * repeats + order[:remainder])
    rng.shuffle(mixed)
    return mixed


@dataclass
class PreparedData:
    """Rows ready to tokenize, with the report of how they were obtained."""

    train: list[Row]
    validation: list[Row]
    reports: list[DatasetReport]
    validation_reports: list[DatasetReport]
    mixture: list[dict[str, Any]]


def prepare_rows(spec: FineTuneJobSpec, cache_dir: Path, s3: S3Options | None = None) -> PreparedData:
    """Read every dataset, hold out validation rows and build the weighted training mixture."""
    task = spec.task.type
    per_dataset: list[list[Row]] = []
    reports: list[DatasetReport] = []
    validation: list[Row] = []
    rng = random.Random(spec.training.seed)
    for dataset in spec.datasets:
        rows, report = load_dataset_rows(dataset, task, spec.cleaning, cache_dir, s3)
        if spec.validation.fraction is not None:
            order = list(rows)
            rng.shuffle(order)
            held = max(1, round(len(order) * spec.validation.fraction)) if len(order) > 1 else 0
            validation.extend(order[:held])
            rows = order[held:]
        per_dataset.append(rows)
        reports.append(report)
    validation_reports = []
    for dataset in spec.validation.datasets or []:
        rows, report = load_dataset_rows(dataset, task, spec.cleaning, cache_dir, s3)
        validation.extend(rows)
        validation_reports.append(report)
    if not validation:
        raise DataError(
            "validation: no held-out rows (the datasets are too small for validation.fraction; add "
            "rows or give validation.datasets)"
        )
    if spec.validation.max_examples is not None:
        validation = validation[: spec.validation.max_examples]
    weights = [d.weight for d in spec.datasets]
    train = mix(per_dataset, weights, spec.training.seed)
    quotas = mixture_quotas([len(r) for r in per_dataset], weights)
    mixture = [
        {"source": d.source, "weight": d.weight, "rows": len(r), "examples": q}
        for d, r, q in zip(spec.datasets, per_dataset, quotas, strict=True)
    ]
    return PreparedData(train, validation, reports, validation_reports, mixture)


# ---------------------------------------------------------------- tokenize


def render_segments(row: Row, task_template: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a row into (text, is_response) segments; only response segments are learned by default."""
    content = row.content
    eos = tokenizer.eos_token or ""
    if row.format == DatasetFormat.text.value:
        return [(content["text"], True)]
    if row.format == DatasetFormat.alpaca.value:
        if task_template == "chat-template":
            user = content["instruction"] + (f"\n\n{content['input']}" if content["input"] else "")
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": content["output"]},
            ]
            return _chat_segments(messages, tokenizer, row.origin)
        if task_template == "plain":
            prompt = content["instruction"] + (f"\n\n{content['input']}" if content["input"] else "") + "\n\n"
        else:
            prompt = ALPACA_PROMPT.format(
                with_input=", paired with an input that provides further context" if content["input"] else "",
                instruction=content["instruction"],
                input_block=f"### Input:\n{content['input']}\n\n" if content["input"] else "",
            )
        return [(prompt, False), (content["output"] + eos, True)]
    return _chat_segments(content["messages"], tokenizer, row.origin)


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], origin: str, **kwargs: Any) -> str:
    """The chat template's text; a template that refuses the conversation (roles that do not alternate,
    a system turn it does not take) is a data error naming the row."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as error:
        detail = " ".join(str(error).split())[:200]
        raise DataError(f"{origin}: the model's chat template refuses this conversation: {detail}") from None


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any, origin: str) -> list[tuple[str, bool]]:
    """Render with the chat template, marking each assistant turn as a response segment."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{origin}: the model's tokenizer has no chat template; use a model with one, or "
            "task.template alpaca/plain for instruction data"
        )
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render_chat(tokenizer, messages[:index], origin, add_generation_prompt=True)
        full = _render_chat(tokenizer, messages[: index + 1], origin)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise DataError(
                f"{origin}: the chat template does not render turns as a growing prefix; "
                "cannot locate the assistant's tokens"
            )
        segments.append((prefix[len(rendered) :], False))
        segments.append((full[len(prefix) :], True))
        rendered = full
    return [s for s in segments if s[0]]


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize_row(
    row: Row, tokenizer: Any, template: str, train_on_prompt: bool, max_length: int
) -> tuple[TokenizedExample, bool]:
    """Tokenize one row; labels are IGNORE_INDEX on prompt tokens. Returns (example, truncated)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_response in render_segments(row, template, tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_length
    return TokenizedExample(input_ids[:max_length], labels[:max_length]), truncated


def blocks(texts: list[str], tokenizer: Any, block_size: int) -> list[TokenizedExample]:
    """Continued pretraining: concatenate texts (EOS between) and cut into full blocks."""
    stream: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    count = len(stream) // block_size
    if count == 0 and stream:
        return [TokenizedExample(stream, list(stream))]  # shorter than one block: keep it whole
    return [
        TokenizedExample(
            stream[i * block_size : (i + 1) * block_size], stream[i * block_size : (i + 1) * block_size]
        )
        for i in range(count)
    ]


def tokenize_rows(
    rows: list[Row], tokenizer: Any, spec: FineTuneJobSpec, packing: bool | None = None
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Turn rows into training sequences following the task; returns sequences and counts."""
    max_length = spec.training.max_seq_length
    stats = {"rows": len(rows), "truncated": 0, "noTrainableTokens": 0}
    if spec.task.type == TaskType.completion.value:
        sequences = blocks([r.content["text"] for r in rows], tokenizer, max_length)
    else:
        sequences = []
        for row in rows:
            example, truncated = tokenize_row(
                row, tokenizer, spec.task.template, spec.task.train_on_prompt, max_length
            )
            stats["truncated"] += int(truncated)
            if all(label == IGNORE_INDEX for label in example.labels):
                stats["noTrainableTokens"] += 1  # the response was cut off entirely: nothing to learn
                continue
            sequences.append(example)
        if packing if packing is not None else spec.training.packing:
            from kubetune_trainer.packing import pack as pack_exact  # position ids restart per example

            sequences = [*pack_exact(sequences, max_length)]
    stats["sequences"] = len(sequences)
    stats["tokens"] = sum(len(s.input_ids) for s in sequences)
    stats["trainableTokens"] = sum(sum(1 for x in s.labels if x != IGNORE_INDEX) for s in sequences)
    if not sequences:
        raise DataError(
            "no training sequences after tokenization (every response was truncated away?); raise "
            "training.maxSeqLength or shorten the prompts"
        )
    return sequences, stats


def pad_batch(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad tokenized examples to the longest: input_ids with `pad_token_id`, labels with
    IGNORE_INDEX, attention_mask 1 on real tokens and 0 on padding (torch tensors, int64).

    torch's pad_sequence does the padding. transformers' DataCollatorForSeq2Seq would pad on the
    tokenizer's padding_side (left for some models) through tokenizer.pad, so it is not used here.
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
    labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
    }


@dataclass
class PaddingCollator:
    """The Trainer's data collator: pad_batch with the tokenizer's pad token."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return pad_batch(features, self.pad_token_id)
