#!/usr/bin/env python
"""nyxray size series: nyxray vs mergekit 0.1.5 vs the I/O floor on one SLERP, model size by size.

For each size (``--sizes 0.25G,1G,4G``; ``7b`` = Mistral-7B's real shape, 14.5 GB), two random bf16
models of that shape (built once, cached in ``--work``), the Nyxene card's stage-3 SLERP t curve over
their 32 layers, and, alternating, ``--runs`` runs each of

* ``nyxray merge RECIPE OUT``: the default command line as a new user types it (a process; the
  default executor ``auto`` runs in process, no Ray),
* ``mergekit-yaml RECIPE OUT --out-shard-size 5B --no-write-model-card`` (nyxray's default shard
  size, ``HF_HUB_OFFLINE=1``, mergekit's default threads: as ``bench.py`` runs it),
* the I/O floor: the needed input bytes read once, the output's bytes written once + fsync,

each after reading the inputs once (a warm page cache), each into a fresh output removed after it.
Prints the machine, the command line and one table; ``--json FILE`` keeps everything, ``--png FILE``
draws it (``chart.py``, matplotlib from the ``bench`` extra). See bench/README.md, "Size series".

    ./dev.sh bench --series --sizes 0.25G,1G,4G,7b --json bench/results/series.json --png bench/results/series.png
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from typing import Any

import cases
from common import command_line, human, log, parse_bytes
from inputs import DONE, card_slerp_for, model_bytes, shape_dims, shape_for, shape_tag, warm_read, write_random_model, write_yaml
from measure import RssSampler, machine_info, measure_once

TOOLS = ("nyxray", "mergekit", "floor")
SPARE = 5 * 10**9  # disk left free after the inputs and one output


def size_spec(token: str) -> dict[str, Any]:
    """``7b`` -> Mistral-7B's dims; ``1G`` -> the Mistral-like dims closest to 1 GB per model."""
    if token.strip().lower() == "7b":
        dims = shape_dims(4096)  # hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 32000
        return {"label": "7B", "dims": dims, "model_bytes": model_bytes(dims)}
    dims = shape_for(parse_bytes(token))
    return {"label": token.strip(), "dims": dims, "model_bytes": model_bytes(dims)}


def ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024


class Series:
    def __init__(self, a: argparse.Namespace, cmdline: str):
        import nyxray
        from nyxray.plan.stages import parse_size

        self.a, self.cmdline = a, cmdline
        self.work = os.path.abspath(a.work)
        self.out_shard = str(inspect.signature(nyxray.merge).parameters["out_shard_size"].default)  # nyxray's default: "5B"
        self.in_shard = parse_size(self.out_shard)
        self.specs = [size_spec(t) for t in a.sizes.split(",") if t.strip()]
        for s in self.specs:
            s["dir"] = os.path.join(self.work, shape_tag(s["dims"]))
            s["models"] = [os.path.join(s["dir"], "a"), os.path.join(s["dir"], "b")]
            s["runs"] = {t: [] for t in TOOLS}
        self.mk_bin: str | None = None
        self.info: dict[str, Any] = {}
        self.error: str | None = None

    def check_disk(self) -> None:
        """Refuse (SystemExit) unless the inputs still to build + the largest output + 5 GB fit."""
        os.makedirs(self.work, exist_ok=True)
        todo = sum(2 * s["model_bytes"] for s in self.specs if not all(os.path.exists(os.path.join(m, DONE)) for m in s["models"]))
        need = todo + max(s["model_bytes"] for s in self.specs) + SPARE
        free = shutil.disk_usage(self.work).free
        if need > free:
            raise SystemExit(
                f"series: not enough disk in {self.work}: {human(free)} free, {human(need)} needed "
                f"({human(todo)} of inputs to build + {human(max(s['model_bytes'] for s in self.specs))} for one output + {human(SPARE)} spare). "
                "Free some space, choose smaller --sizes, or point --work at a larger disk."
            )
        log(f"disk: {human(free)} free in {self.work}, {human(need)} needed")

    def build(self, s: dict) -> None:
        for seed, path in enumerate(s["models"], start=1):
            if os.path.exists(os.path.join(path, DONE)):
                continue
            secs = write_random_model(path, s["dims"], seed=seed, shard_bytes=self.in_shard)
            s.setdefault("build_s", []).append(round(secs, 1))
            log(f"{s['label']}: built {path} ({human(s['model_bytes'])}) in {secs:.1f}s ({s['model_bytes'] / secs / 1e6:.0f} MB/s)")
        a, b = s["models"]
        s["recipe"] = write_yaml(os.path.join(s["dir"], "slerp.yml"), card_slerp_for(a, b, s["dims"]["layers"]))
        s["input_shards"] = sum(f.endswith(".safetensors") for f in os.listdir(a))

    def tool(self, s: dict, name: str) -> cases.Run:
        if name == "nyxray":
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a laptop: no cluster named
            return lambda out: cases.run_nyxray_cli(s["recipe"], out, [], env=env)
        if name == "mergekit":
            assert self.mk_bin
            mk_bin = self.mk_bin

            def mk(out: str) -> dict:
                cases.mk_run(mk_bin, s["recipe"], out, self.out_shard, s["dir"])
                return {"bytes_written": cases.safetensors_bytes(out)}

            return mk
        import nyxray

        return cases.floor_local(nyxray.plan(s["recipe"], out_shard_size=self.out_shard))

    def run(self) -> None:
        a = self.a
        self.check_disk()
        self.info = machine_info()
        if a.install_mergekit and not cases.find_mergekit(a.mergekit_bin):
            cases.install_mergekit()
        self.mk_bin = cases.find_mergekit(a.mergekit_bin)
        if not self.mk_bin:
            log("mergekit not found (--mergekit-bin DIR or --install-mergekit): its column stays empty")
        sampler = RssSampler()
        try:
            for s in self.specs:
                self.build(s)
                s["fits_cache"] = 3 * s["model_bytes"] < 0.9 * ram_bytes()
                tools = [t for t in TOOLS if t != "mergekit" or self.mk_bin]
                fns = {t: self.tool(s, t) for t in tools}
                for i in range(a.runs):
                    for t in tools:
                        n, secs = warm_read(s["models"])
                        out = os.path.join(s["dir"], f"out-{t}-r{i}")
                        shutil.rmtree(out, ignore_errors=True)
                        try:
                            run = measure_once(sampler, fns[t], out)
                        finally:
                            shutil.rmtree(out, ignore_errors=True)
                            with_report = out + ".report.json"
                            if os.path.exists(with_report):
                                os.unlink(with_report)
                        run["warm_read"] = {"bytes": n, "s": round(secs, 2)}
                        s["runs"][t].append(run)
                        log(f"{s['label']} {t} run {i + 1}/{a.runs}: {run['wall_s']:.2f}s, peak RSS {human(run['rss']['child_max'] or run['rss']['driver'])}")
        finally:
            sampler.stop()

    # -- results --------------------------------------------------------------------------------
    @staticmethod
    def med(s: dict, tool: str, key: str = "wall_s") -> float | None:
        vals = [r[key] for r in s["runs"][tool] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    @staticmethod
    def peak(s: dict, tool: str) -> int | None:
        return max((r["rss"]["child_max"] for r in s["runs"][tool]), default=None)

    def rows(self) -> list[dict]:
        out = []
        for s in self.specs:
            ny, mk, fl = (self.med(s, t) for t in TOOLS)
            phases = {
                p: statistics.median(v)
                for p in ("plan", "start", "run", "commit")
                if (v := [r["timings_s"][p] for r in s["runs"]["nyxray"] if r.get("timings_s")])
            }
            out.append(
                {
                    "size": s["label"],
                    "model_bytes": s["model_bytes"],
                    "nyxray_s": ny,
                    "mergekit_s": mk,
                    "floor_s": fl,
                    "nyxray_over_mergekit": ny / mk if ny and mk else None,
                    "floor_over_nyxray": fl / ny if fl and ny else None,
                    "rss_nyxray": self.peak(s, "nyxray"),
                    "rss_mergekit": self.peak(s, "mergekit"),
                    "nyxray_phases_s": phases,
                    "executor": next((r["executor"]["name"] for r in s["runs"]["nyxray"] if r.get("executor")), None),
                    "runs": {t: len(s["runs"][t]) for t in TOOLS},
                }
            )
        return out

    def render(self) -> tuple[str, dict]:
        i, rows = self.info, self.rows()

        def f(v: float | None, fmt: str) -> str:
            return "" if v is None else format(v, fmt)

        head = ["size", "model GB", "nyxray s", "mergekit s", "floor s", "nyxray/mergekit", "floor/nyxray", "peak RSS nyxray", "peak RSS mergekit"]
        body = [
            [
                r["size"],
                f"{r['model_bytes'] / 1e9:.2f}",
                f(r["nyxray_s"], ".2f"),
                f(r["mergekit_s"], ".2f") or ("skipped" if not self.mk_bin else ""),
                f(r["floor_s"], ".2f"),
                f(r["nyxray_over_mergekit"], ".2f") + ("x" if r["nyxray_over_mergekit"] else ""),
                f(r["floor_over_nyxray"], ".2f"),
                human(r["rss_nyxray"]) if r["rss_nyxray"] else "",
                human(r["rss_mergekit"]) if r["rss_mergekit"] else "",
            ]
            for r in rows
        ]
        head2 = ["size", "executor", "plan s", "start s", "run s", "commit s", "input shards", "warm read", "cache"]
        body2 = []
        for r, s in zip(rows, self.specs):
            ph = r["nyxray_phases_s"]
            warm = [x["warm_read"]["s"] for t in TOOLS for x in s["runs"][t]]
            body2.append(
                [r["size"], r["executor"] or "", *(f(ph.get(p), ".2f") for p in ("plan", "start", "run", "commit"))]
                + [str(s.get("input_shards", "")), f"{statistics.median(warm):.1f}s" if warm else "", "warm" if s.get("fits_cache", True) else "DOES NOT FIT"]
            )
        lines = [
            f"nyxray size series, {i.get('date')}",
            f"machine: {i.get('cpus')} CPUs ({i.get('cpu_model', '?')}), {i.get('ram_gib')} GiB RAM; {i.get('uname')}",
            f"python {i.get('python')}, torch {i.get('torch')}, nyxray {i.get('nyxray')} @ {i.get('git')}; mergekit: {self.mk_bin or 'not found'}",
            f"command: {self.cmdline}",
            "merge: SLERP of two random bf16 Mistral-shaped models (the Nyxene card's stage-3 t curve over their 32 layers);"
            f" out-shard-size {self.out_shard} for both (nyxray's default), input shards of at most {human(self.in_shard)}; inputs cached in {self.work}",
            "runs: nyxray `nyxray merge RECIPE OUT` (default CLI), mergekit `mergekit-yaml RECIPE OUT --out-shard-size"
            f" {self.out_shard} --no-write-model-card` (its default threads), floor; alternating, {self.a.runs} run(s) each, inputs read once before each run",
        ]
        if self.error:
            lines.append(f"ERROR, the series stopped early:\n{self.error}")
        lines += ["", *table(head, body), "", "nyxray's own report (median phases; warm read = reading both inputs before each run):", *table(head2, body2), ""]
        lines.append(
            "model GB: one input model (the output is the same size); s: wall seconds (median of the runs) of the whole command;"
            " nyxray/mergekit < 1: nyxray faster; floor/nyxray = the fraction of the I/O floor's speed nyxray reaches;"
            " peak RSS: the largest single process (sampled every 50 ms)."
        )
        if not all(s.get("fits_cache", True) for s in self.specs):
            lines.append(
                "cache DOES NOT FIT: the two inputs and the output (3 x the model) exceed 90% of RAM: the inputs do not all stay in the page"
                " cache through a run, so each run reads part of them from disk (the warm read before it helps only partly)."
            )
        result = {
            "info": i,
            "command": self.cmdline,
            "out_shard_size": self.out_shard,
            "runs": self.a.runs,
            "rows": rows,
            "sizes": self.specs,
            "error": self.error,
        }
        return "\n".join(lines), result


def table(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[k])) for r in [head, *body]) for k in range(len(head))]
    lines = ["  ".join(str(v).ljust(widths[k]) if k == 0 else str(v).rjust(widths[k]) for k, v in enumerate(r)).rstrip() for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def main(argv: list[str] | None = None, cmdline: str | None = None) -> int:
    p = argparse.ArgumentParser(description="nyxray size series: nyxray vs mergekit vs the I/O floor on one SLERP, by model size (see bench/README.md)")
    p.add_argument("--sizes", default="0.25G,1G,4G", help="comma list of bytes per model (K/M/G) and/or 7b (Mistral-7B's shape, 14.5 GB); default 0.25G,1G,4G")
    p.add_argument("--runs", type=int, default=1, help="runs per tool and size, alternating (default 1); the median is shown")
    p.add_argument("--work", default="/tmp/nyxray-bench/series", help="cached inputs (per shape) and the outputs of the run in progress")
    p.add_argument("--mergekit-bin", help="a venv's bin with mergekit-yaml (default: bench/.mk-venv/bin or /work/mk-venv/bin)")
    p.add_argument("--install-mergekit", action="store_true", help="create bench/.mk-venv with torch 2.13.0 + mergekit 0.1.5")
    p.add_argument("--json", help="write everything (every run's numbers) to this file")
    p.add_argument("--png", help="draw wall time and peak RSS vs model size to this PNG (needs matplotlib: the bench extra)")
    a = p.parse_args(argv)
    if a.png:
        from chart import require_matplotlib

        require_matplotlib()  # before hours of measuring, not after
    sr = Series(a, cmdline or command_line(__file__, argv))
    started = time.monotonic()
    try:
        sr.run()
    except KeyboardInterrupt:
        log("interrupted; partial results follow")
    except Exception:  # noqa: BLE001 - print what was measured, then the error
        sr.error = traceback.format_exc()
        log(f"FAILED:\n{sr.error}")
    text, result = sr.render()
    result["series_wall_s"] = round(time.monotonic() - started, 1)
    print(text + f"\n(series took {result['series_wall_s']:.0f}s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if a.png:
        from chart import draw

        draw(result, a.png)
        log(f"chart: {a.png}")
    return 1 if sr.error else 0


if __name__ == "__main__":
    sys.exit(main())
