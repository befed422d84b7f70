"""torchrun worker: the logits of a run's latest checkpoint in the layout it was trained in.

Resumes the run through the real Trainer (the ranks of its layout, its checkpoint), runs the
model on fixed tokens and writes the full-vocabulary logits (gathered over the TP ranks) from
rank 0. On every rank it also checks that `tensor_parallel_dim`, which checkpoint conversion
merges and splits by, agrees with the `partition_dim` megatron records on each parameter.

Usage: layout_logits_worker.py CONFIG TOKENS.pt OUTPUT.pt [key=value ...]
"""

import sys

import torch
import torch.distributed as dist

from l3train.config import load_config
from l3train.parallel.tp_dims import tensor_parallel_dim
from l3train.trainer import Trainer
from training_harness import finish_worker


def main() -> None:
    config, tokens_path, output_path, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config, overrides), resume=True)
    trainer.build()
    assert trainer.step > 0, "no checkpoint was resumed"
    for name, param in trainer.parts.model.named_parameters():
        recorded = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        expected = tensor_parallel_dim(name) if trainer.parallel.tp_size > 1 else None
        assert expected == recorded, (name, expected, recorded)
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(torch.load(tokens_path)).logits.float()
    parallel = trainer.parallel
    if parallel.tp_size > 1:
        pieces = [torch.empty_like(logits) for _ in range(parallel.tp_size)]
        dist.all_gather(pieces, logits.contiguous(), group=parallel.tp_group)
        logits = torch.cat(pieces, dim=-1)
    if dist.get_rank() == 0:
        torch.save(logits, output_path)
    trainer.close()
    finish_worker()


if __name__ == "__main__":
    main()
