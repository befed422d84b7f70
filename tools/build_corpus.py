#!/usr/bin/env python
"""Build the default training corpus from the Python standard library's docstrings.

Needs no network: the text ships with every Python. See l3train/data/corpus.py for why
and how. Example:

    python tools/build_corpus.py --output data/corpus/stdlib_docstrings.jsonl
"""

from __future__ import annotations

import argparse

from l3train.data.corpus import MIN_CHARS, build_corpus, meta_path
from l3train.errors import CliArgumentParser, run_cli
from l3train.utils.outputs import add_overwrite_argument, refuse_existing

DEFAULT_OUTPUT = "data/corpus/stdlib_docstrings.jsonl"


def parse_args() -> argparse.Namespace:
    parser = CliArgumentParser(
        description=(
            "Write one JSONL document per standard-library docstring (module, class, "
            f"function; at least {MIN_CHARS} characters) as "
            '{"text": ..., "source": "module.qualname"}, plus <output>.meta.json '
            "recording the Python version. Output is deterministic for a given Python."
        )
    )
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"JSONL file to write (default: {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--max-mb",
        type=float,
        default=None,
        help="stop before the JSONL exceeds this many megabytes (10^6 bytes); default: no cap",
    )
    parser.add_argument(
        "--stdlib",
        default=None,
        help="standard library directory to read (default: the running Python's)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_argument(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    refuse_existing([args.output, meta_path(args.output)], "a corpus JSONL or its .meta.json record",
                    args.overwrite)
    stats = build_corpus(
        args.output, max_mb=args.max_mb, stdlib=args.stdlib, progress=not args.quiet
    )
    capped = " (capped by --max-mb)" if stats.truncated_by_max_mb else ""
    print(
        f"wrote {args.output}: {stats.documents} documents, {stats.characters} characters, "
        f"{stats.megabytes:.2f} MB{capped} from {stats.files_parsed} files of Python "
        f"{stats.python_version} in {stats.seconds:.1f} s; meta: {meta_path(args.output)}"
    )


if __name__ == "__main__":
    run_cli(main)
