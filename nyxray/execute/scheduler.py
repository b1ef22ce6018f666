"""One scheduler for every pool of workers: the queue of work, retries, progress, the summary.

A pool (:class:`Pool`: Ray actors, threads of this process) only knows how to start a worker,
run a piece of work on it and tell a lost worker (:class:`WorkerLost`: its process or node went
away) from failed work (any other error). The scheduler hands the largest remaining piece to
the next idle worker, so a slow worker does not stall the run and the big pieces do not come
last. Work lost with its worker goes to another worker (the bytes are the same: units are
idempotent); work that fails fails the run at once with its cause. A worker is given work only
once it has started, so a worker that cannot be placed never holds work hostage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Generic, Protocol, TypeVar

from ..errors import NyxrayError
from .progress import Progress

MAX_ATTEMPTS = 4  # per piece of work, counting only lost workers
POLL_S = 0.5


class WorkerLost(Exception):
    """The worker went away (its process or node): its work is retried, the worker restarted."""


class Work(Protocol):
    """What the scheduler needs of a piece of work."""

    @property
    def size(self) -> int: ...  # bytes to move: the largest pieces are handed out first

    @property
    def title(self) -> str: ...  # for messages


class Result(Protocol):
    """What the scheduler needs of a finished piece: the bytes it moved and its time."""

    bytes_read: int
    busy_s: float

    @property
    def unit_bytes_written(self) -> int: ...

    @property
    def unit_hash_s(self) -> float: ...  # of busy_s, the time spent hashing the output


W = TypeVar("W", bound=Work)
R = TypeVar("R", bound=Result)


class Pool(Protocol[W, R]):
    """Workers of one kind. Futures fail with :class:`WorkerLost` when the worker went away."""

    size: int  # number of workers, indexed 0..size-1

    def start(self, worker: int) -> Future:
        """Start (or restart) ``worker``; the future gives ``(node id, device)`` once it can run work."""

    def run(self, worker: int, work: W, on_progress: Callable[[int, int], None]) -> Future:
        """Run ``work`` on a started, idle ``worker``; the future gives its result."""

    def poll(self, workers: list[int], on_progress: Callable[[int, int], None]) -> None:
        """Report the bytes the started ``workers`` moved since the last poll (if ``run`` cannot)."""

    def no_start(self, waited_s: float) -> str:
        """Why no worker could start for ``waited_s`` seconds (the run then fails with this)."""

    def close(self, finished: bool) -> None:
        """Release the workers; ``finished``: every worker is up and idle (none restarting)."""


def summary_row(worker: int) -> dict[str, Any]:
    """One worker's line of the report (``actors``)."""
    return {"actor": worker, "node_id": None, "device": None, "units": 0, "bytes_read": 0, "bytes_written": 0, "busy_s": 0.0, "hash_s": 0.0, "units_lost": 0}


class Scheduler(Generic[W, R]):
    """Runs pieces of work on a pool; :meth:`run` returns the per-worker summary."""

    def __init__(self, pool: Pool[W, R], progress: Progress, on_result: Callable[[W, R], None], start_timeout_s: float = 600.0):
        self.pool, self.progress, self.on_result, self.start_timeout_s = pool, progress, on_result, start_timeout_s
        self.summary = [summary_row(i) for i in range(pool.size)]
        self.todo: list[W] = []
        self.attempts: dict[int, int] = {}  # id(work) -> times lost with its worker
        self.running: dict[Future, tuple[int, W]] = {}
        self.starting: dict[Future, int] = {}
        self.starts = [0] * pool.size  # start attempts since the worker last answered
        self.idle: list[int] = []
        self.last_poll = 0.0
        self.last_capable = time.monotonic()  # the last time some worker was up (idle or running)

    def run(self, work: list[W]) -> list[dict[str, Any]]:
        self.todo = sorted(work, key=lambda w: w.size)  # pop() takes the largest
        for i in range(self.pool.size):
            self._start(i)
        finished = False
        try:
            while self.todo or self.running:
                self._hand_out()
                self._check_capable()
                done, _ = wait([*self.running, *self.starting], timeout=POLL_S, return_when=FIRST_COMPLETED)
                self._poll()
                for f in done:
                    self._started(f) if f in self.starting else self._finished(f)
            self._poll(force=True)
            finished = not self.starting  # every worker answered: none is restarting or unplaced
        finally:
            self.pool.close(finished)
        return self.summary

    def _start(self, i: int) -> None:
        self.starts[i] += 1
        self.starting[self.pool.start(i)] = i

    def _hand_out(self) -> None:
        while self.idle and self.todo:
            i, w = self.idle.pop(0), self.todo.pop()
            self.progress.begin()
            self.running[self.pool.run(i, w, self._moved)] = (i, w)

    def _moved(self, read: int, written: int) -> None:
        self.progress.add(read, written)

    def _check_capable(self) -> None:
        if self.running or self.idle:
            self.last_capable = time.monotonic()
        elif not self.starting:
            raise NyxrayError("every worker was lost; none is left to run the remaining work")
        elif time.monotonic() - self.last_capable > self.start_timeout_s:
            raise NyxrayError(self.pool.no_start(self.start_timeout_s))

    def _poll(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_poll > POLL_S:
            self.last_poll = time.monotonic()
            started = set(self.starting.values())
            self.pool.poll([i for i in range(self.pool.size) if i not in started], self._moved)

    def _started(self, f: Future) -> None:
        i = self.starting.pop(f)
        try:
            node_id, device = f.result()
        except WorkerLost:
            if self.starts[i] < 2 * MAX_ATTEMPTS:
                self._start(i)  # lost while starting (its node went away): it restarts elsewhere
            return  # else: left out; the other workers do the work
        except NyxrayError:
            raise
        except Exception as e:  # noqa: BLE001 - a worker that cannot start fails the run, saying why
            raise NyxrayError(f"worker {i} could not start: {e!r}") from e
        self.summary[i]["node_id"], self.summary[i]["device"] = node_id, device
        self.starts[i] = 0
        self.idle.append(i)

    def _finished(self, f: Future) -> None:
        i, w = self.running.pop(f)
        try:
            result: R = f.result()
        except WorkerLost as e:
            self._lost(i, w, e)
            return
        except NyxrayError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure of the work fails the run, naming it
            raise NyxrayError(f"{w.title} failed: {e!r}") from e
        self.idle.append(i)
        row = self.summary[i]
        row["units"] += 1
        row["bytes_read"] += result.bytes_read
        row["bytes_written"] += result.unit_bytes_written
        row["busy_s"] += result.busy_s
        row["hash_s"] += result.unit_hash_s
        self.progress.add(units=1)
        self.on_result(w, result)

    def _lost(self, i: int, w: W, e: WorkerLost) -> None:
        n = self.attempts[id(w)] = self.attempts.get(id(w), 0) + 1
        self.summary[i]["units_lost"] += 1
        if n >= MAX_ATTEMPTS:
            raise NyxrayError(f"{w.title}: its worker was lost {n} times ({e}); giving up") from None
        self.todo.append(w)  # another worker takes it; the bytes will be the same
        self._start(i)  # the worker restarts: it gets work again once it is up
