#!/usr/bin/env python
"""nyxray benchmark: the only place where the project's performance claims are measured.

One command builds (and caches) a set of Mistral-shaped bf16 input models of a given size, then
measures on those same inputs, in one run:

* the I/O floor: the plan's needed input bytes read once, the output bytes written once (plain
  file reads/writes, fsync like nyxray's commit), and the same with plain s3fs calls;
* nyxray passthrough (stage 1), SLERP (48-layer pair) and the fused Nyxene pipeline, with
  ``executor="local"``, ``executor="ray"`` (1 and 2 actors) and the ``nyxray`` CLI, on local files;
  SLERP and the pipeline through a local S3 server (SeaweedFS); S3 ranged-read throughput;
* a sweep: K SLERP members in one job vs K separate merges;
* mergekit 0.1.5 running the same recipes (the pipeline as three runs);
* optionally (``--profile``) a py-spy profile of nyxray's SLERP and pipeline runs.

It prints the machine, the command line and ONE table; ``--json FILE`` keeps every raw number.
See bench/README.md. Run it with ``./dev.sh bench [args]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # tests.s3server

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MB = 1e6
CHUNK = 64 * 2**20
SOURCES = (
    "fblgit/una-cybertron-7b-v2",
    "chargoddard/loyal-piano-m7-cdpo",
    "berkeley-nest/Starling-LM-7B-alpha",
    "openaccess-ai-collective/DPOpenHermes-7B",
)
STAGE_A, STAGE_B = "loyal-piano-cybertron-11B", "Starling-DPOHermes-11B"
RECIPE_A = os.path.join(REPO, "recipes", "loyal-piano-cybertron-11B.yml")
RECIPE_B = os.path.join(REPO, "recipes", "Starling-DPOHermes-11B.yml")
PIPELINE = os.path.join(REPO, "recipes", "nyxene-v2-11b.pipeline.yml")
GROUPS = ("floor", "local", "ray", "cli", "s3", "s3read", "sweep", "mergekit", "profile")
DEFAULT_GROUPS = GROUPS[:-1]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_bytes(text: str) -> int:
    """``1G``, ``500M``, ``1.5GB``, ``123`` -> bytes (decimal units)."""
    t = str(text).strip().upper()
    if len(t) > 1 and t.endswith("B") and t[-2] in "KMGT":
        t = t[:-1]
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}G"


# -- model shapes ---------------------------------------------------------------------------------


def shape_dims(hidden: int) -> dict[str, int]:
    head_dim = 128 if hidden >= 1024 and hidden % 128 == 0 else 64
    heads = max(1, hidden // head_dim)
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 4))
    inter = max(128, int(round(3.5 * hidden / 128)) * 128)
    return {"hidden": hidden, "intermediate": inter, "layers": 32, "vocab": 32000, "heads": heads, "kv_heads": kv}


def model_bytes(d: dict[str, int]) -> int:
    h, i, v, L = d["hidden"], d["intermediate"], d["vocab"], d["layers"]
    kv = d["kv_heads"] * (h // d["heads"])
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
    return 2 * (2 * v * h + L * per_layer + h)


def shape_for(size: int) -> dict[str, int]:
    """Mistral-like dims (32 layers, vocab 32000, intermediate 3.5x hidden) closest to ``size`` bytes."""
    best = None
    for hidden in range(128, 8192 + 1, 128):
        d = shape_dims(hidden)
        err = abs(model_bytes(d) - size)
        if best is None or err < best[0]:
            best = (err, d)
    assert best is not None
    return best[1]


# -- RSS sampling ---------------------------------------------------------------------------------

INFRA_MARKERS = ("raylet", "gcs_server", "ray/_private", "ray/dashboard", "ray/autoscaler", "log_monitor", "monitor.py", "runtime_env", "weed", "py-spy")


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class RssSampler:
    """Samples the RSS of this process and all its descendants (Ray's workers included) every
    ``interval`` s. Rescans the process tree every ``rescan`` s; reads only statm in between."""

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
            self.peak = {"driver": 0, "actor_max": 0, "actors_sum": 0, "child": 0, "infra": 0, "work": 0, "all": 0}
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
            sums = {"driver": 0, "actor_max": 0, "actors_sum": 0, "child": 0, "infra": 0, "worker": 0}
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
            work = sums["driver"] + sums["actors_sum"]
            with self._lock:
                for k in ("driver", "actor_max", "actors_sum", "child", "infra"):
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


# -- results --------------------------------------------------------------------------------------


@dataclass
class Case:
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


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.work = os.path.abspath(args.work)
        self.size = parse_bytes(args.size)
        self.dims = shape_for(self.size)
        self.model_size = model_bytes(self.dims)
        self.tag = f"h{self.dims['hidden']}-i{self.dims['intermediate']}-v{self.dims['vocab']}-L{self.dims['layers']}"
        self.base = os.path.join(self.work, self.tag)
        self.models = os.path.join(self.base, "models")
        self.stage1 = os.path.join(self.base, "stage1")
        self.recipes = os.path.join(self.base, "recipes")
        self.runs_dir = os.path.join(self.work, "runs")
        self.in_shard = max(1_000_000, self.model_size // 4 + 1)
        self.out_shard = args.out_shard_size or f"{max(1, round(self.model_size / 4 / 1e6))}M"
        self.cases: dict[str, Case] = {}
        self.sampler: RssSampler | None = None
        self.info: dict[str, Any] = {}
        self.ray_init_s: float | None = None
        self.s3: Any = None
        self.s3_opts: dict | None = None
        self.mk_bin: str | None = None
        self.plans: dict[str, Any] = {}
        self.profile: dict[str, Any] = {}
        self.upload: dict[str, Any] = {}
        self.error: str | None = None

    # -- selection ----------------------------------------------------------------------------
    def selected(self, case_id: str, group: str) -> bool:
        pats = self.a.cases
        if not pats:
            return group in DEFAULT_GROUPS or (group == "profile" and self.a.profile)
        return any(p == group or fnmatch.fnmatch(case_id, p) for p in pats) or (group == "profile" and self.a.profile)

    def any_selected(self, group: str, ids: list[str]) -> bool:
        return any(self.selected(i, group) for i in ids)

    # -- building inputs ----------------------------------------------------------------------
    def _sub(self, code: str, what: str) -> None:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        log(f"{what}: {time.monotonic() - t0:.1f}s")

    def build(self) -> None:
        os.makedirs(self.recipes, exist_ok=True)
        os.makedirs(self.runs_dir, exist_ok=True)
        shape = "ModelShape(" + ", ".join(f"{k}={v}" for k, v in self.dims.items()) + ")"
        for seed, name in enumerate(SOURCES, start=1):
            path = os.path.join(self.models, name)
            if os.path.exists(os.path.join(path, ".bench-done")):
                continue
            shutil.rmtree(path, ignore_errors=True)
            self._sub(
                "from nyxray.synthetic import make_model, ModelShape\n"
                f"make_model({path!r}, {shape}, seed={seed}, shard_bytes={self.in_shard})\n"
                f"open({os.path.join(path, '.bench-done')!r}, 'w').close()\n",
                f"built {name} ({human(self.model_size)})",
            )
        for name, recipe in ((STAGE_A, RECIPE_A), (STAGE_B, RECIPE_B)):
            path = os.path.join(self.stage1, name)
            if os.path.exists(os.path.join(path, ".bench-done")):
                continue
            shutil.rmtree(path, ignore_errors=True)
            self._sub(
                "import nyxray\n"
                f"nyxray.merge({recipe!r}, {path!r}, executor='local', models_root={self.models!r}, out_shard_size={self.in_shard},"
                " write_model_card=False, progress=False, overwrite=True)\n"
                f"open({os.path.join(path, '.bench-done')!r}, 'w').close()\n",
                f"built 48-layer {name} (nyxray passthrough)",
            )
        import yaml

        with open(PIPELINE) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        self.slerp_doc = copy.deepcopy(docs[2])
        self._write_yaml("slerp.yml", self.slerp_doc)
        self.stage1_map = {STAGE_A: os.path.join(self.stage1, STAGE_A), STAGE_B: os.path.join(self.stage1, STAGE_B)}
        src_map = {n: os.path.join(self.models, n) for n in SOURCES}
        # mergekit: the same recipes with absolute model paths
        for fname, recipe in (("mk-passthrough-A.yml", RECIPE_A), ("mk-passthrough-B.yml", RECIPE_B)):
            with open(recipe) as f:
                self._write_yaml(fname, _remap(yaml.safe_load(f), src_map))
        self._write_yaml("mk-slerp.yml", _remap(copy.deepcopy(self.slerp_doc), self.stage1_map))
        # sweep members: the SLERP with the self_attn t curve varied
        k = self.a.sweep_k
        self.sweep_members = []
        for i in range(k):
            a = 0.75 - 0.5 * i / max(1, k - 1)
            doc = copy.deepcopy(self.slerp_doc)
            for rule in doc["parameters"]["t"]:
                if rule.get("filter") == "self_attn":
                    rule["value"] = [round(a, 4), round(1 - a, 4)]
            p = self._write_yaml(f"sweep-m{i}.yml", doc)
            self.sweep_members.append((f"m{i}", p))
        self.sweep_file = self._write_yaml("sweep.yml", {"members": [{"name": n, "recipe": p} for n, p in self.sweep_members]})

    def _write_yaml(self, name: str, doc: Any) -> str:
        import yaml

        path = os.path.join(self.recipes, name)
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        return path

    def warm_cache(self) -> None:
        """Read every input file once so that all cases start from the same (warm) page cache."""
        t0 = time.perf_counter()
        n = 0
        buf = bytearray(CHUNK)
        for root in (self.models, self.stage1):
            for d, _, files in os.walk(root):
                for f in files:
                    with open(os.path.join(d, f), "rb", buffering=0) as fh:
                        while k := fh.readinto(buf):
                            n += k
        self.info["warm_read"] = {"bytes": n, "s": round(time.perf_counter() - t0, 2)}
        log(f"page cache warmed: read {human(n)} in {time.perf_counter() - t0:.1f}s")

    def make_plans(self) -> None:
        import nyxray

        self.plans["passthrough"] = nyxray.plan(RECIPE_A, out_shard_size=self.out_shard, models_root=self.models)
        self.plans["slerp"] = nyxray.plan(os.path.join(self.recipes, "slerp.yml"), out_shard_size=self.out_shard, models=self.stage1_map)
        self.plans["pipeline"] = nyxray.plan(PIPELINE, out_shard_size=self.out_shard, models_root=self.models)

    # -- running and recording ----------------------------------------------------------------
    def case(self, cid: str, recipe: str, kind: str, inproc: bool = True, note: str = "") -> Case:
        c = self.cases.get(cid) or Case(cid, recipe, kind, inproc=inproc, note=note)
        self.cases[cid] = c
        return c

    def fresh(self, name: str) -> str:
        path = os.path.join(self.runs_dir, name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def timed(self, c: Case, fn: Callable[[str], dict], runs: int | None = None, s3: bool = False, group: str | None = None) -> None:
        """Run ``fn(out)`` ``runs`` times into fresh outputs; record wall, RSS and fn's numbers."""
        n = runs or self.a.runs_for.get(group or "", 0) or self.a.runs
        for i in range(n):
            out = self._s3_out(f"{c.id}-r{i}") if s3 else self.fresh(f"{c.id.replace('/', '_')}-r{i}")
            assert self.sampler is not None
            gc.collect()
            _malloc_trim()  # hand freed heap back to the OS: each run's peak starts from this process's baseline
            rss_start = _rss(os.getpid())
            self.sampler.reset()
            time.sleep(0.06)
            load = os.getloadavg()[0]
            ru0, rc0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            extra = fn(out) or {}
            wall = time.perf_counter() - t0
            ru1, rc1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            time.sleep(0.06)
            rss = self.sampler.snapshot()
            cpu = {
                "driver": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
                "subprocesses": round(rc1.ru_utime + rc1.ru_stime - rc0.ru_utime - rc0.ru_stime, 2),
                "actors": rss.pop("cpu_s", {}).get("actor", 0.0),
            }
            rss["driver_at_start"] = rss_start
            run = {"wall_s": round(extra.pop("wall_s", wall), 4), "rss": rss, "cpu_s": cpu, "load1": round(load, 2), **extra}
            c.runs.append(run)
            log(f"{c.id} run {i + 1}/{n}: {run['wall_s']:.2f}s, rss work {human(c.work_rss())}")
            if s3:
                self._s3_rm(out)
            else:
                shutil.rmtree(out, ignore_errors=True)

    # -- I/O floor ----------------------------------------------------------------------------
    def floor_spans(self, recipe: str) -> dict[str, list[tuple[int, int]]]:
        from nyxray.graph import leaves

        p = self.plans[recipe]
        spans: dict[tuple, list[tuple[int, int]]] = {}
        locs = {}
        for shard in p.final.shards:
            for t in shard.tensors:
                for leaf in leaves(t.expr):
                    key = (leaf.loc.display, leaf.file)
                    locs[key] = leaf.loc.path(leaf.file)
                    spans.setdefault(key, []).append((leaf.start, leaf.end))
        out: dict[str, list[tuple[int, int]]] = {}
        total = 0
        for key, rs in spans.items():
            merged: list[list[int]] = []
            for a, b in sorted(rs):
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            out[locs[key]] = [(a, b) for a, b in merged]
            total += sum(b - a for a, b in merged)
        assert total == p.bytes_read_min(), (total, p.bytes_read_min())
        return out

    def floor_local(self, recipe: str, copies: int = 1) -> Callable[[str], dict]:
        p = self.plans[recipe]
        spans = self.floor_spans(recipe)
        buf = bytearray(CHUNK)
        view = memoryview(buf)

        def run(out: str) -> dict:
            os.makedirs(out, exist_ok=True)
            t0 = time.perf_counter()
            nread = 0
            for path, rs in spans.items():
                with open(path, "rb", buffering=0) as f:
                    for a, b in rs:
                        f.seek(a)
                        while a < b:
                            n = f.readinto(view[: min(CHUNK, b - a)])
                            if not n:
                                raise OSError(f"short read {path}")
                            a += n
                            nread += n
            t1 = time.perf_counter()
            nwritten = 0
            for k in range(copies):
                for shard in p.final.shards:
                    with open(os.path.join(out, f"{k}-{shard.name}"), "wb", buffering=0) as f:
                        left = shard.size
                        while left:
                            n = f.write(view[: min(CHUNK, left)])
                            left -= n
                            nwritten += n
                        os.fsync(f.fileno())
            t2 = time.perf_counter()
            return {"read_s": round(t1 - t0, 4), "write_s": round(t2 - t1, 4), "bytes_read": nread, "bytes_written": nwritten}

        return run

    def floor_s3(self, recipe: str) -> Callable[[str], dict]:
        p = self.plans[recipe]
        spans = self.floor_spans(recipe)
        pieces = []
        for path, rs in spans.items():
            key = self._s3_key_for(path)
            for a, b in rs:
                for s in range(a, b, 16 * 2**20):
                    pieces.append((key, s, min(b, s + 16 * 2**20)))
        payload = os.urandom(16 * 2**20)

        def run(out: str) -> dict:
            fs = self.s3fs()
            t0 = time.perf_counter()
            nread = 0
            for i in range(0, len(pieces), 8):
                group = pieces[i : i + 8]
                blobs = fs.cat_ranges([g[0] for g in group], [g[1] for g in group], [g[2] for g in group], batch_size=8)
                for blob in blobs:
                    if isinstance(blob, Exception):
                        raise blob
                    nread += len(blob)
            t1 = time.perf_counter()
            nwritten = 0
            for shard in p.final.shards:
                f = fs.open(f"{out}/{shard.name}", "wb", block_size=16 * 2**20)
                left = shard.size
                while left:
                    n = min(left, len(payload))
                    f.write(payload[:n])
                    left -= n
                    nwritten += n
                f.close()
            t2 = time.perf_counter()
            return {"read_s": round(t1 - t0, 4), "write_s": round(t2 - t1, 4), "bytes_read": nread, "bytes_written": nwritten}

        return run

    # -- nyxray ---------------------------------------------------------------------------------
    def recipe_args(self, recipe: str, s3: bool = False) -> tuple[str, dict]:
        if recipe == "passthrough":
            return RECIPE_A, {"models_root": self.s3_models if s3 else self.models}
        if recipe == "slerp":
            mapping = {k: f"{self.s3_stage1}/{k}" for k in self.stage1_map} if s3 else self.stage1_map
            return os.path.join(self.recipes, "slerp.yml"), {"models": mapping}
        return PIPELINE, {"models_root": self.s3_models if s3 else self.models}

    def nyx(self, recipe: str, executor: str, actors: int | None = None, s3: bool = False, keep: float = 0.0) -> Callable[[str], dict]:
        """A nyxray merge in this process (which has torch loaded already: the CLI rows pay its import);
        ``keep``: keep_actors (the Ray actors stay for the next run)."""
        import nyxray

        path, kw = self.recipe_args(recipe, s3)
        if s3:
            kw["storage_options"] = self.s3_opts

        def run(out: str) -> dict:
            rep = nyxray.merge(
                path,
                out,
                executor=executor,
                actors=actors,
                out_shard_size=self.out_shard,
                progress=False,
                write_model_card=False,
                **({"keep_actors": keep} if keep else {}),
                **kw,
            )
            return _nyx_numbers(rep)

        return run

    def kernel(self) -> Callable[[str], dict]:
        """``nyxray.ops.slerp`` over every SLERP'd tensor of the slerp plan, on random bf16 data of the
        same shapes (made before timing), in this process with one torch thread: the compute floor."""
        import torch

        from nyxray.graph import Leaf, Slerp
        from nyxray.ops import TORCH_DTYPES, slerp

        todo = [t.expr for sh in self.plans["slerp"].final.shards for t in sh.tensors if isinstance(t.expr, Slerp)]
        g = torch.Generator().manual_seed(0)
        data = {}
        for e in todo:
            for leaf in (e.a, e.b):
                assert isinstance(leaf, Leaf), "the benchmark's SLERP reads its inputs as stored"
                if leaf.shape not in data:
                    data[leaf.shape] = torch.randn(leaf.shape, generator=g).to(TORCH_DTYPES[leaf.dtype])

        def run(out: str) -> dict:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                n = sum(slerp(data[e.a.shape], data[e.b.shape], e.t, TORCH_DTYPES[e.dtype]).numel() for e in todo)
            finally:
                torch.set_num_threads(before)
            return {"elements": n, "tensors": len(todo)}

        return run

    def nyx_cli(self, recipe: str) -> Callable[[str], dict]:
        path, kw = self.recipe_args(recipe)
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "nyxray"),
            "merge",
            path,
            "OUT",
            "--executor",
            "local",
            "--quiet",
            "--no-write-model-card",
            "--out-shard-size",
            str(self.out_shard),
        ]
        if "models_root" in kw:
            cmd += ["--models-root", kw["models_root"]]
        for k, v in kw.get("models", {}).items():
            cmd += ["--model", f"{k}={v}"]

        def run(out: str) -> dict:
            rep_path = out + ".report.json"
            c = [out if x == "OUT" else x for x in cmd] + ["--report", rep_path]
            subprocess.run(c, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            with open(rep_path) as f:
                rep = json.load(f)
            os.unlink(rep_path)
            return {k: v for k, v in _nyx_numbers(rep).items() if k != "wall_s"} | {"nyxray_wall_s": rep["wall_s"]}

        return run

    # -- mergekit -------------------------------------------------------------------------------
    def find_mergekit(self) -> str | None:
        cands = [self.a.mergekit_bin] if self.a.mergekit_bin else [os.path.join(HERE, ".mk-venv", "bin"), "/work/mk-venv/bin"]
        for d in cands:
            if d and os.access(os.path.join(d, "mergekit-yaml"), os.X_OK):
                return d
        return None

    def install_mergekit(self) -> None:
        venv = os.path.join(HERE, ".mk-venv")
        log(f"installing mergekit 0.1.5 into {venv}")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = os.path.join(venv, "bin", "pip")
        subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([pip, "install", "-q", "mergekit==0.1.5"], check=True)

    def mk_cmd(self, cfg: str, out: str) -> list[str]:
        assert self.mk_bin
        return [os.path.join(self.mk_bin, "mergekit-yaml"), cfg, out, "--out-shard-size", str(self.out_shard), "--no-write-model-card", "--quiet"]

    def mk_run(self, cfg: str, out: str) -> float:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        t0 = time.perf_counter()
        r = subprocess.run(self.mk_cmd(cfg, out), cwd=self.base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if r.returncode:
            raise RuntimeError(f"mergekit failed ({r.returncode}): {r.stderr[-2000:]}")
        return wall

    def mk(self, recipe: str) -> Callable[[str], dict]:
        import yaml

        def run(out: str) -> dict:
            if recipe == "passthrough":
                self.mk_run(os.path.join(self.recipes, "mk-passthrough-A.yml"), out)
                return {"bytes_written": _safetensors_bytes(out)}
            if recipe == "slerp":
                self.mk_run(os.path.join(self.recipes, "mk-slerp.yml"), out)
                return {"bytes_written": _safetensors_bytes(out)}
            a, b, final = (os.path.join(out, x) for x in ("A", "B", "final"))
            ta = self.mk_run(os.path.join(self.recipes, "mk-passthrough-A.yml"), a)
            tb = self.mk_run(os.path.join(self.recipes, "mk-passthrough-B.yml"), b)
            cfg = os.path.join(out, "slerp.yml")
            with open(cfg, "w") as f:
                yaml.safe_dump(_remap(copy.deepcopy(self.slerp_doc), {STAGE_A: a, STAGE_B: b}), f, sort_keys=False)
            tc = self.mk_run(cfg, final)
            return {"stage_s": [round(ta, 3), round(tb, 3), round(tc, 3)], "bytes_written": sum(_safetensors_bytes(x) for x in (a, b, final))}

        return run

    # -- S3 -----------------------------------------------------------------------------------
    BUCKET = "bench"
    s3_models = f"s3://{BUCKET}/models"
    s3_stage1 = f"s3://{BUCKET}/stage1"

    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.s3_opts, skip_instance_cache=True)

    def _s3_key_for(self, local_path: str) -> str:
        for root, prefix in ((self.models, f"{self.BUCKET}/models"), (self.stage1, f"{self.BUCKET}/stage1")):
            if local_path.startswith(root + "/"):
                return prefix + local_path[len(root) :]
        # a leaf of an S3 plan is already bucket/key
        return local_path

    def _s3_out(self, name: str) -> str:
        return f"s3://{self.BUCKET}/out/{name.replace('/', '_')}"

    def _s3_rm(self, url: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.s3fs().rm(url, recursive=True)
        with contextlib.suppress(Exception):
            self.s3.abort_pending_uploads(self.BUCKET, "out/")

    def start_s3(self, need_sources: bool, need_stage1: bool) -> None:
        from tests.s3server import S3Server

        t0 = time.monotonic()
        self.s3 = S3Server(buckets=[self.BUCKET], base_dir=self.work)
        self.s3.start()
        self.s3_opts = self.s3.storage_options
        log(f"S3 server (SeaweedFS) up on {self.s3.endpoint_url} in {time.monotonic() - t0:.1f}s")
        fs = self.s3fs()
        todo = []
        if need_sources:
            todo += [(os.path.join(self.models, n), f"{self.BUCKET}/models/{n}") for n in SOURCES]
        if need_stage1:
            todo += [(p, f"{self.BUCKET}/stage1/{n}") for n, p in self.stage1_map.items()]
        files = [(os.path.join(src, f), f"{dst}/{f}") for src, dst in todo for f in sorted(os.listdir(src)) if not f.startswith(".")]
        nbytes = sum(os.path.getsize(s) for s, _ in files)
        t0 = time.perf_counter()
        # a few files at once; each one a multipart upload
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda sd: fs.put_file(sd[0], sd[1]), files))
        wall = time.perf_counter() - t0
        self.upload = {"files": len(files), "bytes": nbytes, "wall_s": round(wall, 3), "mb_s": round(nbytes / wall / MB, 1)}
        log(f"uploaded {len(files)} files, {human(nbytes)} in {wall:.1f}s ({nbytes / wall / MB:.0f} MB/s)")

    def s3read(self, mode: str, n: int) -> Callable[[str], dict]:
        fs = self.s3fs()
        objs = sorted((fs.size(p), p) for p in fs.find(f"{self.BUCKET}/") if p.endswith(".safetensors") and "/out/" not in p)
        size, key = objs[-1]
        total = min(size, self.a.s3read_bytes)
        rng = 8 * 2**20
        starts = list(range(0, total - rng + 1, rng))

        def run(out: str) -> dict:
            t0 = time.perf_counter()
            got = 0
            if mode == "seq":
                for s in starts:
                    got += len(fs.cat_file(key, start=s, end=s + rng))
            elif mode == "cat_ranges":
                blobs = fs.cat_ranges([key] * len(starts), starts, [s + rng for s in starts], batch_size=n)
                got = sum(len(b) for b in blobs)
            else:
                with ThreadPoolExecutor(max_workers=n) as pool:
                    got = sum(pool.map(lambda s: len(fs.cat_file(key, start=s, end=s + rng)), starts))
            wall = time.perf_counter() - t0
            return {"wall_s": wall, "bytes_read": got, "bytes_written": 0, "range_bytes": rng, "object_bytes": size}

        return run

    # -- sweep --------------------------------------------------------------------------------
    def sweep_one(self, executor: str, actors: int | None) -> Callable[[str], dict]:
        import nyxray

        def run(out: str) -> dict:
            rep = nyxray.sweep(
                self.sweep_file,
                out,
                models=self.stage1_map,
                out_shard_size=self.out_shard,
                executor=executor,
                actors=actors,
                progress=False,
                write_model_card=False,
            )
            return {
                "bytes_read": rep["bytes_read"],
                "bytes_written": rep["bytes_written"],
                "failed": rep["failed"],
                "nyxray_wall_s": rep["wall_s"],
                "bytes_read_min": self.plans["slerp"].bytes_read_min(),
                "timings_s": rep.get("timings_s"),
            }

        return run

    def sweep_separate(self, executor: str, actors: int | None) -> Callable[[str], dict]:
        import nyxray

        def run(out: str) -> dict:
            tot = {"bytes_read": 0, "bytes_written": 0}
            walls = []
            for name, path in self.sweep_members:
                rep = nyxray.merge(
                    path,
                    os.path.join(out, name),
                    models=self.stage1_map,
                    out_shard_size=self.out_shard,
                    executor=executor,
                    actors=actors,
                    progress=False,
                    write_model_card=False,
                )
                tot["bytes_read"] += rep["bytes_read"]
                tot["bytes_written"] += rep["bytes_written"]
                walls.append(rep["wall_s"])
            return {**tot, "member_walls_s": walls}

        return run

    # -- profile --------------------------------------------------------------------------------
    def run_profile(self) -> None:
        spy = self.a.py_spy or next(
            (
                p
                for p in (shutil.which("py-spy"), os.path.join(os.path.dirname(sys.executable), "py-spy"), os.path.join(self.work, "tools", "bin", "py-spy"))
                if p and os.access(p, os.X_OK)
            ),
            None,
        )
        for recipe in ("slerp", "pipeline"):
            path, kw = self.recipe_args(recipe)
            out = self.fresh(f"profile-{recipe}")
            code = (
                "import nyxray, sys, json\n"
                f"rep = nyxray.merge({path!r}, {out!r}, executor='local', out_shard_size={self.out_shard!r}, progress=False,"
                f" write_model_card=False, **{kw!r})\n"
                "print('BENCH-JSON', json.dumps({'wall_s': rep['wall_s']}))\n"
            )
            res: dict[str, Any] = {"recipe": recipe}
            if spy:
                raw = os.path.join(self.runs_dir, f"profile-{recipe}.txt")
                base = [spy, "record", "-r", "100", "-f", "raw", "-o", raw, "--threads"]
                tail = ["--", sys.executable, "-c", code]
                r = subprocess.run(base + ["--native"] + tail, cwd=REPO, capture_output=True, text=True)
                native = r.returncode == 0
                if not native:  # --native needs unwinding support; Python frames alone still tell a lot
                    shutil.rmtree(out, ignore_errors=True)
                    r = subprocess.run(base + tail, cwd=REPO, capture_output=True, text=True)
                if r.returncode == 0:
                    res.update(tool=f"py-spy record --threads{' --native' if native else ''} at 100 Hz", **_digest_pyspy(raw))
                    res["merge_wall_s"] = next(json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("BENCH-JSON"))["wall_s"]
                else:
                    res["error"] = r.stderr[-1500:]
            if not spy or "error" in res:
                import cProfile
                import io
                import pstats

                pr = cProfile.Profile()
                ns: dict = {}
                pr.enable()
                exec(code, ns)
                pr.disable()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15)
                res.update(tool="cProfile (main thread only)", text=s.getvalue())
            shutil.rmtree(out, ignore_errors=True)
            self.profile[recipe] = res
            log(f"profiled {recipe}")

    # -- orchestration ------------------------------------------------------------------------
    def run(self) -> None:
        a = self.a
        self.info = machine_info()
        self.build()
        self.make_plans()
        self.warm_cache()
        self.sampler = RssSampler()
        R = ("passthrough", "slerp", "pipeline")
        try:
            # 1. I/O floor (plain local file reads and writes, same byte counts as the merge)
            for r in R:
                if self.selected(f"{r}/floor", "floor"):
                    self.timed(self.case(f"{r}/floor", r, "floor", note="plain read+write+fsync"), self.floor_local(r), group="floor")
            if self.selected("sweep/floor", "floor") and self.selected("sweep/one-job", "sweep"):
                self.timed(
                    self.case("sweep/floor", "sweep", "floor", note=f"slerp inputs once, {a.sweep_k} outputs"),
                    self.floor_local("slerp", copies=a.sweep_k),
                    group="floor",
                )
            # 2. mergekit (before Ray starts: its numbers carry no Ray processes)
            mk_ids = [f"{r}/mergekit" for r in R]
            if self.any_selected("mergekit", mk_ids):
                if a.install_mergekit and not self.find_mergekit():
                    self.install_mergekit()
                self.mk_bin = self.find_mergekit()
                for r in R:
                    cid = f"{r}/mergekit"
                    if not self.selected(cid, "mergekit"):
                        continue
                    c = self.case(cid, r, "mergekit", inproc=False, note="3 runs: A, B, slerp" if r == "pipeline" else "")
                    if not self.mk_bin:
                        c.skipped = "mergekit not found (--mergekit-bin DIR or --install-mergekit)"
                        continue
                    self.timed(c, self.mk(r), group="mergekit")
            # 3. S3: server, upload, ranged reads, plain-s3fs floor
            s3_ids = [f"{r}/{k}" for r in ("slerp", "pipeline") for k in ("floor-s3", "nyxray-s3-local", "nyxray-s3-ray2")]
            read_modes = [("seq", 1)] + [("cat_ranges", n) for n in a.s3_concurrency if n > 1] + [("threads", max(a.s3_concurrency))]
            read_ids = [f"s3read/{m}-{n}" for m, n in read_modes]
            if self.any_selected("s3", s3_ids) or self.any_selected("s3read", read_ids):
                need_src = self.any_selected("s3", [i for i in s3_ids if i.startswith("pipeline")])
                self.start_s3(need_sources=need_src, need_stage1=True)
                for m, n in read_modes:
                    cid = f"s3read/{m}-{n}"
                    if self.selected(cid, "s3read"):
                        self.timed(self.case(cid, "s3read", "s3read", note=f"8 MiB ranged GETs, {n} in flight"), self.s3read(m, n), group="s3read")
                for r in ("slerp", "pipeline"):
                    if self.selected(f"{r}/floor-s3", "s3"):
                        self.timed(self.case(f"{r}/floor-s3", r, "floor", note="plain s3fs cat_ranges + multipart put"), self.floor_s3(r), s3=True, group="s3")
            # 4. Ray (before the local executor runs, so the driver starts small): init once (timed), one cold run, steady state
            ray_ids = [f"{r}/nyxray-ray{n}" for r in R for n in (1, 2)] + [f"{r}/nyxray-ray2-kept" for r in R] + ["slerp/nyxray-ray-cold"]
            sweep_ids = ["sweep/one-job", "sweep/separate"]
            want_ray = (
                self.any_selected("ray", ray_ids)
                or self.any_selected("s3", [i for i in s3_ids if "ray" in i])
                or (self.any_selected("sweep", sweep_ids) and a.sweep_executor == "ray")
            )
            if want_ray:
                import ray

                t0 = time.perf_counter()
                ray.init(include_dashboard=False, logging_level="WARNING", _temp_dir=os.path.join(self.work, "ray"))
                self.ray_init_s = time.perf_counter() - t0
                log(f"ray.init: {self.ray_init_s:.1f}s")
                if self.selected("slerp/nyxray-ray-cold", "ray"):
                    c = self.case("slerp/nyxray-ray-cold", "slerp", "nyxray-ray", note="ray.init + first merge (2 actors)")
                    self.timed(c, self.nyx("slerp", "ray", 2), runs=1)
                    c.runs[0]["merge_s"] = c.runs[0]["wall_s"]
                    c.runs[0]["ray_init_s"] = round(self.ray_init_s, 3)
                    c.runs[0]["wall_s"] = round(self.ray_init_s + c.runs[0]["wall_s"], 4)
                for r in R:
                    for n in (1, 2):
                        cid = f"{r}/nyxray-ray{n}"
                        if self.selected(cid, "ray"):
                            self.timed(self.case(cid, r, "nyxray-ray", note="Ray up, actors started by the merge"), self.nyx(r, "ray", n), group="ray")
                for r in R:
                    cid = f"{r}/nyxray-ray2-kept"
                    if self.selected(cid, "ray"):
                        import nyxray

                        self.nyx(r, "ray", 2, keep=120)(self.fresh(f"{r}-warm"))  # untimed: starts the actors this case keeps
                        shutil.rmtree(self.fresh(f"{r}-warm"), ignore_errors=True)
                        self.timed(
                            self.case(cid, r, "nyxray-ray", note="Ray up, actors kept by the previous merge (keep_actors)"),
                            self.nyx(r, "ray", 2, keep=120),
                            group="ray",
                        )
                        nyxray.release_actors()
                for r in ("slerp", "pipeline"):
                    if self.s3 and self.selected(f"{r}/nyxray-s3-ray2", "s3"):
                        self.timed(self.case(f"{r}/nyxray-s3-ray2", r, "nyxray-ray"), self.nyx(r, "ray", 2, s3=True), s3=True, group="s3")
            # sweep: K members in one job vs K merges
            if self.any_selected("sweep", sweep_ids):
                ex, n = (a.sweep_executor, a.sweep_actors if a.sweep_executor == "ray" else None)
                kind = "nyxray-ray" if ex == "ray" else "sweep-local"
                label = f"{ex}{n or ''}"
                if self.selected("sweep/one-job", "sweep"):
                    self.timed(self.case("sweep/one-job", "sweep", kind, note=f"{a.sweep_k} SLERP members, {label}"), self.sweep_one(ex, n), group="sweep")
                if self.selected("sweep/separate", "sweep"):
                    self.timed(self.case("sweep/separate", "sweep", kind, note=f"{a.sweep_k} merges, {label}"), self.sweep_separate(ex, n), group="sweep")
            with contextlib.suppress(Exception):
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            # 5. nyxray in this process (executor=local) and the CLI, Ray stopped
            for r in R:
                if self.selected(f"{r}/nyxray-local", "local"):
                    self.timed(self.case(f"{r}/nyxray-local", r, "nyxray-local"), self.nyx(r, "local"), group="local")
            if self.selected("slerp/kernel", "local"):
                self.timed(
                    self.case("slerp/kernel", "slerp", "kernel", note="the SLERP math alone: no I/O, no hashing, 1 thread"), self.kernel(), group="local"
                )
            for r in ("slerp", "pipeline"):
                if self.selected(f"{r}/nyxray-cli", "cli"):
                    self.timed(self.case(f"{r}/nyxray-cli", r, "nyxray-cli", inproc=False, note="process incl. start-up"), self.nyx_cli(r), group="cli")
            # 6. S3 with the local executor
            if self.s3:
                for r in ("slerp", "pipeline"):
                    if self.selected(f"{r}/nyxray-s3-local", "s3"):
                        self.timed(self.case(f"{r}/nyxray-s3-local", r, "nyxray-local"), self.nyx(r, "local", s3=True), s3=True, group="s3")
        finally:
            self.shutdown()
        if self.selected("profile", "profile"):
            self.run_profile()
        self.sampler.stop()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        shutil.rmtree(os.path.join(self.work, "ray"), ignore_errors=True)
        if self.s3 is not None:
            with contextlib.suppress(Exception):
                self.s3.stop()
            self.s3 = None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss(pid: int) -> int:
    fields = _read(f"/proc/{pid}/statm").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 else 0


def _remap(doc: Any, mapping: dict[str, str]) -> Any:
    if isinstance(doc, dict):
        return {k: (mapping.get(v, v) if k in ("model", "base_model") and isinstance(v, str) else _remap(v, mapping)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_remap(x, mapping) for x in doc]
    return doc


def _safetensors_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else 0


def _nyx_numbers(rep: dict) -> dict:
    return {
        "nyxray_wall_s": rep["wall_s"],
        "bytes_read": rep["bytes_read"],
        "bytes_read_tensors": rep["bytes_read_tensors"],
        "bytes_read_min": rep["bytes_read_min"],
        "bytes_written": rep["bytes_written"],
        "shards": rep.get("shards"),
        "actors": [{k: w.get(k) for k in ("actor", "units", "bytes_read", "bytes_written", "busy_s")} for w in rep.get("actors", [])],
        "balance": rep.get("balance"),
        "timings_s": rep.get("timings_s"),
    }


WAIT_LEAVES = (
    "Condition.wait",
    "Event.wait",
    "_worker",
    "Thread.join",
    "Future.result",
    "Queue.get",
    "SimpleQueue.get",
    "wait",
    "select",
    "_wait_for_tstate_lock",
    "get",
)


def _frame(fr: str, line: bool) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py:12)`` (or without the line); native ``0x.. (lib.so)`` -> ``<lib.so>``."""
    if fr.startswith("0x") and " (" in fr:
        return "<" + fr.split(" (", 1)[1].rstrip(")") + ">"
    if " (" not in fr:
        return fr
    func, _, where = fr.partition(" (")
    where = where.rstrip(")")
    fname, _, ln = where.rpartition(":") if where.rpartition(":")[2].isdigit() else (where, "", "")
    fname = "/".join(fname.split("/")[-2:]) if "nyxray" in fname else fname.rsplit("/", 1)[-1]
    return f"{func} ({fname}:{ln})" if line and ln else f"{func} ({fname})"


def _digest_pyspy(raw: str) -> dict:
    """py-spy collapsed stacks -> samples by role, and the top self / inclusive frames of active samples."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    roles: dict[str, int] = {}
    total = active = 0
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = [x for x in stack.split(";") if not x.startswith("thread (") and not x.startswith("process ")]
            leaf = frames[-1].split(" (")[0] if frames else ""
            if not frames:
                role = "native thread, no Python frames (torch OpenMP workers)"
            elif (
                leaf in WAIT_LEAVES
                or leaf.endswith(".wait")
                or leaf.endswith("acquire")
                or any(w in stack for w in ("acquire_lock", "SimpleQueue_get", "pthread_cond", "Condition.wait", "sem_wait"))
            ):
                role = "waiting"
            elif "_find_and_load" in stack:
                role = "import"
            elif "execute/unit.py" in stack and "_loop (" in stack:
                role = "writer thread (write + sha256)"
            elif "fetch (" in stack or "read_ranges" in stack:
                role = "reader threads"
            elif "run_unit (" in stack:
                role = "compute (unit main thread)"
            elif "plan.py" in stack or "models.py" in stack:
                role = "plan (headers)"
            else:
                role = "other (commit, driver, start-up)"
            roles[role] = roles.get(role, 0) + n
            if role in ("waiting", "import") or not frames:
                continue
            active += n
            key = _frame(frames[-1], line=True)
            if ".py" not in key:  # native code: say which Python frame called it
                py = [x for x in frames if ".py:" in x]
                key = f"{key[:60]} <- {_frame(py[-1], line=True) if py else '?'}"
            self_t[key] = self_t.get(key, 0) + n
            for fn in {_frame(x, line=False) for x in frames}:
                incl[fn] = incl.get(fn, 0) + n
    skip = ("<module>", "_bootstrap", "_bootstrap_inner", "run", "_worker", "merge", "run_targets", "execute", "main", "<listcomp>")
    top_self = sorted(self_t.items(), key=lambda kv: -kv[1])[:15]
    top_incl = sorted(((k, v) for k, v in incl.items() if ".py" in k and k.split(" (")[0] not in skip and not k.startswith("Thread.")), key=lambda kv: -kv[1])[
        :15
    ]
    return {"samples": total, "active": active, "self": top_self, "inclusive": top_incl, "roles": roles}


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


# -- report ---------------------------------------------------------------------------------------

ORDER = (
    "floor",
    "floor-s3",
    "mergekit",
    "kernel",
    "nyxray-local",
    "nyxray-cli",
    "nyxray-ray1",
    "nyxray-ray2",
    "nyxray-ray2-kept",
    "nyxray-ray-cold",
    "nyxray-s3-local",
    "nyxray-s3-ray2",
)


def table(b: Bench) -> tuple[str, list[dict]]:
    cases = list(b.cases.values())

    def key(c: Case):
        rorder = ("passthrough", "slerp", "pipeline", "sweep", "s3read")
        suffix = c.id.split("/", 1)[1]
        return (rorder.index(c.recipe) if c.recipe in rorder else 9, ORDER.index(suffix) if suffix in ORDER else 50, c.id)

    cases.sort(key=key)
    floors = {c.recipe: c.wall() for c in cases if c.id.endswith("/floor") and c.runs}
    floors_s3 = {c.recipe: c.wall() for c in cases if c.id.endswith("/floor-s3") and c.runs}
    mk = {c.recipe: c.wall() for c in cases if c.id.endswith("/mergekit") and c.runs}
    if "slerp" in mk:
        mk["sweep"] = mk["slerp"] * b.a.sweep_k
    head = [
        "case",
        "wall s",
        "start s",
        "run s",
        "CPU s",
        "runs",
        "RSS work",
        "RSS proc",
        "read",
        "written",
        "MB/s",
        "floor/case",
        "floor/run",
        "vs mergekit",
        "note",
    ]
    rows, raw = [], []
    for c in cases:
        w = c.wall()
        if w is None:
            rows.append([c.id, "-", "", "", "", "0", "", "", "", "", "", "", "", "", c.skipped or "not run"])
            raw.append(c.summary())
            continue
        rd, wr = c.first("bytes_read") or 0, c.first("bytes_written") or 0
        fl = floors_s3.get(c.recipe) if "s3" in c.id and "floor" not in c.id else floors.get(c.recipe)
        ratio_floor = fl / w if fl and not c.id.endswith("/floor") and c.kind != "kernel" else None
        ratio_mk = w / mk[c.recipe] if c.recipe in mk and c.kind not in ("floor", "kernel") and not c.id.endswith("/mergekit") else None
        spread = f"{len(c.runs)}" + (f" ({min(r['wall_s'] for r in c.runs):.2f}-{max(r['wall_s'] for r in c.runs):.2f})" if len(c.runs) > 1 else "")
        rd_s = human(rd) if rd else ("n/a" if c.kind == "mergekit" else "0")
        cpu = c.cpu()
        start, run = c.startup(), c.phase("run")
        ratio_run = fl / run if fl and run else None
        rows.append(
            [
                c.id,
                f"{w:.2f}",
                f"{start:.2f}" if start is not None else "",
                f"{run:.2f}" if run is not None else "",
                f"{cpu:.1f}" if cpu is not None else "",
                spread,
                human(c.work_rss()),
                human(c.proc_rss()),
                rd_s,
                human(wr),
                f"{(rd + wr) / w / MB:.0f}",
                f"{ratio_floor:.2f}" if ratio_floor else "",
                f"{ratio_run:.2f}" if ratio_run else "",
                f"{ratio_mk:.2f}x" if ratio_mk else "",
                c.note,
            ]
        )
        s = c.summary()
        s.update(ratio_floor=ratio_floor, ratio_floor_run=ratio_run, startup_s=start, run_s=run, ratio_mergekit=ratio_mk, mb_s=(rd + wr) / w / MB)
        raw.append(s)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(widths[i]) if i in (0, 5, 14) else str(v).rjust(widths[i]) for i, v in enumerate(r)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * x for x in widths))
    return "\n".join(lines), raw


def verdicts(b: Bench) -> list[str]:
    c = b.cases
    out = []
    limit = 1.5e9 + parse_bytes(str(b.out_shard))

    def med(cid: str) -> float | None:
        return c[cid].wall() if cid in c else None

    def ratio_line(recipe: str, target: float, label: str) -> None:
        mkw = med(f"{recipe}/mergekit")
        if not mkw:
            out.append(f"{label} <= {target}x mergekit: not measured (no mergekit run)")
            return
        parts = []
        for k in ("nyxray-local", "nyxray-ray1", "nyxray-ray2", "nyxray-ray2-kept", "nyxray-cli", "nyxray-ray-cold"):
            w = med(f"{recipe}/{k}")
            if w:
                parts.append(f"{k.removeprefix('nyxray-')} {w / mkw:.2f}x {'MET' if w / mkw <= target else 'MISSED'}")
        out.append(f"{label} <= {target}x mergekit ({mkw:.1f}s): " + ", ".join(parts))

    ratio_line("slerp", 0.35, "SLERP")
    ratio_line("pipeline", 0.2, "fused pipeline (vs mergekit's 3 runs)")
    ratio_line("passthrough", 0.8, "passthrough")
    parts = []
    for cid, case in c.items():
        run = case.phase("run") if case.kind.startswith("nyxray") and case.runs else None
        fl = med(f"{case.recipe}/floor-s3" if "s3" in cid else f"{case.recipe}/floor")
        if run and fl:
            r = fl / run
            parts.append(f"{cid} {r:.2f} {'MET' if r >= 0.5 else 'MISSED'} (start-up {case.startup():.2f}s)")
    out.append(
        "steady-state throughput >= 50% of the I/O floor (floor time / nyxray's run phase; start-up = plan + start phases): "
        + (", ".join(parts) or "not measured")
    )
    parts = []
    for cid, case in c.items():
        if case.kind.startswith("nyxray") and case.runs:
            p, w = case.proc_rss(), case.work_rss()
            grow = ""
            if case.kind == "nyxray-local":  # the bench's own driver keeps heap between cases: say how much this run added
                g = max(r["rss"]["driver"] - r["rss"].get("driver_at_start", 0) for r in case.runs)
                grow = f", +{human(g)} over the driver's RSS at start"
            parts.append(f"{cid} proc {human(p)} {'MET' if p < limit else 'MISSED'} (driver+actors {human(w)} {'MET' if w < limit else 'MISSED'}{grow})")
    out.append(f"peak RSS < 1.5 GB + out-shard ({human(limit)}): " + ("; ".join(parts) or "not measured"))
    parts = []
    for cid, case in c.items():
        if case.kind.startswith("nyxray") and case.runs and case.first("bytes_read_min"):
            if case.recipe == "sweep":
                continue
            rd, mn = case.first("bytes_read"), case.first("bytes_read_min")
            parts.append(f"{cid} +{(rd - mn) / mn * 100:.2f}% {'MET' if rd <= mn * 1.01 else 'MISSED'}")
    if "sweep/one-job" in c and c["sweep/one-job"].runs:
        case = c["sweep/one-job"]
        rd, mn = case.first("bytes_read"), case.first("bytes_read_min")
        parts.append(f"sweep/one-job ({b.a.sweep_k} members) +{(rd - mn) / mn * 100:.2f}% {'MET' if rd <= mn * 1.01 else 'MISSED'}")
    out.append("bytes read within 1% of the plan minimum (headers included): " + (", ".join(parts) or "not measured"))
    return out


def render(b: Bench, cmdline: str) -> tuple[str, dict]:
    i = b.info
    lines = [
        f"nyxray benchmark, {i.get('date')}",
        f"machine: {i.get('cpus')} CPUs ({i.get('cpu_model', '?')}), {i.get('ram_gib')} GiB RAM; {i.get('uname')}",
        f"python {i.get('python')}, torch {i.get('torch')} ({i.get('torch_threads')} threads), ray {i.get('ray')}, s3fs {i.get('s3fs')},"
        f" nyxray {i.get('nyxray')} @ {i.get('git')}"
        + (f" (at the end: {i.get('git_end')})" if i.get("git_end") != i.get("git") else "")
        + f"; mergekit: {b.mk_bin or 'not used'}",
        f"command: {cmdline}",
        f"inputs: 4 x {human(b.model_size)} bf16 Mistral-shaped ({', '.join(f'{k}={v}' for k, v in b.dims.items())}), "
        f"input shards {human(b.in_shard)}, out-shard-size {b.out_shard}; cached in {b.base}",
        f"ray.init: {b.ray_init_s:.1f}s (not in the steady-state rows)" if b.ray_init_s else "ray.init: not run",
    ]
    if b.upload:
        lines.append(
            f"S3 upload of the inputs (s3fs put_file, 4 files at once): {human(b.upload['bytes'])} in {b.upload['wall_s']:.1f}s = {b.upload['mb_s']:.0f} MB/s"
        )
    loads = [r["load1"] for c in b.cases.values() for r in c.runs if "load1" in r]
    if loads:
        lines.append(f"1-min load average at the start of the runs: {min(loads):.1f}-{max(loads):.1f} (other jobs share this machine)")
    if b.error:
        lines.append(f"ERROR, the run stopped early:\n{b.error}")
    tab, raw = table(b)
    lines += [
        "",
        tab,
        "",
        "wall s: median of the runs (min-max in 'runs'); CPU s: median CPU seconds of the driver + actors (subprocess rows: the subprocesses); RSS work: peak of driver + Ray actors summed (for subprocess rows: the"
        " subprocess tree); RSS proc: peak of the largest single working process (driver for local, actor for Ray);"
        " Ray/S3 daemons are not counted (see --json). start s / run s: nyxray's own phases (timings_s in its report): start-up ="
        " plan + claim + worker start (Ray actors that compute load torch here), run = first unit handed out to the last one done."
        " MB/s = (read + written) / wall. floor/case = I/O-floor time / case time; floor/run = I/O-floor time / run phase (steady state)"
        " (the S3 floor for S3 rows). vs mergekit = case time / mergekit time of the same recipe (the pipeline: mergekit's 3 runs;"
        " the sweep: K x mergekit slerp).",
        "",
    ]
    lines += ["targets:"] + [f"  - {v}" for v in verdicts(b)]
    if b.profile:
        lines += ["", "profile (nyxray executor=local, one process; py-spy):"]
        for recipe, p in b.profile.items():
            if "self" in p:
                lines.append(
                    f"  {recipe}: merge {p.get('merge_wall_s')}s; {p['tool']}; {p['samples']} samples by role: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(p["roles"].items(), key=lambda kv: -kv[1]))
                )
                act = max(1, p["active"])
                lines.append(f"    self time, % of {p['active']} active samples (no waits, no imports):")
                lines += [f"      {v / act * 100:5.1f}%  {k}" for k, v in p["self"][:12]]
                lines.append("    inclusive: " + "; ".join(f"{k} {v / act * 100:.0f}%" for k, v in p["inclusive"][:12]))
            else:
                lines.append(f"  {recipe}: {p.get('tool')}\n{p.get('text', p.get('error', ''))}")
    result = {
        "info": i,
        "command": cmdline,
        "dims": b.dims,
        "model_bytes": b.model_size,
        "out_shard_size": b.out_shard,
        "in_shard_bytes": b.in_shard,
        "ray_init_s": b.ray_init_s,
        "s3_upload": b.upload,
        "cases": raw,
        "profile": b.profile,
        "verdicts": verdicts(b),
        "plans": {k: {"bytes_read_min": p.bytes_read_min(), "bytes_written": p.final.bytes_written, "shards": len(p.final.shards)} for k, p in b.plans.items()},
    }
    return "\n".join(lines), result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="nyxray benchmark (see bench/README.md)")
    p.add_argument("--size", default="1G", help="bytes per input model, K/M/G suffixes (default 1G)")
    p.add_argument("--quick", action="store_true", help="~100 MB smoke run: --size 100M, 1 run, sweep K=2")
    p.add_argument("--runs", type=int, help="runs per case; the median is reported (default 3, 1 with --quick)")
    p.add_argument(
        "--runs-for",
        nargs="*",
        default=[],
        metavar="GROUP=N",
        help=f"runs for one group of cases (groups: {', '.join(GROUPS[:-1])}), e.g. s3=1 cli=1 (default: --runs)",
    )
    p.add_argument("--work", default="/tmp/nyxray-bench", help="work dir: cached inputs, outputs (removed after each run)")
    p.add_argument("--cases", nargs="*", help=f"groups ({', '.join(GROUPS)}) or case-id patterns, e.g. 'slerp/*' '*mergekit'")
    p.add_argument("--out-shard-size", help="output shard size in bytes (default: a quarter of the model size)")
    p.add_argument("--sweep-k", type=int, help="sweep members (default 3, 2 with --quick)")
    p.add_argument("--sweep-executor", default="ray", choices=("ray", "local"))
    p.add_argument("--sweep-actors", type=int, default=2)
    p.add_argument("--s3-concurrency", default="4,8,16", help="concurrent ranged requests to compare with 1 (comma list)")
    p.add_argument("--s3read-bytes", default="256M", help="bytes read per S3 ranged-read measurement")
    p.add_argument("--mergekit-bin", help="a venv's bin with mergekit-yaml (default: bench/.mk-venv/bin or /work/mk-venv/bin)")
    p.add_argument("--install-mergekit", action="store_true", help="create bench/.mk-venv with torch 2.13.0 + mergekit 0.1.5")
    p.add_argument("--profile", action="store_true", help="also profile nyxray's SLERP and pipeline (py-spy, else cProfile)")
    p.add_argument("--py-spy", help="py-spy binary (default: PATH, the venv, WORK/tools/bin)")
    p.add_argument("--json", help="write every raw number to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.size = a.size if "--size" in (argv or sys.argv) else "100M"
        a.runs = a.runs or 1
        a.sweep_k = a.sweep_k or 2
        a.s3read_bytes = a.s3read_bytes if "--s3read-bytes" in (argv or sys.argv) else "64M"
    a.runs = a.runs or 3
    a.runs_for = {k: int(v) for k, _, v in (x.partition("=") for x in a.runs_for)}
    if any(k not in GROUPS for k in a.runs_for):
        p.error(f"--runs-for: groups are {', '.join(GROUPS[:-1])}")
    a.sweep_k = a.sweep_k or 3
    a.s3_concurrency = [int(x) for x in str(a.s3_concurrency).split(",") if x]
    a.s3read_bytes = parse_bytes(a.s3read_bytes)
    cmdline = " ".join(
        shlex.quote(x)
        for x in [
            os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable,
            os.path.relpath(os.path.abspath(__file__), REPO),
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    b = Bench(a)
    started = time.monotonic()
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted; partial results follow")
    except Exception:  # noqa: BLE001 - report what was measured, then the error
        b.error = traceback.format_exc()
        log(f"FAILED:\n{b.error}")
    finally:
        b.shutdown()
    b.info["git_end"] = machine_info().get("git")
    text, result = render(b, cmdline)
    result["bench_wall_s"] = round(time.monotonic() - started, 1)
    print(text + f"\n\n(benchmark took {result['bench_wall_s']:.0f}s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
