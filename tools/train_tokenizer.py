#!/usr/bin/env python
"""Train the sentencepiece tokenizer used for preprocessing and training.

Example (the default corpus, see tools/build_corpus.py):

    python tools/train_tokenizer.py --input data/corpus/stdlib_docstrings.jsonl \\
        --output-prefix data/tokenizer/spm_bpe_2048 --vocab-size 2048
"""

from __future__ import annotations

import argparse
import time

from l3train.data.sources import check_input, detect_format, iter_documents
from l3train.data.tokenizer import iter_training_sentences, train_tokenizer
from l3train.errors import CliArgumentParser, run_cli
from l3train.utils.outputs import add_overwrite_argument, refuse_existing


def parse_args() -> argparse.Namespace:
    parser = CliArgumentParser(
        description=(
            "Train a sentencepiece BPE or unigram model with byte fallback; its eos piece "
            "is the end-of-document token. Writes <prefix>.model and <prefix>.vocab "
            "atomically. Same inputs and flags give a byte-identical model."
        )
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="corpus file(s): text (one document per line) or JSONL (.jsonl/.json)",
    )
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model/.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000, help="default: 8000")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument(
        "--format",
        choices=["auto", "text", "jsonl"],
        default="auto",
        help="input format (default: by extension)",
    )
    parser.add_argument("--json-key", default="text", help="JSONL field with the text")
    parser.add_argument(
        "--max-sentences",
        type=int,
        default=0,
        help="train on a seeded random sample of this many lines (default 0: all)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="trainer threads (default 1; unigram results depend on the count)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    add_overwrite_argument(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    refuse_existing([f"{args.output_prefix}{suffix}" for suffix in (".model", ".vocab")],
                    "a sentencepiece tokenizer: <prefix>.model/.vocab", args.overwrite)
    for path in args.input:
        check_input(path)
    start = time.monotonic()
    counts = {"docs": 0}

    def documents():
        for path in args.input:
            for doc in iter_documents(path, detect_format(path, args.format), args.json_key):
                counts["docs"] += 1
                yield doc

    print(
        f"training {args.model_type} tokenizer, vocab {args.vocab_size}, "
        f"on {', '.join(args.input)}",
        flush=True,
    )
    tokenizer = train_tokenizer(
        iter_training_sentences(documents()),
        args.output_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        num_threads=args.threads,
        max_sentences=args.max_sentences,
        seed=args.seed,
        verbose=args.verbose,
    )
    print(
        f"wrote {tokenizer.path} (+ .vocab): vocab {tokenizer.vocab_size}, eod id "
        f"{tokenizer.eod_id}, tokenizer_id {tokenizer.tokenizer_id}; trained on "
        f"{counts['docs']} documents in {time.monotonic() - start:.1f} s"
    )


if __name__ == "__main__":
    run_cli(main)
