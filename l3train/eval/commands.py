"""The commands of tools/evaluate.py: argument parsing and what each command runs (the tool
is a thin shell; its docstring is the user's documentation)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from l3train.errors import CliArgumentParser, parse_command
from l3train.eval.data import SPLIT_PARTS
from l3train.utils.atomic import atomic_write_text
from l3train.utils.outputs import add_overwrite_argument, refuse_existing

COMMANDS = ("lm", "mc", "diagnostics")


def _command_parsers() -> dict[str, CliArgumentParser]:
    def command(name: str, summary: str) -> CliArgumentParser:
        parser = CliArgumentParser(prog=f"tools/evaluate.py {name}", description=summary)
        parser.add_argument("checkpoint", help="run_dir, checkpoints/step_* directory or consolidated checkpoint")
        parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                            help="for a training checkpoint: fix paths of its saved config")
        parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        add_overwrite_argument(parser)
        return parser

    def text_arguments(parser: CliArgumentParser) -> None:
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--data-prefix", action="append", metavar="PREFIX",
                            help="indexed dataset <PREFIX>.bin/.idx (repeatable; default: the checkpoint's "
                                 "data.prefixes)")
        source.add_argument("--text", metavar="FILE", help="raw text (one document per line) or JSONL file")
        parser.add_argument("--split", help="train,valid,test proportions of --data-prefix (default: the "
                                            "checkpoint's data.split)")
        parser.add_argument("--split-part", choices=SPLIT_PARTS, default="valid",
                            help="part of the split to evaluate on (default valid)")
        parser.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                            help="format of --text (auto: .jsonl/.json are JSONL)")
        parser.add_argument("--json-key", default="text", help="document key of a JSONL --text (default text)")
        parser.add_argument("--seq-length", type=int, help="window length (default: the checkpoint's data.seq_length)")
        parser.add_argument("--max-tokens", type=int, metavar="N",
                            help="evaluate the leading whole documents of at most N tokens")

    lm = command("lm", "loss, perplexity and bits per byte over a text")
    text_arguments(lm)
    lm.add_argument("--json", metavar="FILE", help="also write the results here as JSON")

    mc = command("mc", "zero-shot multiple choice by continuation log-likelihood")
    mc.add_argument("--task", required=True, metavar="FILE", help="task JSONL: {context, choices, label} per line")
    mc.add_argument("--limit", type=int, metavar="N", help="only the first N examples")
    mc.add_argument("--json", metavar="FILE", help="also write the results here as JSON")

    diagnostics = command("diagnostics", "L³ diagnostics and the logit lens over a text")
    text_arguments(diagnostics)
    diagnostics.add_argument("--output", required=True, metavar="DIR",
                             help="directory for diagnostics.json, the PNG plots and tensorboard/")
    return {"lm": lm, "mc": mc, "diagnostics": diagnostics}


def parse_args(argv: list[str] | None = None, usage_text: str = "") -> argparse.Namespace:
    """`COMMAND CHECKPOINT [options and key=value overrides in any order]`."""
    commands = _command_parsers()
    args = parse_command(sys.argv[1:] if argv is None else argv, commands, "tools/evaluate.py", usage_text,
                         "CHECKPOINT ...")
    if args.command == "mc" and args.limit is not None and args.limit < 1:
        commands["mc"].error(f"--limit must be positive, got {args.limit}")
    return args


def _print_and_save(results: dict, lines: list[str], json_path: str | None) -> None:
    print("\n".join(lines))
    if json_path:
        atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")


def main(argv: list[str] | None = None, usage_text: str = "") -> int:
    args = parse_args(argv, usage_text)
    outputs = [args.json] if getattr(args, "json", None) else []
    if args.command == "diagnostics":
        from l3train.eval.evaluation import diagnostics_files

        outputs = diagnostics_files(Path(args.output))
    refuse_existing(outputs, f"an output of tools/evaluate.py {args.command}", args.overwrite)
    # Imported after the argument checks: torch and the model take seconds to import.
    from l3train.eval.loading import load_checkpoint_model
    from l3train.eval.multiple_choice import evaluate_multiple_choice, load_task

    examples = load_task(args.task)[:args.limit] if args.command == "mc" else []  # checked before the slow load
    loaded = load_checkpoint_model(args.checkpoint, args.overrides)
    tokenizer = loaded.tokenizer()
    about = {"checkpoint": str(loaded.directory), "step": loaded.step}
    progress = not args.quiet
    if args.command == "mc":
        result = evaluate_multiple_choice(loaded.model, tokenizer, examples, args.batch_size, progress, args.task)
        _print_and_save({**about, "task": args.task, **result.as_dict()}, [
            f"{args.task}: {result.examples} examples, accuracy {result.accuracy:.4f}, "
            f"length-normalised accuracy {result.accuracy_norm:.4f} (chance {result.chance:.4f})"
            + (f"; {result.skipped} skipped (a choice longer than the model's context)" if result.skipped else "")],
            args.json)
        return 0
    from l3train.eval.evaluation import diagnose, evaluation_text, write_diagnostics
    from l3train.eval.perplexity import evaluate_lm

    text = evaluation_text(loaded.config, tokenizer, args.data_prefix, args.text, args.split, args.split_part,
                           args.format, args.json_key, args.max_tokens)
    seq_length = args.seq_length or loaded.config.data.seq_length
    about.update(text=text.description, seq_length=seq_length)
    if args.command == "lm":
        lm = evaluate_lm(loaded.model, text, tokenizer, seq_length, args.batch_size, progress)
    else:
        diagnosed = diagnose(loaded.model, text, tokenizer, seq_length, args.batch_size, progress)
        write_diagnostics(diagnosed, Path(args.output), loaded.step, Path(args.checkpoint).resolve().name, about)
        lm = diagnosed.lm
    lines = [f"{text.description}: {lm.tokens:,} tokens, {lm.bytes:,} bytes ({lm.bytes_of}; "
             f"{lm.detokenized_bytes:,} detokenized)",
             f"loss {lm.loss:.4f} | perplexity {lm.perplexity:.3f} | bits per byte {lm.bits_per_byte:.4f}"]
    if args.command == "diagnostics":
        for block, layer in diagnosed.layers.items():
            summary = layer.summary()
            lines.append(f"L³ after block {block}: entropy {summary['entropy_mean']:.3f} nats "
                         f"({summary['normalized_entropy_mean']:.2f} of log d_t), top-1 {summary['top1_mean']:.3f}, "
                         f"rows used {summary['rows_used_fraction_mean']:.3f} of d_t")
        lines.append("logit lens KL: " + ", ".join(f"{point.name} {point.kl:.3f}" for point in diagnosed.lens))
        lines.append(f"wrote {args.output}")
    _print_and_save({**about, **lm.as_dict()}, lines, getattr(args, "json", None))
    return 0
