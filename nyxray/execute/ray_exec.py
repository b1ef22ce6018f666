"""Run work units on Ray actors: the pool of :mod:`.scheduler` whose workers are Ray actors.

One actor per GPU (``num_gpus=1``) when the cluster has GPUs and the device allows it, else one per
``actor_cpus`` CPUs. An actor runs one unit at a time and computes on one torch thread
(:mod:`.runtime`); its other CPUs serve the unit's reads, writes and hashing. Only units (metadata)
go to actors and only small manifests come back: no tensor data passes through the driver or the
object store. An actor or node that dies is a lost
worker (:class:`~.scheduler.WorkerLost`): the scheduler gives its unit to another actor; a unit
that fails for a deterministic reason (bad input, storage refusing access) fails the run.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import ray

from ..errors import NyxrayError
from . import heap
from .actor_pool import POOL
from .cpu_capability import ENV as CAPABILITY_ENV
from .cpu_capability import check as check_capability
from .devices import check_cluster_cuda, resolve_device
from .execution import Execution
from .runtime import MATH_THREADS, fix_math_threads, settle_worker_process
from .scheduler import WorkerLost
from .unit import Unit, UnitResult, run_unit

WARM_IDLE_S = 120.0  # warmed actors left unused this long (a plan that never came) are stopped
WARM_MAX = 16  # actors started before the plan: a big cluster's every slot for a 3-unit merge would be waste


def connect(address: str | None = None) -> None:
    """Attach to ``address`` / ``RAY_ADDRESS`` (a cluster or the job's own), else start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING")


def check_cluster_device(execution: Execution) -> None:
    """Check a CUDA device on the Ray cluster (connected to here) before any output is claimed."""
    connect(execution.address)
    check_cluster_cuda(execution.device, ray.cluster_resources().get("GPU", 0.0), execution.actor_gpus)


class MergeActor:
    """Owns one device and runs units on it, one at a time; reports bytes moved for progress."""

    def __init__(self, device: str):
        self.device = resolve_device(device)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._lock = threading.Lock()
        self._moved = [0, 0]
        settle_worker_process()  # this process only runs units

    def ready(self, math: bool, pinned: str | None = None) -> tuple[str, str]:
        """(node id, device): the driver hands units only to actors that answered this.

        An actor that will compute loads torch here (about a second on a CPU), checks that it runs
        the ``pinned`` CPU kernel set and fixes its math threads, so that start-up is over before
        its first unit; copy-only merges never load it.
        """
        if self.device.startswith("cuda") and not _cuda_available():
            ip = ray.util.get_node_ip_address()
            raise NyxrayError(f"device {self.device!r}: no CUDA device is visible to the merge actor on node {ip} (use --device cpu, or a cluster with GPUs)")
        if math:
            if pinned:
                check_capability(pinned, f"the merge actor on node {ray.util.get_node_ip_address()}")
            fix_math_threads()
        return self.node_id, self.device

    def _progress(self, read: int, written: int) -> None:
        with self._lock:
            self._moved[0] += read
            self._moved[1] += written

    def poll(self) -> tuple[int, int]:
        with self._lock:
            moved, self._moved = self._moved, [0, 0]
        return moved[0], moved[1]

    def run(self, unit: Unit) -> UnitResult:
        try:
            return run_unit(unit, self.device, self._progress)
        finally:
            gc.collect()  # the collector is paused for good here (one unit at a time): collect between units


def _cuda_available() -> bool:
    import torch  # only for CUDA devices: a CPU actor imports torch only when the merge computes (ready)

    return torch.cuda.is_available()


def _actor_count(execution: Execution) -> tuple[int, float, float]:
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0.0)
    device, actors = execution.device, execution.actors
    use_gpu = device in ("auto", "cuda") or device.startswith("cuda")
    per_gpu = execution.actor_gpus if execution.actor_gpus is not None else (1.0 if use_gpu and gpus >= 1 else 0.0)
    if actors is None:
        actors = int(gpus // per_gpu) if per_gpu > 0 else int(res.get("CPU", 1) // execution.actor_cpus)
    return max(1, actors), execution.actor_cpus, per_gpu


def _actor_kind(device: str, cpus: float, gpus: float, pinned: str | None) -> tuple[tuple, Callable[[int], Any]]:
    """The shape of the merge actors (what makes them interchangeable) and how to start one.
    torch reads its CPU kernel set when imported, so ``pinned`` goes in the process environment."""
    if device == "auto":
        dev = "cuda" if gpus > 0 else "cpu"
    elif device.startswith("cuda") and gpus > 0:
        dev = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU(s): cuda:N would be another's
    else:
        dev = device
    cls = ray.remote(MergeActor).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_restarts=-1,
        max_task_retries=0,  # the scheduler decides what to retry
        max_concurrency=2,  # run() and poll() at once
        scheduling_strategy="SPREAD",
        runtime_env={"env_vars": {**heap.ARENA_ENV, **({CAPABILITY_ENV: pinned} if pinned else {})}},  # merged with the job's own by Ray
    )
    return (cpus, gpus, dev, MATH_THREADS, pinned), lambda i: cls.remote(dev)


def warm_up(execution: Execution, math: bool, pinned: str | None) -> list[Any]:
    """Start the merge actors now, before the plan exists, so that their start-up (a worker process,
    torch's import when ``math``, an autoscaler's new nodes) overlaps the driver's header reads.

    They wait in the kept-actor pool (:mod:`.actor_pool`) for the merge that takes them: as many as
    the cluster holds, at most :data:`WARM_MAX` (the plan may need fewer: the merge stops the rest,
    or more: it starts them then). Returns the handles for :func:`cool_down` if planning fails.
    """
    connect(execution.address)
    n, cpus, gpus = _actor_count(execution)
    shape, create = _actor_kind(execution.device, cpus, gpus, pinned)
    handles = POOL.take(shape, min(n, max(WARM_MAX, POOL.waiting(shape))), create)  # kept actors are never stopped here
    for h in handles:
        h.ready.remote(math, pinned)  # not awaited: the merge's own ready() call finds the work done
    POOL.keep(shape, handles, WARM_IDLE_S)
    return handles


def cool_down(handles: list[Any]) -> None:
    """Stop the actors :func:`warm_up` started for a merge that will not run (its plan failed)."""
    POOL.drop(handles)


@contextmanager
def actor_pool(units: list[Unit], execution: Execution, pinned: str | None) -> Iterator[tuple[ActorPool, float]]:
    """The pool for ``units``: Ray actors computing with the ``pinned`` kernel set, and how long
    the scheduler waits for one to start.

    If no actor can run at all for ``NYXRAY_ACTOR_START_TIMEOUT`` seconds (default 600: time for an
    autoscaler), the run fails. Actors kept by an earlier merge of this process are reused; with
    ``keep_actors`` seconds this run's actors are kept too (:mod:`.actor_pool`), else they are
    stopped when it ends.
    """
    connect(execution.address)
    yield ActorPool(units, execution, pinned), float(os.environ.get("NYXRAY_ACTOR_START_TIMEOUT", "600"))


class ActorPool:
    """Merge actors as the scheduler's workers: started (or taken from the kept ones) at creation."""

    def __init__(self, units: list[Unit], execution: Execution, pinned: str | None):
        n, self.cpus, self.gpus = _actor_count(execution)
        self.size = min(n, max(1, len(units)))
        self.keep_actors = execution.keep_actors
        self.math = any(u.needs_math for u in units)
        self.pinned = pinned
        self.shape, create = _actor_kind(execution.device, self.cpus, self.gpus, pinned)
        self.handles = POOL.take(self.shape, self.size, create)

    def start(self, worker: int) -> Future:
        def lost_or_failed(e: BaseException) -> BaseException:
            if isinstance(e, ray.exceptions.RayActorError):
                if getattr(e, "actor_init_failed", False):
                    return NyxrayError(f"merge actor {worker} could not start: {_first_line(e)}")
                return WorkerLost(type(e).__name__)  # its node went away: it restarts elsewhere
            return _cause(e)

        return _future(self.handles[worker].ready.remote(self.math, self.pinned), lost_or_failed)

    def run(self, worker: int, work: Unit, on_progress: Callable[[int, int], None]) -> Future:
        """``on_progress`` is not called from here: actors report through :meth:`poll`."""

        def lost_or_failed(e: BaseException) -> BaseException:
            if isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError)):
                return WorkerLost(type(e).__name__)
            return _cause(e)

        return _future(self.handles[worker].run.remote(work), lost_or_failed)

    def poll(self, workers: list[int], on_progress: Callable[[int, int], None]) -> None:
        if not workers:
            return
        refs = [self.handles[i].poll.remote() for i in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        for ref in ready:
            try:
                read, written = ray.get(ref, timeout=10)
            except ray.exceptions.RayError:
                continue  # a lost actor's counts are redone by the unit's next attempt
            on_progress(read, written)

    def no_start(self, waited_s: float) -> str:
        return (
            f"no merge actor could start for {waited_s:.0f} s: each needs {self.cpus:g} CPU{'s' if self.cpus != 1 else ''}"
            + (f" and {self.gpus:g} GPU" if self.gpus else "")
            + f"; the cluster has {_resources()} (ask for fewer or smaller actors: --actors, --actor-cpus)"
        )

    def close(self, finished: bool) -> None:
        if finished and self.keep_actors > 0:
            POOL.keep(self.shape, self.handles, self.keep_actors)
        else:
            for h in self.handles:
                ray.kill(h)


def _future(ref: Any, translate: Callable[[BaseException], BaseException]) -> Future:
    """A future for an actor call's result whose error is what ``translate`` makes of Ray's."""
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            out.set_result(f.result())
        except BaseException as e:  # noqa: BLE001 - handed to the scheduler through the future
            out.set_exception(translate(e))

    out.ref = ref  # type: ignore[attr-defined]  # the call's result lives as long as the future
    ref.future().add_done_callback(done)
    return out


def _cause(e: BaseException) -> BaseException:
    """The exception a remote call raised (the unit's own error), else Ray's."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, BaseException) else NyxrayError(str(e))
    return e


def _resources() -> str:
    res = ray.cluster_resources()
    return ", ".join(f"{res[k]:g} {k}" for k in ("CPU", "GPU") if k in res) or "no CPUs"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A creation-task error ends with the exception's own line ("ValueError: ..."); prefer it.
    return lines[-1] if lines else type(e).__name__
