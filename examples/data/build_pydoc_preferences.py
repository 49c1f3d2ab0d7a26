"""Build the preference dataset from the same real text as the quickstart set (Python's stdlib docs).

Each pair asks about a standard-library function (the questions of build_pydoc_dataset.py); the
chosen answer is the first paragraph of that function's docstring, the rejected answer is the
docstring paragraph of a function of another module: fluent, real documentation that answers the
wrong question. Reproducible and needs no download. It writes into DIR:

    pydoc_preferences.jsonl       prompt/chosen/rejected as plain text
    pydoc_preferences_chat.jsonl  the same knowledge as chat: a multi-turn prompt (system, a first
                                  question and its answer, a follow-up question), chosen and
                                  rejected as assistant messages

    python examples/data/build_pydoc_preferences.py examples/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_pydoc_dataset import rows  # noqa: E402

SYSTEM = "You are a concise Python documentation assistant."


def module_of(row: dict[str, str]) -> str:
    name = row["instruction"].split("`")[1]
    return name.rsplit(".", 1)[0]


def pairs(data: list[dict[str, str]]) -> list[dict[str, str]]:
    """prompt/chosen/rejected: the rejected answer is a docstring from another module."""
    rng = random.Random(2)
    result = []
    for row in data:
        while True:
            other = rng.choice(data)
            if module_of(other) != module_of(row) and other["output"] != row["output"]:
                break
        result.append({"prompt": row["instruction"], "chosen": row["output"], "rejected": other["output"]})
    return result


def chat_pairs(text_pairs: list[dict[str, str]]) -> list[dict]:
    """Multi-turn prompts: the first pair's exchange, then the second pair's question."""
    result = []
    for first, second in zip(text_pairs[1::2], text_pairs[::2], strict=False):
        result.append(
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": first["prompt"]},
                    {"role": "assistant", "content": first["chosen"]},
                    {"role": "user", "content": second["prompt"]},
                ],
                "chosen": [{"role": "assistant", "content": second["chosen"]}],
                "rejected": [{"role": "assistant", "content": second["rejected"]}],
            }
        )
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    text = pairs(rows())
    (out / "pydoc_preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    chat = chat_pairs(text)
    (out / "pydoc_preferences_chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    print(f"wrote {len(text)} preference pairs and {len(chat)} chat pairs to {out}")
