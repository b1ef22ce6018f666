"""Run work units on Ray actors: the driver hands out shards, actors read, compute and write.

One actor per GPU (``num_gpus=1``) when the cluster has GPUs and the device allows it, else one per
``actor_cpus`` CPUs. Idle actors pull the next unit (largest first), so a slow node does not stall
the run. Only units (metadata) go to actors and only small manifests come back: no tensor data
passes through the driver or the object store. An actor or node that dies loses only its unit,
which goes to another actor; a unit that fails for a deterministic reason (bad input, storage
refusing access) fails the run at once with its cause.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import ray

from ..errors import NyxrayError
from ..devices import resolve_device, set_math_threads
from . import heap
from .actor_pool import POOL
from .progress import Progress
from .unit import Unit, UnitResult, run_unit

MAX_ATTEMPTS = 4  # per unit, counting only lost actors/nodes


def connect(address: str | None = None) -> None:
    """Attach to ``address`` / ``RAY_ADDRESS`` (a cluster or the job's own), else start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING")


class MergeActor:
    """Owns one device and runs units on it, one at a time; reports bytes moved for progress."""

    def __init__(self, index: int, device: str, threads: int):
        self.index, self.threads = index, threads
        self.device = resolve_device(device)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._lock = threading.Lock()
        self._moved = [0, 0]
        heap.retain()  # this process only runs units

    def ready(self, math: bool) -> tuple[str, str, str | None]:
        """(node id, device, problem): the driver hands units only to actors that answered this.

        An actor that will compute loads torch here (about a second on a CPU), so that start-up is
        over before its first unit; copy-only merges never load it.
        """
        problem = None
        if self.device.startswith("cuda") and not _cuda_available():
            ip = ray.util.get_node_ip_address()
            problem = f"device {self.device!r}: no CUDA device is visible to the merge actor on node {ip} (use --device cpu, or a cluster with GPUs)"
        if math:
            set_math_threads(self.threads)
        return self.node_id, self.device, problem

    def _progress(self, read: int, written: int) -> None:
        with self._lock:
            self._moved[0] += read
            self._moved[1] += written

    def poll(self) -> tuple[int, int]:
        with self._lock:
            moved, self._moved = self._moved, [0, 0]
        return moved[0], moved[1]

    def run(self, unit: Unit) -> UnitResult:
        result = run_unit(unit, self.device, self._progress)
        result.worker = {"actor": self.index, "node_id": self.node_id, "device": self.device}
        return result


def _cuda_available() -> bool:
    import torch  # only for CUDA devices: a CPU actor imports torch only when the merge computes (ready)

    return torch.cuda.is_available()


def _actor_count(device: str, actors: int | None, actor_cpus: float, actor_gpus: float | None) -> tuple[int, float, float]:
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0.0)
    use_gpu = device in ("auto", "cuda") or device.startswith("cuda")
    per_gpu = actor_gpus if actor_gpus is not None else (1.0 if use_gpu and gpus >= 1 else 0.0)
    if actors is None:
        actors = int(gpus // per_gpu) if per_gpu > 0 else int(res.get("CPU", 1) // actor_cpus)
    return max(1, actors), actor_cpus, per_gpu


def execute(
    units: list[Unit],
    device: str,
    progress: Progress,
    on_result: Callable[[Unit, UnitResult], None],
    address: str | None = None,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    actor_gpus: float | None = None,
    keep_actors: float = 0.0,
) -> list[dict]:
    """Run the units on Ray actors; returns per-actor summaries for the report.

    A unit goes only to an actor that has started and answered :meth:`MergeActor.ready`, so actors
    the cluster cannot place (more than it holds, or a restart with no room left after a node was
    lost) never hold a unit hostage; the others do the work. If no actor can run at all for
    ``NYXRAY_ACTOR_START_TIMEOUT`` seconds (default 600: time for an autoscaler), the run fails.
    Actors kept by an earlier merge of this process are reused; with ``keep_actors`` seconds this
    run's actors are kept too (:mod:`.actor_pool`), else they are stopped when it ends.
    """
    connect(address)
    n, cpus, gpus = _actor_count(device, actors, actor_cpus, actor_gpus)
    n = min(n, max(1, len(units)))
    cls = ray.remote(MergeActor).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_restarts=-1,
        max_task_retries=0,  # the driver decides what to retry
        max_concurrency=2,  # run() and poll() at once
        scheduling_strategy="SPREAD",
    )
    if device == "auto":
        dev = "cuda" if gpus > 0 else "cpu"
    elif device.startswith("cuda") and gpus > 0:
        dev = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU(s): cuda:N would be another's
    else:
        dev = device
    math = any(u.needs_math for u in units)
    threads = max(1, int(cpus))
    shape = (cpus, gpus, dev, threads)
    handles = POOL.take(shape, n, lambda i: cls.remote(i, dev, threads))
    finished = False
    summary = [{"actor": i, "node_id": None, "device": None, "units": 0, "bytes_read": 0, "bytes_written": 0, "busy_s": 0.0, "units_lost": 0} for i in range(n)]
    todo = sorted(units, key=lambda u: u.shard.size + u.read_bytes)
    attempts: dict[int, int] = {}
    inflight: dict = {}
    starting: dict = {}  # ready() probe -> actor index: actors not (yet, or again) known to be up
    probes = [0] * n
    idle: list[int] = []
    start_timeout = float(os.environ.get("NYXRAY_ACTOR_START_TIMEOUT", "600"))
    last_poll = 0.0
    last_capable = time.monotonic()  # the last time some actor was up (idle or running a unit)

    def probe(i: int) -> None:
        probes[i] += 1
        starting[handles[i].ready.remote(math)] = i

    for i in range(n):
        probe(i)
    try:
        while todo or inflight:
            while idle and todo:
                i = idle.pop(0)
                unit = todo.pop()
                progress.begin()
                inflight[handles[i].run.remote(unit)] = (i, unit)
            if inflight or idle:
                last_capable = time.monotonic()
            elif not starting:
                raise NyxrayError("every merge actor was lost; none is left to run the remaining units")
            elif time.monotonic() - last_capable > start_timeout:
                raise NyxrayError(
                    f"no merge actor could start for {start_timeout:.0f} s: each needs {cpus:g} CPU{'s' if cpus != 1 else ''}"
                    + (f" and {gpus:g} GPU" if gpus else "")
                    + f"; the cluster has {_resources()} (ask for fewer or smaller actors: --actors, --actor-cpus)"
                )
            ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=0.5)
            if time.monotonic() - last_poll > 0.5:
                last_poll = time.monotonic()
                _poll([handles[i] for i in range(n) if i not in starting.values()], progress)
            for ref in ready:
                if ref in starting:
                    i = starting.pop(ref)
                    try:
                        node_id, actual, problem = ray.get(ref, timeout=60)
                    except ray.exceptions.RayActorError as e:
                        if getattr(e, "actor_init_failed", False):
                            raise NyxrayError(f"merge actor {i} could not start: {_first_line(e)}") from None
                        if probes[i] < 2 * MAX_ATTEMPTS:
                            probe(i)  # lost while starting (its node went away): it restarts elsewhere
                        continue  # else: left out; the other actors do the work
                    if problem:
                        raise NyxrayError(problem)
                    summary[i]["node_id"], summary[i]["device"] = node_id, actual
                    probes[i] = 0
                    idle.append(i)
                    continue
                i, unit = inflight.pop(ref)
                try:
                    result: UnitResult = ray.get(ref, timeout=60)
                except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError) as e:
                    key = id(unit)
                    attempts[key] = attempts.get(key, 0) + 1
                    summary[i]["units_lost"] += 1
                    if attempts[key] >= MAX_ATTEMPTS:
                        raise NyxrayError(f"shard {unit.label}{unit.shard.name}: its actor was lost {attempts[key]} times ({type(e).__name__}); giving up") from None
                    todo.append(unit)  # another actor takes it; the bytes will be the same
                    probe(i)  # the actor restarts (max_restarts): it gets units again once it is up
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
                    if isinstance(cause, NyxrayError):
                        raise cause from None
                    raise NyxrayError(f"shard {unit.label}{unit.shard.name} failed: {cause!r}" if cause else str(e)) from None
                idle.append(i)
                s = summary[result.worker["actor"]]
                s["node_id"], s["device"] = result.worker["node_id"], result.worker["device"]
                s["units"] += 1
                s["bytes_read"] += result.bytes_read
                s["bytes_written"] += result.unit_bytes_written
                s["busy_s"] += result.busy_s
                progress.add(units=1)
                on_result(unit, result)
        _poll([handles[i] for i in range(n) if i not in starting.values()], progress)
        finished = not starting  # every actor answered: none is restarting or unplaced
    finally:
        if finished and keep_actors > 0:
            POOL.keep(shape, handles, keep_actors)
        else:
            for h in handles:
                ray.kill(h)
    return summary


def _resources() -> str:
    res = ray.cluster_resources()
    return ", ".join(f"{res[k]:g} {k}" for k in ("CPU", "GPU") if k in res) or "no CPUs"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A creation-task error ends with the exception's own line ("ValueError: ..."); prefer it.
    return lines[-1] if lines else type(e).__name__


def _poll(handles: list, progress: Progress) -> None:
    if not handles:
        return
    refs = [h.poll.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
    for ref in ready:
        try:
            read, written = ray.get(ref, timeout=10)
        except ray.exceptions.RayError:
            continue  # a lost actor's counts are redone by the unit's next attempt
        progress.add(read, written)
