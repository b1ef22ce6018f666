"""The pool factory: from an :class:`~.execution.Execution` and the chosen executor, the pool of
workers the scheduler runs units on (threads of this process, or Ray actors), with the device
checked where that pool computes. Ray is imported only for the Ray pool.
"""

from __future__ import annotations

from collections.abc import Callable

from .devices import check_local_cuda
from .execution import Execution
from .progress import Progress
from .scheduler import Scheduler
from .unit import Unit, UnitResult


def check_device(execution: Execution, executor: str) -> None:
    """Check a CUDA device where the math will run, before any output is claimed: this process
    for the local executor, the Ray cluster otherwise. ``auto`` falls back to the CPU: no check."""
    if not execution.device.startswith("cuda"):
        return
    if executor == "local":
        check_local_cuda(execution.device)
        return
    from .ray_exec import check_cluster_device

    check_cluster_device(execution)


def run_units(
    executor: str, units: list[Unit], execution: Execution, pinned: str | None, progress: Progress, on_result: Callable[[Unit, UnitResult], None]
) -> list[dict]:
    """Run ``units`` on the ``executor``'s pool, every worker computing with the ``pinned`` CPU
    kernel set; returns the per-worker summary for the report."""
    if executor == "local":
        from .local import thread_pool as opened
    else:
        from .ray_exec import actor_pool as opened
    with opened(units, execution, pinned) as (pool, start_timeout_s):
        return Scheduler(pool, progress, on_result, start_timeout_s).run(units)
