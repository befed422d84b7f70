#!/usr/bin/env python
"""Tokenize a corpus into a Megatron indexed dataset (<prefix>.bin/.idx) for training.

The corpus is any number of files, directories (their corpus files, sorted) and globs:
JSONL, plain text (one document per line), Parquet (one document per row), text and JSONL
also .gz or .zst; each file is streamed. Resumable: rerun the same command after an
interruption and finished chunks are kept. Examples (the default corpus and tokenizer, see
tools/build_corpus.py and tools/train_tokenizer.py; then a directory of FineWeb-style shards):

    python tools/preprocess_data.py --input data/corpus/stdlib_docstrings.jsonl \\
        --tokenizer data/tokenizer/spm_bpe_2048.model --output-prefix data/indexed/stdlib_docstrings_text_document --workers 2
    python tools/preprocess_data.py --input 'corpus/shard_*.parquet' more/part-0001.jsonl.zst \\
        --tokenizer tok.model --output-prefix data/indexed/web --workers 16
"""

from __future__ import annotations

import argparse

from l3train.data.indexed import DEFAULT_CHUNK_LINES, Task, preprocess
from l3train.errors import CliArgumentParser, run_cli
from l3train.utils.outputs import add_overwrite_argument, refuse_existing


def parse_args() -> argparse.Namespace:
    parser = CliArgumentParser(
        description=(
            "Tokenize text, JSONL or Parquet files (text and JSONL also .gz/.zst) into "
            "<prefix>.bin/.idx with megatron-core's IndexedDatasetBuilder, EOD after every "
            "document, plus a <prefix>.meta.json naming the tokenizer and inputs. Output is "
            "identical for any --workers and --chunk-size, and however the same files are named. "
            "Work is saved per chunk under <prefix>.parts/: rerunning an interrupted command resumes it."
        )
    )
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE_DIR_OR_GLOB",
                        help="corpus files, directories or globs (quote globs), in order")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    parser.add_argument(
        "--format", choices=["auto", "text", "jsonl", "parquet"], default="auto",
        help="default: by extension (.jsonl/.json, .parquet, else text; under .gz/.zst too)"
    )
    parser.add_argument("--json-key", "--text-key", dest="json_key", default="text",
                        help="the JSONL field or Parquet column with the text (default text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_LINES,
        help=f"documents per resumable chunk (default {DEFAULT_CHUNK_LINES})",
    )
    parser.add_argument("--task", metavar="I/N", help="tokenize only group I of N of the input files, into "
                        "<prefix>.parts/ (one SLURM array task: launch/slurm/preprocess.sh); merge with --merge-only")
    parser.add_argument("--merge-only", action="store_true",
                        help="merge the parts every --task wrote into <prefix>.bin/.idx")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_argument(parser)
    args = parser.parse_args()
    if args.task is not None:
        index, _, count = args.task.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)) or args.merge_only:
            parser.error(f"--task takes I/N with 0 <= I < N (e.g. 3/16), without --merge-only; got {args.task}")
        args.task = Task(int(index), int(count), tokenize=True, merge=False)
    else:
        args.task = Task(tokenize=not args.merge_only)
    return args


def main() -> None:
    args = parse_args()
    # Only finished datasets count: an interrupted run's <prefix>.parts/ is resumed, not refused.
    refuse_existing([f"{args.output_prefix}{suffix}" for suffix in (".bin", ".idx", ".meta.json")],
                    "a tokenized dataset: <prefix>.bin/.idx/.meta.json", args.overwrite)
    stats = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        fmt=args.format,
        json_key=args.json_key,
        workers=args.workers,
        chunk_lines=args.chunk_size,
        progress=not args.quiet,
        task=args.task,
    )
    if not args.task.merge:
        print(f"task {args.task.index} of {args.task.count}: {stats.documents} documents, {stats.tokens} tokens in "
              f"{args.output_prefix}.parts/ ({stats.chunks_reused} of {stats.chunks} chunk(s) done before) in "
              f"{stats.seconds:.1f} s; merge with --merge-only once every task is done")
        return
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} "
        f"tokens ({stats.tokens / stats.documents:.1f}/doc, {stats.dtype}) in {stats.seconds:.1f} s"
    )


if __name__ == "__main__":
    run_cli(main)
