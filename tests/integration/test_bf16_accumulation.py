"""bf16 gradients accumulated and reduced in fp32: DeepSpeed's dense gradients (ZeRO 2 and 3,
the data types of `deepspeed_adapter.engine_config`) and the sharded L³ rows, plus the global
clipping of both, on real DeepSpeed engines.

This file is also the worker (run under torchrun): it trains on whatever device
`l3train.distributed.init_distributed` picks, so the test runs it on 2 gloo ranks with GPUs
hidden, and tools/gpu_check.sh runs it as a world of one over NCCL on a GPU. Rank 0 prints
every figure and a FAILED line per broken bound, and the worker exits 1 if there is one.

What is measured, over 8 micro-batches (gradient accumulation) per rank:
- dense: the gradient DeepSpeed applies (the fp32 master weights' change under SGD with
  lr 1) against the exact fp64 sum of the same bf16 per-micro-batch gradients, averaged
  over the ranks. With l3train's data types the error is fp32 rounding; with DeepSpeed's
  defaults (bf16 sum, bf16 all-reduce) it is bf16 rounding, which the worker also measures.
  The adapter's pre-step norm must equal the reference norm.
- rows: the accumulated gradient of this rank's shard against an fp64 lookup given the
  same bf16 positions and upstream gradients; the old scheme (tables cast to bf16 for the
  lookup, so each micro-batch's gradient was bf16) is measured beside it.
- clipping: the L³ layer's dense parts in the engine and its rows sharded, clipped by the
  global norm to a quarter; the applied dense step and the rows' gradients must be a quarter
  of the unclipped ones, and the norm that of both together.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_harness import REPO, finish_worker, free_port, trainer_env

MICRO_BATCHES = 8
# Relative error (Frobenius norm of the difference over that of the reference) allowed with
# fp32 accumulation: fp32 rounding of 8 additions and the all-reduce (measured ~1e-6).
FP32_ACCUMULATION_BOUND = 1e-5
# The bf16 schemes must be clearly worse (measured ~3e-3 for the dense gradients): at least
# ten times the bound above.
BF16_ACCUMULATION_FLOOR = 1e-4
# The clipped step against a quarter of the unclipped one: the fp32 master weights' change
# (a difference of nearby fp32 numbers) and the ratio of two fp32 norms.
CLIP_BOUND = 1e-4


def relative_error(got: list, want: list) -> float:
    """‖got − want‖ / ‖want‖ over a list of tensors (fp64, on the host)."""
    got = [g.detach().double().cpu() for g in got]
    want = [w.detach().double().cpu() for w in want]
    difference = sum(float((g - w).square().sum()) for g, w in zip(got, want))
    return (difference / max(sum(float(w.square().sum()) for w in want), 1e-300)) ** 0.5


def _config(world: int, stage: int, max_norm: float):
    from l3train.config import config_from_dict, validate_for_world

    cfg = config_from_dict({}, ["training.precision=bf16", f"parallel.zero_stage={stage}",
                                "training.micro_batch_size=4", f"training.global_batch_size={4 * MICRO_BATCHES * world}",
                                f"optimizer.grad_clip={max_norm}", "optimizer.weight_decay=0.0"])
    return cfg, validate_for_world(cfg, world)


def _master_weights(params: list) -> list:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in params]


def _mlp():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))


def _bf16_copy(engine):
    """A plain MLP holding the engine's bf16 weights (gathered at ZeRO-3, where the engine's
    module cannot be copied)."""
    import deepspeed

    params = list(engine.module.parameters())
    plain = _mlp().bfloat16()
    with deepspeed.zero.GatheredParameters(params):
        for mine, theirs in zip(plain.parameters(), params):
            mine.data.copy_(theirs.data)
    return plain


def dense_accumulation(stage: int, with_data_types: bool, world, log) -> dict:
    """Error of the applied dense gradient against the exact sum of its bf16 micro-batch parts."""
    import torch
    import torch.distributed as dist

    from l3train.trainer import deepspeed_adapter

    cfg, layout = _config(world.size, stage, max_norm=0.0)
    config = deepspeed_adapter.engine_config(cfg, layout)
    if not with_data_types:  # DeepSpeed's defaults: the behaviour before l3train set the data types
        config.pop("data_types", None)
        config.pop("communication_data_type", None)
    torch.manual_seed(0)
    module = _mlp()
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    engine, _ = deepspeed_adapter.initialize_engine(module, optimizer, None, config, None)
    params = list(engine.module.parameters())
    plain = _bf16_copy(engine).to(world.device)
    before = _master_weights(params)
    reference = [torch.zeros(p.shape, dtype=torch.float64, device=world.device) for p in plain.parameters()]
    generator = torch.Generator().manual_seed(100 + world.rank)
    norm = None
    for _ in range(MICRO_BATCHES):
        x = torch.randn(4, 64, generator=generator).to(world.device, torch.bfloat16)
        engine.backward(engine(x).float().square().mean())
        # The same micro-batch through the plain copy: the bf16 gradient DeepSpeed received
        # (its loss is divided by the number of micro-batches, a power of two: exact).
        loss = plain(x).float().square().mean() / MICRO_BATCHES
        for total, part in zip(reference, torch.autograd.grad(loss, list(plain.parameters()))):
            total += part.double()
        if engine.is_gradient_accumulation_boundary() and with_data_types:
            norm = deepspeed_adapter.dense_grad_norm(engine, lambda: float("nan"))
        engine.step()
    for total in reference:
        dist.all_reduce(total)
        total /= world.size
    applied = [b - a for b, a in zip(before, _master_weights(params))]
    figures = {"error": relative_error(applied, reference), "optimizer": type(engine.optimizer).__name__}
    engine.destroy()
    if norm is not None:
        expected = sum(float(t.square().sum()) for t in reference) ** 0.5
        figures["norm_error"] = abs(norm - expected) / expected
    log(f"dense ZeRO-{stage} {'l3train data types ' if with_data_types else 'DeepSpeed defaults'}: "
        + " ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return figures


def _lookup_layer(tied: bool):
    import numpy as np
    import torch

    from l3train.model.l3_layer import LargeLookupLayer

    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 40, (64,), generator=generator).numpy()
    rows[5] = 300
    torch.manual_seed(1)
    layer = LargeLookupLayer(rows, d_in=32, d_emb=32 if tied else 24, d_up=48, tied_kv=tied)
    frequencies = np.random.default_rng(0).zipf(1.3, 64).clip(max=10_000)
    return layer, rows, frequencies


def _batches(world_size: int, micro_batches: int, d_in: int, d_out: int, seed: int):
    """Every rank's (x, ids, upstream gradient) of each micro-batch, bf16, identical on all ranks."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(micro_batches):
        ids = torch.randint(0, 64, (world_size, 96), generator=generator)
        ids[:, :20] = 5  # a token with many rows and many positions
        x = torch.randn(world_size, 96, d_in, generator=generator).bfloat16()
        grad = (torch.randn(world_size, 96, d_out, generator=generator) / (96 * micro_batches)).bfloat16()
        batches.append((x, ids, grad))
    return batches


def row_accumulation(tied: bool, world, parallel, log) -> dict:
    """The sharded rows' accumulated gradient against fp64, and the old bf16-table scheme's."""
    import torch

    from l3train.model.l3_attention import row_attention_with_entropy
    from l3train.parallel.collectives import ScaleGradient
    from l3train.parallel.shard_plan import plan_shards
    from l3train.parallel.sharded_l3 import shard_lookup_layer
    from l3train.parallel.sharded_optim import ShardedRows

    layer, rows, frequencies = _lookup_layer(tied)
    full_keys, full_values = (t.detach().clone() for t in layer.rows.tables())
    plan = plan_shards(rows, frequencies, world.size)
    backend = shard_lookup_layer(layer, plan, parallel, device=world.device)
    bounds = layer.bounds.to(world.device)
    own = torch.as_tensor(plan.global_row_indices(backend.routing.shard))
    # fp64 reference and the old scheme on every rank, over all ranks' positions (the owner's
    # gradient is the sum over the ranks that sent them, scaled by 1/DP).
    exact_keys = full_keys.double().requires_grad_()
    exact_values = exact_keys if tied else full_values.double().requires_grad_()
    old_keys = full_keys.to(world.device).requires_grad_()
    old_values = old_keys if tied else full_values.to(world.device).requires_grad_()
    scale = 1.0 / world.size
    for x, ids, grad in _batches(world.size, MICRO_BATCHES, 32, full_values.shape[1], seed=7):
        mine = slice(world.rank, world.rank + 1)
        route = backend.route(ids[mine].flatten().to(world.device), bounds)
        out, _ = backend(x[mine].flatten(0, 1).to(world.device), route)
        out.backward(grad[mine].flatten(0, 1).to(world.device))
        flat_x, flat_ids, flat_grad = x.flatten(0, 1), ids.flatten(), grad.flatten(0, 1)
        exact, _ = row_attention_with_entropy(flat_x.double(), flat_ids, layer.bounds, ScaleGradient.apply(
            exact_keys, scale), ScaleGradient.apply(exact_values, scale))
        exact.backward(flat_grad.double())
        keys16 = ScaleGradient.apply(old_keys.to(torch.bfloat16), scale)
        values16 = keys16 if tied else ScaleGradient.apply(old_values.to(torch.bfloat16), scale)
        old, _ = row_attention_with_entropy(flat_x.to(world.device), flat_ids.to(world.device), bounds, keys16,
                                            values16)
        old.backward(flat_grad.to(world.device))
    # On a CPU the micro-batches' row-sparse gradients were summed as they arrived: each row once.
    for table in backend.local.tensors():
        if table.device.type == "cpu":
            assert table.grad.is_sparse and table.grad.is_coalesced() and table.grad._nnz() <= table.shape[0]
    # At the accumulation boundary the rows' optimizer applies their share of the DP average.
    ShardedRows([backend], plan, _config(world.size, 0, max_norm=0.0)[0]).scale_gradients(1.0)
    tables = [(backend.local.keys, exact_keys, old_keys)]
    if not tied:
        tables.append((backend.local.values, exact_values, old_values))
    got = [t.grad.to_dense() for t, _, _ in tables]  # (row-sparse on CPUs: the kernel's gradient)
    want = [e.grad[own] for _, e, _ in tables]
    figures = {"error": relative_error(got, want), "old_error": relative_error([o.grad[own] for _, _, o in tables],
                                                                              want),
               "grad_dtype": str(got[0].dtype)}
    log(f"rows {'tied' if tied else 'untied'}: error {figures['error']:.2e}, bf16-table scheme "
        f"{figures['old_error']:.2e}, gradient {figures['grad_dtype']}")
    return figures


def clipped_step(stage: int, max_norm: float, world, parallel) -> dict:
    """One accumulated step of an L³ layer (dense parts in a bf16 engine, rows sharded);
    returns the global norm, the applied dense step and the rows' gradients after clipping."""
    import torch

    from l3train.parallel.shard_plan import plan_shards
    from l3train.parallel.sharded_l3 import shard_lookup_layer
    from l3train.parallel.sharded_optim import ShardedRows
    from l3train.trainer import deepspeed_adapter
    from l3train.trainer.clipping import clip_global_norm

    cfg, layout = _config(world.size, stage, max_norm)
    layer, rows, frequencies = _lookup_layer(tied=True)
    plan = plan_shards(rows, frequencies, world.size)
    backend = shard_lookup_layer(layer, plan, parallel, device=world.device)
    sharded = ShardedRows([backend], plan, cfg)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    engine, _ = deepspeed_adapter.initialize_engine(layer, optimizer, None,
                                                    deepspeed_adapter.engine_config(cfg, layout), None)
    params = list(engine.module.parameters())
    before = _master_weights(params)
    total = None
    for x, ids, grad in _batches(world.size, MICRO_BATCHES, 32, 32, seed=11):
        out, _ = engine(x[world.rank].to(world.device), ids[world.rank].to(world.device))
        engine.backward((out.float() * grad[world.rank].to(world.device).float()).sum())
        if engine.is_gradient_accumulation_boundary():
            total = clip_global_norm(engine, engine.module, parallel, [sharded], max_norm)
        engine.step()
    step = [b - a for b, a in zip(before, _master_weights(params))]
    row_grads = [p.grad.detach().to_dense().clone() for p in sharded.params]  # (row-sparse on CPUs)
    engine.destroy()
    return {"total": total, "dense_step": step, "row_grads": row_grads}


def global_clipping(stage: int, world, parallel, log) -> dict:
    """Unclipped, then clipped to a quarter of the global norm: both parts scale by 1/4."""
    import torch
    import torch.distributed as dist

    free = clipped_step(stage, 0.0, world, parallel)
    clipped = clipped_step(stage, free["total"] / 4, world, parallel)
    rows_squared = torch.tensor(sum(float(g.double().square().sum()) for g in free["row_grads"]),
                                dtype=torch.float64, device=world.device)
    dist.all_reduce(rows_squared)
    dense_squared = sum(float(s.double().square().sum()) for s in free["dense_step"])
    expected_total = (dense_squared + rows_squared.item()) ** 0.5
    figures = {"norm": free["total"],
               "norm_error": abs(free["total"] - expected_total) / expected_total,
               "dense_error": relative_error(clipped["dense_step"], [s / 4 for s in free["dense_step"]]),
               "rows_error": relative_error(clipped["row_grads"], [g / 4 for g in free["row_grads"]])}
    log(f"clipping ZeRO-{stage}: global norm {figures['norm']:.4g} (against dense and rows' "
        f"{figures['norm_error']:.1e}), clipped to 1/4: dense step {figures['dense_error']:.1e}, "
        f"rows {figures['rows_error']:.1e}")
    return figures


def failures(report: dict) -> list[str]:
    """Every bound the report breaks, one line each."""
    found = []
    for name, figures in report["dense"].items():
        if name.endswith("new"):
            if figures["error"] > FP32_ACCUMULATION_BOUND or figures["norm_error"] > FP32_ACCUMULATION_BOUND:
                found.append(f"dense {name}: error {figures['error']:.2e}, norm error {figures['norm_error']:.2e} "
                             f"> {FP32_ACCUMULATION_BOUND}")
        elif figures["error"] < BF16_ACCUMULATION_FLOOR:
            found.append(f"dense {name}: DeepSpeed's bf16 defaults gave only {figures['error']:.2e} "
                         f"(< {BF16_ACCUMULATION_FLOOR}): the comparison no longer shows fp32 accumulation")
    for name, figures in report["rows"].items():
        if figures["error"] > FP32_ACCUMULATION_BOUND or figures["grad_dtype"] != "torch.float32":
            found.append(f"rows {name}: error {figures['error']:.2e} > {FP32_ACCUMULATION_BOUND} "
                         f"or gradient {figures['grad_dtype']}")
        if figures["old_error"] < BF16_ACCUMULATION_FLOOR:
            found.append(f"rows {name}: the bf16-table scheme gave only {figures['old_error']:.2e}")
    for name, figures in report["clipping"].items():
        if max(figures["norm_error"], figures["dense_error"], figures["rows_error"]) > CLIP_BOUND:
            found.append(f"clipping {name}: {figures} beyond {CLIP_BOUND}")
    return found


def _worker(output: Path) -> None:
    import torch.distributed as dist

    from l3train.distributed import init_distributed
    from l3train.parallel.state import initialize_parallel

    world = init_distributed()
    parallel = initialize_parallel(1)
    log = print if world.is_main else (lambda _: None)
    log(f"[bf16 accumulation] {world.size} rank(s) on {world.device.type} over {dist.get_backend()}, "
        f"{MICRO_BATCHES} micro-batches")
    report = {"device": world.device.type, "backend": dist.get_backend(), "world": world.size,
              "dense": {f"zero{stage}_{kind}": dense_accumulation(stage, kind == "new", world, log)
                        for stage in (2, 3) for kind in ("new", "deepspeed_defaults")},
              "rows": {kind: row_accumulation(kind == "tied", world, parallel, log) for kind in ("tied", "untied")},
              "clipping": {f"zero{stage}": global_clipping(stage, world, parallel, log) for stage in (2, 3)}}
    broken = failures(report)
    if world.is_main:
        output.write_text(json.dumps(report))
        for line in broken:
            print(f"FAILED {line}")
        print(f"[bf16 accumulation] {'FAILED' if broken else 'ok'}")
    finish_worker(1 if broken else 0)


@pytest.mark.slow
def test_bf16_gradients_accumulate_in_fp32_on_two_ranks(tmp_path):
    """8 micro-batches on 2 gloo ranks, ZeRO 2 and 3: fp32 accumulation within the bound,
    DeepSpeed's bf16 defaults measurably worse, and global clipping exact."""
    output = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), __file__, str(output)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert (report["device"], report["backend"], report["world"]) == ("cpu", "gloo", 2)
    assert not failures(report), result.stdout
    # The engines are DeepSpeed's ZeRO optimizers, whose internals the adapter reads.
    assert {figures["optimizer"] for figures in report["dense"].values()} == {
        "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"}
    for stage in (2, 3):  # the old behaviour was worse by orders of magnitude
        assert report["dense"][f"zero{stage}_deepspeed_defaults"]["error"] > 100 * report["dense"][f"zero{stage}_new"]["error"]


def test_bf16_data_types_where_deepspeed_supports_them():
    """fp32 accumulation and reduction are asked for at ZeRO 2 and 3 in bf16 only: DeepSpeed
    refuses them at ZeRO-0 and changes its optimizer class at ZeRO-1."""
    from l3train.config import config_from_dict, validate_for_world
    from l3train.trainer.deepspeed_adapter import engine_config

    for stage in range(4):
        cfg, layout = _config(2, stage, max_norm=1.0)
        bf16 = engine_config(cfg, layout)
        assert bf16["bf16"] == {"enabled": True}
        if stage >= 2:
            assert bf16["data_types"] == {"grad_accum_dtype": "fp32"} and bf16["communication_data_type"] == "fp32"
        else:
            assert "data_types" not in bf16 and "communication_data_type" not in bf16
        fp32 = config_from_dict({}, [f"parallel.zero_stage={stage}"])
        assert "data_types" not in engine_config(fp32, validate_for_world(fp32, 1))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
