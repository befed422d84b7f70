"""megatron-core's import without TorchDynamo/Inductor and wandb (l3train.utils.megatron_import)."""

from __future__ import annotations

import json
import subprocess
import sys

from l3train.utils.megatron_import import _deferring


def test_a_deferred_function_is_compiled_once_on_its_first_call_with_its_options():
    compiled_with = []

    def fake_compile(function, **options):
        compiled_with.append(options)
        return lambda *args: ("compiled", function(*args))

    deferred = _deferring(fake_compile)

    @deferred
    def double(x):
        """Twice x."""
        return 2 * x

    @deferred(mode="max-autotune")
    def square(x):
        return x * x

    assert compiled_with == [] and double.__doc__ == "Twice x." and double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert square(3) == ("compiled", 9)
    assert compiled_with == [{}, {"mode": "max-autotune"}]


def test_importing_megatron_core_skips_dynamo_inductor_and_wandb_and_restores_torch_compile():
    code = """if True:
        import json, sys
        import l3train, torch
        real = torch.compile
        import megatron.core
        from megatron.core import jit
        import wandb  # still importable afterwards (l3train's own W&B logger)
        print(json.dumps({
            "dynamo": "torch._dynamo" in sys.modules,
            "inductor": "torch._inductor.compile_fx" in sys.modules,
            "compile_restored": torch.compile is real,
            "jit_fuser_deferred": jit.jit_fuser.__name__ == "deferred_compile",
            "wandb_module": type(wandb).__name__,
        }))
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "dynamo": False, "inductor": False, "compile_restored": True, "jit_fuser_deferred": True,
        "wandb_module": "module"}
