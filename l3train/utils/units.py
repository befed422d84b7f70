"""Sizes on the command line: `2G`, `500M`, `1000000`."""

from __future__ import annotations

import argparse
import os

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of `text` (an argparse type: a bad size is a usage error naming it)."""
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * _UNITS[text[-1]]) if text and text[-1] in _UNITS else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 500M, 1000000)") from None


def default_max_memory() -> int:
    """80% of this machine's physical memory."""
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
