"""The things a case times, each a function ``run(out) -> numbers`` built before timing starts.

* the I/O floor: the plan's needed input byte ranges read once, the final shards' bytes written
  once + fsync (``floor_local``);
* nyxray in this process (``nyx``), as the ``nyxray merge`` command (``run_nyxray_cli``, ``nyx_cli``),
  its SLERP kernel alone (``kernel``), a sweep in one job or as separate merges;
* mergekit 0.1.5's ``mergekit-yaml`` (``find_mergekit``, ``mk_cmd``, ``mk_run``, ``mk``).

The S3 cases are in ``s3cases.py``, the profile in ``profiling.py``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from common import CHUNK, HERE, REPO, log
from inputs import STAGE_A, STAGE_B, BenchInputs, remap

Run = Callable[[str], dict]

# -- I/O floor ------------------------------------------------------------------------------------


def floor_spans(plan: Any) -> dict[str, list[tuple[int, int]]]:
    """The byte ranges of every input file that ``plan`` reads, merged: path -> [(start, end)]."""
    from nyxray.plan.expr import leaves

    spans: dict[tuple, list[tuple[int, int]]] = {}
    locs = {}
    for shard in plan.final.shards:
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
    assert total == plan.bytes_read_min(), (total, plan.bytes_read_min())
    return out


def floor_local(plan: Any, copies: int = 1) -> Run:
    """Plain ``readinto`` of the needed input ranges, then ``copies`` x the final shards' sizes
    written with plain ``write`` + ``fsync`` per file (nyxray fsyncs each shard)."""
    spans = floor_spans(plan)
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
            for shard in plan.final.shards:
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


# -- nyxray -----------------------------------------------------------------------------------------


def nyx_numbers(rep: dict) -> dict:
    """What the benchmark keeps of a nyxray report."""
    return {
        "nyxray_wall_s": rep["wall_s"],
        "bytes_read": rep["bytes_read"],
        "bytes_read_tensors": rep["bytes_read_tensors"],
        "bytes_read_min": rep["bytes_read_min"],
        "bytes_written": rep["bytes_written"],
        "shards": rep.get("shards"),
        "actors": [{k: w.get(k) for k in ("actor", "units", "bytes_read", "bytes_written", "busy_s", "hash_s")} for w in rep.get("actors", [])],
        "balance": rep.get("balance"),
        "timings_s": rep.get("timings_s"),
        "executor": rep.get("executor"),
    }


def nyx(inp: BenchInputs, recipe: str, executor: str, actors: int | None = None, s3: Any = None, keep: float = 0.0) -> Run:
    """A nyxray merge in this process (which has torch loaded already: the CLI rows pay its import);
    ``s3``: an ``s3cases.S3Bench`` to read the inputs from; ``keep``: keep_actors (the Ray actors stay
    for the next run)."""
    import nyxray

    path, kw = inp.recipe_args(recipe, *((s3.models, s3.stage1) if s3 else ()))
    if s3:
        kw["storage_options"] = s3.opts

    def run(out: str) -> dict:
        rep = nyxray.merge(
            path,
            out,
            executor=executor,
            actors=actors,
            out_shard_size=inp.out_shard,
            progress=False,
            write_model_card=False,
            **({"keep_actors": keep} if keep else {}),
            **kw,
        )
        return nyx_numbers(rep)

    return run


def run_nyxray_cli(recipe: str, out: str, options: list[str], env: dict | None = None) -> dict:
    """``nyxray merge RECIPE OUT [options] --report OUT.report.json`` as a process of this venv;
    its report's numbers (``nyxray_wall_s``: the wall time it reports itself)."""
    rep_path = out + ".report.json"
    cmd = [os.path.join(os.path.dirname(sys.executable), "nyxray"), "merge", recipe, out, *options, "--report", rep_path]
    r = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"nyxray merge failed ({r.returncode}): {r.stderr[-2000:]}")
    with open(rep_path) as f:
        rep = json.load(f)
    os.unlink(rep_path)
    return nyx_numbers(rep)


def nyx_cli(inp: BenchInputs, recipe: str) -> Run:
    """``nyxray merge`` as a process with the default executor (``auto``: in process, as no cluster
    is named: RAY_ADDRESS is removed from its environment); start-up (imports, torch) included."""
    path, kw = inp.recipe_args(recipe)
    opts = ["--quiet", "--no-write-model-card", "--out-shard-size", str(inp.out_shard)]
    if "models_root" in kw:
        opts += ["--models-root", kw["models_root"]]
    for k, v in kw.get("models", {}).items():
        opts += ["--model", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return lambda out: run_nyxray_cli(path, out, opts, env)


def kernel(plan: Any) -> Run:
    """``nyxray.methods._slerp.slerp`` over every SLERP'd tensor of ``plan``, on random bf16 data of the same
    shapes (made before timing), in this process with one torch thread: the compute floor."""
    import torch

    from nyxray.execute.evaluate import TORCH_DTYPES
    from nyxray.methods._slerp import slerp
    from nyxray.plan.expr import Leaf, Merge

    todo = []  # (base shape, other shape, t, dtype)
    for sh in plan.final.shards:
        for t in sh.tensors:
            e = t.expr
            if isinstance(e, Merge) and e.method == "slerp":
                assert all(isinstance(x, Leaf) for x in e.inputs), "the benchmark's SLERP reads its inputs as stored"
                base = e.base or 0
                todo.append((e.inputs[base], e.inputs[1 - base], dict(e.params)["t"], e.dtype))
    g = torch.Generator().manual_seed(0)
    data = {}
    for a, b, _, _ in todo:
        for leaf in (a, b):
            if leaf.shape not in data:
                data[leaf.shape] = torch.randn(leaf.shape, generator=g).to(TORCH_DTYPES[leaf.dtype])

    def run(out: str) -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            n = sum(slerp(data[a.shape], data[b.shape], t, TORCH_DTYPES[dt]).numel() for a, b, t, dt in todo)
        finally:
            torch.set_num_threads(before)
        return {"elements": n, "tensors": len(todo)}

    return run


def sweep_one(inp: BenchInputs, executor: str, actors: int | None) -> Run:
    """The K sweep members in one ``nyxray.sweep`` job (inputs read once)."""
    import nyxray

    def run(out: str) -> dict:
        rep = nyxray.sweep(
            inp.sweep_file,
            out,
            models=inp.stage1_map,
            out_shard_size=inp.out_shard,
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
            "bytes_read_min": inp.plans["slerp"].bytes_read_min(),
            "timings_s": rep.get("timings_s"),
        }

    return run


def sweep_separate(inp: BenchInputs, executor: str, actors: int | None) -> Run:
    """The K sweep members as K ``nyxray.merge`` calls."""
    import nyxray

    def run(out: str) -> dict:
        tot = {"bytes_read": 0, "bytes_written": 0}
        walls = []
        for name, path in inp.sweep_members:
            rep = nyxray.merge(
                path,
                os.path.join(out, name),
                models=inp.stage1_map,
                out_shard_size=inp.out_shard,
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


# -- mergekit ---------------------------------------------------------------------------------------


def find_mergekit(mergekit_bin: str | None = None) -> str | None:
    """The ``bin`` directory holding ``mergekit-yaml``: ``mergekit_bin``, else bench/.mk-venv/bin, else /work/mk-venv/bin."""
    cands = [mergekit_bin] if mergekit_bin else [os.path.join(HERE, ".mk-venv", "bin"), "/work/mk-venv/bin"]
    for d in cands:
        if d and os.access(os.path.join(d, "mergekit-yaml"), os.X_OK):
            return d
    return None


def install_mergekit() -> None:
    venv = os.path.join(HERE, ".mk-venv")
    log(f"installing mergekit 0.1.5 into {venv}")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([pip, "install", "-q", "mergekit==0.1.5"], check=True)


def mk_cmd(mk_bin: str, cfg: str, out: str, out_shard: str) -> list[str]:
    """mergekit-yaml as the benchmark runs it: its defaults (threads included), no model card."""
    return [os.path.join(mk_bin, "mergekit-yaml"), cfg, out, "--out-shard-size", str(out_shard), "--no-write-model-card", "--quiet"]


def mk_run(mk_bin: str, cfg: str, out: str, out_shard: str, cwd: str) -> float:
    """One ``mergekit-yaml`` run, offline (``HF_HUB_OFFLINE=1``); its wall seconds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run(mk_cmd(mk_bin, cfg, out, out_shard), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"mergekit failed ({r.returncode}): {r.stderr[-2000:]}")
    return wall


def safetensors_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else 0


def mk(inp: BenchInputs, mk_bin: str, recipe: str) -> Run:
    """mergekit on ``recipe``; the pipeline as its three runs (A, B, then the SLERP of A and B)."""
    import yaml

    def one(cfg: str, out: str) -> float:
        return mk_run(mk_bin, cfg, out, inp.out_shard, inp.base)

    def run(out: str) -> dict:
        if recipe in ("passthrough", "slerp"):
            one(inp.recipe("mk-passthrough-A.yml" if recipe == "passthrough" else "mk-slerp.yml"), out)
            return {"bytes_written": safetensors_bytes(out)}
        a, b, final = (os.path.join(out, x) for x in ("A", "B", "final"))
        ta = one(inp.recipe("mk-passthrough-A.yml"), a)
        tb = one(inp.recipe("mk-passthrough-B.yml"), b)
        cfg = os.path.join(out, "slerp.yml")
        with open(cfg, "w") as f:
            yaml.safe_dump(remap(copy.deepcopy(inp.slerp_doc), {STAGE_A: a, STAGE_B: b}), f, sort_keys=False)
        tc = one(cfg, final)
        return {"stage_s": [round(ta, 3), round(tb, 3), round(tc, 3)], "bytes_written": sum(safetensors_bytes(x) for x in (a, b, final))}

    return run
