"""Start the disk writes of a local file's finished bytes while the rest of it is still computed.

A shard (or part) is fsynced before the driver records it, and without help the kernel leaves most
of its pages dirty until then: the worker then waits at ``fsync`` for the whole file's writeback,
its math and the disk taking turns. Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues the
writeback of a range without waiting for it, so the disk works while the next tensors are computed
and the final ``fsync`` (still what makes the bytes durable) finds little left. Elsewhere this does
nothing and the ``fsync`` does it all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

STEP = 32 * 2**20  # bytes written between two writeback requests
SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


class Writeback:
    """Queues the writeback of ``fd``'s bytes from ``start`` on, every :data:`STEP` bytes written."""

    def __init__(self, fd: int, start: int = 0):
        self.fd, self.queued = fd, start
        self.call = _sync_file_range() if sys.platform.startswith("linux") else None

    def wrote(self, end: int) -> None:
        """The file's bytes up to ``end`` are written (to the page cache)."""
        if self.call is not None and end - self.queued >= STEP:
            self.call(self.fd, self.queued, end - self.queued, SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start
            self.queued = end
