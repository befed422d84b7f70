#!/usr/bin/env python
"""Build the per-token row allocation of the L³ tables (Algorithm 1) from a corpus sample.

The allocation d_t (1 <= d_t <= k, sum = v) decides how many rows of W_K/W_V each token
owns; it is computed once, offline, and becomes part of the model: training and
inference load the .npz written here and refuse one built for another tokenizer.

Modes: lzw is Algorithm 1 (LZW codeword counts, sorted, one row per codeword to its last
token); lzw-reference runs the paper's own Python loop (identical output, much slower);
uniform and frequency are ablations. If the codewords run out before v, the walk repeats
the sorted list (see l3train/allocation/allocation.py).

Examples:

    # from preprocessed training data (tokenizer id, vocab size and EOD id are read
    # from <prefix>.meta.json when it exists)
    python tools/lzw_allocate.py --data-prefix data/indexed/stdlib_docstrings_text_document -v 710000 \\
        --max-tokens 50000000 --output data/allocation.npz

    # from raw text, one document per line, as in the paper's script
    python tools/lzw_allocate.py --text corpus.txt --tokenizer data/tokenizer.model \\
        -v 710000 -k 512 --output data/allocation.npz

Documents are streamed in batches, so memory holds one batch plus the LZW dictionary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from l3train.allocation import MODES, TextFile
from l3train.allocation.build import CorpusOptions, check_scan_memory, open_corpus, scan_and_allocate, summary_lines
from l3train.utils.units import default_max_memory, parse_size
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.utils.outputs import add_overwrite_argument, refuse_existing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-prefix", metavar="PREFIX",
                        help="Megatron indexed dataset <PREFIX>.bin/.idx; each document is one LZW document")
    source.add_argument("--text", metavar="FILE", help="UTF-8 text, one document per line (needs --tokenizer)")
    identity = parser.add_mutually_exclusive_group()
    identity.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="sentencepiece .model: tokenizes --text; identifies the tokenizer (sha256)",
    )
    identity.add_argument(
        "--tokenizer-id",
        metavar="ID",
        help="tokenizer id to record when the .model file is not at hand (with --data-prefix "
        "or --mode uniform); default for --data-prefix: from <PREFIX>.meta.json",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="vocabulary size; default: from --tokenizer or <PREFIX>.meta.json",
    )
    parser.add_argument("--mode", choices=MODES, default="lzw", help="allocation rule (default lzw)")
    parser.add_argument("--budget", "-v", type=int, required=True, metavar="V", help="total rows v (>= vocab size)")
    parser.add_argument("--cap", "-k", type=int, default=512, metavar="K", help="max rows per token k (default 512)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="scan at most this many tokens (the document crossing the limit is cut there)",
    )
    parser.add_argument(
        "--eod-id",
        type=int,
        metavar="ID",
        help="with --data-prefix: drop this token when it ends a document (the paper's "
        "documents have no EOD); default: eod_id from <PREFIX>.meta.json if present",
    )
    parser.add_argument("--max-memory", type=parse_size, default=default_max_memory(), metavar="SIZE",
                        help="refuse an LZW scan whose dictionary is predicted to need more (e.g. 64G; default: "
                             "80%% of this machine's memory)")
    parser.add_argument("--corpus", metavar="TEXT", help="free-text corpus description to record (default: derived)")
    parser.add_argument("--output", required=True, metavar="FILE.npz", help="allocation file to write")
    add_overwrite_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.data_prefix is None and args.text is None and args.mode != "uniform":
        parser.error(f"--mode {args.mode} needs a corpus: pass --data-prefix or --text")
    if args.text is not None and args.tokenizer is None:
        parser.error("--text needs --tokenizer MODEL to tokenize it")
    if args.text is not None and args.eod_id is not None:
        parser.error("--eod-id only applies to --data-prefix (text lines carry no EOD)")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be positive, got {args.max_tokens}")
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a directory; give a file name")
    return args


def main() -> None:
    start = time.monotonic()
    args = parse_args()
    refuse_existing([args.output], "an L³ allocation file", args.overwrite)  # before the scan
    source = TextFile(args.text) if args.text is not None else args.data_prefix  # None: no corpus (uniform)
    options = CorpusOptions(tokenizer=args.tokenizer, tokenizer_id=args.tokenizer_id, vocab_size=args.vocab_size,
                            eod_id=args.eod_id, max_tokens=args.max_tokens, description=args.corpus)
    corpus = open_corpus(source, args.budget, args.cap, options)
    if args.mode == "lzw":
        check_scan_memory(corpus, args.max_memory)
    allocation, result = scan_and_allocate(corpus, args.mode, args.budget, args.cap, progress=not args.quiet)
    try:
        allocation.save(args.output)
    except OSError as err:
        raise L3TrainError(f"cannot write --output {args.output}: {err.strerror or err}") from err
    lines = [f"wrote {args.output}", *summary_lines(allocation, result, corpus.tokenizer),
             f"  time: {time.monotonic() - start:.1f} s"]
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
