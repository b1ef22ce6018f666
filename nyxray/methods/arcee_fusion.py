"""Arcee Fusion: take the other model's value only where it matters most, keep the base elsewhere.

An element's importance is |other - base| times its row's KL divergence between the softmaxes of the
two models (last axis). Elements at or above median + 1.5 IQR of the importances take the other
model's value. The quartiles come from the sorted importances; past 1,000,000 elements, from
1,000,000 of them drawn with replacement with ``group.generator`` (mergekit 0.1.5 draws them from
torch's global generator, so there those tensors are reproducible, not bit-equal). The mask is
float32, so the result is float32 for bf16/fp16 inputs, as mergekit 0.1.5 writes it.
"""

from __future__ import annotations

import torch

from ._geometry import single_threaded
from .base import Group

_SAMPLE = 1_000_000
_QUARTILES = (0.25, 0.5, 0.75)
_EPS = 1e-8


@single_threaded
def merge(group: Group) -> torch.Tensor:
    base, (other,) = group.base_tensor, group.others
    importance = _importance(other, base)
    q1, median, q3 = _quartiles(importance, group.generator)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


def _importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(other, dim=-1) + _EPS
    q = torch.softmax(base, dim=-1) + _EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def _quartiles(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Order statistics at floor(q * (n - 1)) of the values, or of a sample of 1,000,000 of them."""
    flat = x.reshape(-1)
    if flat.numel() > _SAMPLE:
        if generator is None:
            raise ValueError("arcee_fusion samples tensors over 1,000,000 elements: it needs group.generator")
        picks = torch.randint(flat.numel(), (_SAMPLE,), generator=generator)  # drawn on the CPU
        flat = flat[picks.to(flat.device)]
    ordered, _ = torch.sort(flat)
    at = (torch.tensor(_QUARTILES) * (ordered.numel() - 1)).long()
    return ordered[at.to(ordered.device)]
