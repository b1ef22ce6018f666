"""Linear: the weighted sum of every input, divided by the sum of the weights when ``normalize``.

As mergekit 0.1.5: the sum accumulates in float32 (float64 for float64 inputs), one input after the
other in model order (``addcmul_``, so the product and the sum round as mergekit's do); weights are
float32 there too, their sum included. The result is rounded once to the inputs' dtype.
A base model plays no part: it is one more input if it is listed among the models.
"""

from __future__ import annotations

import torch

from .base import Group


def merge(group: Group) -> torch.Tensor:
    """The weighted (and normalized) sum of ``group.tensors``, in their dtype.

    With ``normalize`` and weights summing to 0 in float32 this divides by zero (inf/nan), as
    mergekit does; the planner rejects such a recipe before it runs.
    """
    first = group.tensors[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(group.per_input["weight"], dtype=work, device=first.device)
    out = torch.zeros_like(first, dtype=work)
    for tensor, weight in zip(group.tensors, weights):
        out.addcmul_(tensor, weight)
    if group.params["normalize"]:
        out.div_(weights.sum())
    return out.to(first.dtype)
