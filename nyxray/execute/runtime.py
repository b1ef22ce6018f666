"""The one owner of process-wide state: every setting below is made here, once for a pool's
lifetime (or for a process that exists to merge), never per unit or per tensor.

Units run side by side in one process (the threads of the in-process pool), so no unit may change
a process-wide setting under another's feet:

- torch's intra-op thread count decides how a SLERP chunk's dot product is summed, hence the
  output bits (``nyxray.methods._slerp``). Every worker computes with :data:`MATH_THREADS` = 1 torch thread,
  the order mergekit ``--num-threads 1`` sums in; parallelism comes from units in flight, one per
  core, whose reads, writes and hashing also need the cores. The methods that sum whole tensors
  only check it there (``nyxray.methods._geometry.single_threaded``, :func:`in_pool`).
- the cyclic garbage collector is paused: a unit makes no cycles worth collecting, and each full
  collection would walk every object torch and the plan hold.
- freed memory is kept for reuse, and a process that exists to merge keeps every thread in one
  malloc arena (:mod:`.heap`).
- warning filters: ``warnings.catch_warnings`` swaps the process's filter list, so one worker
  thread's would drop or restore another's; the filters the units need are installed once.
"""

from __future__ import annotations

import gc
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from . import heap

MATH_THREADS = 1
# torch warns that a tensor over read-only bytes could write to them; a unit's inputs are never written
_READ_ONLY_INPUTS = "The given buffer is not writable"
_thread = threading.local()  # .pool: this thread is a pool's worker
_worker_process = False  # this whole process runs units (a merge actor)


def set_math_threads(threads: int) -> int:
    """Set torch's intra-op threads (importing torch); returns the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    return previous


def fix_math_threads() -> int:
    """Make the calling thread a worker that computes on :data:`MATH_THREADS` torch threads (new
    threads inherit the count); returns the previous count. Imports torch: only where units compute."""
    _thread.pool = True
    return set_math_threads(MATH_THREADS)


def in_pool() -> bool:
    """Whether the calling thread runs units for a pool: there, torch's thread count was set once
    and must not change (a check may then assert it rather than set it)."""
    return _worker_process or getattr(_thread, "pool", False)


def quiet_unit_warnings() -> None:
    """Install the warning filters units need, for good (idempotent: an equal filter replaces itself)."""
    warnings.filterwarnings("ignore", message=_READ_ONLY_INPUTS, category=UserWarning)


def settle_command() -> None:
    """For the ``nyxray`` command's process, first thing in ``main``: one malloc arena (before any
    thread exists, :func:`.heap.one_arena`), and no Ray usage report unless the user asks for one."""
    heap.one_arena()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def settle_worker_process() -> None:
    """For a process that exists to run units (a merge actor): GC paused and memory kept, for good."""
    global _worker_process
    _worker_process = True
    gc.disable()
    heap.retain()
    quiet_unit_warnings()


@contextmanager
def pool_settings(math: bool) -> Iterator[None]:
    """For a pool in someone else's process: the settings while the pool lives, then restored.

    ``math``: units compute (torch threads are fixed; copy-only merges never import torch).
    The caller's thread is not made a worker: new threads take the count set here.
    """
    collecting = gc.isenabled()
    gc.disable()
    quiet_unit_warnings()
    threads = set_math_threads(MATH_THREADS) if math else None
    try:
        with heap.retained():
            yield
    finally:
        if threads is not None:
            set_math_threads(threads)
        if collecting:
            gc.enable()
