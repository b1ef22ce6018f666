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
from ..ops import resolve_device
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
        import torch

        torch.set_num_threads(max(1, threads))  # a reused worker keeps its first thread count
        self.index = index
        self.device = resolve_device(device)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._lock = threading.Lock()
        self._moved = [0, 0]

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
) -> list[dict]:
    """Run the units on Ray actors; returns per-actor summaries for the report."""
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
    dev = "cuda" if gpus > 0 and device == "auto" else ("cpu" if device == "auto" else device)
    handles = [cls.remote(i, dev, max(1, int(cpus))) for i in range(n)]
    summary = [{"actor": i, "node_id": None, "device": None, "units": 0, "bytes_read": 0, "bytes_written": 0, "busy_s": 0.0} for i in range(n)]
    todo = sorted(units, key=lambda u: u.shard.size + u.read_bytes)
    attempts: dict[int, int] = {}
    inflight: dict = {}
    idle = list(range(n))
    last_poll = 0.0
    try:
        while todo or inflight:
            while idle and todo:
                i = idle.pop(0)
                unit = todo.pop()
                inflight[handles[i].run.remote(unit)] = (i, unit)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            if time.monotonic() - last_poll > 0.5:
                last_poll = time.monotonic()
                _poll(handles, progress)
            for ref in ready:
                i, unit = inflight.pop(ref)
                idle.append(i)
                try:
                    result: UnitResult = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError) as e:
                    key = id(unit)
                    attempts[key] = attempts.get(key, 0) + 1
                    if attempts[key] >= MAX_ATTEMPTS:
                        raise NyxrayError(f"shard {unit.label}{unit.shard.name}: its actor was lost {attempts[key]} times ({type(e).__name__}); giving up") from None
                    todo.append(unit)  # another actor takes it; the bytes will be the same
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
                    if isinstance(cause, NyxrayError):
                        raise cause from None
                    raise NyxrayError(f"shard {unit.label}{unit.shard.name} failed: {cause!r}" if cause else str(e)) from None
                s = summary[result.worker["actor"]]
                s["node_id"], s["device"] = result.worker["node_id"], result.worker["device"]
                s["units"] += 1
                for k in ("bytes_read", "bytes_written", "busy_s"):
                    s[k] += getattr(result, k)
                progress.add(units=1)
                on_result(unit, result)
        _poll(handles, progress)
    finally:
        for h in handles:
            ray.kill(h)
    return summary


def _poll(handles: list, progress: Progress) -> None:
    refs = [h.poll.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
    for ref in ready:
        try:
            read, written = ray.get(ref)
        except ray.exceptions.RayError:
            continue  # a lost actor's counts are redone by the unit's next attempt
        progress.add(read, written)
