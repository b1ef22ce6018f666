"""The unit runner's process hygiene: freed memory kept for reuse while units run, and given back after."""

from __future__ import annotations

import ctypes
import gc
import sys

import pytest

from nyxray.execute import heap


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_blocks() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().hblks


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._libc() is None, reason="glibc only")
def test_large_blocks_come_from_the_heap_only_while_retained():
    before = _mmapped_blocks()
    with heap.retained():
        block = bytearray(48 * 2**20)  # above glibc's default mmap threshold
        assert _mmapped_blocks() == before  # served from the heap: reusable once freed, no new faults
        del block
    block = bytearray(48 * 2**20)
    assert _mmapped_blocks() == before + 1  # defaults restored: big blocks go straight back to the kernel
    del block


def test_pool_settings_hold_for_the_pool_and_are_restored_after():
    """The in-process pool pauses the GC and fixes torch's threads once, for its lifetime (units
    run side by side, so none may toggle them), and gives the caller's process its own back."""
    import torch

    from nyxray.execute.runtime import MATH_THREADS, pool_settings

    before = torch.get_num_threads()
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            with pytest.raises(RuntimeError):
                with pool_settings(math=True):
                    assert not gc.isenabled() and torch.get_num_threads() == MATH_THREADS
                    raise RuntimeError("a unit failed")  # the state must still come back
            assert gc.isenabled() == enabled and torch.get_num_threads() == before
        finally:
            gc.enable()


FAULTS_PROBE = """
import resource, sys, threading
from nyxray.execute import heap
if sys.argv[1] == "one-arena":
    heap.one_arena()  # as the nyxray command does, before any thread exists
heap.retain()
faults = []
def worker():  # a unit's thread: read batches (64 MiB) allocated, filled and freed, again and again
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(12):
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        del block
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=worker)
t.start()
t.join()
print(faults[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._libc() is None, reason="glibc only")
def test_one_arena_lets_worker_threads_reuse_freed_blocks():
    """In its own arena a thread's blocks of 64 MiB are mapped for themselves and unmapped when
    freed, so every unit's buffers fault in again; in the main arena, retained, they are reused."""
    import subprocess

    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], check=True, capture_output=True, text=True).stdout)

    pages = 64 * 2**20 // 4096
    shared, own = faults("one-arena"), faults("own-arenas")
    assert shared < 2 * pages, shared  # the first block's pages only
    assert own > 6 * pages, own  # the control: without it, the pages of most of the 12 blocks
