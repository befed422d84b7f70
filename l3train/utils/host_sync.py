"""Count the calls that would make the host wait for a GPU, on any device.

On a GPU, `torch.cuda.set_sync_debug_mode("warn")` reports every call that synchronises
the host with the device. On the CPU nothing waits, but the same code calls the same
operators, so `HostSyncCounter` records the calls that would: reading a value or a
data-dependent size back on the host. That makes "no host sync inside an L³ layer"
testable on CPU (tests/unit/test_host_syncs.py) and on GPU alike:

    with HostSyncCounter() as syncs:
        loss = model(tokens).logits.sum(); loss.backward()
    print(syncs.calls)   # e.g. ['aten.nonzero.default', 'Tensor.tolist']

Counted: `.item()`/`int()`/`float()`/`bool()` of a tensor, `.tolist()`, `.numpy()`,
`nonzero`, boolean-mask indexing and `masked_select`, `unique`/`unique_consecutive`,
`repeat_interleave` without `output_size`, `bincount`, `equal`. Not counted: copies to
the host with `.cpu()`/`.to("cpu")` (on the CPU they are no-ops and never dispatched).
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose output size or value the host must read from the device.
SYNCING_OPERATORS = frozenset({
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default, aten.bincount.default,
    aten.equal.default, aten.is_nonzero.default,
})
# Tensor methods that read data on the host without dispatching an operator.
SYNCING_METHODS = ("tolist", "numpy")


def _syncs(func, args: tuple, kwargs: dict) -> bool:
    if func in SYNCING_OPERATORS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func is aten.index.Tensor:  # a boolean mask index is a nonzero
        return any(index is not None and index.dtype == torch.bool for index in args[1])
    return False


class _OperatorCounter(TorchDispatchMode):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.calls.append(str(func))
        return func(*args, **kwargs)


class HostSyncCounter:
    """Context manager: `calls` lists the host-synchronising calls made inside, in order
    (backward included: the operators are seen by a dispatch mode, which autograd keeps, and
    the methods by wrappers set on `torch.Tensor` for the duration)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._operators = _OperatorCounter(self.calls)
        self._methods = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}

    def _counted(self, name: str):
        method = self._methods[name]

        @functools.wraps(method)
        def counted(tensor, *args, **kwargs):
            self.calls.append(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return counted

    def __enter__(self) -> HostSyncCounter:
        for name in SYNCING_METHODS:
            setattr(torch.Tensor, name, self._counted(name))
        self._operators.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._operators.__exit__(*exc_info)
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
