"""Build the quickstart dataset from real text on any machine: Python's own standard-library docs.

Each row asks what a standard-library function does and answers with the first paragraph of its
docstring, so the data is real, reproducible and needs no download. Run:

    python examples/data/build_pydoc_dataset.py examples/data/pydoc_instructions.jsonl
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import sys

MODULES = ["os", "os.path", "shutil", "json", "re", "math", "statistics", "string", "textwrap", "itertools",
           "functools", "collections", "heapq", "bisect", "random", "datetime", "time", "pathlib", "glob",
           "fnmatch", "tempfile", "hashlib", "base64", "binascii", "zlib", "gzip", "csv", "difflib", "operator",
           "copy", "pprint", "urllib.parse", "html", "uuid", "secrets", "fractions", "decimal", "calendar",
           "locale", "shlex", "platform", "sys", "subprocess", "threading", "queue", "socket", "struct",
           "unicodedata", "keyword", "ipaddress", "email.utils", "zipfile", "tarfile", "logging", "warnings"]
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
            result.append({"instruction": rng.choice(QUESTIONS).format(name=name), "input": "", "output": answer})
    return result


if __name__ == "__main__":
    data = rows()
    with open(sys.argv[1], "w") as handle:
        for row in data:
            handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(data)} rows to {sys.argv[1]}")
