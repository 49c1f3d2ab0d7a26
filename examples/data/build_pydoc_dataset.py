"""Build the quickstart dataset from real text on any machine: Python's own standard-library docs.

Each row asks what a standard-library function does and answers with the first paragraph of its
docstring, so the data is real, reproducible and needs no download. It writes three files into DIR:

    pydoc_instructions.jsonl  alpaca rows (instruction, input, output)
    pydoc_chat.jsonl          the same knowledge as chat conversations (messages), two turns each
    pydoc_modules.txt         the modules' own documentation as plain text (continued pretraining)

    python examples/data/build_pydoc_dataset.py examples/data
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import sys

MODULES = [
    "os",
    "os.path",
    "shutil",
    "json",
    "re",
    "math",
    "statistics",
    "string",
    "textwrap",
    "itertools",
    "functools",
    "collections",
    "heapq",
    "bisect",
    "random",
    "datetime",
    "time",
    "pathlib",
    "glob",
    "fnmatch",
    "tempfile",
    "hashlib",
    "base64",
    "binascii",
    "zlib",
    "gzip",
    "csv",
    "difflib",
    "operator",
    "copy",
    "pprint",
    "urllib.parse",
    "html",
    "uuid",
    "secrets",
    "fractions",
    "decimal",
    "calendar",
    "locale",
    "shlex",
    "platform",
    "sys",
    "subprocess",
    "threading",
    "queue",
    "socket",
    "struct",
    "unicodedata",
    "keyword",
    "ipaddress",
    "email.utils",
    "zipfile",
    "tarfile",
    "logging",
    "warnings",
]
QUESTIONS = [
    "What does the Python function `{name}` do?",
    "Explain `{name}` from the Python standard library.",
    "Describe the purpose of `{name}` in Python.",
]


def first_paragraph(doc: str) -> str:
    paragraphs = [p.strip() for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]
    # Skip signature-only first paragraphs such as "gcd(*integers)".
    for paragraph in paragraphs:
        text = " ".join(paragraph.split())
        if len(text) > 40 and not text.endswith(")") and " " in text:
            return text
    return ""


def rows() -> list[dict[str, str]]:
    result = []
    rng = random.Random(0)
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)) or not obj.__doc__:
                continue
            answer = first_paragraph(obj.__doc__)
            if not 40 <= len(answer) <= 600:
                continue
            name = f"{module_name}.{attr}"
            result.append(
                {"instruction": rng.choice(QUESTIONS).format(name=name), "input": "", "output": answer}
            )
    return result


def chats(data: list[dict[str, str]]) -> list[dict]:
    rng = random.Random(1)
    conversations = []
    for first, second in zip(data[::2], data[1::2], strict=False):
        conversations.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a concise Python documentation assistant."},
                    {"role": "user", "content": first["instruction"]},
                    {"role": "assistant", "content": first["output"]},
                    {
                        "role": "user",
                        "content": rng.choice(["And ", "What about ", "Now "])
                        + second["instruction"][0].lower()
                        + second["instruction"][1:],
                    },
                    {"role": "assistant", "content": second["output"]},
                ]
            }
        )
    return conversations


def module_texts() -> list[str]:
    texts = []
    for module_name in MODULES:
        doc = importlib.import_module(module_name).__doc__
        if doc and len(doc) > 200:
            texts.append(inspect.cleandoc(doc))
    return texts


if __name__ == "__main__":
    from pathlib import Path

    out = Path(sys.argv[1])
    data = rows()
    (out / "pydoc_instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    conversations = chats(data)
    (out / "pydoc_chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    texts = module_texts()
    (out / "pydoc_modules.txt").write_text("\n\n".join(texts) + "\n")
    print(
        f"wrote {len(data)} instructions, {len(conversations)} conversations, {len(texts)} module texts to {out}"
    )
