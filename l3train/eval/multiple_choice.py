"""Zero-shot multiple choice by continuation log-likelihood, and the corpus continuation task.

Task format (JSONL, one example per line; docs/evaluation.md):

    {"context": "The quick brown", "choices": [" fox jumps", " cat sleeps"], "label": 0}

`context` is the prompt, `choices` (at least two) the candidate continuations, written with
the whitespace that joins them to the context (usually a leading space), `label` the index
of the right one. Other keys (e.g. "id", "source") are carried along and ignored.

Scoring, per choice: tokens = EOD + encode(context + choice), the EOD standing for the
document start as in training. The continuation's tokens are those after the longest common
prefix with EOD + encode(context) (a tokenizer may merge across the boundary, so the
continuation cannot be encoded separately), and its score is the sum of their
log-probabilities. The prediction is the choice with the highest score (accuracy), or with
the highest score per UTF-8 byte of the choice (length-normalised accuracy; bytes rather
than tokens or characters, so it is comparable across tokenizers and scripts). A sequence
longer than the model's context loses context from the left; an example with a choice that
alone does not fit is skipped, and counted.

The continuation task (`continuation_task`) is built from held-out documents of a corpus:
the context is a run of words of a document, the right choice the words that follow it,
the other choices equally long runs from other documents. A model that has learned the
corpus's language prefers the true continuation; chance is 1 / choices.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.eval.perplexity import next_token_nll
from l3train.utils.atomic import atomic_write_text


@dataclass(frozen=True)
class Example:
    """One multiple-choice question."""

    context: str
    choices: tuple[str, ...]
    label: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other keys of the line

    def as_dict(self) -> dict[str, Any]:
        return {"context": self.context, "choices": list(self.choices), "label": self.label, **self.extra}


def parse_example(record: Any, where: str) -> Example:
    """The example in one decoded JSONL record; `where` (file:line) prefixes any error."""
    if not isinstance(record, dict):
        raise L3TrainError(f"{where}: expected a JSON object with context, choices and label")
    missing = [key for key in ("context", "choices", "label") if key not in record]
    if missing:
        raise L3TrainError(f"{where}: no {missing[0]!r} field (found {sorted(record)})")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise L3TrainError(f"{where}: context is {type(context).__name__}, not a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise L3TrainError(f"{where}: choices must be a list of at least two non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise L3TrainError(f"{where}: label must be an index into choices (0..{len(choices) - 1}), got {label!r}")
    extra = {key: value for key, value in record.items() if key not in ("context", "choices", "label")}
    return Example(context, tuple(choices), label, extra)


def load_task(path: str | os.PathLike) -> list[Example]:
    """The examples of a task file; a malformed line is one error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise L3TrainError(f"task file {path} not found (build one with tools/build_mc_task.py)")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise L3TrainError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
        examples.append(parse_example(record, f"{path}:{number}"))
    if not examples:
        raise L3TrainError(f"task file {path} holds no example")
    return examples


def write_task(path: str | os.PathLike, examples: list[Example]) -> None:
    """Write `examples` as a task file, atomically."""
    atomic_write_text(path, "".join(json.dumps(example.as_dict(), ensure_ascii=False) + "\n"
                                    for example in examples))


@dataclass
class MCResult:
    examples: int  # scored
    skipped: int  # not scored: a choice alone is longer than the model's context
    accuracy: float  # argmax of the continuation log-likelihood
    accuracy_norm: float  # argmax of the log-likelihood per UTF-8 byte of the choice
    chance: float  # mean of 1 / choices
    scores: list[list[float]] = field(repr=False)  # log-likelihood of every choice of every example

    def as_dict(self) -> dict[str, float | int]:
        return {"examples": self.examples, "skipped": self.skipped, "accuracy": self.accuracy,
                "accuracy_norm": self.accuracy_norm, "chance": self.chance}


@dataclass(frozen=True)
class _Request:
    """One (example, choice) pair: the token sequence and where its continuation starts."""

    tokens: tuple[int, ...]
    first: int  # index in `tokens` of the continuation's first token


def _request(tokenizer: Tokenizer, example: Example, choice: str, max_length: int, where: str) -> _Request | None:
    """The scoring request of one choice; None when the choice alone does not fit the model."""
    prompt = tokenizer.encode_prompt(example.context)
    tokens = tokenizer.encode_prompt(example.context + choice)
    first = 0
    while first < min(len(prompt), len(tokens)) and prompt[first] == tokens[first]:
        first += 1
    if first == len(tokens):
        raise L3TrainError(f"{where}: choice {choice!r} adds no token to the context")
    # Too long for the model: drop context from the left; the continuation must fit whole.
    excess = len(tokens) - 1 - max_length
    if excess > 0:
        if first - 1 < excess:
            return None
        tokens, first = tokens[excess:], first - excess
    return _Request(tuple(tokens), first)


def score_requests(model: nn.Module, requests: list[_Request], batch_size: int, progress: bool) -> list[float]:
    """Summed log-probability of each request's continuation tokens."""
    device = next(model.parameters()).device
    scores = []
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc="multiple choice", unit="batch", disable=None if progress else True):
            width = max(len(request.tokens) for request in batch)
            # Right padding: a causal model's scores of real positions ignore what follows them.
            rows = torch.zeros(len(batch), width, dtype=torch.long)
            for index, request in enumerate(batch):
                rows[index, :len(request.tokens)] = torch.tensor(request.tokens)
            nll = next_token_nll(model, rows[:, :-1].to(device), rows[:, 1:].to(device)).double().cpu()
            # Target j of a row is token j + 1: the continuation's targets are first-1 .. len-2.
            scores += [-float(nll[index, request.first - 1:len(request.tokens) - 1].sum())
                       for index, request in enumerate(batch)]
    return scores


def evaluate_multiple_choice(model: nn.Module, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 16,
                             progress: bool = True, source: str = "task") -> MCResult:
    """Accuracy and length-normalised accuracy of `model` on `examples`."""
    if batch_size < 1:
        raise L3TrainError(f"--batch-size must be positive, got {batch_size}")
    requests, scored = [], []
    for number, example in enumerate(examples, 1):
        own = [_request(tokenizer, example, choice, model.cfg.max_seq_len, f"{source} example {number}")
               for choice in example.choices]
        if None not in own:  # an example is scored whole or not at all
            requests += own
            scored.append(example)
    if not scored:
        raise L3TrainError(f"{source}: no example fits the model's {model.cfg.max_seq_len} positions")
    flat = score_requests(model, requests, batch_size, progress)
    scores, correct, correct_norm, at = [], 0, 0, 0
    for example in scored:
        chosen = flat[at:at + len(example.choices)]
        at += len(example.choices)
        per_byte = [score / len(choice.encode("utf-8")) for score, choice in zip(chosen, example.choices)]
        correct += int(np.argmax(chosen)) == example.label
        correct_norm += int(np.argmax(per_byte)) == example.label
        scores.append(chosen)
    return MCResult(examples=len(scored), skipped=len(examples) - len(scored), accuracy=correct / len(scored),
                    accuracy_norm=correct_norm / len(scored),
                    chance=float(np.mean([1 / len(example.choices) for example in scored])), scores=scores)


def continuation_task(documents: list[str], examples: int, choices: int = 4, context_words: int = 24,
                      continuation_words: int = 8, seed: int = 0, first_document: int = 0) -> list[Example]:
    """Up to `examples` questions from `documents`: `context_words` words of a document, then
    its next `continuation_words` words against `choices - 1` equally long runs of words from
    other documents (words are whitespace-separated and rejoined by single spaces).

    Each document gives windows of context + continuation words at a stride of
    `continuation_words`, so every run of words is the right answer of one window at most;
    `examples` of all windows are drawn with `seed`, so the task is deterministic. Each example
    records its document (numbered from `first_document`) and first word."""
    if choices < 2 or context_words < 1 or continuation_words < 1 or examples < 1:
        raise L3TrainError("need --examples >= 1, --choices >= 2, --context-words >= 1 and --continuation-words >= 1")
    span = context_words + continuation_words
    words = [document.split() for document in documents]
    windows = [(doc, start) for doc, tokens in enumerate(words)
               for start in range(0, len(tokens) - span + 1, continuation_words)]
    if len({doc for doc, _ in windows}) < choices:
        raise L3TrainError(f"need {choices} documents of at least {span} words for distinct choices, "
                           f"found {len({doc for doc, _ in windows})}; use more documents or shorter spans")
    rng = random.Random(seed)
    chosen = rng.sample(windows, min(examples, len(windows)))
    task = []
    for doc, start in chosen:
        context = " ".join(words[doc][start:start + context_words])
        continuations = [" " + " ".join(words[doc][start + context_words:start + span])]
        others = [window for window in windows if window[0] != doc]
        for _ in range(100 * choices):  # a bound, in case other documents repeat the same words
            other_doc, other_start = rng.choice(others)
            offset = other_start + context_words
            candidate = " " + " ".join(words[other_doc][offset:offset + continuation_words])
            if candidate not in continuations:
                continuations.append(candidate)
                if len(continuations) == choices:
                    break
        else:
            raise L3TrainError(f"could not find {choices - 1} distinct distractors for document {doc}")
        order = list(range(choices))
        rng.shuffle(order)
        task.append(Example(context, tuple(continuations[i] for i in order), order.index(0),
                            {"document": first_document + doc, "word": start}))
    return task
