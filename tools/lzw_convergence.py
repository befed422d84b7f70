#!/usr/bin/env python
"""How large a sample the LZW allocation needs: allocations from doubling samples, compared.

One pass over the corpus snapshots the LZW dictionary each time the tokens scanned double
(from --start), builds the allocation of each snapshot with the same v and k, and prints how
many rows changed owner against the previous snapshot and against the largest: once the
share stops falling, a larger sample changes little (docs/allocation.md, "How large a sample").

    python tools/lzw_convergence.py --data-prefix data/indexed/stdlib_docstrings_text_document -v 32768 -k 128
    python tools/lzw_convergence.py --text corpus.txt --tokenizer tok.model -v 710000 -k 512 --max-tokens 200000000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from l3train.allocation import TextFile
from l3train.allocation.build import CorpusOptions, check_scan_memory, open_corpus
from l3train.allocation.convergence import convergence_table
from l3train.errors import CliArgumentParser, run_cli
from l3train.utils.atomic import atomic_write_text
from l3train.utils.units import default_max_memory, parse_size


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-prefix", metavar="PREFIX", help="Megatron indexed dataset <PREFIX>.bin/.idx")
    source.add_argument("--text", metavar="FILE", help="UTF-8 text, one document per line (needs --tokenizer)")
    parser.add_argument("--tokenizer", metavar="MODEL", help="sentencepiece .model (for --text; else from the meta)")
    parser.add_argument("--budget", "-v", type=int, required=True, metavar="V", help="total rows v")
    parser.add_argument("--cap", "-k", type=int, default=512, metavar="K", help="max rows per token k (default 512)")
    parser.add_argument("--start", type=int, default=100_000, help="tokens of the first sample (default 100000)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="scan at most this many tokens")
    parser.add_argument("--max-memory", type=parse_size, default=default_max_memory(), metavar="SIZE",
                        help="refuse a scan whose dictionary is predicted to need more (default: 80%% of memory)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args()
    if args.text is not None and args.tokenizer is None:
        parser.error("--text needs --tokenizer MODEL to tokenize it")
    corpus = open_corpus(TextFile(args.text) if args.text else args.data_prefix, args.budget, args.cap,
                         CorpusOptions(tokenizer=args.tokenizer, max_tokens=args.max_tokens))
    check_scan_memory(corpus, args.max_memory)
    print(f"allocations of v = {args.budget:,}, k = {args.cap} from doubling samples of {corpus.description}")
    rows = convergence_table(corpus, args.budget, args.cap, args.start)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
