"""SLERP of the base model (t=0) and the other model (t=1); the kernel is :func:`nyxray.methods._slerp.slerp`."""

from __future__ import annotations

import torch

from ._slerp import slerp
from .base import Group


def merge(group: Group) -> torch.Tensor:
    (other,) = group.others
    return slerp(group.base_tensor, other, group.params["t"], group.base_tensor.dtype)
