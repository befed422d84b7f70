"""Table placement for generation: the L³ row backend that stages rows, and the prefetcher.

With the `host` or `disk` placement every L³ layer's `rows` backend is a `StagedRowTable`
(swapped in from outside, like the sharded backend in l3train.parallel): it computes the
row attention with the same `plan_lookup` and `attend`, on the rows of the step's tokens
staged by a `RowStager` (l3train.inference.staging). Routing is static, so the rows a step
needs are known as soon as its token ids are: the engine calls `TablePlacement.start_step`
right after sampling, and with prefetch on, a worker thread stages every layer's rows while
the model runs the blocks before the first L³ layer. The layer waits only if its rows are
not staged yet (a stall); a prefetch the worker has not even started by then (the thread
may be waiting for a core) is cancelled and done by the layer itself. Without prefetch the
layer stages its rows itself.

On a CPU model nothing is staged: the row attention reads a token's rows in place
wherever they lie (the CPU kernel, l3train.model.l3_cpu), so each layer computes on its
host tables, or on a read-only memory map of its disk tables, directly (`InPlaceRowTable`),
exactly as with resident tables; staging and prefetch exist to feed a GPU. The pages of
mapped disk tables are released from the process (`DiskRows.release_pages`) whenever the
rows of the distinct tokens seen since the last release pass `MAPPED_BYTES_BUDGET`
(`MappedPages`), so the resident set stays bounded whatever the tables' size.

The staged rows belong to one step: `start_step` returns the ids tensor to give the model,
and a layer uses the prefetched rows only when it is called with that very tensor (same
memory and length; the ticket keeps it alive, so its memory cannot be reused for other
ids). Any other call (a forward nobody announced) waits for the prefetch in flight and
stages its own rows, so a layer never reads rows staged for other ids.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from l3train.errors import L3TrainError
from l3train.inference.row_sources import DiskRows, RowSource
from l3train.inference.staging import RequestChunk, RowStager, StagedChunk
from l3train.model.l3_attention import RowPlan, attend, plan_lookup
from l3train.model.l3_layer import LargeLookupLayer


@dataclass
class PrefetchCounters:
    """What staging cost, summed over the L³ layers (all counted on the model's thread)."""

    tokens: int = 0  # positions given to the model
    lookups: int = 0  # L³ layer calls
    bytes_moved: int = 0  # bytes of rows copied into staging buffers
    stalls: int = 0  # layer calls whose rows were not staged yet when the layer needed them
    wait_s: float = 0.0  # time the layers spent waiting for or staging rows
    extra_chunks: int = 0  # chunks after the first, when a step needed more rows than the buffer
    unannounced: int = 0  # layer calls with ids `start_step` did not announce

    def summary(self) -> dict[str, float]:
        return {**asdict(self), "bytes_per_token": self.bytes_moved / max(self.tokens, 1),
                "stalls_per_lookup": self.stalls / max(self.lookups, 1)}


class StepIds:
    """One forward's token ids as `start_step` announced them. Every L³ layer has the same
    allocation and staging size, so the layers share the step's chunk plan, made by the
    first that needs it (should the worker and the model's thread race, both make the
    same plan)."""

    def __init__(self, ids: Tensor, host_ids: np.ndarray) -> None:
        self.ids = ids  # what the model is given
        self.host_ids = host_ids  # the same ids, flattened, on the host
        self._chunks: list[RequestChunk] | None = None

    def describes(self, token_ids: Tensor) -> bool:
        return token_ids.data_ptr() == self.ids.data_ptr() and token_ids.numel() == self.ids.numel()

    def chunks(self, stager: RowStager) -> list[RequestChunk]:
        if self._chunks is None:
            self._chunks = stager.plan(self.host_ids)
        return self._chunks


@dataclass
class Ticket:
    """One layer's rows for one forward: the step, and the prefetch of its first chunk."""

    step: StepIds
    prefetched: Future[StagedChunk] | None  # None: not prefetched


class StagedRowTable(nn.Module):
    """Row backend of an L³ layer whose tables live in host memory or on disk."""

    def __init__(self, stager: RowStager, counters: PrefetchCounters) -> None:
        super().__init__()
        self.stager, self.counters = stager, counters
        self.ticket: Ticket | None = None
        self.routing_key = ("token ids",)  # the rows are staged per layer; only the ids are shared

    def route(self, token_ids: Tensor, bounds: Tensor) -> Tensor:
        return token_ids

    def announce(self, step: StepIds, prefetch: bool) -> Future[StagedChunk] | None:
        """The next forward's ids; with `prefetch`, the future the prefetch thread will fulfil
        with the staged rows (`stage_in_order`)."""
        self._drain()
        prefetched = None
        if prefetch:
            self.stager.release()
            prefetched = Future()
        self.ticket = Ticket(step, prefetched)
        return prefetched

    def stage_first(self, step: StepIds) -> StagedChunk:
        return self.stager.stage(step.chunks(self.stager)[0])

    def close(self) -> None:
        self._drain()
        self.stager.close()

    def _drain(self) -> None:
        """Drop an unused ticket once its prefetch has finished writing the staging buffer."""
        if self.ticket is not None and self.ticket.prefetched is not None and not self.ticket.prefetched.cancel():
            self.ticket.prefetched.result()
        self.ticket = None

    def _first_staged(self, ticket: Ticket) -> StagedChunk:
        """The ticket's first chunk staged: prefetched, waited for, or staged now. A prefetch
        the worker has not started yet (it may be waiting for a core) is cancelled and done
        here instead, so prefetching never waits longer than staging on the spot."""
        future = ticket.prefetched
        if future is not None and future.done():
            return future.result()
        self.counters.stalls += 1
        started = time.perf_counter()
        if future is not None and not future.cancel():
            staged = future.result()
        else:
            self.stager.release()
            staged = self.stage_first(ticket.step)
        self.counters.wait_s += time.perf_counter() - started
        return staged

    def _stage_now(self, chunk: RequestChunk) -> StagedChunk:
        """A further chunk of a step too large for the buffer, staged once the previous one is used."""
        self.counters.stalls += 1
        started = time.perf_counter()
        self.stager.release()
        staged = self.stager.stage(chunk)
        self.counters.wait_s += time.perf_counter() - started
        return staged

    def _attend(self, x: Tensor, chunk: RequestChunk, staged: StagedChunk) -> tuple[Tensor, Tensor]:
        self.stager.wait(staged)
        self.counters.bytes_moved += chunk.rows * self.stager.row_bytes
        keys, values = staged.tables[0].to(x.dtype), staged.tables[-1].to(x.dtype)  # one table when tied
        if chunk.row_plan is None:  # one plan per step and chunk, for every layer
            chunk.row_plan = plan_lookup(staged.token_ids, staged.bounds, keys.shape[1] + values.shape[1],
                                         table_dtype=keys.dtype)
        return attend(x, keys, values, chunk.row_plan)

    def forward(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Same contract as `LocalRowTable`, with the token ids as the route (the staged rows
        come with their own bounds and plan)."""
        ticket, self.ticket = self.ticket, None
        if ticket is None or not ticket.step.describes(token_ids):
            self.counters.unannounced += 1
            self.ticket = ticket
            self._drain()
            ticket = Ticket(StepIds(token_ids, token_ids.cpu().numpy()), None)
        staged = self._first_staged(ticket)
        chunks = ticket.step.chunks(self.stager)
        self.counters.lookups += 1
        if len(chunks) == 1:
            return self._attend(x, chunks[0], staged)
        self.counters.extra_chunks += len(chunks) - 1
        results = []
        for index, chunk in enumerate(chunks):
            staged = staged if index == 0 else self._stage_now(chunk)
            results.append((staged.positions, *self._attend(x[staged.positions], chunk, staged)))
        out = x.new_empty(x.shape[0], results[0][1].shape[1])
        entropy = results[0][2].new_empty(x.shape[0])
        for positions, chunk_out, chunk_entropy in results:
            out[positions], entropy[positions] = chunk_out, chunk_entropy
        return out, entropy


MAPPED_BYTES_BUDGET = 512 << 20  # what a model's memory-mapped disk tables may add to its resident set


class MappedPages:
    """Keeps the pages that a CPU model's memory-mapped disk tables add to its resident set
    under `MAPPED_BYTES_BUDGET`, for all its L³ layers together (they share the allocation,
    so a step touches the same rows of each). Each forward's token ids are recorded; an
    upper bound (positions × the largest token's rows) costs nothing per step, and only when
    it passes the budget are the distinct tokens since the last release counted exactly. Only
    if those pass it too are the maps' pages released (`DiskRows.release_pages`), so a hot
    set of tokens below the budget stays mapped however long the generation."""

    def __init__(self, sources: list[DiskRows], bounds: np.ndarray) -> None:
        self.sources, self.bounds = sources, bounds
        self.row_bytes = sum(source.row_bytes for source in sources)  # one row of every mapped table
        self.largest = int(np.diff(bounds).max())
        self.recorded: list[np.ndarray] = []  # token ids since the last release
        self.upper_bound = 0  # ≥ the bytes they map
        self.releases = 0

    def record(self, token_ids: Tensor) -> None:
        """The token ids of the forward about to run (a CPU tensor)."""
        if not self.sources:
            return
        ids = token_ids.reshape(-1).numpy().copy()  # the caller may reuse the tensor
        self.recorded.append(ids)
        self.upper_bound += ids.size * self.largest * self.row_bytes
        if self.upper_bound <= MAPPED_BYTES_BUDGET:
            return
        tokens = np.unique(np.concatenate(self.recorded))
        if self._bytes(tokens) > MAPPED_BYTES_BUDGET:
            for source in self.sources:
                source.release_pages()
            self.releases += 1
            tokens = np.unique(ids)  # what this forward maps in again
        self.recorded, self.upper_bound = [tokens], self._bytes(tokens)

    def _bytes(self, tokens: np.ndarray) -> int:
        return int((self.bounds[tokens + 1] - self.bounds[tokens]).sum()) * self.row_bytes


class InPlaceRowTable(nn.Module):
    """A CPU model's row backend over host or disk tables, computed on in place (no staging):
    the key table, and the value table when untied. `pages` bounds what mapped disk tables
    add to the resident set (shared by the model's layers)."""

    def __init__(self, sources: list[RowSource], pages: MappedPages) -> None:
        super().__init__()
        self.sources, self.pages = sources, pages
        tables = [source.in_place() for source in sources]
        self.keys, self.values = tables[0], tables[-1]  # the same tensor when tied
        self.routing_key = ("in-place rows", self.keys.shape[1] + self.values.shape[1])

    def route(self, token_ids: Tensor, bounds: Tensor) -> RowPlan:
        """Once per forward for the layers that share it (l3train.model.l3_layer.LookupRoutes)."""
        self.pages.record(token_ids)
        return plan_lookup(token_ids, bounds, self.routing_key[1], table_dtype=self.keys.dtype)

    def forward(self, x: Tensor, route: RowPlan) -> tuple[Tensor, Tensor]:
        out, entropy = attend(x.to(self.keys.dtype), self.keys, self.values, route)
        return out.to(x.dtype), entropy

    def close(self) -> None:
        for source in self.sources:
            source.close()


def stage_in_order(step: StepIds, jobs: list[tuple[StagedRowTable, Future[StagedChunk]]]) -> None:
    """The prefetch thread's work for one step: stage each layer's rows, in the order the
    model runs the layers, and fulfil its future (the executor protocol of `Future`). One job
    per step, not per layer: on a busy CPU every wake-up of the thread can cost the model's
    thread its core. A future the layer has cancelled meanwhile is skipped: the layer
    staged those rows itself."""
    for backend, future in jobs:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(backend.stage_first(step))
            except BaseException as error:  # handed to the layer, which re-raises it (as executors do)
                future.set_exception(error)


class TablePlacement:
    """The staged row backends of a model's L³ layers (none when the tables are resident or
    computed on in place), the prefetch thread, the counters, and the in-place backends."""

    def __init__(self, device: torch.device, backends: list[StagedRowTable] = (), prefetch: bool = True,
                 counters: PrefetchCounters | None = None, in_place: list[InPlaceRowTable] = ()) -> None:
        self.device, self.backends, self.in_place = device, list(backends), list(in_place)
        self.counters = counters or PrefetchCounters()
        # One thread, one job per step: it stages the layers' rows in the order the model needs them.
        self.prefetcher = (ThreadPoolExecutor(1, thread_name_prefix="l3-prefetch")
                           if prefetch and self.backends else None)

    @classmethod
    def install(cls, layers: list[LargeLookupLayer], tables: list[list[RowSource]], bounds: np.ndarray,
                staging_rows: int, prefetch: bool, device: torch.device, in_place: bool = True) -> TablePlacement:
        """Swap each layer's row backend for a `StagedRowTable` over its tables (the key table,
        and the value table when untied), or on a CPU model with `in_place` for an
        `InPlaceRowTable`; `bounds` are the allocation's (every layer's)."""
        largest = int(np.diff(bounds).max())
        if staging_rows < largest:  # checked where nothing is staged too: a config means the same everywhere
            raise L3TrainError(f"staging rows {staging_rows} cannot hold the {largest} rows of the largest token; "
                               f"use at least {largest}")
        if device.type == "cpu" and in_place:
            pages = MappedPages([source for sources in tables for source in sources if isinstance(source, DiskRows)],
                                bounds)
            for layer, layer_tables in zip(layers, tables):
                layer.rows = InPlaceRowTable(layer_tables, pages)
            return cls(device, in_place=[layer.rows for layer in layers])
        counters = PrefetchCounters()
        backends = []
        for layer, layer_tables in zip(layers, tables):
            layer.rows = StagedRowTable(RowStager(layer_tables, bounds, staging_rows, device), counters)
            backends.append(layer.rows)
        return cls(device, backends, prefetch, counters)

    def start_step(self, token_ids: Tensor) -> Tensor:
        """Announce the next forward's token ids (batch, seq; on the CPU) as soon as they are
        known; returns the tensor to give the model. With prefetch, staging starts now."""
        step = StepIds(token_ids.to(self.device), token_ids.reshape(-1).numpy())
        self.counters.tokens += token_ids.numel()
        futures = [backend.announce(step, self.prefetcher is not None) for backend in self.backends]
        if self.prefetcher is not None:
            self.prefetcher.submit(stage_in_order, step, list(zip(self.backends, futures)))
        return step.ids

    def close(self) -> None:
        """Wait for staging in flight, stop the thread, close the table files."""
        for backend in [*self.backends, *self.in_place]:
            backend.close()
        if self.prefetcher is not None:
            self.prefetcher.shutdown()
