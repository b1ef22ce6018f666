"""Run work units in this process, several at once: the pool of :mod:`.scheduler` made of threads.

torch's kernels, SHA-256 and file I/O release the GIL, so units in flight on threads use the
machine's cores: one worker per core, each computing on one torch thread (:mod:`.runtime`), or
one worker per local GPU when the math runs on GPUs. Memory is bounded by the workers in flight
times a unit's own bound (:mod:`.unit`). Nothing here imports Ray.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from .cpu_capability import check
from .devices import resolve_device
from .execution import Execution
from .runtime import fix_math_threads, pool_settings
from .unit import Unit, run_unit

START_TIMEOUT_S = 600.0  # never reached: a thread starts at once


@contextmanager
def thread_pool(units: list[Unit], execution: Execution, pinned: str | None) -> Iterator[tuple[ThreadPool, float]]:
    """The pool for ``units``: ``execution.actors`` threads (default: one per core or local GPU),
    with the process settings of :mod:`.runtime` while it lives. This process must compute with
    the ``pinned`` kernel set."""
    math = any(u.needs_math for u in units)
    if math and pinned:
        check(pinned, "this process")
    devices = worker_devices(execution.device if math else "cpu", execution.actors)[: max(1, len(units))]
    with pool_settings(math):
        yield ThreadPool(devices, math), START_TIMEOUT_S


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_devices(device: str, workers: int | None = None) -> list[str]:
    """The device of each worker: every local GPU in turn for ``cuda``/``auto`` with GPUs, the one
    GPU named by ``cuda:N``, else the CPU, one worker per core."""
    dev = resolve_device(device)
    if dev.startswith("cuda:"):
        return [dev] * (workers or 1)
    if dev == "cuda":
        import torch  # loaded already: resolve_device or the caller probed CUDA

        gpus = max(1, torch.cuda.device_count())
        return [f"cuda:{i % gpus}" for i in range(workers or gpus)]
    return [dev] * (workers or cores())


class ThreadPool:
    """Workers as threads of this process; a worker never goes away, so nothing is ever lost."""

    def __init__(self, devices: list[str], math: bool):
        self.devices, self.size = devices, len(devices)
        self.node = platform.node()
        # Each thread fixes its own torch thread count (per thread under OpenMP) before any unit.
        self.threads = ThreadPoolExecutor(self.size, "nyxray-unit", initializer=fix_math_threads if math else None)

    def start(self, worker: int) -> Future:
        started: Future = Future()
        started.set_result((self.node, self.devices[worker]))
        return started

    def run(self, worker: int, work: Unit, on_progress: Callable[[int, int], None]) -> Future:
        return self.threads.submit(run_unit, work, self.devices[worker], on_progress)

    def poll(self, workers: list[int], on_progress: Callable[[int, int], None]) -> None:
        """Nothing to collect: units report their bytes as they move them."""

    def no_start(self, waited_s: float) -> str:
        return f"no worker thread started in {waited_s:.0f} s"  # unreachable: start() answers at once

    def close(self, finished: bool) -> None:
        """Wait for the units in flight (a failed run's too: none may write after the merge returns)."""
        self.threads.shutdown(wait=True, cancel_futures=True)
