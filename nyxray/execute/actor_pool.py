"""Merge actors kept between the merges of one driver process, when asked (``keep_actors``).

Starting an actor costs a worker process and, for merges that compute, torch's import: well over a
second on a CPU node, paid by every merge. A script that merges recipe after recipe can keep the
actors warm instead. Kept actors hold their CPU/GPU reservation while idle, so they are stopped
after ``keep_actors`` idle seconds, when a merge needs actors of another shape (or fewer), when
the Ray session is not the one they belong to, and by :func:`release`. A merge always reuses
kept actors of its shape, but keeps its own only when asked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ray

Shape = tuple  # (CPUs, GPUs, device, math threads): what makes actors interchangeable


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._shape: Shape | None = None
        self._session: tuple[str, str] | None = None
        self._timer: threading.Timer | None = None

    def take(self, shape: Shape, n: int, create: Callable[[int], Any]) -> list[Any]:
        """``n`` actors of ``shape``: kept ones first (in their original order), then new ones."""
        session = _session()
        with self._lock:
            self._cancel_timer()
            kept, self._handles = self._handles, []
            if self._session != session:
                kept = []  # another Ray session: those handles mean nothing here, and their actors died with it
            elif self._shape != shape:
                _kill(kept)
                kept = []
            _kill(kept[n:])
            kept = kept[:n]
        return kept + [create(i) for i in range(len(kept), n)]

    def waiting(self, shape: Shape) -> int:
        """How many kept actors of ``shape`` (of this Ray session) wait for a merge."""
        with self._lock:
            return len(self._handles) if self._shape == shape and self._session == _session() else 0

    def keep(self, shape: Shape, handles: list[Any], idle_s: float) -> None:
        """Hold ``handles`` for the next merge; stop them after ``idle_s`` seconds unused."""
        with self._lock:
            self._cancel_timer()
            _kill([h for h in self._handles if h not in handles])  # a concurrent merge's, kept earlier
            self._handles, self._shape, self._session = list(handles), shape, _session()
            self._timer = threading.Timer(idle_s, self.release)
            self._timer.daemon = True
            self._timer.start()

    def drop(self, handles: list[Any]) -> None:
        """Stop those of ``handles`` that are still waiting here (none a merge has taken since)."""
        with self._lock:
            mine = [h for h in self._handles if h in handles]
            self._handles = [h for h in self._handles if h not in handles]
            if not self._handles:
                self._cancel_timer()
            _kill(mine)

    def release(self) -> int:
        """Stop the kept actors now; returns how many there were."""
        with self._lock:
            self._cancel_timer()
            handles, self._handles = self._handles, []
            if self._session is not None and self._session == _session():
                _kill(handles)
        return len(handles)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _session() -> tuple[str, str] | None:
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    return ctx.get_session_name(), ctx.get_job_id()


def _kill(handles: list[Any]) -> None:
    for h in handles:
        try:
            ray.kill(h)
        except Exception:  # noqa: BLE001 - already gone (its node, or the session); nothing left to stop
            pass


POOL = _Pool()


def release() -> int:
    """Stop the merge actors that ``keep_actors`` kept alive; returns how many were stopped."""
    return POOL.release()
