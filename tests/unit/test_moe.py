"""The MoE feed-forward: router losses by hand and against megatron-core, dispatch against a
per-position loop, capacity dropping against megatron-core's token dropping."""

from __future__ import annotations

import math

import pytest
import torch

from l3train.config import MoEConfig
from l3train.model.moe import MoEFeedForward, load_balancing_loss, router_loss, router_z_loss, within_capacity


def _layer(d_model: int = 8, dtype=torch.float64, **moe) -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(d_model, MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden_size": 6, **moe}))
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return layer.to(dtype)


def _fixed_routing_layer() -> tuple[MoEFeedForward, torch.Tensor]:
    """3 experts, top-1; the router is the identity on 3-d one-hot inputs, so logits = 2·x."""
    layer = MoEFeedForward(3, MoEConfig(num_experts=3, top_k=1, expert_hidden_size=2))
    with torch.no_grad():
        layer.router.weight.copy_(2 * torch.eye(3))
        for param in layer.experts.parameters():
            param.fill_(0.1)
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]])  # the last one ties: expert 0
    return layer, x


def test_router_losses_match_hand_computed_values_on_fixed_routing():
    layer, x = _fixed_routing_layer()
    _, stats = layer(x)
    # Logits per position: [2,0,0], [2,0,0], [0,2,0], [0,0,0]; top-1 experts 0, 0, 1, 0.
    e2 = math.exp(2)
    peaked, flat = e2 / (e2 + 2), 1 / (e2 + 2)  # softmax of a one-hot logit row of 2
    mean_probability = [(2 * peaked + flat + 1 / 3) / 4, (2 * flat + peaked + 1 / 3) / 4, (3 * flat + 1 / 3) / 4]
    assigned = [3 / 4, 1 / 4, 0]
    aux = 3 * sum(f * p for f, p in zip(assigned, mean_probability))
    z = (3 * math.log(e2 + 2) ** 2 + math.log(3) ** 2) / 4
    assert stats.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert stats.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert stats.load.tolist() == assigned
    weighted = router_loss([stats, stats], MoEConfig(aux_loss_weight=0.01, z_loss_weight=0.001))
    assert weighted.item() == pytest.approx(2 * (0.01 * aux + 0.001 * z), rel=1e-6)


def test_router_and_losses_equal_megatron_core():
    """Gates, chosen experts, load-balancing and z-loss as megatron-core's defaults compute them."""
    from megatron.core.transformer.moe.moe_utils import (switch_load_balancing_loss_func,
                                                         topk_routing_with_score_function, z_loss_func)

    layer = _layer(dtype=torch.float32, num_experts=6, top_k=2)
    x = torch.randn(40, 8)
    logits, gates, experts = layer.router(x)
    probs, routing_map = topk_routing_with_score_function(logits, topk=2)
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, experts, True))
    torch.testing.assert_close(probs.gather(1, experts), gates)
    tokens_per_expert = routing_map.sum(0)
    expected_aux = switch_load_balancing_loss_func(logits.softmax(-1), tokens_per_expert, 40, 2, 6, 1.0)
    torch.testing.assert_close(load_balancing_loss(logits, experts), expected_aux)
    torch.testing.assert_close(router_z_loss(logits), z_loss_func(logits, 1.0))


def _per_position_reference(layer: MoEFeedForward, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = Σ_j gate_tj · SwiGLU_{e_tj}(x_t), one position and one expert at a time."""
    _, gates, experts = layer.router(x)
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(layer.top_k):
            if keep is not None and not keep[t, j]:
                continue
            e = experts[t, j]
            y = y + gates[t, j].to(x.dtype) * (w2[e] @ (torch.nn.functional.silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
        rows.append(y)
    return torch.stack(rows)


def test_dropless_dispatch_equals_per_position_loop_with_gradients():
    layer = _layer()
    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    out, stats = layer(x)
    reference = _per_position_reference(layer, x.reshape(-1, 8)).reshape(x.shape)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)
    assert stats.dropped_fraction == 0.0
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad(reference.square().sum(), [x, *layer.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)  # router (through the gates), experts and x all learn


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
def test_capacity_keeps_the_largest_gates_like_megatron_core(capacity_factor):
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    layer = _layer(capacity_factor=capacity_factor)
    x = torch.randn(30, 8, dtype=torch.float64)
    _, gates, experts = layer.router(x)
    keep = within_capacity(gates.flatten(), experts.flatten(), 4, capacity_factor).view_as(experts)
    capacity = math.ceil(capacity_factor * 30 * 2 / 4)
    per_expert = torch.bincount(experts[keep], minlength=4)
    assert per_expert.max() <= capacity
    dense_gates = torch.zeros(30, 4, dtype=gates.dtype).scatter(1, experts, gates)
    routing_map = torch.zeros(30, 4, dtype=torch.bool).scatter(1, experts, True)
    _, kept_map = apply_router_token_dropping(dense_gates, routing_map, 2, capacity_factor)
    assert torch.equal(kept_map.gather(1, experts), keep)

    out, stats = layer(x)
    assert stats.dropped_fraction.item() == pytest.approx(1 - keep.float().mean().item())
    if capacity_factor < 1:
        assert stats.dropped_fraction > 0.4
    torch.testing.assert_close(out, _per_position_reference(layer, x, keep), rtol=1e-10, atol=1e-12)


def test_an_expert_without_tokens_is_fine():
    layer = _layer(num_experts=8, top_k=1)
    x = torch.randn(3, 8, dtype=torch.float64)  # at most 3 of 8 experts are used
    out, stats = layer(x)
    out.sum().backward()
    assert (stats.load == 0).sum() >= 5
    assert layer.experts.w1.grad is not None
