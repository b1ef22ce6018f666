"""Run work units in this process, one after another: tests, debugging, tiny merges."""

from __future__ import annotations

import platform
from typing import Callable

from ..devices import resolve_device, set_math_threads
from . import heap
from .progress import Progress
from .unit import Unit, UnitResult, run_unit


def execute(units: list[Unit], device: str, progress: Progress, on_result: Callable[[Unit, UnitResult], None]) -> list[dict]:
    """Run every unit here; returns the per-worker summary (one worker)."""
    dev = resolve_device(device)
    # One torch thread, as in an actor: the reader and writer threads (and hashing) need the other
    # cores, and OpenMP's spinning costs more than it gains here (bench/README.md).
    with heap.retained():
        if not any(u.needs_math for u in units):
            return _run(units, dev, progress, on_result)
        threads = set_math_threads(1)
        try:
            return _run(units, dev, progress, on_result)
        finally:
            from ..ops import free_buffers  # torch is loaded already: math ran here

            free_buffers()  # the caller's process, not ours: keep nothing after the merge
            set_math_threads(threads)


def _run(units: list[Unit], dev: str, progress: Progress, on_result: Callable[[Unit, UnitResult], None]) -> list[dict]:
    progress.begin()
    worker = {"actor": 0, "node_id": platform.node(), "device": dev, "units": 0, "bytes_read": 0, "bytes_written": 0, "busy_s": 0.0}
    for unit in units:
        result = run_unit(unit, dev, lambda r, w: progress.add(r, w))
        progress.add(units=1)
        worker["bytes_read"] += result.bytes_read
        worker["bytes_written"] += result.unit_bytes_written
        worker["busy_s"] += result.busy_s
        worker["units"] += 1
        result.worker = {"actor": 0, "node_id": worker["node_id"], "device": dev}
        on_result(unit, result)
    return [worker]
