"""Process-wide settings for running units, made once for a pool's lifetime, never per unit.

Units run side by side in one process (the threads of the in-process pool), so no unit may change
a process-wide setting under another's feet:

- torch's intra-op thread count decides how a SLERP chunk's dot product is summed, hence the
  output bits (``nyxray.methods._slerp``). Every worker computes with :data:`MATH_THREADS` = 1 torch thread,
  the order mergekit ``--num-threads 1`` sums in; parallelism comes from units in flight, one per
  core, whose reads, writes and hashing also need the cores.
- the cyclic garbage collector is paused: a unit makes no cycles worth collecting, and each full
  collection would walk every object torch and the plan hold.
- freed memory is kept for reuse (:mod:`.heap`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from . import heap

MATH_THREADS = 1


def set_math_threads(threads: int) -> int:
    """Set torch's intra-op threads (importing torch); returns the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    return previous


def fix_math_threads() -> int:
    """Set this thread's (and new threads') torch thread count for math; returns the previous one.

    Imports torch: call it only where units compute.
    """
    return set_math_threads(MATH_THREADS)


def settle_worker_process() -> None:
    """For a process that exists to run units (a merge actor): GC paused and memory kept, for good."""
    gc.disable()
    heap.retain()


@contextmanager
def pool_settings(math: bool) -> Iterator[None]:
    """For a pool in someone else's process: the settings while the pool lives, then restored.

    ``math``: units compute (torch threads are fixed; copy-only merges never import torch).
    """
    collecting = gc.isenabled()
    gc.disable()
    threads = fix_math_threads() if math else None
    try:
        with heap.retained():
            yield
    finally:
        if threads is not None:
            set_math_threads(threads)
        if collecting:
            gc.enable()
