"""Text output of generation: streaming one completion, printing a batch's as they end."""

from __future__ import annotations

import sys

from l3train.data.tokenizer import Tokenizer
from l3train.inference.config import InferenceConfig
from l3train.inference.engine import Generator


def stream_one(generator: Generator, prompt: list[int], config: InferenceConfig, tokenizer: Tokenizer) -> None:
    """Print the completion as it grows: the decoded whole minus what is already shown. Text
    ending in an incomplete UTF-8 sequence (byte pieces) is held back until it completes or
    the generation ends."""
    steps = generator.stream([prompt], config)  # checks the prompt before it is shown
    shown = tokenizer.decode(prompt)
    sys.stdout.write(shown)
    tokens = list(prompt)
    for step in steps:
        if step.tokens[0] is None:
            break
        tokens.append(step.tokens[0])
        text = tokenizer.decode(tokens)
        if text.startswith(shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = tokenizer.decode(tokens)
    sys.stdout.write((text[len(shown):] if text.startswith(shown) else "") + "\n")


def print_batch(generator: Generator, prompts: list[list[int]], texts: list[str], config: InferenceConfig,
                tokenizer: Tokenizer) -> None:
    """Print each completion (prompt and new text) as soon as its sequence stops."""
    new: list[list[int]] = [[] for _ in prompts]
    printed = [False] * len(prompts)
    for step in generator.stream(prompts, config):
        for index, token in enumerate(step.tokens):
            if token is not None:
                new[index].append(token)
            elif not printed[index]:
                printed[index] = True
                print(f"[{index}] {tokenizer.decode(prompts[index] + new[index])}", flush=True)
    for index, done in enumerate(printed):
        if not done:
            print(f"[{index}] {tokenizer.decode(prompts[index] + new[index])}", flush=True)
