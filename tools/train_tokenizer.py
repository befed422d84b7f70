#!/usr/bin/env python
"""Train the sentencepiece tokenizer used for preprocessing and training.

Example (the default corpus, see tools/build_corpus.py):

    python tools/train_tokenizer.py --input data/corpus/stdlib_docstrings.jsonl \\
        --output-prefix data/tokenizer/spm_bpe_2048 --vocab-size 2048
"""

from __future__ import annotations

import argparse
import time

from l3train.data.sources import expand_inputs, iter_documents, sample_documents
from l3train.data.tokenizer import iter_training_sentences, train_tokenizer
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
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
        help="corpus files, directories or globs: text (one document per line), JSONL, Parquet; .gz/.zst",
    )
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model/.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000, help="default: 8000")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument(
        "--format",
        choices=["auto", "text", "jsonl", "parquet"],
        default="auto",
        help="input format (default: by extension)",
    )
    parser.add_argument("--json-key", "--text-key", dest="json_key", default="text",
                        help="the JSONL field or Parquet column with the text")
    parser.add_argument(
        "--sample-documents",
        type=int,
        default=0,
        help="train on a seeded sample of about this many documents spread over the input files by "
             "size (default 0: every document)",
    )
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
    paths = expand_inputs(args.input)
    if args.sample_documents < 0:
        raise L3TrainError(f"--sample-documents must be >= 0, got {args.sample_documents}")
    start = time.monotonic()
    counts = {"docs": 0}

    def documents():
        if args.sample_documents:
            chosen = sample_documents(paths, args.sample_documents, args.seed, args.format, args.json_key)
        else:
            chosen = (doc for path in paths for doc in iter_documents(path, args.format, args.json_key))
        for doc in chosen:
            counts["docs"] += 1
            yield doc

    sampled = f" (a sample of about {args.sample_documents} documents, seed {args.seed})" if args.sample_documents else ""
    print(f"training {args.model_type} tokenizer, vocab {args.vocab_size}, "
          f"on {paths[0] if len(paths) == 1 else f'{len(paths)} files'}{sampled}", flush=True)
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
