#!/usr/bin/env python
"""Build a multiple-choice continuation task from held-out documents of a corpus.

Each example is a run of --context-words words of a document; the right choice is the
--continuation-words words that follow, the others equally long runs of words from other
documents (chance: 1 / --choices). Documents are taken from one part of a train,valid,test
split of the corpus, cut by document exactly as training cuts the preprocessed corpus
(one non-empty line = one document), so with the training config's data.split and
--split-part valid the task uses only text the model never trained on. The output is a
task file for `tools/evaluate.py mc` (format in docs/evaluation.md); it is deterministic for
a given corpus and --seed.

    python tools/build_mc_task.py --corpus data/corpus/stdlib_docstrings.jsonl \\
        --output data/tasks/stdlib_continuation.jsonl
    python tools/build_mc_task.py --corpus data/corpus/stdlib_docstrings.jsonl --examples 8 \\
        --output configs/tasks/stdlib_continuation_example.jsonl    # the example shipped in the repo
"""

from __future__ import annotations

import argparse

from l3train.data.sources import iter_documents
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.eval.data import SPLIT_PARTS, split_range
from l3train.eval.multiple_choice import continuation_task, write_task
from l3train.utils.outputs import add_overwrite_argument, refuse_existing


def main(argv: list[str] | None = None) -> int:
    parser = CliArgumentParser(prog="tools/build_mc_task.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, metavar="FILE", help="text (one document per line) or JSONL corpus")
    parser.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                        help="corpus format (auto: .jsonl/.json are JSONL)")
    parser.add_argument("--json-key", default="text", help="document key of a JSONL corpus (default text)")
    parser.add_argument("--split", default="98,2,0", help="train,valid,test proportions (default 98,2,0, the "
                                                          "shipped configs' data.split)")
    parser.add_argument("--split-part", choices=SPLIT_PARTS, default="valid",
                        help="part of the split to draw documents from (default valid)")
    parser.add_argument("--examples", type=int, default=200, help="number of examples (default 200; fewer if the "
                                                                  "documents do not hold that many)")
    parser.add_argument("--choices", type=int, default=4, help="choices per example (default 4)")
    parser.add_argument("--context-words", type=int, default=24, help="words of context (default 24)")
    parser.add_argument("--continuation-words", type=int, default=8, help="words per choice (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    parser.add_argument("--output", required=True, metavar="FILE", help="task JSONL to write")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    refuse_existing([args.output], "a multiple-choice task file", args.overwrite)
    documents = list(iter_documents(args.corpus, args.format, args.json_key))
    begin, end = split_range(len(documents), args.split, args.split_part)
    if begin == end:
        raise L3TrainError(f"the {args.split_part} part of split {args.split!r} of {args.corpus} "
                           f"({len(documents)} documents) is empty; choose another --split-part or --split")
    task = continuation_task(documents[begin:end], args.examples, args.choices, args.context_words,
                             args.continuation_words, args.seed, first_document=begin)
    write_task(args.output, task)
    print(f"wrote {args.output}: {len(task)} examples of {args.choices} choices from documents {begin}..{end - 1} "
          f"({args.split_part} part of {args.split}) of {args.corpus}")
    return 0


if __name__ == "__main__":
    run_cli(main)
