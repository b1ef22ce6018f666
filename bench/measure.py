"""Measuring: the RSS/CPU sampler, one timed run, a case's runs and what they add up to, the machine.

* ``RssSampler``: a thread that samples ``/proc`` for this process and all its descendants (Ray's
  workers, the ``nyxray``/``mergekit-yaml`` subprocesses) and keeps the peaks by process kind.
* ``measure_once(sampler, fn, out)``: one run of ``fn(out)``: wall time, CPU time, RSS peaks, load.
* ``Case``: the runs of one benchmark case (``bench.py``'s table rows) and their medians.
* ``machine_info()``: CPU, RAM, OS, versions and the git commit, printed above every result.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import REPO

INFRA_MARKERS = ("raylet", "gcs_server", "ray/_private", "ray/dashboard", "ray/autoscaler", "log_monitor", "monitor.py", "runtime_env", "weed", "py-spy")


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def rss_of(pid: int) -> int:
    fields = _read(f"/proc/{pid}/statm").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 else 0


def malloc_trim() -> None:
    """Hand freed heap back to the OS, so that the next run's peak starts from this process's baseline."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler:
    """Samples the RSS of this process and all its descendants (Ray's workers included) every
    ``interval`` s. Rescans the process tree every ``rescan`` s; reads only statm in between.

    Peaks: ``driver`` (this process), ``actor_max``/``actors_sum`` (Ray merge actors), ``child`` (the
    other descendants summed: subprocesses), ``child_max`` (the largest single one of them), ``infra``
    (Ray daemons, the S3 server), ``work`` (driver + actors), ``all``."""

    def __init__(self, interval: float = 0.05, rescan: float = 0.25):
        self.interval, self.rescan = interval, rescan
        self.me = os.getpid()
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.tick = os.sysconf("SC_CLK_TCK")
        self.procs: dict[int, str] = {}  # pid -> kind: driver, actor, worker, infra, child
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.reset()
        self.thread = threading.Thread(target=self._loop, name="bench-rss", daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self._lock:
            self.peak = {"driver": 0, "actor_max": 0, "actors_sum": 0, "child": 0, "child_max": 0, "infra": 0, "work": 0, "all": 0}
            self.samples = 0
            self.cpu_first: dict[int, float] = {}
            self.cpu_last: dict[int, tuple[str, float]] = {}
            self.fresh = True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            cpu: dict[str, float] = {}
            for pid, (kind, last) in self.cpu_last.items():
                cpu[kind] = cpu.get(kind, 0.0) + last - self.cpu_first.get(pid, 0.0)
            return dict(self.peak, samples=self.samples, cpu_s={k: round(v, 2) for k, v in cpu.items()})

    def _scan(self) -> None:
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            stat = _read(f"/proc/{name}/stat")
            if not stat:
                continue
            try:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
        tree, todo = set(), [self.me]
        while todo:
            p = todo.pop()
            if p in tree:
                continue
            tree.add(p)
            todo += children.get(p, [])
        procs = {}
        for pid in tree:
            if pid == self.me:
                procs[pid] = "driver"
                continue
            cmd = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
            if self.procs.get(pid) == "actor" or (not cmd and pid in self.procs):
                procs[pid] = self.procs[pid]  # sticky: an exiting process has an empty cmdline
            elif cmd.startswith("ray::"):
                procs[pid] = "actor" if "MergeActor" in cmd else "worker"
            elif any(m in cmd for m in INFRA_MARKERS):
                procs[pid] = "infra"
            else:
                procs[pid] = "child"
        self.procs = procs

    def _loop(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan >= self.rescan:
                with contextlib.suppress(Exception):
                    self._scan()
                last_scan = now
            sums = {"driver": 0, "actor_max": 0, "actors_sum": 0, "child": 0, "child_max": 0, "infra": 0, "worker": 0}
            cpu_now: dict[int, tuple[str, float]] = {}
            for pid, kind in list(self.procs.items()):
                stat = _read(f"/proc/{pid}/stat")
                try:
                    fields = stat.rsplit(")", 1)[1].split()
                    rss = int(fields[21]) * self.page
                    cpu_now[pid] = (kind, (int(fields[11]) + int(fields[12])) / self.tick)
                except (IndexError, ValueError):
                    continue
                if kind == "actor":
                    sums["actors_sum"] += rss
                    sums["actor_max"] = max(sums["actor_max"], rss)
                else:
                    sums[kind] += rss
                    if kind == "child":
                        sums["child_max"] = max(sums["child_max"], rss)
            work = sums["driver"] + sums["actors_sum"]
            with self._lock:
                for k in ("driver", "actor_max", "actors_sum", "child", "child_max", "infra"):
                    self.peak[k] = max(self.peak[k], sums[k])
                self.peak["work"] = max(self.peak["work"], work)
                self.peak["all"] = max(self.peak["all"], work + sums["child"] + sums["infra"] + sums["worker"])
                self.samples += 1
                for pid, (kind, c) in cpu_now.items():
                    if self.fresh:
                        self.cpu_first[pid] = c  # processes alive at reset count from here; later ones from 0
                    self.cpu_last[pid] = (kind, c)
                self.fresh = False
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)


def measure_once(sampler: RssSampler, fn: Callable[[str], dict | None], out: str) -> dict:
    """Run ``fn(out)`` once and return its numbers plus ``wall_s`` (``fn`` may return its own),
    ``rss`` (the sampler's peaks over the run, ``driver_at_start``), ``cpu_s`` (this process,
    its finished subprocesses, the Ray actors) and ``load1`` at the start."""
    gc.collect()
    malloc_trim()  # each run's peak starts from this process's baseline
    rss_start = rss_of(os.getpid())
    sampler.reset()
    time.sleep(0.06)
    load = os.getloadavg()[0]
    ru0, rc0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    extra = fn(out) or {}
    wall = time.perf_counter() - t0
    ru1, rc1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(0.06)
    rss = sampler.snapshot()
    cpu = {
        "driver": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
        "subprocesses": round(rc1.ru_utime + rc1.ru_stime - rc0.ru_utime - rc0.ru_stime, 2),
        "actors": rss.pop("cpu_s", {}).get("actor", 0.0),
    }
    rss["driver_at_start"] = rss_start
    return {"wall_s": round(extra.pop("wall_s", wall), 4), "rss": rss, "cpu_s": cpu, "load1": round(load, 2), **extra}


@dataclass
class Case:
    """One benchmark case (a row of ``bench.py``'s table) and its runs (``measure_once`` results)."""

    id: str
    recipe: str  # passthrough | slerp | pipeline | sweep | s3read | ray
    kind: str  # floor | nyxray | mergekit | ...
    runs: list[dict] = field(default_factory=list)
    note: str = ""
    skipped: str = ""
    inproc: bool = True  # RSS of this process (driver) counts; else only its child processes

    def wall(self) -> float | None:
        w = [r["wall_s"] for r in self.runs]
        return statistics.median(w) if w else None

    def first(self, key: str) -> Any:
        return self.runs[0].get(key) if self.runs else None

    def peak(self, key: str) -> int:
        return max((r.get("rss", {}).get(key, 0) for r in self.runs), default=0)

    def cpu(self) -> float | None:
        """Median CPU seconds of the work (driver + actors, or the subprocesses for subprocess rows)."""
        if not self.runs:
            return None
        vals = [(r["cpu_s"]["driver"] + r["cpu_s"]["actors"]) if self.inproc else r["cpu_s"]["subprocesses"] for r in self.runs if "cpu_s" in r]
        return statistics.median(vals) if vals else None

    def phase(self, name: str) -> float | None:
        """Median seconds of one of nyxray's reported phases (plan, start, run, commit)."""
        vals = [r["timings_s"][name] for r in self.runs if r.get("timings_s")]
        return statistics.median(vals) if vals else None

    def hash_s(self) -> float | None:
        """Median seconds nyxray's workers spent in SHA-256 of the output (summed over workers)."""
        vals = [sum(w.get("hash_s") or 0.0 for w in r["actors"]) for r in self.runs if r.get("actors")]
        return statistics.median(vals) if vals else None

    def startup(self) -> float | None:
        """Seconds before data moves: planning, claiming the output, starting workers (torch included)."""
        p, st = self.phase("plan"), self.phase("start")
        return p + st if p is not None and st is not None else None

    def work_rss(self) -> int:
        return self.peak("work") if self.inproc else self.peak("child")

    def proc_rss(self) -> int:
        """The largest single process doing the work: the driver (local) or an actor (Ray)."""
        if not self.inproc:
            return self.peak("child")
        return max(self.peak("actor_max"), self.peak("driver") if self.kind in ("nyxray-local", "floor", "sweep-local") else 0) or self.peak("driver")

    def summary(self) -> dict:
        return {
            "id": self.id,
            "recipe": self.recipe,
            "kind": self.kind,
            "note": self.note,
            "skipped": self.skipped,
            "wall_median_s": self.wall(),
            "walls_s": [r["wall_s"] for r in self.runs],
            "runs": self.runs,
            "rss_work_peak": self.work_rss() if self.runs else None,
            "rss_proc_peak": self.proc_rss() if self.runs else None,
        }


def machine_info() -> dict:
    info: dict[str, Any] = {}
    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    u = platform.uname()
    info["uname"] = f"{u.system} {u.node} {u.release} {u.version} {u.machine}"
    info["cpus"] = os.cpu_count()
    with contextlib.suppress(Exception):
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    with contextlib.suppress(Exception):
        info["ram_gib"] = round(int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20, 1)
    info["python"] = platform.python_version()
    for mod in ("torch", "ray", "s3fs", "nyxray", "safetensors"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        info["torch_threads"] = __import__("torch").get_num_threads()
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "nyxray"], capture_output=True, text=True).stdout.strip()
        info["git"] = head + (" (nyxray/ modified)" if dirty else "")
    return info
