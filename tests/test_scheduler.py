"""The scheduler on fake pools, without Ray: order, retries of lost work, failures, start-up, summary."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from nyxray.errors import NyxrayError, StorageError
from nyxray.execute.progress import Progress
from nyxray.execute.scheduler import MAX_ATTEMPTS, Scheduler, WorkerLost


@dataclass(eq=False)
class Piece:
    size: int
    title: str


@dataclass
class Done:
    bytes_read: int
    busy_s: float
    unit_bytes_written: int
    unit_hash_s: float = 0.0


def done(value=None, error: BaseException | None = None) -> Future:
    f: Future = Future()
    f.set_exception(error) if error else f.set_result(value)
    return f


class FakePool:
    """``size`` workers; ``behave(worker, piece, attempt)`` returns a Done or raises; starts answer
    at once unless ``never_start`` names the worker (its start future never completes)."""

    def __init__(
        self, size: int, behave: Callable[[int, Piece, int], Done] | None = None, never_start: set[int] = frozenset(), lost_starts: dict[int, int] | None = None
    ):
        self.size, self.never_start = size, never_start
        self.behave = behave or (lambda w, p, a: Done(p.size, 0.1, 2 * p.size, 0.05))
        self.lost_starts = dict(lost_starts or {})  # worker -> starts that fail as lost
        self.ran: list[tuple[int, str]] = []
        self.starts: list[int] = []
        self.attempts: dict[str, int] = {}
        self.closed: bool | None = None

    def start(self, worker: int) -> Future:
        self.starts.append(worker)
        if worker in self.never_start:
            return Future()
        if self.lost_starts.get(worker, 0) > 0:
            self.lost_starts[worker] -= 1
            return done(error=WorkerLost("node gone"))
        return done((f"node{worker}", "cpu"))

    def run(self, worker: int, work: Piece, on_progress) -> Future:
        self.ran.append((worker, work.title))
        a = self.attempts[work.title] = self.attempts.get(work.title, 0) + 1
        try:
            return done(self.behave(worker, work, a))
        except BaseException as e:  # noqa: BLE001 - the future carries it, as a pool's would
            return done(error=e)

    def poll(self, workers, on_progress) -> None:
        pass

    def no_start(self, waited_s: float) -> str:
        return f"fake: nothing started in {waited_s:g} s"

    def close(self, finished: bool) -> None:
        self.closed = finished


def schedule(pool, pieces, timeout_s: float = 600.0):
    got: list[tuple[str, Done]] = []
    progress = Progress(len(pieces), 0, 0, enabled=False)
    summary = Scheduler(pool, progress, lambda p, r: got.append((p.title, r)), timeout_s).run(pieces)
    return summary, got, progress


def test_largest_first_and_the_summary_adds_up():
    pool = FakePool(1)
    pieces = [Piece(3, "c"), Piece(10, "a"), Piece(1, "d"), Piece(7, "b")]
    summary, got, progress = schedule(pool, pieces)
    assert [t for _, t in pool.ran] == ["a", "b", "c", "d"]
    assert [t for t, _ in got] == ["a", "b", "c", "d"]
    assert summary == [
        {
            "actor": 0,
            "node_id": "node0",
            "device": "cpu",
            "units": 4,
            "bytes_read": 21,
            "bytes_written": 42,
            "busy_s": pytest.approx(0.4),
            "hash_s": pytest.approx(0.2),
            "units_lost": 0,
        }
    ]
    assert progress.done == 4 and progress.began is not None
    assert pool.closed is True


def test_lost_work_is_retried_on_a_restarted_worker_and_counted():
    def behave(w: int, p: Piece, attempt: int) -> Done:
        if p.title == "big" and attempt == 1:
            raise WorkerLost("RayActorError")
        return Done(p.size, 0.0, p.size)

    pool = FakePool(2, behave)
    summary, got, _ = schedule(pool, [Piece(5, "big"), Piece(1, "small")])
    assert sorted(t for t, _ in got) == ["big", "small"]  # each delivered once
    assert pool.attempts["big"] == 2
    assert sum(row["units_lost"] for row in summary) == 1
    assert sum(row["units"] for row in summary) == 2
    assert pool.starts.count(pool.ran[0][0]) == 2  # the worker that lost it was started again


def test_work_lost_too_often_fails_the_run():
    pool = FakePool(2, lambda w, p, a: (_ for _ in ()).throw(WorkerLost("OutOfMemoryError")))
    with pytest.raises(NyxrayError, match=f"shard x: its worker was lost {MAX_ATTEMPTS} times"):
        schedule(pool, [Piece(1, "shard x")])
    assert pool.attempts["shard x"] == MAX_ATTEMPTS
    assert pool.closed is False


def test_failed_work_fails_the_run_at_once_naming_it():
    pool = FakePool(2, lambda w, p, a: (_ for _ in ()).throw(ValueError("bad bytes")))
    with pytest.raises(NyxrayError, match=r"shard y failed: ValueError\('bad bytes'\)"):
        schedule(pool, [Piece(1, "shard y")])
    assert pool.attempts == {"shard y": 1}  # not retried


def test_a_nyxray_error_from_work_is_raised_as_it_is():
    error = StorageError("s3://b/k: access denied")
    pool = FakePool(1, lambda w, p, a: (_ for _ in ()).throw(error))
    with pytest.raises(StorageError) as e:
        schedule(pool, [Piece(1, "z")])
    assert e.value is error


def test_a_worker_that_never_starts_holds_no_work():
    pool = FakePool(3, never_start={1, 2})
    summary, got, _ = schedule(pool, [Piece(i, f"p{i}") for i in range(5)])
    assert {w for w, _ in pool.ran} == {0}
    assert len(got) == 5 and summary[1]["units"] == summary[2]["units"] == 0
    assert pool.closed is False  # some workers never answered: not kept


def test_a_worker_that_fails_to_start_fails_the_run_saying_why():
    class Broken(FakePool):
        def start(self, worker: int) -> Future:
            return done(error=ImportError("no torch here"))

    with pytest.raises(NyxrayError, match=r"worker 0 could not start: ImportError\('no torch here'\)"):
        schedule(Broken(1), [Piece(1, "p")])


def test_no_worker_starting_in_time_fails_with_the_pools_reason():
    pool = FakePool(2, never_start={0, 1})
    started = time.monotonic()
    with pytest.raises(NyxrayError, match="fake: nothing started in 0.3 s"):
        schedule(pool, [Piece(1, "p")], timeout_s=0.3)
    assert time.monotonic() - started < 5


def test_a_worker_lost_while_starting_is_started_again_and_then_given_up():
    pool = FakePool(2, lost_starts={0: 2})
    summary, got, _ = schedule(pool, [Piece(1, "a"), Piece(2, "b")])
    assert pool.starts.count(0) == 3 and len(got) == 2 and summary[0]["node_id"] == "node0"

    gone = FakePool(1, lost_starts={0: 100})
    with pytest.raises(NyxrayError, match="every worker was lost"):
        schedule(gone, [Piece(1, "a")])
    assert gone.starts.count(0) == 2 * MAX_ATTEMPTS


def test_every_worker_has_work_in_flight_at_once():
    """With threads behind the futures, as many pieces run at once as there are workers, no more."""
    workers, gate = 3, threading.Barrier(3, timeout=10)
    lock, now, peak = threading.Lock(), [0], [0]
    threads = ThreadPoolExecutor(8)

    def work(p: Piece) -> Done:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        if p.size >= 7:  # the three largest go out first and must all be in flight together
            gate.wait()
        with lock:
            now[0] -= 1
        return Done(p.size, 0.0, 0)

    class ThreadedPool(FakePool):
        def run(self, worker: int, piece: Piece, on_progress) -> Future:
            self.ran.append((worker, piece.title))
            return threads.submit(work, piece)

    pool = ThreadedPool(workers)
    try:
        _, got, _ = schedule(pool, [Piece(i, f"p{i}") for i in range(10)])
    finally:
        threads.shutdown()
    assert len(got) == 10 and peak[0] == workers
    assert {w for w, _ in pool.ran} == {0, 1, 2}
