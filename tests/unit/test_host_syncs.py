"""Routing once per micro-batch, and no host synchronisation inside an L³ layer.

`HostSyncCounter` records, on CPU, the calls that would make the host wait for a GPU
(torch.cuda.set_sync_debug_mode's job on a GPU). A model with two L³ layers must build its
lookup route once per forward pass, and every host sync of forward and backward must come
from that route: none from the layers, none from backward, none from recomputation. The
sharded path's equivalent runs on 2 ranks in tests/integration/test_sharded_l3.py, the
Triton path's in tests/unit/test_l3_triton.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l3train.config import L3Config, ModelConfig
from l3train.model.l3_layer import LocalRowTable
from l3train.model.llama import DecoderLM
from l3train.parallel.recompute import apply_recompute
from l3train.utils.host_sync import HostSyncCounter

CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48,
                     max_seq_len=16)


def test_counter_sees_each_kind_of_host_sync():
    ids = torch.tensor([3, 1, 3, 2])
    with HostSyncCounter() as syncs:
        int(ids.sum())
        ids.tolist()
        ids.numpy()
        torch.nonzero(ids)
        ids[ids > 1]
        torch.unique_consecutive(ids)
        torch.repeat_interleave(ids)
        torch.bincount(ids)
    assert len(syncs.calls) == 8, syncs.calls
    with HostSyncCounter() as syncs:
        torch.repeat_interleave(ids, output_size=9)
        order = torch.argsort(ids, stable=True)
        ids[order].cumsum(0).index_add_(0, order, ids)
    assert syncs.calls == []


@pytest.mark.parametrize("recompute", ["none", "blocks"])
def test_routes_are_built_once_per_micro_batch_and_layers_never_sync(monkeypatch, recompute):
    rows = np.random.default_rng(0).integers(1, 9, CONFIG.vocab_size)
    torch.manual_seed(0)
    model = DecoderLM(CONFIG, L3Config(after_blocks=[0, 2], d_emb=32, d_up=40, allocation="a"), rows)
    apply_recompute(model, recompute)
    syncs = HostSyncCounter()
    route_calls, route_syncs = [], []
    original_route = LocalRowTable.route

    def counted_route(self, token_ids, bounds):
        before = len(syncs.calls)
        route = original_route(self, token_ids, bounds)
        route_calls.append(route)
        route_syncs.extend(syncs.calls[before:])
        return route

    monkeypatch.setattr(LocalRowTable, "route", counted_route)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    for micro_batch in range(2):
        route_calls.clear()
        with syncs:
            model(tokens).logits.square().mean().backward()
        assert len(route_calls) == 1  # one route for both layers, forward, backward and recomputation
    assert route_syncs, "the route reads sizes on the host (or the counter saw nothing)"
    assert syncs.calls == route_syncs  # nothing else synchronised: not the layers, not backward
