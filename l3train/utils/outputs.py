"""Tools never replace an existing output unless asked to (`--overwrite`).

A tool pointed at the wrong path used to replace a dataset, tokenizer or allocation that
took hours to build, without a word. Every tool that writes files therefore declares
`--overwrite` with `add_overwrite_argument` and, right after parsing its arguments and
before any expensive work (tokenizing, scanning a corpus), calls `refuse_existing` on
everything it is about to write. The refusal is one `L3TrainError` line naming the path,
what it is and both ways out; the existing file is not touched.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterable

from l3train.errors import L3TrainError


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """Add the `--overwrite` flag that lets `refuse_existing` pass."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that already exist (default: refuse, exit status 2)")


def refuse_existing(paths: Iterable[str | os.PathLike], what: str, overwrite: bool = False) -> None:
    """Raise `L3TrainError` for the first of `paths` that exists, unless `overwrite`.

    `what` says what the output is ("a tokenized dataset: <prefix>.bin/.idx"), so the
    user can tell whether it is the file they meant to replace. A dangling symlink counts
    as existing: writing through it would create a file somewhere else.
    """
    if overwrite:
        return
    for path in paths:
        if os.path.lexists(path):
            raise L3TrainError(f"{os.fspath(path)} already exists ({what}); pass --overwrite to replace it, "
                               f"or choose another output path")
