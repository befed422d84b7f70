"""Where the rows of an L³ table are read from when they do not live on the compute device.

A token's rows are one contiguous range of the table, so a step's rows are a list of
ranges (one per unique token), each copied with one large copy: `HostRows` holds the
table in host memory, `DiskRows` reads the ranges from the table's .npy file with one
positional read each. (Row by row, e.g. `np.take` over a row index, was slower: a decode
step at batch 16 with 512-row tokens is 16 copies of 256 KiB, or 8,192 of 512 bytes.)
That copy is what a GPU model is fed from (l3train.inference.staging).

A CPU model copies nothing: its row-attention kernel reads a token's rows wherever they
lie, so each source also gives its whole table as a CPU tensor to compute on in place
(`in_place`): the host table itself, or for a disk table a read-only memory map of the
file. The map's pages are the kernel's page cache (the same pages a positional read
copies from), but a page that was touched through the map stays in the process's
resident set until it is released, so over a long generation the map of a table larger
than RAM would account for every token ever seen. `DiskRows.release_pages` drops them from
the process (not from the page cache: the next touch maps them again without reading the
disk); `MappedPages` (l3train.inference.placement) calls it when the rows of the distinct
tokens seen since the last release pass a budget, which bounds the resident set.
The kernel runs without the GIL (ctypes), so its page faults do not stall other threads.
The file is a standard .npy, so `np.load(path, mmap_mode="r")` also opens it.
"""

from __future__ import annotations

import mmap
import os
import warnings
import weakref
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from l3train.errors import L3TrainError


class RowSource(Protocol):
    """A table (rows × width) that copies ranges of rows into a host buffer (staging), or gives
    itself whole to compute on in place (a CPU model)."""

    num_rows: int
    width: int
    dtype: np.dtype

    def read(self, starts: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        """Copy rows starts[i]:starts[i]+counts[i] for every i, back to back, into out[:counts.sum()]."""
        ...

    def in_place(self) -> torch.Tensor:
        """The whole table as a CPU tensor that a CPU model computes on without copying rows."""
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

    def in_place(self) -> torch.Tensor:
        return self.table

    def close(self) -> None:
        """Nothing to close: the table goes with this object."""


class DiskRows:
    """A table in a .npy file (C order), read with positional reads or mapped (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        (self.num_rows, self.width), self.dtype, self.data_offset = read_npy_header(self.path)
        self.row_bytes = self.width * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self._fd)  # also when never closed explicitly
        self._map: mmap.mmap | None = None

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

    def in_place(self) -> torch.Tensor:
        """The table as a read-only tensor over a memory map of the file (nothing is read yet:
        pages come from the page cache, or the disk, on first touch). Never written to:
        generation runs without gradients."""
        if self._map is None:
            end = self.data_offset + self.num_rows * self.row_bytes
            size = os.fstat(self._fd).st_size
            if size < end:  # touching a page past the end of a mapped file kills the process (SIGBUS)
                raise L3TrainError(f"{self.path} has {size:,} bytes, its header describes {end:,} (truncated?); "
                                   f"delete it and it is written again from the checkpoint")
            self._map = mmap.mmap(self._fd, end, access=mmap.ACCESS_READ)  # keeps its own descriptor
        with warnings.catch_warnings():  # "not writable": nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=torch.from_numpy(np.empty(0, self.dtype)).dtype,
                                    count=self.num_rows * self.width, offset=self.data_offset)
        return flat.view(self.num_rows, self.width)

    def release_pages(self) -> None:
        """Drop from the process's resident set the pages `in_place`'s map holds."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Close the file; a map given out by `in_place` lives on while its tensors do."""
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
