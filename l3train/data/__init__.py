"""Data pipeline: default corpus, tokenizer, preprocessing to Megatron .bin/.idx, datasets.

Modules are imported directly (`l3train.data.tokenizer`, ...) rather than re-exported
here, so that using the tokenizer does not pay for importing megatron-core.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from l3train.errors import L3TrainError


class CliArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors follow the project's CLI convention.

    Plain argparse prints the usage block plus a message and exits; raising
    `L3TrainError` instead lets `run_cli` print a single `error: ...` line (exit 2).
    """

    def error(self, message: str) -> NoReturn:
        raise L3TrainError(f"{message} (see {self.prog} --help)")
