"""User-facing errors and the one-line CLI error convention.

Every problem caused by user input (configs, data, allocation files, checkpoints, CLI
flags) raises `L3TrainError` with a message that names what is wrong and how to fix it.
Entry points wrap their `main` with `run_cli`, which prints that message as a single
`error: ...` line on stderr and exits with status 2 instead of a traceback; so do
operating-system errors (an unwritable output path names the path).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class L3TrainError(Exception):
    """An error caused by user input; its message is shown to the user verbatim."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI `main`, turning `L3TrainError` into one stderr line and exit status 2."""
    try:
        status = main()
    except L3TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    except OSError as err:  # unwritable output, missing directory, full disk: name the path
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        status = 2
    _exit(status or 0)


def _exit(status: int) -> NoReturn:
    """`sys.exit`, except in a process that joined torch.distributed: that one must skip
    interpreter finalization (l3train.process.exit_process says why)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        from l3train.process import exit_process

        exit_process(status)
    sys.exit(status)


class CliArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors follow the one-line convention.

    Plain argparse prints the usage block plus a message; raising `L3TrainError`
    instead lets `run_cli` print a single `error: ...` line (exit 2). Abbreviated flags
    are refused: `--resum` must not silently mean `--resume`.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise L3TrainError(f"{message} (see {self.prog} --help)")


def parse_command(argv: list[str], commands: dict[str, CliArgumentParser], prog: str, usage_text: str,
                  usage_tail: str = "...") -> argparse.Namespace:
    """`COMMAND [options and key=value overrides in any order]` of a tool with subcommands:
    each command's own parser reads the rest intermixed (which argparse's subparsers cannot);
    `--help` alone prints `usage_text`. The namespace's `command` is the command's name."""
    if not argv or argv[0] in ("-h", "--help"):
        usage = CliArgumentParser(prog=prog, usage=f"%(prog)s {{{','.join(commands)}}} {usage_tail}",
                                  description=usage_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if not argv:
            usage.error(f"a command is required: {', '.join(commands)}")
        usage.print_help()
        sys.exit(0)
    if argv[0] not in commands:
        raise L3TrainError(f"unknown command {argv[0]!r}; choose one of {', '.join(commands)} (see {prog} --help)")
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args
