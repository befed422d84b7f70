"""megatron-core's import, without the parts of it l3train never runs (~2 s per process).

`import megatron.core` runs the whole package, and every trainer rank, converter and data
tool that touches megatron-core pays for it at start-up. Most of that time goes to two
things l3train does not use:

- megatron.core.jit sets `jit_fuser = torch.compile`, and two dozen fused helpers (bias-GeLU,
  SwiGLU, MoE routing, ...) are decorated with it at import: each decoration imports and
  configures TorchDynamo and Inductor, about 2 s on the CPU machines. While megatron.core
  imports, `torch.compile` is replaced by a deferring decorator: a helper is handed to the
  real `torch.compile` on its first call, with the same options, so a helper that runs is
  compiled as before (torch.compile itself compiles on first call too); one that never
  runs costs nothing. `torch.compile` is restored as soon as the import ends.
- megatron-core's inference engine and timers import wandb when it is installed (~0.5 s),
  for logging that l3train does not use; it is hidden from them, unless already imported
  (l3train's own W&B logger, `logging.wandb=true`, imports it before megatron-core).

`install()` (called by `import l3train`) arranges this for the first import of megatron.core,
wherever it comes from, through an import hook that applies once and then removes itself.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any

PACKAGE = "megatron.core"


def _deferring(compile_function: Callable) -> Callable:
    """A stand-in for `torch.compile` that compiles a function on its first call."""

    def deferred_compile(model: Callable | None = None, **options: Any) -> Callable:
        if model is None:  # @torch.compile(mode=...): the decorator factory form
            return lambda function: deferred_compile(function, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_function(model, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred_compile


@contextlib.contextmanager
def _lean_import() -> Iterator[None]:
    import torch

    real_compile = torch.compile
    hide_wandb = "wandb" not in sys.modules
    torch.compile = _deferring(real_compile)
    if hide_wandb:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError: megatron's optional use is off
    try:
        yield
    finally:
        torch.compile = real_compile
        if hide_wandb and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


class _Loader(importlib.abc.Loader):
    """megatron.core's own loader, executing the package inside `_lean_import`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with _lean_import():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: the real loader's
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != PACKAGE:
            return None
        sys.meta_path.remove(self)  # once; the other finders locate the real package
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Make the process's first import of megatron.core lean (no-op once it is imported)."""
    if PACKAGE not in sys.modules and not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
