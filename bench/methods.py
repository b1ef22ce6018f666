#!/usr/bin/env python
"""Benchmark: TIES and DARE-TIES over a base and 3 fine-tunes, nyxray against mergekit 0.1.5.

Both are timed as the whole command a user types, in the same run on the same inputs, alternating:
``nyxray merge R OUT`` (default options) against ``mergekit-yaml R OUT``. Wall time and peak RSS of
each process come from ``/usr/bin/time``. Prints a table; ``--json FILE`` keeps the numbers.

    .venv/bin/python bench/methods.py --size 1G --runs 3 [--methods ties dare_ties] [--mergekit-bin /work/mk-venv/bin]

``--size`` is the size of each of the 4 input models (bf16, Mistral-shaped; default 1G). The inputs
are read once before timing (warm page cache), as a user re-running a merge would have them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RECIPES = {
    "ties": "{weight: %s, density: 0.5}",
    "dare_ties": "{weight: %s, density: 0.5}",
}
WEIGHTS = ("1.0", "0.6", "0.4")


def shape_for(size: int):
    """A Mistral-like shape (hidden 1024 .. 4096, 32000 vocabulary) whose bf16 checkpoint is ~size bytes."""
    from nyxray.demo.synthetic import ModelShape

    hidden = 1024 if size < 3 * 2**30 else 4096
    inter = hidden * 7 // 2
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * (hidden // 4) + 3 * hidden * inter + 2 * hidden)
    embeds = 2 * 2 * 32000 * hidden
    layers = max(1, (size - embeds) // per_layer)
    return ModelShape(hidden=hidden, intermediate=inter, layers=int(layers), vocab=32000, heads=hidden // 128, kv_heads=hidden // 512)


def recipe(method: str, models: dict[str, str]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {models['base']}", "models:"]
    for i, w in enumerate(WEIGHTS, start=1):
        lines += [f"  - model: {models[f'ft{i}']}", f"    parameters: {RECIPES[method] % w}"]
    return "\n".join(lines + ["dtype: bfloat16", ""])


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command, from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        proc = subprocess.run(["/usr/bin/time", "-o", t.name, "-f", "%e %M", *cmd], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        wall, rss_kb = t.read().split()[-2:]
    return float(wall), int(rss_kb) * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes per input model, with K/M/G (binary); default 1G")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each command (median reported)")
    ap.add_argument("--mergekit-bin", default="/work/mk-venv/bin", help="a venv's bin holding mergekit-yaml")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="which rows (default: all)")
    a = ap.parse_args()
    size = int(float(a.size[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[a.size[-1].upper()]) if a.size[-1].isalpha() else int(a.size)
    work = a.work or tempfile.mkdtemp(prefix="nyxray-bench-methods-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", CUDA_VISIBLE_DEVICES="")
    nyx = [os.path.join(os.path.dirname(sys.executable), "nyxray"), "merge"]
    mk = [os.path.join(a.mergekit_bin, "mergekit-yaml")]
    try:
        from nyxray.demo.synthetic import make_model

        shape = shape_for(size)
        t0 = time.time()
        models = {name: os.path.join(work, name) for name in ("base", "ft1", "ft2", "ft3")}
        for i, path in enumerate(models.values()):
            if not os.path.exists(os.path.join(path, "config.json")):  # --work keeps inputs for the next run
                like = {"like": models["base"], "like_noise": 0.03} if i else {}
                make_model(path, shape, seed=1 + i, shard_bytes=2 * 10**9, **like)
        print(f"inputs: 4 x {shape.layers} layers, hidden {shape.hidden}, ready in {time.time() - t0:.0f} s", flush=True)
        for d in models.values():  # warm the page cache for both tools alike
            for f in os.listdir(d):
                with open(os.path.join(d, f), "rb") as fh:
                    while fh.read(1 << 24):
                        pass
        rows = []
        for method in a.methods:
            path = os.path.join(work, f"{method}.yml")
            with open(path, "w") as f:
                f.write(recipe(method, models))
            got: dict[str, list[tuple[float, int]]] = {"nyxray": [], "mergekit": []}
            for run in range(a.runs):
                for tool, cmd in (
                    ("nyxray", [*nyx, path, os.path.join(work, "out-nyx"), "--quiet"]),
                    ("mergekit", [*mk, path, os.path.join(work, "out-mk"), "--no-write-model-card"]),
                ):
                    out = os.path.join(work, "out-nyx" if tool == "nyxray" else "out-mk")
                    shutil.rmtree(out, ignore_errors=True)
                    got[tool].append(timed(cmd, env))
                    print(f"{method} run {run + 1} {tool}: {got[tool][-1][0]:.1f} s, {got[tool][-1][1] / 1e9:.2f} GB", flush=True)
            nyx_s, mk_s = (statistics.median(w for w, _ in got[t]) for t in ("nyxray", "mergekit"))
            rows.append(
                {
                    "method": method,
                    "nyxray_s": nyx_s,
                    "mergekit_s": mk_s,
                    "ratio": nyx_s / mk_s,
                    "nyxray_rss": max(r for _, r in got["nyxray"]),
                    "mergekit_rss": max(r for _, r in got["mergekit"]),
                    "runs": got,
                }
            )
        print(
            f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}; inputs 4 x {size / 2**30:.2f} GiB bf16; "
            f"median of {a.runs} runs; command: {' '.join(sys.argv)}"
        )
        print("| method | nyxray merge (s) | mergekit-yaml (s) | ratio (target <= 0.35) | peak RSS nyxray | peak RSS mergekit |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['method']} | {r['nyxray_s']:.1f} | {r['mergekit_s']:.1f} | {r['ratio']:.2f}x | {r['nyxray_rss'] / 1e9:.2f} GB | {r['mergekit_rss'] / 1e9:.2f} GB |"
            )
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"size": size, "rows": rows}, f, indent=2)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
