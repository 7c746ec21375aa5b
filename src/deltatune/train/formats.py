"""The formats of the user's data (:mod:`deltatune.train.userdata`): which columns hold what, how a
format is told from the columns, and how rows of a causal format become token ids and labels.

:class:`Encoder` is the ``datasets.map`` function: it renders conversations with the tokenizer's chat
template, finds the assistant turns by rendering each conversation's prefixes (:func:`assistant_spans`),
tokenises a whole batch in one call and marks with -100 the tokens no loss applies to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .sources import column

__all__ = [
    "CAUSAL_FORMATS",
    "DATA_FORMATS",
    "LOSS_ON",
    "ROLES",
    "Columns",
    "Encoder",
    "assistant_spans",
    "check_conversation",
    "check_rows",
    "detect_format",
    "encoded_features",
    "targets_of",
    "tokenizer_fingerprint",
]

DATA_FORMATS = ("text", "prompt_completion", "messages", "classification", "regression")
CAUSAL_FORMATS = ("text", "prompt_completion", "messages")
LOSS_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant", "tool")
ENCODING_VERSION = "2"  # bump when the tokenised columns change meaning (invalidates the cache)


@dataclass(frozen=True)
class Columns:
    """Which column holds what (``--text-column`` and friends)."""

    text: str = "text"
    text_pair: str | None = None
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    label: str = "label"

    def of(self, fmt: str) -> tuple[str, ...]:
        """The columns format ``fmt`` reads."""
        if fmt == "messages":
            return (self.messages,)
        if fmt == "prompt_completion":
            return (self.prompt, self.completion)
        if fmt == "text":
            return (self.text,)
        return (self.text, *((self.text_pair,) if self.text_pair else ()), self.label)


def detect_format(table: Any, cols: Columns, where: str) -> str:
    """The format the columns call for: messages, prompt/completion, text + label, text. Columns of
    two formats (a JSONL file whose rows differ) name the first row of the second."""
    have = set(table.column_names)
    found = [
        fmt
        for fmt, needed in (
            ("messages", {cols.messages}),
            ("prompt_completion", {cols.prompt, cols.completion}),
            ("classification", {cols.text, cols.label}),
        )
        if needed <= have
    ]
    if not found and cols.text in have:
        found = ["text"]
    if len(found) > 1:
        for fmt in found:
            row = next((r for r in map(lambda c: _first_null(table, c), cols.of(fmt)) if r is not None), None)
            if row is not None:
                other = next(f for f in found if f != fmt)
                raise ValueError(
                    f"{where} row {row + 1}: no {' + '.join(map(repr, cols.of(fmt)))} where other rows have "
                    f"them: mixed formats in one file ({fmt} and {other}); keep one format per file"
                )
        raise ValueError(
            f"{where}: columns for several formats ({', '.join(found)}) in one file: {sorted(have)}; "
            "keep one format per file, or choose one with --data-format"
        )
    if not found:
        raise ValueError(
            f"{where}: cannot tell the format from the columns {sorted(have)}; expected 'messages', "
            "'prompt' + 'completion', 'text' + 'label' or 'text' (rename with --messages-column, "
            "--prompt-column, --completion-column, --text-column, --label-column, or set --data-format)"
        )
    return found[0]


def _first_null(table: Any, name: str) -> int | None:
    import pyarrow.compute as pc

    data = column(table, name)
    if not data.null_count:
        return None
    return int(pc.index(pc.is_null(data), True).as_py())


def check_rows(table: Any, fmt: str, cols: Columns, where: str) -> None:
    """Every column of ``fmt`` present and filled in every row (a row of another format is named)."""
    needed = cols.of(fmt)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{where}: format {fmt} needs column(s) {', '.join(map(repr, missing))}; the file has "
            f"{', '.join(map(repr, table.column_names))} (rename with --{missing[0]}-column style flags: "
            "--text-column, --label-column, --prompt-column, --completion-column, --messages-column)"
        )
    for name in needed:
        row = _first_null(table, name)
        if row is not None:
            others = [c for c in table.column_names if c not in needed and table[row][c] is not None]
            hint = f" (it has {', '.join(map(repr, others))}: mixed formats in one file?)" if others else ""
            raise ValueError(f"{where} row {row + 1}: field {name!r} is missing{hint}")


# ----------------------------------------------------------------------------------------------------
# Tokenising the causal formats
# ----------------------------------------------------------------------------------------------------


def check_conversation(messages: object, where: str, column: str) -> list[dict[str, str]]:
    """A conversation: a list of ``{role, content}`` with known roles and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field {column!r} should be a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise ValueError(f"{where}: {column}[{i}] should be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise ValueError(
                f"{where}: {column}[{i}] has unknown role {turn['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: {column}[{i}].content should be text, got {turn.get('content')!r}")
    if not any(t["role"] == "assistant" for t in messages):
        raise ValueError(f"{where}: {column!r} has no assistant turn (nothing to train on)")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return text


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included)."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        end_text = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(end_text) or start > len(end_text):
            raise ValueError(
                f"{where}: the chat template does not render a conversation's turns as prefixes of the whole "
                "conversation, so the assistant turns cannot be located; give --chat-template FILE with one "
                "that does, or use --loss-on all"
            )
        spans.append((start, len(end_text)))
    return full, spans


@dataclass
class Encoder:
    """Turns a batch of rows of one causal format into ``input_ids``, ``labels``, ``length``,
    ``status`` (0 whole, 1 truncated, 2 skipped) and, for evaluation (``keep_text``), ``prompt`` and
    ``reference`` (a ``datasets.map`` function; one tokenizer call per batch)."""

    tokenizer: Any
    fmt: str
    cols: Columns
    max_length: int
    loss_on: str
    where: str
    origin: Sequence[int] | None = None  # the file's row of each table row (after a split)
    keep_text: bool = False

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [
            f"{self.where} row {(i if self.origin is None else int(self.origin[i])) + 1}" for i in indices
        ]
        ids, labels, prompts, references = self._encode(batch, rows)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "status": [], "targets": []}
        for row_ids, row_labels in zip(ids, labels, strict=True):
            status = 0
            if len(row_ids) > self.max_length:
                kept = row_labels[: self.max_length]
                status = 2 if all(x == -100 for x in kept) else 1
                row_ids, row_labels = row_ids[: self.max_length], kept
            out["input_ids"].append(row_ids)
            out["labels"].append(row_labels)
            out["length"].append(len(row_ids))
            out["status"].append(status)
            out["targets"].append(targets_of(row_labels))
        out["prompt"] = prompts if self.keep_text else [""] * len(ids)
        out["reference"] = references if self.keep_text else [""] * len(ids)
        return out

    def _encode(
        self, batch: dict[str, list[Any]], rows: list[str]
    ) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
        tok = self.tokenizer
        eos = tok.eos_token_id
        if self.fmt == "text":
            texts = [_text(batch, self.cols.text, j, w) for j, w in enumerate(rows)]
            ids = [[*x, eos] for x in tok(texts)["input_ids"]]
            return ids, [list(x) for x in ids], [""] * len(ids), [""] * len(ids)
        if self.fmt == "prompt_completion":
            prompts = [_text(batch, self.cols.prompt, j, w) for j, w in enumerate(rows)]
            completions = [_text(batch, self.cols.completion, j, w) for j, w in enumerate(rows)]
            p_ids = tok(prompts)["input_ids"]
            c_ids = tok(completions, add_special_tokens=False)["input_ids"]
            ids, labels = [], []
            for p, c in zip(p_ids, c_ids, strict=True):
                c = [*c, eos]
                ids.append([*p, *c])
                labels.append([*(p if self.loss_on == "all" else [-100] * len(p)), *c])
            return ids, labels, prompts, completions
        conversations = [
            check_conversation(m, w, self.cols.messages)
            for m, w in zip(batch[self.cols.messages], rows, strict=True)
        ]
        rendered = [assistant_spans(tok, m, w) for m, w in zip(conversations, rows, strict=True)]
        enc = tok(
            [full for full, _ in rendered],
            add_special_tokens=False,
            return_offsets_mapping=self.loss_on != "all",
        )
        ids = [list(x) for x in enc["input_ids"]]
        if self.loss_on == "all":
            labels = [list(x) for x in ids]
        else:
            labels = [
                _in_spans(row_ids, offsets, spans)
                for row_ids, offsets, (_, spans) in zip(ids, enc["offset_mapping"], rendered, strict=True)
            ]
        prompts, references = [], []
        for m in conversations:
            last = max(i for i, t in enumerate(m) if t["role"] == "assistant")
            prompts.append(_render(tok, m[:last], True) if self.keep_text else "")
            references.append(m[last]["content"])
        return ids, labels, prompts, references


def targets_of(labels: Sequence[int]) -> int:
    """The tokens the loss predicts in a row of ``labels``: those after the first that are not -100
    (position t predicts token t+1, as :func:`deltatune.train.batches.count_of` counts a batch)."""
    return sum(1 for x in labels[1:] if x != -100)


def _in_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``ids`` where a token starts inside one of ``spans`` (character ranges), else -100."""
    out = []
    k = 0
    for t, (a, _) in zip(ids, offsets, strict=True):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        out.append(t if k < len(spans) and spans[k][0] <= a else -100)
    return out


def _text(batch: dict[str, list[Any]], column: str, j: int, where: str) -> str:
    value = batch[column][j]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {column!r} should be text, got {value!r}")
    return value


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What the tokenised cache depends on of a tokenizer: its vocabulary, rules and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(repr((tokenizer.chat_template, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()[:16]


def encoded_features() -> Any:
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features(
        {
            "input_ids": ids,
            "labels": ids,
            "length": datasets.Value("int32"),
            "status": datasets.Value("int8"),
            "targets": datasets.Value("int32"),
            "prompt": datasets.Value("string"),
            "reference": datasets.Value("string"),
        }
    )
