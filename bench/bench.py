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
``--series ...`` runs the size series instead (``series.py``). See bench/README.md. Run it with
``./dev.sh bench [args]``.

This file is the command line and the order the cases run in; the parts: ``inputs.py`` (models,
recipes, plans), ``measure.py`` (sampler, one timed run, cases, machine), ``cases.py`` (floor,
nyxray, mergekit), ``s3cases.py``, ``profiling.py``, ``report.py`` (table, verdicts, text).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shutil
import sys
import time
import traceback
from typing import Any

import cases
from common import command_line, human, log, parse_bytes
from inputs import BenchInputs, warm_read
from measure import Case, RssSampler, machine_info, measure_once
from profiling import find_py_spy, run_profile
from report import render
from s3cases import S3Bench

GROUPS = ("floor", "local", "ray", "cli", "s3", "s3read", "sweep", "mergekit", "profile")
DEFAULT_GROUPS = GROUPS[:-1]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.work = os.path.abspath(args.work)
        self.inp = BenchInputs(self.work, parse_bytes(args.size), args.out_shard_size, args.sweep_k)
        self.runs_dir = os.path.join(self.work, "runs")
        self.s3 = S3Bench(self.inp, self.work)
        self.cases: dict[str, Case] = {}
        self.sampler: RssSampler | None = None
        self.info: dict[str, Any] = {}
        self.ray_init_s: float | None = None
        self.mk_bin: str | None = None
        self.profile: dict[str, Any] = {}
        self.error: str | None = None

    # -- selection ----------------------------------------------------------------------------
    def selected(self, case_id: str, group: str) -> bool:
        pats = self.a.cases
        if not pats:
            return group in DEFAULT_GROUPS or (group == "profile" and self.a.profile)
        return any(p == group or fnmatch.fnmatch(case_id, p) for p in pats) or (group == "profile" and self.a.profile)

    def any_selected(self, group: str, ids: list[str]) -> bool:
        return any(self.selected(i, group) for i in ids)

    # -- running and recording ----------------------------------------------------------------
    def case(self, cid: str, recipe: str, kind: str, inproc: bool = True, note: str = "") -> Case:
        c = self.cases.get(cid) or Case(cid, recipe, kind, inproc=inproc, note=note)
        self.cases[cid] = c
        return c

    def fresh(self, name: str) -> str:
        path = os.path.join(self.runs_dir, name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def timed(self, c: Case, fn: cases.Run, runs: int | None = None, s3: bool = False, group: str | None = None) -> None:
        """Run ``fn(out)`` ``runs`` times into fresh outputs (removed after each run); record each run."""
        n = runs or self.a.runs_for.get(group or "", 0) or self.a.runs
        for i in range(n):
            out = self.s3.out(f"{c.id}-r{i}") if s3 else self.fresh(f"{c.id.replace('/', '_')}-r{i}")
            warm_read([self.inp.models, self.inp.stage1])  # the page cache does not stay warm by itself (see README)
            assert self.sampler is not None
            run = measure_once(self.sampler, fn, out)
            c.runs.append(run)
            log(f"{c.id} run {i + 1}/{n}: {run['wall_s']:.2f}s, rss work {human(c.work_rss())}")
            if s3:
                self.s3.rm(out)
            else:
                shutil.rmtree(out, ignore_errors=True)

    # -- orchestration ------------------------------------------------------------------------
    def run(self) -> None:
        a, inp = self.a, self.inp
        self.info = machine_info()
        os.makedirs(self.runs_dir, exist_ok=True)
        inp.build()
        inp.make_plans()
        n, s = warm_read([inp.models, inp.stage1])
        self.info["warm_read"] = {"bytes": n, "s": round(s, 2)}
        log(f"page cache warmed: read {human(n)} in {s:.1f}s")
        self.sampler = RssSampler()
        R = ("passthrough", "slerp", "pipeline")
        try:
            # 1. I/O floor (plain local file reads and writes, same byte counts as the merge)
            for r in R:
                if self.selected(f"{r}/floor", "floor"):
                    self.timed(self.case(f"{r}/floor", r, "floor", note="plain read+write+fsync"), cases.floor_local(inp.plans[r]), group="floor")
            if self.selected("sweep/floor", "floor") and self.selected("sweep/one-job", "sweep"):
                self.timed(
                    self.case("sweep/floor", "sweep", "floor", note=f"slerp inputs once, {a.sweep_k} outputs"),
                    cases.floor_local(inp.plans["slerp"], copies=a.sweep_k),
                    group="floor",
                )
            # 2. mergekit (before Ray starts: its numbers carry no Ray processes)
            if self.any_selected("mergekit", [f"{r}/mergekit" for r in R]):
                if a.install_mergekit and not cases.find_mergekit(a.mergekit_bin):
                    cases.install_mergekit()
                self.mk_bin = cases.find_mergekit(a.mergekit_bin)
                for r in R:
                    cid = f"{r}/mergekit"
                    if not self.selected(cid, "mergekit"):
                        continue
                    c = self.case(cid, r, "mergekit", inproc=False, note="3 runs: A, B, slerp" if r == "pipeline" else "")
                    if not self.mk_bin:
                        c.skipped = "mergekit not found (--mergekit-bin DIR or --install-mergekit)"
                        continue
                    self.timed(c, cases.mk(inp, self.mk_bin, r), group="mergekit")
            # 3. S3: server, upload, ranged reads, plain-s3fs floor
            s3_ids = [f"{r}/{k}" for r in ("slerp", "pipeline") for k in ("floor-s3", "nyxray-s3-local", "nyxray-s3-ray2")]
            read_modes = [("seq", 1)] + [("cat_ranges", n) for n in a.s3_concurrency if n > 1] + [("threads", max(a.s3_concurrency))]
            read_ids = [f"s3read/{m}-{n}" for m, n in read_modes]
            if self.any_selected("s3", s3_ids) or self.any_selected("s3read", read_ids):
                need_src = self.any_selected("s3", [i for i in s3_ids if i.startswith("pipeline")])
                self.s3.start(need_sources=need_src, need_stage1=True)
                for m, n in read_modes:
                    cid = f"s3read/{m}-{n}"
                    if self.selected(cid, "s3read"):
                        c = self.case(cid, "s3read", "s3read", note=f"8 MiB ranged GETs, {n} in flight")
                        self.timed(c, self.s3.read(m, n, a.s3read_bytes), group="s3read")
                for r in ("slerp", "pipeline"):
                    if self.selected(f"{r}/floor-s3", "s3"):
                        c = self.case(f"{r}/floor-s3", r, "floor", note="plain s3fs cat_ranges + multipart put")
                        self.timed(c, self.s3.floor(inp.plans[r]), s3=True, group="s3")
            # 4. Ray (before the local executor runs, so the driver starts small): init once (timed), one cold run, steady state
            self.run_ray(R, s3_ids)
            with contextlib.suppress(Exception):
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            # 5. nyxray in this process (executor=local) and the CLI, Ray stopped
            for r in R:
                if self.selected(f"{r}/nyxray-local", "local"):
                    self.timed(self.case(f"{r}/nyxray-local", r, "nyxray-local"), cases.nyx(inp, r, "local"), group="local")
            if self.selected("slerp/kernel", "local"):
                c = self.case("slerp/kernel", "slerp", "kernel", note="the SLERP math alone: no I/O, no hashing, 1 thread")
                self.timed(c, cases.kernel(inp.plans["slerp"]), group="local")
            for r in ("slerp", "pipeline"):
                if self.selected(f"{r}/nyxray-cli", "cli"):
                    c = self.case(f"{r}/nyxray-cli", r, "nyxray-cli", inproc=False, note="process incl. start-up")
                    self.timed(c, cases.nyx_cli(inp, r), group="cli")
            # 6. S3 with the local executor
            if self.s3.server:
                for r in ("slerp", "pipeline"):
                    if self.selected(f"{r}/nyxray-s3-local", "s3"):
                        c = self.case(f"{r}/nyxray-s3-local", r, "nyxray-local")
                        self.timed(c, cases.nyx(inp, r, "local", s3=self.s3), s3=True, group="s3")
        finally:
            self.shutdown()
        if self.selected("profile", "profile"):
            self.profile = run_profile(inp, self.runs_dir, find_py_spy(a.py_spy, self.work))
        self.sampler.stop()

    def run_ray(self, R: tuple[str, ...], s3_ids: list[str]) -> None:
        """The Ray cases and the sweep: ``ray.init`` timed once, the cold run, then Ray up."""
        a, inp = self.a, self.inp
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
                self.timed(c, cases.nyx(inp, "slerp", "ray", 2), runs=1)
                c.runs[0]["merge_s"] = c.runs[0]["wall_s"]
                c.runs[0]["ray_init_s"] = round(self.ray_init_s, 3)
                c.runs[0]["wall_s"] = round(self.ray_init_s + c.runs[0]["wall_s"], 4)
            for r in R:
                for n in (1, 2):
                    cid = f"{r}/nyxray-ray{n}"
                    if self.selected(cid, "ray"):
                        self.timed(self.case(cid, r, "nyxray-ray", note="Ray up, actors started by the merge"), cases.nyx(inp, r, "ray", n), group="ray")
            for r in R:
                cid = f"{r}/nyxray-ray2-kept"
                if self.selected(cid, "ray"):
                    import nyxray

                    cases.nyx(inp, r, "ray", 2, keep=120)(self.fresh(f"{r}-warm"))  # untimed: starts the actors this case keeps
                    shutil.rmtree(self.fresh(f"{r}-warm"), ignore_errors=True)
                    c = self.case(cid, r, "nyxray-ray", note="Ray up, actors kept by the previous merge (keep_actors)")
                    self.timed(c, cases.nyx(inp, r, "ray", 2, keep=120), group="ray")
                    nyxray.release_actors()
            for r in ("slerp", "pipeline"):
                if self.s3.server and self.selected(f"{r}/nyxray-s3-ray2", "s3"):
                    self.timed(self.case(f"{r}/nyxray-s3-ray2", r, "nyxray-ray"), cases.nyx(inp, r, "ray", 2, s3=self.s3), s3=True, group="s3")
        # sweep: K members in one job vs K merges
        if self.any_selected("sweep", sweep_ids):
            ex, n = (a.sweep_executor, a.sweep_actors if a.sweep_executor == "ray" else None)
            kind = "nyxray-ray" if ex == "ray" else "sweep-local"
            label = f"{ex}{n or ''}"
            if self.selected("sweep/one-job", "sweep"):
                self.timed(self.case("sweep/one-job", "sweep", kind, note=f"{a.sweep_k} SLERP members, {label}"), cases.sweep_one(inp, ex, n), group="sweep")
            if self.selected("sweep/separate", "sweep"):
                self.timed(self.case("sweep/separate", "sweep", kind, note=f"{a.sweep_k} merges, {label}"), cases.sweep_separate(inp, ex, n), group="sweep")

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        shutil.rmtree(os.path.join(self.work, "ray"), ignore_errors=True)
        self.s3.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="nyxray benchmark (see bench/README.md); --series ARGS runs the size series (series.py --help)")
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
    return a


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--series"]:
        import series

        return series.main(args[1:], cmdline=command_line(__file__, args))
    a = parse_args(argv)
    cmdline = command_line(__file__, argv)
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
