"""Megatron-style tensor parallelism of the Llama backbone, applied to a built `DecoderLM`.

The model code holds no parallelism; `parallelize_tensor` swaps its layers for
megatron-core's tensor-parallel ones and copies into them this rank's slice of the plain
model's initialised weights, so TP=N starts from exactly the TP=1 weights:

    embedding        → VocabParallelEmbedding      rows (vocabulary) split
    wq, wk, wv       → ColumnParallelLinear        output features (heads) split
    w1, w3           → ColumnParallelLinear        hidden features split
    wo, w2           → RowParallelLinear           input features split, input already split
    output           → ColumnParallelLinear        vocabulary split: logits stay sharded
    loss             → vocab_parallel_cross_entropy (in the trainer's `lm_loss`)

Attention heads are split contiguously: TP rank r holds query heads
[r·H/TP, (r+1)·H/TP) and KV heads [r·KV/TP, (r+1)·KV/TP). With grouped-query attention
query head h reads KV head h // (H/KV), so these local query heads read exactly the local
KV heads, and `Attention.forward` (which takes head counts from the weight shapes) runs
unchanged on a shard. Hence n_heads and n_kv_heads must both be divisible by TP.

Collectives over the TP group, per decoder block:
- forward: one all-reduce after wo and one after w2 (RowParallelLinear);
- backward: one all-reduce of the gradient entering each sublayer. megatron's column
  layers would each all-reduce their own input gradient (3 for wq/wk/wv, 2 for w1/w3);
  instead they are built with `disable_grad_reduce=True` and the output of the sublayer's
  norm passes through megatron's `copy_to_tensor_model_parallel_region` (identity forward,
  all-reduce backward) once, via a forward hook, so the model code stays untouched.
Plus, per micro-batch: an all-reduce after the embedding lookup (forward), one of the
input gradient of `output` (backward), and three small ones inside the vocab-parallel
cross entropy (max, target logit, sum of exponentials; forward).

Everything else is replicated over the TP ranks: norms, RoPE, MoE feed-forwards
(router and experts; each TP rank computes the whole MoE block) and (for now) the L³
layers. Their inputs are identical on every TP rank and so are the gradients reaching
them (every sharded-to-replicated boundary all-reduces), so their gradients need no TP
reduction.
DeepSpeed counts their gradient norm once and the TP-sharded parameters' on every rank,
recognising the latter by the `tensor_model_parallel` attribute set here.

Tied embeddings are supported: the vocabulary slice of the embedding rows and of the
output projection's rows are the same on each rank, so both layers share one sharded
parameter, and its gradient is the sum of both uses as in the plain model.

Sequence parallelism (`sequence_parallel=True`, megatron's scheme): between the
tensor-parallel regions the residual stream is split along the sequence, so each TP rank
holds and normalises S/TP positions and the activations that are replicated above are
divided by TP. Per decoder block the forward all-reduce after wo/w2 becomes a
reduce-scatter along the sequence (megatron's RowParallelLinear with `sequence_parallel`)
and each sublayer's norm output is all-gathered along the sequence before wq/wk/wv and
w1/w3 (megatron's `gather_from_sequence_parallel_region`, whose backward reduce-scatters
the partial input gradients). The embedding is reduce-scattered (megatron's
`reduce_scatter_embeddings`) and the final norm's output gathered before `output`. The
same bytes move as without SP (a reduce-scatter plus an all-gather is one all-reduce).
megatron's sequence-parallel mappings work on [seq, batch, hidden]; the model is
batch-first, so they are called on transposed views.
What was replicated now sees only this rank's positions, so its gradient is partial:
every parameter that is not TP-sharded (norms, L³ W_up/W_mix/norm, unsharded L³ tables)
gets a gradient hook summing it over the TP group (megatron's finalize_model_grads does
the same for its `sequence_parallel` parameters). L³ layers look up this rank's positions
only: their token ids are split along the sequence like the hidden states. MoE blocks
are not supported with SP (their load-balancing loss would need the TP-wide counts).

Not supported: a vocabulary that TP does not divide (padding it would add logits to the
softmax; set model.vocab_size to a multiple of TP instead, the tokenizer may be smaller).
"""

from __future__ import annotations

import functools

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region,
                                           gather_from_sequence_parallel_region, vocab_parallel_cross_entropy)
from megatron.core.tensor_parallel.layers import (param_is_not_tensor_parallel_duplicate,
                                                  set_tensor_model_parallel_attributes)
from torch import Tensor, nn

from l3train.model.l3_layer import LookupRoutes
from l3train.model.llama import DecoderLM, SwiGLU
from l3train.parallel.state import ParallelState


class _ColumnParallel(ColumnParallelLinear):
    """ColumnParallelLinear returning only the output: megatron returns (output, bias), the
    model calls its linears as `self.wq(x)`."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class _RowParallel(RowParallelLinear):
    """RowParallelLinear returning only the output (see `_ColumnParallel`). Under sequence
    parallelism megatron reduce-scatters its output along the first dimension, which it
    takes to be the sequence: the batch-first activations are transposed around it."""

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            return super().forward(x.transpose(0, 1))[0].transpose(0, 1)
        return super().forward(x)[0]


class _SequenceParallelEmbedding(VocabParallelEmbedding):
    """megatron's `reduce_scatter_embeddings` returns [S/TP, batch, hidden]; the model is batch-first."""

    def forward(self, tokens: Tensor) -> Tensor:
        return super().forward(tokens).transpose(0, 1)


def _shard(full: Tensor, dim: int, state: ParallelState) -> Tensor:
    return full.detach().chunk(state.tp_size, dim=dim)[state.tp_rank]


def _load_shard(param: nn.Parameter, full: Tensor, dim: int, state: ParallelState) -> None:
    """Copy this rank's slice of `full` into `param` and tag it as split along `dim`.

    The layers are built with `perform_initialization=False` (their own initialisation would
    draw different numbers than the plain model), which also skips megatron's tagging."""
    with torch.no_grad():
        param.copy_(_shard(full, dim, state))
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _column(linear: nn.Linear, config: ModelParallelConfig, state: ParallelState,
            reduce_input_grad: bool) -> _ColumnParallel:
    layer = _ColumnParallel(linear.in_features, linear.out_features, config=config, init_method=None, bias=False,
                            gather_output=False, disable_grad_reduce=not reduce_input_grad,
                            tp_group=state.tp_group)
    _load_shard(layer.weight, linear.weight, 0, state)
    return layer


def _row(linear: nn.Linear, config: ModelParallelConfig, state: ParallelState) -> _RowParallel:
    """Reduces its output over TP: all-reduce, or under `config.sequence_parallel` reduce-scatter along the sequence."""
    layer = _RowParallel(linear.in_features, linear.out_features, config=config, init_method=None, bias=False,
                         input_is_parallel=True, skip_bias_add=False, tp_group=state.tp_group)
    _load_shard(layer.weight, linear.weight, 1, state)
    return layer


def _enter_tensor_parallel_region(group: torch.distributed.ProcessGroup, module: nn.Module,
                                  inputs: tuple, output: Tensor) -> Tensor:
    """Forward hook: identity forward, all-reduce of the gradient in backward (megatron's "f")."""
    return copy_to_tensor_model_parallel_region(output, group=group)


def _gather_sequence(group: torch.distributed.ProcessGroup, module: nn.Module, inputs: tuple,
                     output: Tensor) -> Tensor:
    """Forward hook: all-gather the sequence (backward: reduce-scatter the partial gradients)."""
    return gather_from_sequence_parallel_region(output.transpose(0, 1), True, group).transpose(0, 1)


def _local_token_ids(state: ParallelState, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of an L³ block under SP: its hidden states are this rank's slice of the
    sequence, so its lookups take the routes of that slice of the ids (shared by all L³ blocks)."""
    hidden, token_ids = args
    routes = LookupRoutes.of(token_ids).part(("sequence parallel", state.tp_rank),
                                              lambda ids: ids.chunk(state.tp_size, dim=1)[state.tp_rank])
    return hidden, routes


def _sum_over_group(group: torch.distributed.ProcessGroup, grad: Tensor) -> Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=group)
    return grad


def parallelize_tensor(model: DecoderLM, state: ParallelState, sequence_parallel: bool = False) -> DecoderLM:
    """Shard `model`'s backbone over `state`'s TP group in place (see the module docstring),
    with the residual stream split along the sequence if `sequence_parallel`.

    Call on every rank with identically initialised plain models, before DeepSpeed wraps it."""
    if sequence_parallel and model.moe_layers():
        raise ValueError("sequence parallelism does not support MoE blocks (the config check refuses it)")
    dtype = model.output.weight.dtype
    # CPU initialisation keeps megatron from allocating on a CUDA device here: like the plain
    # model, the sharded one is built on the host and moved to the device by DeepSpeed.
    config = ModelParallelConfig(tensor_model_parallel_size=state.tp_size, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=dtype)
    # Only the row layers use megatron's sequence-parallel path (reduce-scatter); the column
    # layers' inputs are gathered by `enter`, so they run as without SP.
    row_config = ModelParallelConfig(tensor_model_parallel_size=state.tp_size, use_cpu_initialization=True,
                                     perform_initialization=False, params_dtype=dtype,
                                     sequence_parallel=sequence_parallel)
    # Before the column layers: all-reduce of the input gradient, or under SP all-gather of the sequence.
    enter = functools.partial(_gather_sequence if sequence_parallel else _enter_tensor_parallel_region,
                              state.tp_group)

    embedding_class = _SequenceParallelEmbedding if sequence_parallel else VocabParallelEmbedding
    embedding = embedding_class(model.cfg.vocab_size, model.cfg.d_model, init_method=None, config=config,
                                reduce_scatter_embeddings=sequence_parallel, tp_group=state.tp_group)
    _load_shard(embedding.weight, model.embedding.weight, 0, state)
    for block in model.blocks:
        attention, ffn = block.attention, block.feed_forward
        attention.wq, attention.wk, attention.wv = (
            _column(linear, config, state, reduce_input_grad=False)
            for linear in (attention.wq, attention.wk, attention.wv))
        attention.wo = _row(attention.wo, row_config, state)
        block.attention_norm.register_forward_hook(enter)
        if isinstance(ffn, SwiGLU):  # an MoE feed-forward stays replicated, its input gradient whole
            ffn.w1, ffn.w3 = (_column(linear, config, state, reduce_input_grad=False) for linear in (ffn.w1, ffn.w3))
            ffn.w2 = _row(ffn.w2, row_config, state)
            block.ffn_norm.register_forward_hook(enter)
    model.embedding = embedding
    # `output` is the only consumer of the final norm's output: its own input-gradient all-reduce
    # suffices; under SP the gather before it reduces that gradient instead.
    model.output = _column(model.output, config, state, reduce_input_grad=not sequence_parallel)
    if model.cfg.tie_embeddings:
        model.output.weight = embedding.weight  # the same vocabulary slice on this rank: one shared shard
    if sequence_parallel:
        model.norm.register_forward_hook(enter)
        for block in model.lookups.values():
            block.register_forward_pre_hook(functools.partial(_local_token_ids, state))
        for param in model.parameters():
            if not getattr(param, "tensor_model_parallel", False):
                param.register_hook(functools.partial(_sum_over_group, state.tp_group))
    return model


def vocab_parallel_token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-position cross entropy from vocabulary-sharded logits; the same full loss on every TP rank."""
    # .float() copies bf16 logits; fp32 logits are modified in place (max subtraction), which
    # is fine here because the loss is their only use.
    return vocab_parallel_cross_entropy(logits.float(), labels)


def tensor_parallel_grad_norm(model: nn.Module, state: ParallelState) -> float:
    """Global gradient norm of a TP-sharded model, the same on every rank: the squared norms
    of sharded gradients are summed over the TP group, replicated ones counted once."""
    squares = [p.grad.detach().float().square().sum() for p in model.parameters()
               if p.grad is not None and param_is_not_tensor_parallel_duplicate(p, state.tp_group)]
    total = torch.stack(squares).sum()
    torch.distributed.all_reduce(total, group=state.tp_group)
    return total.sqrt().item()
