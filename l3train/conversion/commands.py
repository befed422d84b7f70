"""The commands of tools/convert_checkpoint.py: argument parsing and what each command runs.

The tool is a thin shell (its docstring is the user's documentation); the conversions
themselves are in l3train.checkpoint.convert and huggingface, and l3train.conversion.reshard.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from l3train.checkpoint.consolidated import DEFAULT_MAX_SHARD_BYTES, Consolidated
from l3train.checkpoint.manifest import read_manifest
from l3train.errors import CliArgumentParser, L3TrainError, parse_command
from l3train.utils.outputs import add_overwrite_argument, refuse_existing
from l3train.utils.units import parse_size


def _command_parsers() -> dict[str, CliArgumentParser]:
    def command(name: str, summary: str) -> CliArgumentParser:
        parser = CliArgumentParser(prog=f"tools/convert_checkpoint.py {name}", description=summary)
        add_overwrite_argument(parser)
        return parser

    consolidate = command("consolidate", "training checkpoint -> consolidated checkpoint")
    consolidate.add_argument("checkpoint", help="run_dir (its latest checkpoint) or checkpoints/step_* directory")
    consolidate.add_argument("--output", required=True, help="consolidated checkpoint directory to write")
    consolidate.add_argument("--with-optimizer", action="store_true",
                             help="also write AdamW's moments and step (optimizer.safetensors), for reshard")
    consolidate.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                             help="split model.safetensors past this size (default 2G)")
    consolidate.add_argument("overrides", nargs="*", metavar="key.sub=value",
                             help="fix paths of the saved config, e.g. l3.allocation=... data.tokenizer=...")

    reshard = command("reshard", "checkpoint -> run directory with a training checkpoint for another layout")
    reshard.add_argument("checkpoint", help="training checkpoint (run_dir or step_*) or consolidated checkpoint")
    reshard.add_argument("--output", required=True, help="run directory to create for the new layout")
    reshard.add_argument("--nproc", required=True, type=int, help="number of ranks of the new layout")
    reshard.add_argument("--weights-only", action="store_true",
                         help="start AdamW afresh (moments zero) instead of resharding its state")
    reshard.add_argument("overrides", nargs="*", metavar="key.sub=value",
                         help="the new layout, e.g. parallel.tensor_parallel=2 parallel.zero_stage=3")

    export = command("export", "checkpoint -> Hugging Face folder")
    export.add_argument("checkpoint", help="training checkpoint (run_dir or step_*) or consolidated checkpoint")
    export.add_argument("--output", required=True, help="Hugging Face folder to write")
    export.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="for a training checkpoint: fix paths of its saved config")

    imported = command("import", "Hugging Face Llama folder -> consolidated checkpoint")
    imported.add_argument("folder", help="Hugging Face folder (config.json + safetensors)")
    imported.add_argument("--config", help="l3train config of the model to build (its model: section must "
                                           "match the folder's config.json)")
    imported.add_argument("--output", help="consolidated checkpoint directory to write")
    imported.add_argument("--print-model-section", action="store_true",
                          help="print the l3train model: section matching the folder and exit")
    imported.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return {"consolidate": consolidate, "reshard": reshard, "export": export, "import": imported}


def parse_args(argv: list[str] | None = None, usage_text: str = "") -> argparse.Namespace:
    """`COMMAND [options and key=value overrides in any order]`; `usage_text` is the tool's help."""
    commands = _command_parsers()
    args = parse_command(sys.argv[1:] if argv is None else argv, commands, "tools/convert_checkpoint.py", usage_text)
    parser = commands[args.command]
    if args.command == "reshard" and args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.command == "import" and not args.print_model_section and not (args.config and args.output):
        parser.error("import needs --config and --output (or --print-model-section)")
    return args


def _is_consolidated(path: Path) -> bool:
    manifest, _ = read_manifest(path)
    return manifest is not None and manifest.get("kind") == "consolidated"


def _as_consolidated(path: str, overrides: list[str], scratch: str, with_optimizer: bool) -> Path:
    """`path` itself when consolidated, else its consolidation into `scratch`."""
    from l3train.checkpoint.convert import consolidate

    if _is_consolidated(Path(path)):
        if overrides:
            raise L3TrainError(f"{path} is a consolidated checkpoint: its config paths are its own files, "
                               f"overrides {overrides} do not apply")
        return Path(path)
    return consolidate(path, Path(scratch) / "consolidated", overrides, with_optimizer=with_optimizer)


def main(argv: list[str] | None = None, usage_text: str = "") -> int:
    args = parse_args(argv, usage_text)
    if args.command == "consolidate":
        from l3train.checkpoint.convert import consolidate

        refuse_existing([args.output], "a consolidated checkpoint", args.overwrite)
        out = consolidate(args.checkpoint, args.output, args.overrides, args.with_optimizer, args.max_shard_size,
                          args.overwrite)
        print(f"wrote consolidated checkpoint {out} (step {Consolidated(out, check=False).step})")
    elif args.command == "reshard":
        from l3train.checkpoint.convert import resolve_training_checkpoint
        from l3train.conversion.reshard import reshard

        refuse_existing([args.output], "a run directory", args.overwrite)
        with tempfile.TemporaryDirectory(prefix="l3train-convert-") as scratch:
            source, keep_paths = Path(args.checkpoint), []
            if not _is_consolidated(source):
                # The run keeps using the training run's allocation and tokenizer files, not
                # the copies in this temporary consolidation.
                saved = yaml.safe_load((resolve_training_checkpoint(source) / "config.yaml").read_text())
                keep_paths = [f"l3.allocation={saved['l3']['allocation']}",
                              f"data.tokenizer={saved['data']['tokenizer']}"]
                # The user's overrides also repoint the paths the consolidation reads (a run whose
                # config holds relative paths, resharded from elsewhere).
                source = _as_consolidated(args.checkpoint, args.overrides, scratch,
                                          with_optimizer=not args.weights_only)
            out = reshard(source, Path(args.output), args.nproc, [*keep_paths, *args.overrides], args.weights_only,
                          args.overwrite)
        if args.weights_only:
            print("warning: --weights-only: AdamW restarts from zero moments at the checkpoint's step, so the "
                  "run will not follow the original trajectory", file=sys.stderr)
        print(f"wrote run directory {out}; continue with: torchrun --nproc_per_node {args.nproc} -m l3train.train "
              f"--config {out / 'config.yaml'} --resume")
    elif args.command == "export":
        from l3train.checkpoint.huggingface import export_huggingface

        refuse_existing([args.output], "a Hugging Face folder", args.overwrite)
        with tempfile.TemporaryDirectory(prefix="l3train-convert-") as scratch:
            source = _as_consolidated(args.checkpoint, args.overrides, scratch, with_optimizer=False)
            out = export_huggingface(Consolidated(source), Path(args.output), args.overwrite)
        print(f"wrote Hugging Face folder {out}")
    else:
        from l3train.checkpoint.huggingface import import_huggingface, model_section_from_huggingface

        if args.print_model_section:
            print(yaml.safe_dump({"model": model_section_from_huggingface(Path(args.folder))}, sort_keys=False))
            return 0
        from l3train.config import load_config

        refuse_existing([args.output], "a consolidated checkpoint", args.overwrite)
        out = import_huggingface(Path(args.folder), load_config(args.config, args.overrides), Path(args.output),
                                 args.overwrite)
        print(f"wrote consolidated checkpoint {out}; train from it with: python -m l3train.train "
              f"--config {args.config} --init-from {out}")
    return 0
