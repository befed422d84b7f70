"""Artifacts stored as one .npz: named arrays plus a JSON metadata record.

Allocations and shard plans use this format. Writes are atomic; reads turn every way a
file can be wrong (missing, not a zip, a bare .npy, truncated, missing arrays, bad JSON)
into one `L3TrainError` line that says what the file should be and how to rebuild it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_path


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Write `arrays` and `metadata` to exactly `path` (no suffix added), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays, metadata=np.array(json.dumps(metadata)))


def load_npz(path: str | os.PathLike, names: tuple[str, ...], what: str,
             rebuild_hint: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read the arrays `names` and the metadata dict of an .npz written by `save_npz`.

    `what` names the kind of file in messages ("allocation file"), `rebuild_hint` says how
    to make a good one ("rebuild it with tools/lzw_allocate.py").
    """
    path = Path(path)
    if not path.is_file():
        raise L3TrainError(f"{what} {path} does not exist; {rebuild_hint}")
    not_this = f"{path} is not an l3train {what} or is corrupt"
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise L3TrainError(f"{not_this} (a bare .npy array); {rebuild_hint}")
        with archive:
            if not {*names, "metadata"} <= set(archive.files):
                raise L3TrainError(f"{not_this} (missing arrays); {rebuild_hint}")
            arrays = {name: archive[name] for name in names}
            metadata = json.loads(str(archive["metadata"]))
    except L3TrainError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        # json.JSONDecodeError is a ValueError.
        raise L3TrainError(f"{not_this} ({type(err).__name__}: {err}); {rebuild_hint}") from err
    if not isinstance(metadata, dict):
        raise L3TrainError(f"{not_this} (no metadata record); {rebuild_hint}")
    return arrays, metadata
