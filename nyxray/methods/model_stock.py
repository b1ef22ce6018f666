"""Model Stock: move from the base towards the fine-tunes' average by a ratio set by their angles.

With the offsets d_i = w_i - w_0 of the k fine-tunes from the base, cos is the mean pairwise cosine
of the offsets and the ratio t = k cos / (1 + (k - 1) cos); the result is
t * mean(w_i) + (1 - t) * w_0. ``filter_wise`` takes one ratio per row (last axis) instead of one
per tensor. Everything runs in the inputs' dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

import torch

from ._geometry import single_threaded
from .base import Group

_SINGULAR = 1e-6  # |1 + (k - 1) cos| below this: no finite ratio, the base is kept


@single_threaded
def merge(group: Group) -> torch.Tensor:
    base, tuned = group.base_tensor, group.others
    shape = base.shape
    if not group.params["filter_wise"]:
        base, tuned = base.reshape(-1), [w.reshape(-1) for w in tuned]
    elif base.dim() == 1:
        base, tuned = base.unsqueeze(0), [w.unsqueeze(0) for w in tuned]
    deltas = [w - base for w in tuned]
    cosines = [_cosine(a, b) for i, a in enumerate(deltas) for b in deltas[i + 1 :]]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(tuned)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < _SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    ratio = torch.where(singular, torch.zeros_like(cos), (k * cos) / safe)
    average = sum(tuned) / k  # Python's sum: 0 + w_1 + ... in the inputs' dtype, as mergekit adds them
    return (ratio * average + (1 - ratio) * base).reshape(shape)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two offsets along the last axis; norms' product floored at 1e-6."""
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return ((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1)
