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
