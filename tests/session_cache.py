"""Files built once per test session and shared by its pytest-xdist workers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest


def session_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of this test session shared by all its pytest-xdist workers (each worker's
    base temp is a subfolder of the session's): what is built there under `build_once` is
    built by one worker and read by the others."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`build(folder)` unless another worker (or an earlier call) has already finished it; a
    worker that comes second waits for the first to finish."""
    from filelock import FileLock

    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".complete").touch()
    return folder
