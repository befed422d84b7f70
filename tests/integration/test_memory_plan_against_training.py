"""The memory planner (l3train.sizing.memory) against what tiny runs of the real trainer hold,
at 1, 2 and 4 gloo ranks on the CPU: every planned figure within 15% of the measured one.

On a CPU there is no device memory to read, so what is measured is the bytes of the tensors
themselves, by storage (a tensor's views and shared storages count once), on every rank:

- held tensors: those reachable from the DeepSpeed engine, its optimizer and the rank-local
  parts (not from the training loop's frames), in the second step (the optimizer's state
  exists since the first), sorted into parameters (of the wrapped module; ZeRO-3: their
  partitions), optimizer (the client AdamW's fp32 master partitions and moments), the
  rank-local rows with their gradients and AdamW state, the parameters' gradients in
  storages of their own, and the rest (but module buffers); twice: when backward has ended
  and DeepSpeed is about to reduce the gradients (`allreduce_gradients`), and at the
  accumulation boundary before the optimizer step;
- gradients: the larger of the two moments' gradients: the parameters' own when backward
  ends (ZeRO-1 keeps them whole until it reduces them) and, at the boundary, what DeepSpeed
  keeps after reducing them (ZeRO-2: its fp32 partition) with any left on the parameters;
- DeepSpeed's gradient bucket: the rest when backward ends (ZeRO-2's parameters' gradients
  are views of it), or at ZeRO-0 the flat copy the engine all-reduces (`allreduce_bucket`,
  made and freed inside the reduction);
- activations: how much the process's heap grows over one forward pass and loss of a
  micro-batch (glibc's count of bytes malloc has handed out, from every thread: torch's
  profiler misses what communication threads free), which is what autograd keeps for
  backward plus the logits; compared with the planner's `stored` part (with recomputation,
  the block rebuilt in backward is not part of it).

The planned rows are those of the fullest shard and the measured ones the largest over the
ranks; every other figure is compared with the largest over the ranks too.

Run as a script under torchrun, this file is the worker that measures.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from training_harness import REPO, finish_worker, free_port, tiny_l3_config, trainer_env, write_config

TOLERANCE = 0.15
# (ranks, overrides): fp32 with the rows in DeepSpeed (ZeRO-1 asked for, ZeRO-0 run: one
# data-parallel rank); the paper's bf16 ZeRO-2 with sharded rows; TP=2 × DP=2 at ZeRO-1.
# Each with another recomputation mode.
RUNS = {
    1: ["parallel.zero_stage=1", "training.recompute=none"],
    2: ["parallel.zero_stage=2", "training.precision=bf16", "training.recompute=blocks"],
    4: ["parallel.zero_stage=1", "parallel.tensor_parallel=2", "training.recompute=l3"],
}


def planned(config: Path, overrides: list[str], ranks: int) -> dict[str, int]:
    from l3train.config import load_config
    from l3train.sizing.memory import plan_memory

    plan = plan_memory(load_config(config, overrides), "tiny", 1, ranks, device="cpu")
    rows = plan.rows
    return {"parameters": plan.deepspeed.parameters, "gradients": plan.deepspeed.gradients,
            "optimizer": plan.deepspeed.optimizer, "rows": rows.parameters, "rows_gradients": rows.gradients,
            "rows_optimizer": rows.optimizer, "bucket": plan.buffers, "activations": plan.activations.stored}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", sorted(RUNS))
def test_planned_memory_matches_what_the_trainer_holds(tmp_path, tiny_corpus, tiny_allocation, ranks):
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE

    from l3train.config import GRADIENT_BUCKET_ELEMENTS

    assert MEMORY_OPT_ALLREDUCE_SIZE == GRADIENT_BUCKET_ELEMENTS  # the ZeRO-0 bucket the planner assumes
    tree = tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation)
    # Twice the harness's width, four times its micro-batch: the lookups' routes (index plans of
    # the positions and of their distinct tokens' rows) are not planned; per position they
    # shrink as a batch repeats tokens, and at the harness's sizes they come near the tolerance.
    tree["model"]["d_model"] = tree["l3"]["d_emb"] = 128
    tree["l3"]["d_up"] = 256
    tree["training"].update(steps=2, micro_batch_size=32, global_batch_size=64)
    tree["optimizer"]["warmup_steps"] = 1
    config = write_config(tmp_path / "config.yaml", tree)
    report = tmp_path / "measured.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__, str(config), str(report), *RUNS[ranks]]
    result = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    measured = json.loads(report.read_text())
    largest = {key: max(rank[key] for rank in measured) for key in measured[0]}
    plan = planned(config, RUNS[ranks], ranks)
    print(json.dumps({"ranks": ranks, "planned": plan, "measured": largest}))
    for key, want in plan.items():
        if (key == "rows_gradients" and ranks > 1) or (key == "gradients" and ranks == 1):
            # The L³ tables on a CPU (sharded rows; one rank's tables at ZeRO-0 in fp32): a
            # row-sparse gradient, the rows this step touched (with an 8-byte index each); the
            # plan is the worst case, every row touched.
            assert 0.2 * want < largest[key] <= (1 + TOLERANCE) * want, (key, plan, largest)
            continue
        assert abs(largest[key] - want) <= TOLERANCE * max(want, 1), (key, plan, largest)


def _storages(tensors) -> dict[int, int]:
    """Bytes by storage of `tensors`; None entries and meta tensors (no memory: DeepSpeed keeps
    some as shape records) are skipped."""
    parts = [part for t in tensors if t is not None and not t.is_meta
             for part in ((t._indices(), t._values()) if t.is_sparse else (t,))]  # a row-sparse gradient: both
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in parts}


_NOT_STATE = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType, type)


def _held(roots: list) -> dict[int, int]:
    """Bytes by storage of every tensor reachable from `roots` (with their gradients and ZeRO
    partitions), not through modules, functions or classes (whose globals reach everything)."""
    seen, found, pending = set(), [], list(roots)
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, _NOT_STATE):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            extras = (obj.grad if obj.is_leaf else None, getattr(obj, "ds_tensor", None))
            pending += [extra for extra in extras if extra is not None]
        pending += gc.get_referents(obj)
    return _storages(found)


def _census(trainer) -> dict[str, dict[int, int]]:
    """The held tensors of `trainer` by kind (module docstring)."""
    model, rank_local = list(trainer.parts.model.parameters()), trainer.parts.rank_local
    parameters = _storages([getattr(p, "ds_tensor", p) for p in model] + model)
    client = trainer.optimizer
    optimizer = _storages([p for group in client.param_groups for p in group["params"]]
                          + [value for state in client.state.values() for value in state.values()])
    kinds = {"parameters": parameters,
             "optimizer": {ptr: size for ptr, size in optimizer.items() if ptr not in parameters},
             "rows": _storages([p for part in rank_local for p in part.params]),
             "rows_gradients": _storages([p.grad for part in rank_local for p in part.params]),
             "rows_optimizer": _storages([value for part in rank_local for state in part.optimizer.state.values()
                                          for value in state.values()]),
             # Only gradients in storages of their own: ZeRO-2 makes them views of its bucket.
             "parameter_gradients": _storages([p.grad for p in model if p.grad is not None and (
                 p.grad.is_sparse or p.grad.untyped_storage().nbytes() == p.grad.nbytes)]),
             "buffers": _storages(list(trainer.parts.model.buffers()))}
    known = {ptr for kind in kinds.values() for ptr in kind}
    held = _held([trainer.engine, trainer.parts, client])
    kinds["rest"] = {ptr: size for ptr, size in held.items() if ptr not in known}
    return kinds


class _MallocInfo(ctypes.Structure):
    """glibc's `struct mallinfo2`."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int:
    """Bytes the process's malloc has handed out and not taken back, from every thread: in its
    arenas and in chunks of their own (glibc's mallinfo2, glibc >= 2.33)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallocInfo
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def _forward_bytes(trainer) -> int:
    """How much the heap grows over one forward pass and loss of a micro-batch, with garbage
    collected on both sides and every rank's collectives done."""
    import torch.distributed as dist

    from l3train.trainer.loss import lm_loss
    from l3train.trainer.trainer import micro_batches

    micro = next(micro_batches(trainer.batch(trainer.step), trainer.layout.micro_batch_size, trainer.world.device))
    gc.collect()
    dist.barrier()
    before = _heap_in_use()
    output = trainer.engine(micro["tokens"])
    loss = lm_loss(output.logits, micro["labels"], micro["loss_mask"], trainer.parallel.tp_size > 1)
    gc.collect()
    dist.barrier()
    grown = _heap_in_use() - before
    del output, loss
    return grown


def _worker(config: str, report: str, *overrides: str) -> None:
    import torch.distributed as dist

    from l3train.config import load_config
    from l3train.trainer import Trainer

    trainer = Trainer(load_config(config, list(overrides)))
    trainer.build()
    censuses = {}
    clip, reduce = trainer._clip_and_agree, trainer.engine.allreduce_gradients
    flatten_and_reduce, flat_bytes = trainer.engine.allreduce_bucket, [0]

    def measured_allreduce_bucket(bucket, *args, **kwargs):
        flat_bytes[0] = max(flat_bytes[0], sum(t.numel() * t.element_size() for t in bucket))
        return flatten_and_reduce(bucket, *args, **kwargs)

    def census_then_clip(*args):
        censuses["boundary"] = _census(trainer)
        return clip(*args)

    def census_then_reduce(*args, **kwargs):
        censuses["backward"] = _census(trainer)  # the last one: of the boundary micro-batch
        return reduce(*args, **kwargs)

    trainer.train_step(trainer.batch(trainer.step))  # the optimizer's state exists from here on
    trainer._clip_and_agree, trainer.engine.allreduce_gradients = census_then_clip, census_then_reduce
    trainer.engine.allreduce_bucket = measured_allreduce_bucket
    trainer.train_step(trainer.batch(trainer.step))
    total = {when: {kind: sum(sizes.values()) for kind, sizes in kinds.items()} for when, kinds in censuses.items()}
    # Alone at ZeRO-0 the engine does not all-reduce (deepspeed_adapter.initialize_engine): no
    # census in backward, and no bucket, which the plan must say too.
    at_boundary = total["boundary"]
    in_backward = total.get("backward", {"parameter_gradients": 0, "rest": 0})
    measured = {kind: at_boundary[kind] for kind in ("parameters", "optimizer", "rows", "rows_gradients",
                                                     "rows_optimizer")}
    measured["gradients"] = max(in_backward["parameter_gradients"],
                                at_boundary["rest"] + at_boundary["parameter_gradients"])
    measured["bucket"] = max(in_backward["rest"], flat_bytes[0])
    measured["activations"] = _forward_bytes(trainer)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, measured)
    if dist.get_rank() == 0:
        Path(report).write_text(json.dumps(everyone))
    trainer.close()
    finish_worker()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
