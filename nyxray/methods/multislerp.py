"""Multi-SLERP: a weighted barycentre of several models (or offsets from a base) on the sphere.

Each flattened input is scaled to unit length; their weighted mean, normalised, is the point of
tangency; the weighted mean of the inputs projected onto that tangent plane is mapped back to the
sphere, then scaled by the weighted mean of the inputs' norms. The weights are stored in the
inputs' dtype first (bf16 weights for bf16 models), and everything runs in that dtype, as in
mergekit 0.1.5.
"""

from __future__ import annotations

import torch

from ._geometry import offsets, single_threaded
from .base import Group


@single_threaded
def merge(group: Group) -> torch.Tensor:
    if len(group.others) == 1:
        return group.others[0]  # the model itself, even with a base (mergekit does the same)
    eps = group.params["eps"]
    stacked = torch.stack(offsets(group))
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor(group.per_input["weight"], dtype=stacked.dtype, device=stacked.device)
    if group.params["normalize_weights"]:
        weights = weights / weights.sum()
    column = weights.view(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * column).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError("multislerp: the weighted mean of the inputs' directions is zero (antipodal inputs whose weights cancel); change the weights")
        result = stacked[0] * weights[0] + stacked[1] * weights[1]  # two antipodes: linear
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangents * column).sum(0)
        length = torch.linalg.vector_norm(step) + eps
        on_sphere = mean * torch.cos(length) + step * (torch.sin(length) / length)
        result = (on_sphere * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result if group.base is None else result + group.base_tensor
