"""Passthrough: one input, copied (a renamed source tensor), optionally scaled."""

from __future__ import annotations

import torch

from .base import Group


def merge(group: Group) -> torch.Tensor:
    (tensor,) = group.tensors
    scale = group.per_input["scale"][0]
    return tensor if scale is None else tensor * scale
