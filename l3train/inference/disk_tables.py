"""L³ tables as files for the disk placement: written once from a checkpoint, then reused.

Each table is `<table_dir>/<key>.npy` (a standard C-order .npy, written atomically) next to
`<key>.json` (written after it: what the file holds and where it came from). The key is a
hash of the checkpoint's manifest (every file's size and CRC-32), the tensor's name, shape
and dtype, so a file is reused exactly when it was made from the same tensor of the same
checkpoint, and a retrained or edited checkpoint gets new files. Writing streams the
table in row chunks, so it never holds a whole table in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from l3train.inference.row_sources import read_npy_header
from l3train.utils.atomic import atomic_path, atomic_write_text

DEFAULT_TABLE_DIR = Path.home() / ".cache" / "l3train" / "l3_tables"


def table_key(checkpoint_files: dict[str, Any], name: str, shape: tuple[int, int], dtype: np.dtype) -> str:
    """The identity of tensor `name` of the checkpoint whose manifest lists `checkpoint_files`."""
    identity = json.dumps({"files": checkpoint_files, "tensor": name, "shape": list(shape), "dtype": dtype.str},
                          sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def _is_complete(npy: Path, meta: Path, key: str, shape: tuple[int, int], dtype: np.dtype) -> bool:
    if not (npy.is_file() and meta.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())
        found_shape, found_dtype, offset = read_npy_header(npy)
    except (OSError, ValueError):
        return False
    return (recorded.get("key") == key and tuple(found_shape) == tuple(shape) and found_dtype == dtype
            and npy.stat().st_size == offset + shape[0] * shape[1] * dtype.itemsize)


def disk_table(table_dir: Path, key: str, shape: tuple[int, int], dtype: np.dtype,
               row_chunks: Iterable[np.ndarray], description: dict[str, Any]) -> Path:
    """The .npy file of table `key`: the existing one when it is complete and matches, else
    written from `row_chunks` (consecutive row blocks of the table, consumed only when writing)."""
    npy, meta = table_dir / f"{key}.npy", table_dir / f"{key}.json"
    if _is_complete(npy, meta, key, shape, dtype):
        return npy
    with atomic_path(npy) as staging:
        with open(staging, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                          "fortran_order": False, "shape": tuple(shape)})
            rows = 0
            for chunk in row_chunks:
                handle.write(np.ascontiguousarray(chunk, dtype=dtype).data)
                rows += len(chunk)
        if rows != shape[0]:
            raise ValueError(f"table {description} gave {rows} rows, expected {shape[0]}")
    atomic_write_text(meta, json.dumps({"key": key, "shape": list(shape), "dtype": dtype.str, **description},
                                       indent=1) + "\n")
    return npy
