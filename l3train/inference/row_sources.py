"""Where the rows of an L³ table are read from when they do not live on the compute device.

A token's rows are one contiguous range of the table, so a step's rows are a list of
ranges (one per unique token), each copied with one large copy: `HostRows` holds the
table in host memory, `DiskRows` reads the ranges from the table's .npy file with one
positional read each. (Row by row, e.g. `np.take` over a row index, was slower: a decode
step at batch 16 with 512-row tokens is 16 copies of 256 KiB, or 8,192 of 512 bytes.)

Why positional reads rather than a memory map of the file: a mapped page that was read
stays in the process's resident set until the mapping goes, so over a long generation a
map of a table larger than RAM would account (and compete for) the pages of every token
ever seen; its page faults also hold the GIL, stalling the thread that runs the model.
`os.preadv` copies exactly the requested rows into the staging buffer, releases the GIL,
and leaves caching to the kernel's page cache. The file is a standard .npy, so
`np.load(path, mmap_mode="r")` still opens it for inspection.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class RowSource(Protocol):
    """A table (rows × width) that copies ranges of rows into a host buffer."""

    num_rows: int
    width: int
    dtype: np.dtype

    def read(self, starts: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        """Copy rows starts[i]:starts[i]+counts[i] for every i, back to back, into out[:counts.sum()]."""
        ...

    def close(self) -> None: ...


class HostRows:
    """A table in host memory: a CPU tensor (pageable: rows go to the device through the
    staging buffer, which is the pinned one)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # owns the memory
        self._array = table.numpy()  # a view of it
        self.num_rows, self.width = table.shape
        self.dtype = self._array.dtype

    def read(self, starts: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        ranges = [self._array[start:start + count] for start, count in zip(starts.tolist(), counts.tolist())]
        np.concatenate(ranges, out=out[:int(counts.sum())])

    def close(self) -> None:
        """Nothing to close: the table goes with this object."""


class DiskRows:
    """A table in a .npy file (C order), read with positional reads (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        (self.num_rows, self.width), self.dtype, self.data_offset = read_npy_header(self.path)
        self.row_bytes = self.width * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self._fd)  # also when never closed explicitly

    def read(self, starts: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        first = 0
        for start, count in zip(starts.tolist(), counts.tolist()):
            view = memoryview(out[first:first + count]).cast("B")
            position = self.data_offset + start * self.row_bytes
            while view.nbytes:  # a read may return fewer bytes than asked
                got = os.preadv(self._fd, [view], position)
                if got == 0:
                    raise EOFError(f"{self.path} ends before row {start + count} (truncated?)")
                view, position = view[got:], position + got
            first += count

    def close(self) -> None:
        self._closer()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-order .npy file, without reading the data."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order:
            raise ValueError(f"{path} is in Fortran order; L³ table files are C order")
        return shape, dtype, handle.tell()
