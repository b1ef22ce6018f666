"""SLERP of the base model (t=0) and the other model (t=1); the kernel is :func:`nyxray.methods._slerp.slerp`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._slerp import chunks_of, slerp, slerp_chunks
from .base import Group


def merge(group: Group) -> torch.Tensor:
    (other,) = group.others
    return slerp(group.base_tensor, other, group.params["t"], group.base_tensor.dtype)


def merge_chunks(group: Group, out_dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """:func:`merge` over :class:`~nyxray.methods.base.ChunkSource` inputs: the output in pieces."""
    (other,) = group.others
    return slerp_chunks(chunks_of(group.base_tensor, "a"), chunks_of(other, "b"), group.params["t"], out_dtype)
