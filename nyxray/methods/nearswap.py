"""NearSwap: take the other model's value where it is close to the base's, keep the base elsewhere.

Per element, with d = |base - other|, the other model's share is min(1, t / max(d, 1e-6)): equal
to 1 where d <= t, fading as t / d beyond. Computed in the inputs' dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

import torch

from .base import Group


def merge(group: Group) -> torch.Tensor:
    base, (other,) = group.base_tensor, group.others
    distance = torch.abs(base - other)
    share = (group.params["t"] / distance.clamp(min=1e-6)).clamp(min=0, max=1)
    return share * other + (1 - share) * base
