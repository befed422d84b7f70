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
        sys.exit(2)
    except OSError as err:  # unwritable output, missing directory, full disk: name the path
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)


class CliArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors follow the one-line convention.

    Plain argparse prints the usage block plus a message; raising `L3TrainError`
    instead lets `run_cli` print a single `error: ...` line (exit 2).
    """

    def error(self, message: str) -> NoReturn:
        raise L3TrainError(f"{message} (see {self.prog} --help)")
