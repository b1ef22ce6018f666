"""NuSLERP: SLERP of two models (or of their offsets from a base), with t from their weights.

t = w_2 / (w_1 + w_2) (0.5 when the weights sum to about 0). The angle is taken over the whole
flattened tensor (``nuslerp_flatten``, the default), or per row of the last axis, or per column
(``nuslerp_row_wise``: along the first axis). All in the inputs' dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

import torch

from ._geometry import offsets, single_threaded
from .base import Group

_NORM_FLOOR = 1e-7
_COLINEAR = 1e-8**2  # 1 - cos^2 at or below this: linear interpolation (as mergekit writes it, not 1e-16)


@single_threaded
def merge(group: Group) -> torch.Tensor:
    w1, w2 = group.per_input["weight"]
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    v0, v1 = offsets(group)
    result = _slerp(t, v0, v1, flatten=group.params["nuslerp_flatten"], row_wise=group.params["nuslerp_row_wise"])
    return result if group.base is None else group.base_tensor + result


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """SLERP along the last axis after flattening, or after moving the first axis last (row_wise)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
