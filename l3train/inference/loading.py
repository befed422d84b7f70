"""Load a checkpoint for generation, with its L³ tables where the inference config puts them.

The model is built by `build_model` with its L³ tables deferred (on the meta device), so no
table is allocated or initialised on the way: with the `host` or `disk` placement each L³
layer's row backend is swapped for a `StagedRowTable` over tables read from the checkpoint
in row chunks (into host memory, or into the table files of l3train.inference.disk_tables),
and only the remaining tensors go to the compute device and are loaded. Peak memory
therefore stays below the tables' size with the disk placement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from l3train.checkpoint.consolidated import load_weights, plain_state_dict
from l3train.checkpoint.reader import CheckpointTensors
from l3train.inference.config import InferenceConfig
from l3train.inference.disk_tables import DEFAULT_TABLE_DIR, disk_table, table_key
from l3train.inference.placement import TablePlacement
from l3train.inference.row_sources import DiskRows, HostRows, RowSource
from l3train.model.build import build_model
from l3train.model.l3_layer import LargeLookupLayer, bounds_from_rows
from l3train.model.llama import DecoderLM

ROWS_PER_CHUNK = 1 << 14  # rows per read when a table is copied out of a checkpoint


def _table_names(model: DecoderLM) -> list[tuple[LargeLookupLayer, list[str]]]:
    """Each L³ layer with the names of its tables (the key table, then the value table when untied)."""
    return [(module, [f"{name}.rows.{table}" for table, _ in module.rows.named_parameters()])
            for name, module in model.named_modules() if isinstance(module, LargeLookupLayer)]


def _row_source(checkpoint: CheckpointTensors, name: str, shape: tuple[int, int], config: InferenceConfig) -> RowSource:
    """Table `name` of the checkpoint in host memory, or in its table file. Host tables are
    ordinary (pageable) memory also for a CUDA model: a step's rows are copied from them into
    the staging buffer, and only that buffer is pinned and copied to the device (pinning whole
    tables would lock their size, rounded up to a power of two, in RAM for nothing)."""
    dtype = np.dtype(np.float32)
    if config.placement == "host":
        table = torch.empty(shape, dtype=torch.float32)
        start = 0
        for chunk in checkpoint.row_chunks(name, ROWS_PER_CHUNK):
            table[start:start + len(chunk)] = torch.from_numpy(chunk)
            start += len(chunk)
        return HostRows(table)
    table_dir = Path(config.table_dir) if config.table_dir else DEFAULT_TABLE_DIR
    path = disk_table(table_dir, table_key(checkpoint.files, name, shape, dtype), shape, dtype,
                      checkpoint.row_chunks(name, ROWS_PER_CHUNK),
                      {"checkpoint": str(Path(checkpoint.directory).resolve()), "tensor": name})
    return DiskRows(path)


def load_for_generation(checkpoint: CheckpointTensors, config: InferenceConfig,
                        device: torch.device) -> tuple[DecoderLM, TablePlacement]:
    """The checkpoint's model on `device` in eval mode, its L³ tables placed as `config` says."""
    cfg = checkpoint.config
    # The constructor makes what is computed, not loaded (RoPE tables, the tied output, the L³
    # bounds from the allocation, which the checkpoint's must then equal); the tables stay on
    # the meta device until their placement gives them memory.
    model, allocation = build_model(cfg, defer_rows=True)
    layers = _table_names(model)
    if config.placement == "resident" or not layers:
        for layer, _ in layers:
            layer.rows.to_empty(device=device)  # filled from the checkpoint below
        placement = TablePlacement(device)
    else:
        shapes = {name: tuple(table.shape) for name, table in model.state_dict().items()}
        tables = [[_row_source(checkpoint, name, shapes[name], config) for name in names]
                  for _, names in layers]
        placement = TablePlacement.install([layer for layer, _ in layers], tables,
                                           bounds_from_rows(allocation.rows_per_token).numpy(), config.staging_rows,
                                           config.prefetch, device, config.in_place)
    model.to(device)
    source = str(checkpoint.directory)
    load_weights(model, {name: checkpoint.tensor(name) for name in plain_state_dict(model, cfg.model.tie_embeddings)},
                 cfg.model.tie_embeddings, source)
    return model.eval(), placement
