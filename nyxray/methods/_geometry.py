"""Helpers shared by the geometric methods (model stock, NuSLERP, Multi-SLERP, RAM, ...).

They replay mergekit 0.1.5's torch operations exactly: same ops, same dtypes, same order, so the
bits match. Keep them that way: an algebraically equal rewrite changes the rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from ..execute.runtime import in_pool
from .base import Group

F = TypeVar("F", bound=Callable[..., torch.Tensor])


def offsets(group: Group) -> list[torch.Tensor]:
    """Each non-base input minus the base, in the inputs' dtype; the inputs themselves without a base."""
    if group.base is None:
        return group.others
    base = group.base_tensor
    return [t - base for t in group.others]


def single_threaded(fn: F) -> F:
    """Make sure ``fn`` computes on one torch thread.

    Whole-tensor sums and norms split their work across threads, and the split changes the order
    of the additions, hence the bits; mergekit's reference runs with ``--num-threads 1``. In a
    pool's worker the runtime set one thread once (:mod:`nyxray.execute.runtime`), so this only
    asserts it: changing the count there would race with the other workers. A direct call from
    elsewhere (a script, a test) is run on one thread and the caller's count restored.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        if in_pool():
            raise RuntimeError(f"{fn.__name__}: a pool worker computes on {threads} torch threads, not 1 (nyxray.execute.runtime sets it)")
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper  # type: ignore[return-value]
