"""Data pipeline: reading every format, bad rows named by file:line, cleaning, mixing, masking, packing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kubetune.spec import CleaningSpec, DatasetSpec, FineTuneJobSpec
from kubetune_trainer import data
from kubetune_trainer.errors import DataError
from tests.support.trainer_fixtures import write_jsonl

ALPACA = [{"instruction": f"Say {i}", "input": "", "output": f"Number {i}."} for i in range(10)]


def load(
    source: Path | str, fmt: str | None = None, task: str = "instruction", **cleaning
) -> tuple[list, object]:
    spec = DatasetSpec(source=str(source), format=fmt)
    return data.load_dataset_rows(spec, task, CleaningSpec(**cleaning), Path("/tmp/kt-cache"))


def job_spec(**overrides) -> FineTuneJobSpec:
    spec = {"model": {"source": "x/y"}, "task": {"type": "instruction"}, "datasets": [{"source": "a.jsonl"}]}
    spec.update(overrides)
    return FineTuneJobSpec.model_validate(spec)


# ------------------------------------------------------------ bad input names file:line and field


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], "{not json", ALPACA[1]])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load(path)


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], ALPACA[1], {"instruction": "x"}])
    with pytest.raises(DataError, match=rf"{path}:3: missing required field 'output'"):
        load(path)


def test_wrong_type_names_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": 42}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'output' must be a string, got int"):
        load(path)


def test_row_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}:1: expected an object with fields, got list"):
        load(path)


def test_bad_chat_role_and_missing_assistant(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
    )
    with pytest.raises(DataError, match=rf"{path}:1: messages\[1\].role must be one of"):
        load(path, "messages", "chat")
    path = write_jsonl(tmp_path / "c2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'messages' has no assistant message"):
        load(path, "messages", "chat")
    path = write_jsonl(tmp_path / "c3.jsonl", [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(DataError, match=rf"{path}:1: messages\[0\].content must be a string"):
        load(path, "messages", "chat")


def test_missing_text_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=rf"{path}:1: missing required field 'text'"):
        load(path, "text", "completion")


def test_skip_invalid_rows_counts_them(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], "{bad", {"instruction": "x"}, ALPACA[1]])
    rows, report = load(path, skip_invalid_rows=True)
    assert len(rows) == 2 and report.invalid == 2 and report.read == 4
    assert report.invalid_examples[0].startswith(f"{path}:2:")


def test_empty_after_cleaning_is_a_clear_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "   "}])
    with pytest.raises(DataError, match="no usable rows after cleaning .*empty 1"):
        load(path)


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="cannot tell the file type"):
        load(tmp_path / "d.xlsx")


# ------------------------------------------------------------ formats


def test_json_array_reports_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": 7}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: field 'output'"):
        load(path)


def test_csv_parquet_txt_and_globs(tmp_path: Path) -> None:
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA[:3])
    rows, _ = load(tmp_path / "d.csv")
    assert [r.origin for r in rows] == [f"{tmp_path / 'd.csv'}:{n}" for n in (2, 3, 4)]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ALPACA[:4]), tmp_path / "d.parquet")
    rows, _ = load(tmp_path / "d.parquet")
    assert len(rows) == 4 and rows[0].content["output"] == "Number 0."

    (tmp_path / "book.txt").write_text("First paragraph\nstill first.\n\nSecond one.\n")
    rows, _ = load(tmp_path / "book.txt", "text", "completion")
    assert [r.content["text"] for r in rows] == ["First paragraph\nstill first.", "Second one."]
    assert rows[1].origin.endswith("book.txt:4")

    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", ALPACA[:2])
    write_jsonl(shards / "b.jsonl", ALPACA[2:5])
    rows, report = load(str(shards / "*.jsonl"))
    assert len(rows) == 5 and len(report.files) == 2 and all(len(h) == 64 for h in report.hashes.values())
    rows, _ = load(shards)  # a directory
    assert len(rows) == 5


def test_cleaning_counts(tmp_path: Path) -> None:
    rows_in = [
        {"instruction": "  a  ", "output": " b "},
        {"instruction": "a", "output": "b"},  # duplicate after strip
        {"instruction": "a", "output": ""},  # empty response
        {"instruction": "x" * 50, "output": "long"},  # too long
        {"instruction": "q", "output": "z"},  # too short (2 chars)
        {"instruction": "keep", "output": "this"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows_in)
    rows, report = load(path, min_chars=2, max_chars=20)
    assert rows[0].content == {"instruction": "a", "input": "", "output": "b"}
    assert (report.read, report.duplicates, report.empty, report.too_long, report.too_short, report.kept) == (
        6,
        1,
        1,
        1,
        0,
        3,
    )
    rows, report = load(path, min_chars=3, max_chars=20)
    assert report.too_short == 3  # both copies of a/b and q/z: length is checked before duplicates


# ------------------------------------------------------------ mixing


def test_mixture_quotas_count_examples() -> None:
    assert data.mixture_quotas([100, 100], [0.7, 0.3]) == [140, 60]
    assert data.mixture_quotas([10, 90, 50], [1, 1, 2]) == [38, 37, 75]
    assert sum(data.mixture_quotas([7, 5], [0.33, 0.67])) == 12


def test_mix_upsamples_and_downsamples() -> None:
    a = [data.Row(f"a:{i}", "text", {"text": f"a{i}"}) for i in range(10)]
    b = [data.Row(f"b:{i}", "text", {"text": f"b{i}"}) for i in range(30)]
    mixed = data.mix([a, b], [3, 1], seed=1)
    assert len(mixed) == 40
    from_a = [r for r in mixed if r.origin.startswith("a")]
    assert len(from_a) == 30  # 10 rows repeated 3 times
    assert {r.origin for r in from_a} == {r.origin for r in a}
    assert len({r.origin for r in mixed if r.origin.startswith("b")}) == 10  # 10 of 30, no repeats


def test_validation_split_fraction_and_files(tmp_path: Path) -> None:
    train = write_jsonl(
        tmp_path / "t.jsonl", [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(40)]
    )
    spec = job_spec(datasets=[{"source": str(train)}], validation={"fraction": 0.1})
    prepared = data.prepare_rows(spec, tmp_path)
    assert len(prepared.validation) == 4 and len(prepared.train) == 36
    assert not {r.origin for r in prepared.validation} & {r.origin for r in prepared.train}
    val = write_jsonl(tmp_path / "v.jsonl", ALPACA[:3])
    spec = job_spec(datasets=[{"source": str(train)}], validation={"datasets": [{"source": str(val)}]})
    prepared = data.prepare_rows(spec, tmp_path)
    assert len(prepared.validation) == 3 and len(prepared.train) == 40


# ------------------------------------------------------------ tokenization and masking


def _labelled_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != data.IGNORE_INDEX]
    )


@pytest.mark.parametrize("template", ["alpaca", "plain", "chat-template"])
def test_prompt_masking_instruction(tokenizer, template: str) -> None:
    row = data.Row("x:1", "alpaca", {"instruction": "Add two and two.", "input": "2+2", "output": "Four."})
    example, truncated = data.tokenize_row(row, tokenizer, template, train_on_prompt=False, max_length=512)
    assert not truncated
    segments = data.render_segments(row, template, tokenizer)
    prompt_ids = sum((tokenizer(t, add_special_tokens=False)["input_ids"] for t, r in segments if not r), [])
    # labels are -100 exactly on the prompt tokens, and equal to the ids on the response tokens
    assert example.labels[: len(prompt_ids)] == [data.IGNORE_INDEX] * len(prompt_ids)
    assert example.labels[len(prompt_ids) :] == example.input_ids[len(prompt_ids) :]
    assert "Four." in _labelled_text(tokenizer, example)
    assert "Add two" not in _labelled_text(tokenizer, example)
    full, _ = data.tokenize_row(row, tokenizer, template, train_on_prompt=True, max_length=512)
    assert full.labels == full.input_ids


def test_prompt_masking_multi_turn_chat(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Kube."},
    ]
    row = data.Row("c:1", "messages", {"messages": messages})
    example, _ = data.tokenize_row(row, tokenizer, "alpaca", train_on_prompt=False, max_length=512)
    learned = _labelled_text(tokenizer, example)
    assert "Hello!" in learned and "Kube." in learned
    assert "Be brief" not in learned and "Name?" not in learned and "Hi" not in learned.replace("Hello", "")
    assert (
        example.input_ids
        == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )


def test_truncation_and_packing(tokenizer) -> None:
    spec = job_spec(training={"maxSeqLength": 128, "packing": True})
    rows = [
        data.Row(f"x:{i}", "alpaca", {"instruction": f"Q{i}", "input": "", "output": "A" * (i % 5 + 1)})
        for i in range(20)
    ]
    unpacked, stats = data.tokenize_rows(rows, tokenizer, spec, packing=False)
    packed, packed_stats = data.tokenize_rows(rows, tokenizer, spec)
    assert len(packed) < len(unpacked) and all(len(s.input_ids) <= 128 for s in packed)
    assert (
        packed_stats["tokens"] == stats["tokens"]
        and packed_stats["trainableTokens"] == stats["trainableTokens"]
    )
    long_row = [data.Row("l:1", "alpaca", {"instruction": "word " * 200, "input": "", "output": "ok"})]
    with pytest.raises(DataError, match="no training sequences"):
        data.tokenize_rows(long_row, tokenizer, spec)


def test_completion_blocks(tokenizer) -> None:
    spec = job_spec(task={"type": "completion"}, training={"maxSeqLength": 16})
    rows = [data.Row(f"t:{i}", "text", {"text": "lorem ipsum dolor sit amet " * 3}) for i in range(5)]
    sequences, stats = data.tokenize_rows(rows, tokenizer, spec)
    assert all(len(s.input_ids) == 16 and s.labels == s.input_ids for s in sequences)
    assert stats["sequences"] == len(sequences) > 3


def test_json_rows_written_by_json_module(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ALPACA[:3], indent=2))
    rows, _ = load(path)
    assert [int(r.origin.rsplit(":", 1)[1]) for r in rows] == [2, 7, 12]


# ------------------------------------------------------------ hostile files: DataError (exit 3), never a traceback


def _bad_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


ROW = json.dumps(ALPACA[0]).encode()
HOSTILE = [
    (
        "undecodable.jsonl",
        ROW + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n',
        r":2: not UTF-8 text \(byte 0xe9",
    ),
    ("latin1.csv", b"instruction,input,output\nsay,,caf\xe9\n", r":2: not UTF-8 text"),
    ("gzipped.jsonl", b"\x1f\x8b\x08\x00" + bytes(range(40)), r": this is a gzip-compressed file"),
    ("zipped.csv", b"PK\x03\x04" + bytes(40), r": this is a zip archive"),
    ("binary.jsonl", b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(64), r": binary data \(NUL bytes\)"),
    (
        "utf16.jsonl",
        "\ufeff".encode("utf-16-le") + (json.dumps(ALPACA[0]) + "\n").encode("utf-16-le"),
        r": this is UTF-16 text",
    ),
    ("utf16-nobom.jsonl", (json.dumps(ALPACA[0]) + "\n").encode("utf-16-le"), r": looks like UTF-16 text"),
    ("truncated.parquet", b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02", r": not a readable Parquet file"),
    ("not.parquet", b'{"a": 1}\n', r": not a Parquet file"),
    ("parquet-named.jsonl", b"PAR1" + bytes(30), r": this is a Parquet file"),
    (
        "deep.jsonl",
        b'{"instruction": ' + b"[" * 100000 + b"]" * 100000 + b', "output": "x"}\n',
        r":1: not valid JSON: nested more than",
    ),
    ("deep.json", b"[" * 100000 + b"]" * 100000, r": not valid JSON: nested more than"),
    (
        "surrogate.jsonl",
        b'{"instruction": "hi \\ud800 there", "output": "x"}\n',
        r":1: field 'instruction' holds an unpaired surrogate",
    ),
    ("ragged.csv", b"instruction,input,output\na,b,c,d\n", r":2: 1 more value"),
    (
        "role-object.jsonl",
        b'{"messages": [{"role": {"a": 1}, "content": "x"}]}\n',
        r":1: messages\[0\].role must be",
    ),
]


@pytest.mark.parametrize("name,content,expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_file_is_refused_with_file_and_line(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = _bad_file(tmp_path, name, content)
    fmt = "messages" if name.startswith("role") else None
    with pytest.raises(DataError, match=rf"{path}{expected}"):
        load(path, fmt)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """Excel and Notepad write a UTF-8 byte-order mark; it is not part of the first field."""
    jsonl = _bad_file(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + ROW + b"\n")
    assert len(load(jsonl)[0]) == 1
    csv_path = _bad_file(tmp_path, "bom.csv", b"\xef\xbb\xbfinstruction,input,output\nsay,,hello\n")
    assert load(csv_path)[0][0].content["instruction"] == "say"
    json_path = _bad_file(tmp_path, "bom.json", b"\xef\xbb\xbf[" + ROW + b"]")
    assert len(load(json_path)[0]) == 1
    txt = _bad_file(tmp_path, "bom.txt", b"\xef\xbb\xbfsome text\n")
    assert load(txt, "text", task="completion")[0][0].content["text"] == "some text"


def test_skip_invalid_rows_counts_undecodable_json_rows(tmp_path: Path) -> None:
    path = _bad_file(
        tmp_path, "d.jsonl", ROW + b"\n" + b"[" * 5000 + b"\n" + ROW.replace(b"Say 0", b"Say 1") + b"\n"
    )
    rows, report = load(path, skip_invalid_rows=True)
    assert len(rows) == 2 and report.invalid == 1


def test_csv_long_field_is_read(tmp_path: Path) -> None:
    long_text = "word " * 60000  # 300k characters: over csv's default field limit
    path = _bad_file(tmp_path, "long.csv", f'instruction,input,output\nsay,,"{long_text}"\n'.encode())
    assert len(load(path)[0][0].content["output"]) > 250000


def test_chat_template_refusing_a_conversation_names_the_row() -> None:
    from jinja2 import TemplateError

    class Tokenizer:
        chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"

        def apply_chat_template(self, messages, **_):
            raise TemplateError("Conversation roles must alternate user/assistant")

    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(
        DataError,
        match=r"f.jsonl:7: the model's chat template refuses this conversation: "
        r"Conversation roles must alternate",
    ):
        data._chat_segments(messages, Tokenizer(), "f.jsonl:7")


@pytest.mark.parametrize(
    "name,content,expected",
    [
        (
            "bigint.json",
            b'[{"instruction": "a", "output": "b", "n": ' + b"9" * 5000 + b"}]",
            r":1: not valid JSON: a number too long",
        ),
        ("bigint-top.json", b'{"n": ' + b"9" * 5000 + b"}", r": not valid JSON: a number too long"),
        (
            "bigint.jsonl",
            b'{"instruction": "a", "output": "b", "n": ' + b"9" * 5000 + b"}\n",
            r":1: not valid JSON: a number too long",
        ),
        (
            "trailing.json",
            b'[{"instruction": "a", "output": "b"}]\nxyz',
            r":2: not valid JSON: text after the closing",
        ),
    ],
    ids=["bigint-json", "bigint-top", "bigint-jsonl", "trailing-text"],
)
def test_more_hostile_json(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = _bad_file(tmp_path, name, content)
    with pytest.raises(DataError, match=rf"{path}{expected}"):
        load(path)


def test_csv_with_old_mac_line_ends(tmp_path: Path) -> None:
    path = _bad_file(tmp_path, "mac.csv", b"instruction,input,output\rsay,,one\rtell,,two\r")
    rows, _ = load(path)
    assert [r.content["output"] for r in rows] == ["one", "two"] and rows[1].origin.endswith(":3")


def test_padding_collator_pads_right_with_ignore_index() -> None:
    """Every row is padded on the right to the longest: ids with the pad token, labels with
    IGNORE_INDEX (prompt labels stay masked), attention 1 exactly on the real tokens."""
    import torch

    features = [
        {"input_ids": [5, 6, 7], "labels": [data.IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
        {"input_ids": [1, 2, 3, 4, 9], "labels": [data.IGNORE_INDEX] * 2 + [3, 4, 9]},
    ]
    batch = data.PaddingCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 9]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, -100],
        [8, -100, -100, -100, -100],
        [-100, -100, 3, 4, 9],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert data.IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
