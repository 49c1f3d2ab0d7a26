"""Preference rows: check, clean and tokenize prompt/chosen/rejected (and prompt/completion/label) rows.

Rows are read by data.py (the same files, cleaning, mixing and file:line errors as every task);
data.check_row hands the two preference formats to `check_row` here. A row is either plain text

    {"prompt": "...", "chosen": "...", "rejected": "..."}            # format preference
    {"prompt": "...", "completion": "...", "label": true}             # format unpaired (kto)

or chat messages: `prompt` a list of {role, content} (multi-turn prompts, a system turn), and
`chosen`/`rejected`/`completion` either the assistant's text or a list of assistant messages. A
conversation row without `prompt` (chosen and rejected each a whole conversation) is split at the
longest common prefix of turns, as TRL's extract_prompt does.

Tokenization is ours, so that prompt and completion truncation can be counted and reported: the
prompt keeps its last `maxPromptLength` tokens, completions are cut so that prompt + completion
fits `training.maxSeqLength`. The tokenized columns (prompt_ids, chosen_ids, rejected_ids; or
prompt_ids, completion_ids, label) are exactly what TRL's preference collators read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.spec import DatasetFormat, DatasetSpec, FineTuneJobSpec
from kubetune_trainer.errors import DataError

PAIRED = DatasetFormat.preference.value
UNPAIRED = DatasetFormat.unpaired.value
FORMATS = (PAIRED, UNPAIRED)
TRUE_LABELS = {"true", "1", "yes", "desirable", "good"}
FALSE_LABELS = {"false", "0", "no", "undesirable", "bad"}


def is_preference(content: dict[str, Any]) -> bool:
    """Whether a checked row's content is a preference row (paired or unpaired)."""
    return "chosen" in content or "label" in content


def _text(value: Any, key: str) -> str:
    from kubetune_trainer.data import _encodable

    if not isinstance(value, str):
        raise ValueError(
            f"field '{key}' must be a string or a list of {{role, content}}, got "
            f"{type(value).__name__} {value!r:.40}"
        )
    return _encodable(value, f"field '{key}'")


def _messages(value: list[Any], key: str) -> list[dict[str, str]]:
    from kubetune_trainer.data import check_messages

    return check_messages(value, key)


def _completion(value: Any, key: str) -> str | list[dict[str, str]]:
    """A completion: text, or a list of assistant messages (the reply)."""
    if value is None:
        raise ValueError(f"missing required field '{key}'")
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        messages = _messages(value, key)
        if messages[0]["role"] != "assistant":
            raise ValueError(
                f"{key}[0].role must be assistant (the reply to the prompt), got {messages[0]['role']!r}"
            )
        return messages
    return _text(value, key)


def _prompt(value: Any) -> str | list[dict[str, str]]:
    if value is None:
        raise ValueError("missing required field 'prompt'")
    if isinstance(value, list):
        messages = _messages(value, "prompt")
        if messages[-1]["role"] == "assistant":
            raise ValueError(
                "prompt must end with a user (or system/tool) turn, not assistant: the chosen and "
                "rejected completions answer it"
            )
        return messages
    return _text(value, "prompt")


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_LABELS | FALSE_LABELS:
        return value.strip().lower() in TRUE_LABELS
    raise ValueError(f"field 'label' must be true (desirable) or false (undesirable), got {value!r:.40}")


def _split_conversations(raw: dict[str, Any]) -> dict[str, Any]:
    """A row with whole chosen/rejected conversations and no prompt: the common leading turns are the prompt."""
    chosen, rejected = raw["chosen"], raw["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError(
            "missing required field 'prompt' (and chosen/rejected do not share leading turns to take it from)"
        )
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def check_row(raw: Any, fmt: str, spec: DatasetSpec) -> dict[str, Any]:
    """Validate one preference (or unpaired) row; raises ValueError naming the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object with fields, got {type(raw).__name__}")
    if fmt == UNPAIRED:
        if "label" not in raw or raw["label"] is None:
            raise ValueError(
                "missing required field 'label' (true for a desirable completion, false otherwise)"
            )
        return {
            "prompt": _prompt(raw.get("prompt")),
            "completion": _completion(raw.get("completion"), "completion"),
            "label": _label(raw["label"]),
        }
    if (
        raw.get("prompt") is None
        and isinstance(raw.get("chosen"), list)
        and isinstance(raw.get("rejected"), list)
    ):
        raw = _split_conversations(
            {"chosen": _messages(raw["chosen"], "chosen"), "rejected": _messages(raw["rejected"], "rejected")}
        )
    content = {
        "prompt": _prompt(raw.get("prompt")),
        "chosen": _completion(raw.get("chosen"), "chosen"),
        "rejected": _completion(raw.get("rejected"), "rejected"),
    }
    if content["chosen"] == content["rejected"]:
        raise ValueError("chosen and rejected are the same completion: the pair expresses no preference")
    return content


def _strip_value(value: Any) -> Any:
    if isinstance(value, list):
        return [{"role": m["role"], "content": m["content"].strip()} for m in value]
    return value.strip() if isinstance(value, str) else value


def strip(content: dict[str, Any]) -> dict[str, Any]:
    """Whitespace stripped from every text (and every message's content)."""
    return {k: _strip_value(v) for k, v in content.items()}


def _empty(value: Any) -> bool:
    if isinstance(value, list):
        return not value or any(not m["content"] for m in value if m["role"] == "assistant")
    return not value


def is_empty(content: dict[str, Any]) -> bool:
    """An empty prompt or an empty completion."""
    return any(_empty(content[k]) for k in ("prompt", "chosen", "rejected", "completion") if k in content)


def char_count(content: dict[str, Any]) -> int:
    """Characters of every text in the row."""
    total = 0
    for value in content.values():
        if isinstance(value, list):
            total += sum(len(m["content"]) for m in value)
        elif isinstance(value, str):
            total += len(value)
    return total


# ---------------------------------------------------------------- tokenize


def _render(tokenizer: Any, prompt: Any, completion: Any, template: str, origin: str) -> tuple[str, str]:
    """(prompt text, completion text) as the model sees them."""
    from kubetune_trainer.data import ALPACA_PROMPT, _render_chat

    conversational = isinstance(prompt, list) or isinstance(completion, list) or template == "chat-template"
    if conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{origin}: the model's tokenizer has no chat template; use a model with one, or "
                "plain-text rows with task.template plain or alpaca"
            )
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        prefix = _render_chat(tokenizer, messages, origin, add_generation_prompt=True)
        full = _render_chat(tokenizer, messages + reply, origin)
        if not full.startswith(prefix):
            raise DataError(
                f"{origin}: the chat template does not render the prompt as a prefix of the "
                "conversation; cannot locate the completion's tokens"
            )
        return prefix, full[len(prefix) :]
    eos = tokenizer.eos_token or ""
    if template == "alpaca":
        prompt = ALPACA_PROMPT.format(with_input="", instruction=prompt, input_block="")
    else:
        prompt = prompt + "\n\n"
    return prompt, completion + eos


@dataclass
class TokenizeStats:
    """What tokenization did to the rows (reported in the run summary)."""

    rows: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "promptTruncated": self.prompt_truncated,
            "completionTruncated": self.completion_truncated,
            "droppedNoCompletion": self.dropped,
            "sequences": self.rows - self.dropped,
            "tokens": self.tokens,
        }


def max_prompt_length(spec: FineTuneJobSpec) -> int:
    """Prompt tokens kept: task.preference.maxPromptLength, else half of training.maxSeqLength."""
    preference = spec.task.preference
    configured = preference.max_prompt_length if preference else None
    return min(configured or spec.training.max_seq_length // 2, spec.training.max_seq_length - 1)


def tokenize_rows(
    rows: list[Any], tokenizer: Any, spec: FineTuneJobSpec, unpaired: bool, training: bool = True
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenize checked rows into TRL's preference columns; paired rows become two unpaired ones for kto.
    Training data for kto must hold both desirable and undesirable examples (held-out data need not)."""
    max_length = spec.training.max_seq_length
    prompt_limit = max_prompt_length(spec)
    stats = TokenizeStats()
    out: list[dict[str, Any]] = []

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def cut(prompt_ids: list[int], completions: list[list[int]]) -> tuple[list[int], list[list[int]]] | None:
        if len(prompt_ids) > prompt_limit:
            stats.prompt_truncated += 1
            prompt_ids = prompt_ids[-prompt_limit:]  # the end of the prompt is what the reply answers
        room = max_length - len(prompt_ids)
        if any(len(c) > room for c in completions):
            stats.completion_truncated += 1
            completions = [c[:room] for c in completions]
        if any(not c for c in completions):
            return None
        return prompt_ids, completions

    template = spec.task.template
    for row in rows:
        content = row.content
        examples: list[tuple[list[Any], bool | None]] = []  # (completion(s), label)
        if "label" in content:
            examples.append(([content["completion"]], content["label"]))
        elif unpaired:
            examples += [([content["chosen"]], True), ([content["rejected"]], False)]
        else:
            examples.append(([content["chosen"], content["rejected"]], None))
        for completions, label in examples:
            stats.rows += 1
            rendered = [_render(tokenizer, content["prompt"], c, template, row.origin) for c in completions]
            prompt_ids = encode(rendered[0][0])
            result = cut(prompt_ids, [encode(r[1]) for r in rendered])
            if result is None:
                stats.dropped += 1
                continue
            prompt_ids, ids = result
            stats.tokens += sum(len(prompt_ids) + len(c) for c in ids)
            if label is None:
                out.append({"prompt_ids": prompt_ids, "chosen_ids": ids[0], "rejected_ids": ids[1]})
            else:
                out.append({"prompt_ids": prompt_ids, "completion_ids": ids[0], "label": label})
    if not out:
        raise DataError(
            "no preference examples after tokenization (every completion was truncated away?); raise "
            "training.maxSeqLength or lower task.preference.maxPromptLength"
        )
    if training and unpaired and len({e["label"] for e in out}) < 2 and len(out) > 1:
        raise DataError(
            "kto needs both desirable (label true) and undesirable (label false) examples; the data "
            f"has only {'desirable' if out[0]['label'] else 'undesirable'} ones"
        )
    return out, stats.as_dict()


def sft_view(examples: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """input_ids/labels of prompt + chosen (or desirable) completion: for held-out loss and the int8 export check."""
    from kubetune_trainer.data import IGNORE_INDEX

    out = []
    for example in examples:
        completion = example.get("chosen_ids")
        if completion is None:
            if not example["label"]:
                continue
            completion = example["completion_ids"]
        out.append(
            {
                "input_ids": example["prompt_ids"] + completion,
                "labels": [IGNORE_INDEX] * len(example["prompt_ids"]) + completion,
            }
        )
    return out
