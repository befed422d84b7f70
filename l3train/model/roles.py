"""Parameter roles, declared by the module that creates the parameters.

The optimizer's groups (decayed matrices, undecayed vectors, L³ rows with their own lr and
weight decay) and the initialisation look parameters up by role, never by name: names
change when a layer is wrapped or swapped. A module class that owns parameters of a
special kind declares it (`parameter_role = ParamRole.L3_ROWS`); every other parameter is
a matrix (≥ 2 dimensions) or a vector. The role lives on the module class rather than as
an attribute of the tensor, so it survives `copy.deepcopy` and tensor-parallel swaps
(megatron's layers are plain matrices).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

from torch import nn


class ParamRole(str, Enum):
    MATRIX = "matrix"  # weight matrices and embeddings: decayed
    VECTOR = "vector"  # norm weights and biases: not decayed
    L3_ROWS = "l3_rows"  # L³ key/value tables: own lr and weight decay
    EXPERT = "expert"  # stacked MoE expert weights: decayed like matrices


def parameter_roles(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ParamRole]]:
    """(name, parameter, role) for every distinct parameter of `model`, in `named_parameters` order."""
    declared = {}
    for module in model.modules():
        role = getattr(module, "parameter_role", None)
        for param in module.parameters(recurse=False):
            declared[id(param)] = role
    for name, param in model.named_parameters():
        role = declared.get(id(param)) or (ParamRole.MATRIX if param.dim() >= 2 else ParamRole.VECTOR)
        yield name, param, role
