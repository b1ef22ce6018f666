"""Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della* in one function.

Each non-base input gives a task vector ``delta = input - base``, optionally sparsified
(:mod:`.sparsify`) and scaled by its weight. With sign consensus ("sum", TIES), only the entries
agreeing with the sign of the weighted sum at their position are summed. The merged task vector is
divided by the weights that contributed (``normalize``), scaled by ``lambda`` and added to the base.

Everything runs in the inputs' dtype (bf16 stays bf16, weights included: mergekit stores them in a
tensor of the inputs' dtype), with the same torch operations as mergekit 0.1.5, because the sums
over inputs (``sum(dim=0)``: float32 accumulation, rounded once) and each rounding decide the bits.
"""

from __future__ import annotations

import torch

from ._geometry import single_threaded
from .base import Group
from .sparsify import sparsify as sparsify_delta

_ZERO_WEIGHT_SUM = 1e-8  # without consensus, a weight sum below this divides by 1 instead (as mergekit)


@single_threaded  # the rescale's whole-tensor sums are mergekit's bits on one thread
def merge(group: Group, *, consensus: str | None, sparsify: str | None) -> torch.Tensor:
    """The merged tensor, in the inputs' dtype; the base itself when there is no other input."""
    base = group.base_tensor
    others = group.others
    if not others:
        return base
    params = group.params
    deltas = base.new_empty((len(others), *base.shape))
    for i, other in enumerate(others):
        delta = other - base
        if sparsify is not None:
            extra = {k: group.per_input[k][i] for k in ("gamma", "epsilon") if k in group.per_input}
            delta = sparsify_delta(delta, sparsify, density=group.per_input["density"][i], rescale=params["rescale"], generator=group.generator, **extra)
        deltas[i] = delta
        del delta
    weights = torch.tensor(group.per_input["weight"], dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(len(others), *([1] * base.ndim))
    deltas.mul_(weights)

    if consensus == "sum":
        # int8_mask only saved memory in mergekit: its mask is a bool comparison either way.
        agree = deltas.sign() == majority_sign(deltas)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    elif consensus is None:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < _ZERO_WEIGHT_SUM] = 1
    else:
        raise ValueError(f"unknown consensus {consensus!r}; expected 'sum' or None")
    del deltas

    if params["normalize"]:
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return base + mixed


def majority_sign(deltas: torch.Tensor) -> torch.Tensor:
    """+1 where the weighted task vectors sum to >= 0 at that position, else -1 (TIES's elected sign)."""
    return (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
