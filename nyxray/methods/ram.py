"""RAM and RAM+ (tensor-local): merge task vectors so shared updates are averaged, unique ones kept.

A model "touches" an element when its task vector there exceeds ``epsilon`` in magnitude. An element
touched by one model takes that model's update whole; one touched by several takes the mean of
their updates. RAM+ further scales each model's unique updates by 1 + r * min(rho, alpha), rho
being the ratio of its shared to its unique touched elements; that factor is float32, which
promotes RAM+'s result to float32 for bf16/fp16 inputs (mergekit 0.1.5 writes it so).
"""

from __future__ import annotations

import torch

from ._geometry import offsets
from .base import Group


def merge_ram(group: Group) -> torch.Tensor:
    if not group.others:
        return group.base_tensor
    vectors, touched, counts = _touches(group)
    kept = vectors * touched
    merged = (kept * (counts == 1) + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return group.base_tensor + merged.reshape_as(group.base_tensor)


def merge_ramplus_tl(group: Group) -> torch.Tensor:
    if not group.others:
        return group.base_tensor
    r, alpha, epsilon = (group.params[k] for k in ("r", "alpha", "epsilon"))
    vectors, touched, counts = _touches(group)
    unique, shared = counts == 1, counts > 1
    rho = (touched & shared).sum(dim=1) / (touched & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    kept = vectors * touched
    merged = (kept * unique * boost.unsqueeze(-1) + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return group.base_tensor + merged.reshape_as(group.base_tensor)


def _touches(group: Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors as rows [models, elements], where each exceeds epsilon, and how many do per element."""
    vectors = torch.stack(offsets(group)).view(len(group.others), -1)
    touched = vectors.abs() > group.params["epsilon"]
    return vectors, touched, touched.sum(dim=0, keepdim=True)
