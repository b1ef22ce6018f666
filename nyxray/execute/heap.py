"""Keep freed memory in the process while units run, instead of handing it back to the kernel.

A unit allocates and frees the same large buffers over and over (64 MiB read batches, output
tensors, SLERP chunks). glibc's default hands every block above its mmap threshold back to the
kernel on free, so the next allocation page-faults all of it in again: at 1 GB per model that
costs more CPU than the SLERP arithmetic. Raising the mmap and trim thresholds makes freed blocks
reusable; the heap then stays at its peak, which the unit's bounded prefetch and write queue
already bound. Only glibc has ``mallopt``; elsewhere this does nothing.

The thresholds alone do not reach the worker threads: glibc gives each thread an arena of its
own, made of heaps of at most 64 MiB, so a block of 64 MiB or more (a read batch, a large tensor)
is mapped for itself whatever the threshold, and unmapped when freed; every one of a worker
thread's big buffers is page-faulted in afresh (7B SLERP: 9.3 million faults, 76 s of system
time in a 135 s run). A process that exists to merge therefore keeps all threads in the main
arena (:data:`ARENA_ENV`, :func:`one_arena`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}  # for processes started to merge (Ray actors): read by glibc at start
RETAIN = 1 << 30  # blocks up to 1 GiB come from the heap and stay there once freed
DEFAULT = 128 * 1024  # glibc's initial thresholds


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _set(threshold: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.mallopt(M_TRIM_THRESHOLD, threshold)


def one_arena() -> None:
    """Every thread allocates from the main arena (see the module docstring). Takes effect only
    when called before the process has started threads: first thing in a command's ``main``."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)


def retain() -> None:
    """For a process that exists to run units (a merge actor): keep freed memory for good."""
    _set(RETAIN)


@contextmanager
def retained() -> Iterator[None]:
    """For units run in someone else's process: keep freed memory, then give it all back."""
    _set(RETAIN)
    try:
        yield
    finally:
        _set(DEFAULT)
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
