"""Staging: the rows one step needs, copied from a table's source into a bounded buffer.

For a step's token ids (known before the model runs), `plan_chunks` finds the unique
tokens (sorted), their row ranges in the global table, and each position's index among
them; the unique tokens' rows, back to back, form a small table with its own bounds, on
which the row attention (`plan_lookup`, `attend`) computes exactly what it computes on the global table
(the plan of the block-diagonal attention depends only on the tokens' order and row
counts, which the local table preserves), so the results are bit-identical.

The staging buffer holds `capacity` rows. A step whose unique tokens need more rows is
split into chunks of consecutive tokens (by id) that each fit; the layer then computes
chunk after chunk on the same buffer (equal to one pass up to float rounding, because the
attention batches the blocks differently). A single token never needs more than k rows,
and the capacity is checked to hold that.

`RowStager.stage` fills the buffer and hands it to the compute device: on CPU the buffer
is what the layer computes on (`CpuTransfer`); on CUDA the buffer is pinned host memory,
copied to a device buffer on a side stream, and an event tells the compute stream when
the rows have arrived (`CudaTransfer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from l3train.inference.row_sources import RowSource
from l3train.model.l3_attention import RowPlan


@dataclass
class RequestChunk:
    """Rows for some of a step's positions: their tokens' ranges of the global table."""

    positions: np.ndarray | None  # indices into the step's flattened ids; None: all of them
    local_ids: np.ndarray  # (positions,) each position's token as an index into this chunk's tokens
    starts: np.ndarray  # first global row of each token (ascending token ids)
    counts: np.ndarray  # rows of each token
    local_bounds: np.ndarray  # (tokens + 1,) token i owns local rows local_bounds[i]:local_bounds[i+1]
    # The row attention's plan over the local table, made by the first layer that attends and
    # reused by the others (all share the allocation and the widths, so the plan is the same).
    row_plan: RowPlan | None = None

    @property
    def rows(self) -> int:
        return int(self.local_bounds[-1])


def _chunk(positions: np.ndarray | None, local_ids: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> RequestChunk:
    local_bounds = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=local_bounds[1:])
    return RequestChunk(positions, local_ids, starts, counts, local_bounds)


def plan_chunks(token_ids: np.ndarray, bounds: np.ndarray, capacity: int) -> list[RequestChunk]:
    """The chunks staging the rows of `token_ids` (flattened) takes, each at most `capacity` rows."""
    tokens, local_ids = np.unique(token_ids, return_inverse=True)
    starts = bounds[tokens]
    counts = bounds[tokens + 1] - starts
    if counts.sum() <= capacity:
        return [_chunk(None, local_ids, starts, counts)]
    groups, first, used = [], 0, 0
    for index, count in enumerate(counts.tolist()):
        if used + count > capacity:
            groups.append((first, index))
            first, used = index, 0
        used += count
    groups.append((first, len(counts)))
    chunks = []
    for first, end in groups:
        positions = np.flatnonzero((local_ids >= first) & (local_ids < end))
        chunks.append(_chunk(positions, local_ids[positions] - first, starts[first:end], counts[first:end]))
    return chunks


@dataclass
class StagedChunk:
    """A chunk's rows and indices on the compute device, ready once `ready` (CUDA) has fired."""

    positions: Tensor | None
    token_ids: Tensor  # local ids
    bounds: Tensor  # local bounds
    tables: list[Tensor]  # the staged key rows, and value rows when untied
    ready: torch.cuda.Event | None = None


def _index_tensors(chunk: RequestChunk, device: torch.device) -> dict[str, Tensor | None]:
    def move(array: np.ndarray) -> Tensor:
        return torch.from_numpy(array).to(device, non_blocking=True)

    return {"positions": None if chunk.positions is None else move(chunk.positions),
            "token_ids": move(chunk.local_ids), "bounds": move(chunk.local_bounds)}


class CpuTransfer:
    """On a CPU compute device the staging buffers are what the layer reads: nothing to copy."""

    def __init__(self, capacity: int, widths: list[int], dtype: torch.dtype) -> None:
        # torch.empty does not touch the memory: only the rows actually staged become resident.
        self.buffers = [torch.empty(capacity, width, dtype=dtype) for width in widths]
        self.arrays = [buffer.numpy() for buffer in self.buffers]  # the same memory

    def host_buffers(self) -> list[np.ndarray]:
        return self.arrays

    def send(self, chunk: RequestChunk) -> StagedChunk:
        return StagedChunk(**_index_tensors(chunk, torch.device("cpu")),
                           tables=[buffer[:chunk.rows] for buffer in self.buffers])

    def release(self) -> None:
        """Nothing to do: on CPU the layer has finished reading the buffers when it returns."""

    def wait(self, staged: StagedChunk) -> None:
        """Nothing to do: `send` returns after the rows are in place."""


class CudaTransfer:
    """Pinned host buffers, copied to device buffers on a side stream; events order the streams.

    Two hazards, two events: the pinned buffers must not be refilled before the previous
    copy out of them has finished (`copied`, waited for on the host), and the device buffers
    must not be overwritten before the compute stream has finished reading them
    (`released`, recorded on the compute stream, waited for by the side stream)."""

    def __init__(self, capacity: int, widths: list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.host = [torch.empty(capacity, width, dtype=dtype, pin_memory=True) for width in widths]
        self.buffers = [torch.empty(capacity, width, dtype=dtype, device=device) for width in widths]
        self.copied: torch.cuda.Event | None = None
        self.released: torch.cuda.Event | None = None

    def host_buffers(self) -> list[np.ndarray]:
        if self.copied is not None:
            self.copied.synchronize()
        return [buffer.numpy() for buffer in self.host]

    def send(self, chunk: RequestChunk) -> StagedChunk:
        with torch.cuda.stream(self.stream):
            if self.released is not None:
                self.stream.wait_event(self.released)
            tables = [buffer[:chunk.rows].copy_(host[:chunk.rows], non_blocking=True)
                      for buffer, host in zip(self.buffers, self.host)]
            indices = _index_tensors(chunk, self.device)
            self.copied = torch.cuda.Event()
            self.copied.record(self.stream)
        return StagedChunk(**indices, tables=tables, ready=self.copied)

    def release(self) -> None:
        """Called on the thread that runs the model: what it has queued so far is the last use
        of the device buffers before they are refilled."""
        self.released = torch.cuda.Event()
        self.released.record(torch.cuda.current_stream(self.device))

    def wait(self, staged: StagedChunk) -> None:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(staged.ready)
        # The index tensors were allocated on the side stream and are used on this one.
        for tensor in (staged.positions, staged.token_ids, staged.bounds):
            if tensor is not None:
                tensor.record_stream(stream)


class RowStager:
    """Stages the rows of one L³ layer's tables (keys, and values when untied) for the compute device."""

    def __init__(self, tables: list[RowSource], bounds: np.ndarray, capacity: int, device: torch.device) -> None:
        self.tables, self.bounds, self.capacity = tables, bounds, capacity
        widths = [table.width for table in tables]
        dtype = torch.from_numpy(np.empty(0, dtype=tables[0].dtype)).dtype
        self.transfer = (CudaTransfer(capacity, widths, dtype, device) if device.type == "cuda"
                         else CpuTransfer(capacity, widths, dtype))
        self.row_bytes = sum(table.width * table.dtype.itemsize for table in tables)

    def plan(self, token_ids: np.ndarray) -> list[RequestChunk]:
        return plan_chunks(token_ids, self.bounds, self.capacity)

    def stage(self, chunk: RequestChunk) -> StagedChunk:
        """Copy the chunk's rows into the staging buffers and send them to the compute device
        (runs on the prefetch thread, or on the model's thread when not prefetched)."""
        for table, buffer in zip(self.tables, self.transfer.host_buffers()):
            table.read(chunk.starts, chunk.counts, buffer)
        return self.transfer.send(chunk)

    def release(self) -> None:
        self.transfer.release()

    def wait(self, staged: StagedChunk) -> None:
        self.transfer.wait(staged)

    def close(self) -> None:
        for table in self.tables:
            table.close()
