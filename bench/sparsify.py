#!/usr/bin/env python
"""Micro-benchmark: TIES/breadcrumbs magnitude sparsification, the full sort against the replay.

``nyxray.methods.sparsify`` picks the kept entries by replaying only the partitions of torch's CPU
sort that hold the cut (``_sorted_prefix``); before, it sorted every |delta| (``torch.argsort``).
This times ``sparsify(delta, ...)`` both ways on bf16 task vectors of real tensor shapes, on one
torch thread (as the merge runs it), checks that both keep the very same entries, and prints the
median of ``--runs`` runs per cell.

    .venv/bin/python bench/sparsify.py [--runs 5] [--shapes 1g|7b|all] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from nyxray.methods import sparsify as sp  # noqa: E402

SHAPES = {
    # bench/methods.py's 1 GiB model (hidden 1024, intermediate 3584, vocabulary 32000)
    "1g": [("k_proj 256x1024", (256, 1024)), ("q_proj 1024x1024", (1024, 1024)), ("mlp 3584x1024", (3584, 1024)), ("embed 32000x1024", (32000, 1024))],
    # a Mistral 7B
    "7b": [("q_proj 4096x4096", (4096, 4096)), ("mlp 14336x4096", (14336, 4096))],
}
CASES = [("ties", "magnitude", {"density": 0.5}), ("breadcrumbs", "magnitude_outliers", {"density": 0.9, "gamma": 0.01})]


def timed(fn, runs: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shapes", default="1g", choices=["1g", "7b", "all"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    shapes = SHAPES["1g"] + SHAPES["7b"] if a.shapes == "all" else SHAPES[a.shapes]
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), 1 torch thread, median of {a.runs} runs"
    )
    print(f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    assert sp._self_check(), "this torch build's sort is not the one replayed"
    rows = []
    print(f"{'case':12s} {'tensor':22s} {'entries':>10s} {'sort s':>8s} {'replay s':>9s} {'speed-up':>8s}  same")
    for label, shape in shapes:
        g = torch.Generator().manual_seed(0)
        base = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        delta = (base.float() + 0.002 * torch.randn(shape, generator=g)).to(torch.bfloat16) - base
        for case, method, params in CASES:

            def run(delta=delta, method=method, params=params):
                return sp.sparsify(delta, method, rescale=False, **params)

            sp._replay_checked = False
            t_sort, by_sort = timed(run, a.runs)
            sp._replay_checked = True
            t_replay, by_replay = timed(run, a.runs)
            same = torch.equal(by_sort, by_replay)
            rows.append({"case": case, "tensor": label, "entries": delta.numel(), "sort_s": t_sort, "replay_s": t_replay, "same": same})
            print(f"{case:12s} {label:22s} {delta.numel():>10d} {t_sort:8.3f} {t_replay:9.3f} {t_sort / t_replay:7.1f}x  {same}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
