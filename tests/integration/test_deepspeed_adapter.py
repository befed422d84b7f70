"""The DeepSpeed adapter (l3train/trainer/deepspeed_adapter.py) pinned on the installed version:
every internal it touches exists and behaves as the trainer (and resharding) assumes, at ZeRO 0-3."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from training_harness import REPO, finish_worker, trainer_env


def test_installed_deepspeed_is_the_pinned_version():
    import deepspeed

    from l3train.trainer.deepspeed_adapter import PINNED_VERSION

    assert deepspeed.__version__ == PINNED_VERSION
    requirement = re.search(r"^deepspeed==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert requirement and requirement.group(1) == PINNED_VERSION


def _worker(output: Path) -> None:
    """World of one: per ZeRO stage, the adapter's dense norm equals the gradients' norm, the
    threshold it sets is the one the step clips with, and the reported norm is that norm."""
    import torch

    from l3train.distributed import init_distributed
    from l3train.trainer import deepspeed_adapter

    init_distributed()
    report = {}
    for stage in range(4):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        reference = [p.detach().clone() for p in model.parameters()]
        config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1e9,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 1 << 30}
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        engine, _ = deepspeed_adapter.initialize_engine(model, optimizer, None, config, None)
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
        engine.backward(engine(x).square().sum())
        # The expected norm from a plain copy of the model.
        plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        with torch.no_grad():
            for p, r in zip(plain.parameters(), reference):
                p.copy_(r)
        plain(x).square().sum().backward()
        expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters()])).item()
        whole = lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()  # noqa: E731
        dense = deepspeed_adapter.dense_grad_norm(engine, whole)
        deepspeed_adapter.set_clip_threshold(engine, expected / 4)  # clip the step to a quarter
        engine.step()
        after = deepspeed_adapter.reported_grad_norm(engine)
        # SGD with lr 1 moves the weights by exactly the clipped gradient.
        step = torch.linalg.vector_norm(torch.stack([
            (now - before).norm() for now, before in zip(_full_params(engine), reference)])).item()
        report[stage] = {"dense": dense, "expected": expected, "reported": after, "step_norm": step,
                         "adam_state_error": _adam_state_error(stage)}
        engine.destroy()
    output.write_text(json.dumps(report))
    finish_worker()


def _adam_state_error(stage: int) -> float:
    """`set_adam_state` on a fresh engine, then one step: the largest difference from a plain
    torch AdamW given the same moments and step count (0 when the state landed where it should)."""
    import torch

    from l3train.trainer import deepspeed_adapter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    plain.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(2)
    moments = [{"exp_avg": torch.randn(p.shape, generator=generator),
                "exp_avg_sq": torch.rand(p.shape, generator=generator)} for p in plain.parameters()]
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 1 << 30}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine, _ = deepspeed_adapter.initialize_engine(model, optimizer, None, config, None)
    deepspeed_adapter.set_adam_state(engine, optimizer, list(zip(engine.module.parameters(), moments)), step=5)
    reference = torch.optim.AdamW(plain.parameters(), lr=0.1)
    for param, state in zip(plain.parameters(), moments):
        reference.state[param] = {"step": torch.tensor(5.0), **{k: v.clone() for k, v in state.items()}}
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    engine.backward(engine(x).square().sum())
    engine.step()
    plain(x).square().sum().backward()
    reference.step()
    error = max((ours - theirs).abs().max().item() for ours, theirs in zip(_full_params(engine), plain.parameters()))
    engine.destroy()
    return error


def _full_params(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op below ZeRO-3
        return [p.detach().clone() for p in params]


@pytest.mark.slow
def test_adapter_internals_behave_as_assumed_at_every_zero_stage(tmp_path):
    output = tmp_path / "report.json"
    result = subprocess.run([sys.executable, __file__, str(output)], cwd=REPO, env=trainer_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert sorted(report) == ["0", "1", "2", "3"]
    for stage, figures in report.items():
        assert figures["dense"] == pytest.approx(figures["expected"], rel=1e-5), stage
        assert figures["step_norm"] == pytest.approx(figures["expected"] / 4, rel=1e-4), stage
        assert figures["adam_state_error"] <= 1e-6, stage
        if figures["reported"] is not None:
            assert figures["reported"] == pytest.approx(figures["expected"], rel=1e-5), stage


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
