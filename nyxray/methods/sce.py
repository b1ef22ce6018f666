"""SCE (select, calculate, erase): task vectors weighted by their mean square, with TIES's sign election.

Select: with ``select_topk < 1``, only the positions where the task vectors vary most across
inputs (the top fraction of the nonzero variances) are kept. Calculate: each input's weight is the
mean square of its task vector, normalized to sum 1 (equal weights when that sum is below 1e-6).
Erase: at each position only the inputs agreeing with the elected sign count. As mergekit 0.1.5,
everything runs in the inputs' dtype with the same torch operations (the bits depend on them).
"""

from __future__ import annotations

import torch

from ._geometry import single_threaded
from .base import Group
from .task_arithmetic import majority_sign

_TINY_WEIGHT_SUM = 1e-6  # below this the mean squares are too small to weigh with: equal weights
_MIN_DIVISOR = 1e-6


@single_threaded  # the mean squares are whole-row sums: mergekit's bits on one thread
def merge(group: Group) -> torch.Tensor:
    """The merged tensor in the inputs' dtype; the base itself when there is no other input.

    ``int8_mask`` only saved memory in mergekit and cannot change the bits: masks here are bool.
    """
    base = group.base_tensor
    others = group.others
    if not others:
        return base
    vectors = torch.stack([other - base for other in others], dim=0)
    if group.params["select_topk"] < 1:
        vectors = vectors * _most_varying(vectors, group.params["select_topk"]).unsqueeze(0)
    agree = vectors.sign() == majority_sign(vectors)
    weights = _weights(vectors).reshape(len(others), *([1] * base.ndim))
    erased = weights * agree
    merged = (vectors * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=_MIN_DIVISOR)


def _weights(vectors: torch.Tensor) -> torch.Tensor:
    """Each input's mean square task-vector entry, divided by their (Python float) sum."""
    squares = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = squares.sum().item()
    if abs(total) < _TINY_WEIGHT_SUM:
        return torch.ones_like(squares) / squares.shape[0]
    return squares / total


def _most_varying(vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ``int(nonzero * fraction)`` positions with the largest variance across inputs."""
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    keep = torch.zeros_like(variance, dtype=torch.bool)
    if k:
        keep.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = True
    return keep
