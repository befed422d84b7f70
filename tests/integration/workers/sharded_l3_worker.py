"""torchrun worker: a sharded L³ layer (rows partitioned over TP×DP) against the full layer.

Every rank builds the same full layer and the same global batch; DP replica r takes its
slice of positions, TP ranks of one replica share it. Checks, per rank: outputs equal the
full layer's, the rank's row gradients equal the matching rows of the full layer's
gradient of the mean replica loss, DP-averaged dense gradients equal the full ones, and
the rank stores only its shard's rows. Then two sharded layers run one after the other on
one `LookupRoutes`: they share one route, and outside building it their forward and
backward make no host synchronisation (`HostSyncCounter`). Writes a JSON report per rank
and case (failures listed in it, an exception's traceback included).

Usage: sharded_l3_worker.py REPORT_DIR TP:tied|untied [TP:tied|untied ...]: the cases run in
one world, each writes REPORT_DIR/<TP>_<kv>/rank<r>.json.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from l3train.model.l3_layer import LargeLookupLayer, LookupRoutes
from l3train.parallel.shard_plan import plan_shards
from l3train.parallel.sharded_l3 import shard_lookup_layer
from l3train.parallel.state import ParallelState
from l3train.utils.host_sync import HostSyncCounter
from training_harness import finish_worker


def check_routes_are_shared_and_layers_never_sync(first, full, plan, state, ids, x, failures) -> list[str]:
    """Two sharded layers on one micro-batch's routes; returns the route's host syncs."""
    second = LargeLookupLayer(full.bounds.diff().numpy(), d_in=x.shape[1], d_emb=first.rows_width[1], d_up=24,
                              tied_kv=first.tied_kv).double()
    second.load_state_dict(full.state_dict())
    shard_lookup_layer(second, plan, state)
    routes, syncs = LookupRoutes(ids), HostSyncCounter()
    with syncs:
        route = routes.route_for(first)
    route_syncs = list(syncs.calls)
    with syncs:
        hidden, _ = first(x.clone().requires_grad_(), routes)
        out, _ = second(hidden, routes)
        out.square().sum().backward()
    if routes.route_for(second) is not route:
        failures.append("the two layers built separate routes")
    if syncs.calls[len(route_syncs):]:
        failures.append(f"host syncs inside the layers: {syncs.calls[len(route_syncs):]}")
    if not route_syncs:
        failures.append("building the route made no host sync (the counter sees nothing?)")
    return route_syncs


def check_case(tp_size: int, tied: bool, report_dir: Path) -> None:
    """One layout of the world's ranks (TP × DP); writes this rank's report to report_dir."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_size = world // tp_size
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    tp_groups = [dist.new_group([d * tp_size + t for t in range(tp_size)]) for d in range(dp_size)]
    dp_groups = [dist.new_group([d * tp_size + t for d in range(dp_size)]) for t in range(tp_size)]

    vocab, d_model, per_replica = 64, 16, 96
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 40, (vocab,), generator=gen).numpy()
    rows[5] = 512
    frequencies = np.random.default_rng(0).zipf(1.3, vocab).clip(max=10_000)
    torch.manual_seed(1)
    full = LargeLookupLayer(rows, d_in=d_model, d_emb=d_model if tied else 8, d_up=24, tied_kv=tied).double()
    sharded = LargeLookupLayer(rows, d_in=d_model, d_emb=d_model if tied else 8, d_up=24, tied_kv=tied).double()
    sharded.load_state_dict(full.state_dict())
    plan = plan_shards(rows, frequencies, tp_size * dp_size)
    state = ParallelState(tp_rank, tp_size, tp_groups[dp_rank], dp_rank, dp_size, dp_groups[tp_rank])
    backend = shard_lookup_layer(sharded, plan, state)

    ids = torch.randint(0, vocab, (dp_size * per_replica,), generator=gen)
    ids[:20] = 5
    x = torch.randn(dp_size * per_replica, d_model, generator=gen, dtype=torch.float64)
    weights = torch.randn(dp_size * per_replica, d_model, generator=gen, dtype=torch.float64)

    def replica_loss(layer, r, x_r):
        span = slice(r * per_replica, (r + 1) * per_replica)
        return (layer(x_r, ids[span])[0] * weights[span]).sum() / per_replica

    x_full = x.clone().requires_grad_()
    total = sum(replica_loss(full, r, x_full[r * per_replica:(r + 1) * per_replica]) for r in range(dp_size))
    (total / dp_size).backward()

    x_local = x[dp_rank * per_replica:(dp_rank + 1) * per_replica].clone().requires_grad_()
    replica_loss(sharded, dp_rank, x_local).backward()
    failures = []

    def check(name, got, want):
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        if error > 1e-10:
            failures.append(f"{name}: relative error {error:.3g}")

    span = slice(dp_rank * per_replica, (dp_rank + 1) * per_replica)
    check("output", sharded(x_local.detach(), ids[span])[0], full(x[span], ids[span])[0])
    check("grad x", x_local.grad, x_full.grad[span] * dp_size)
    shard = dp_rank * tp_size + tp_rank
    own_rows = torch.as_tensor(plan.global_row_indices(shard))
    # The rows' gradient is the sum over the ranks they served; their optimizer applies the
    # DP average (gradient_scale = 1/DP) at the accumulation boundary.
    if backend.gradient_scale != 1 / dp_size:
        failures.append(f"gradient scale {backend.gradient_scale}, expected 1/{dp_size}")
    check("grad key rows", backend.local.keys.grad / dp_size, full.rows.key_table.grad[own_rows])
    if not tied:
        check("grad value rows", backend.local.values.grad / dp_size, full.rows.value_table.grad[own_rows])
    if any(name.endswith("_table") for name, _ in sharded.named_parameters()):
        failures.append("the sharded tables are still parameters of the layer")
    for name, param in sharded.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=dp_groups[tp_rank])  # what DDP/ZeRO does for replicated parameters
        check(f"grad {name}", grad / dp_size, dict(full.named_parameters())[name].grad)
    route_syncs = check_routes_are_shared_and_layers_never_sync(sharded, full, plan, state, ids[span],
                                                                x_local.detach(), failures)
    stored = backend.local.keys.shape[0]
    expected = int(plan.rows_per_shard()[shard])
    if stored != expected:
        failures.append(f"stores {stored} rows, plan says {expected}")
    report = {"rank": rank, "rows_stored": stored, "rows_total": int(rows.sum()),
              "rows_max_over_mean": float(plan.rows_per_shard().max() / plan.rows_per_shard().mean()),
              "route_host_syncs": route_syncs, "failures": failures}
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    """Each case in the same world, one after the other (a world costs seconds to start): an
    exception in one is written as that case's failure and the next case still runs."""
    dist.init_process_group("gloo")
    for case in sys.argv[2:]:
        tp_size, kv = case.split(":")
        report_dir = Path(sys.argv[1]) / case.replace(":", "_")
        report_dir.mkdir(parents=True, exist_ok=True)
        try:
            check_case(int(tp_size), kv == "tied", report_dir)
        except Exception:  # noqa: BLE001  (reported per case; the test names it)
            report = {"rank": dist.get_rank(), "failures": [traceback.format_exc()]}
            (report_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
        dist.barrier()
    finish_worker()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
