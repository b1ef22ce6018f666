#!/usr/bin/env python
"""GPU check: does nyxray on CUDA write what it writes on the CPU, and how fast?

Self-contained (no pytest); run it on a machine with a GPU, from the repository root:

    python bench/gpu_check.py                 # inputs of about 2 GB each for the throughput part
    python bench/gpu_check.py --size 512M     # smaller
    python bench/gpu_check.py --size small    # about 256 MB: a quick look

Steps (synthetic Mistral-shaped bf16 models from ``nyxray.demo.synthetic``, ``executor="local"``):

1. correctness, small models: a passthrough recipe (a frankenmerge: byte copies), the same cast to
   float16 (computed on the device), a SLERP recipe with a ``t`` gradient, and one recipe for each
   other merge method over a base and fine-tunes of it (``METHODS``), each merged with
   ``device="cuda"`` and ``device="cpu"``. Passthrough must be byte-identical (else exit 1). For
   SLERP and the cast it prints, against the CPU output: the number of differing elements, the
   max abs error and the max difference in bf16/fp16 ulps.
2. Ray: the SLERP again with ``executor="ray"`` on a local Ray started with the GPUs visible
   (one actor per GPU); its output must equal the local CUDA output byte for byte (else exit 1),
   and the report must say the actors ran on ``cuda``.
3. throughput: a SLERP of two models of ``--size`` each, on the GPU and on the CPU: wall time and
   GB/s (input + output bytes / wall, and input bytes / wall), then the same comparison of the two
   outputs; and the SLERP kernel alone (one large tensor already on the device).

Exit codes: 0 checks passed (or no CUDA device: it prints "no CUDA device" and exits 0 unless
``--require-cuda``, then 3); 1 a byte-identity check failed; 2 bad arguments.

``--device cpu`` runs every step with the CPU standing in for the GPU (the outputs then agree
trivially): a dry run of this script's own logic on a machine without one.
About 1-2 minutes on one H100 with the default size (most of it making and reading the inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GB = 1e9


def parse_size(text: str) -> int:
    if text == "small":
        return 256 * 2**20
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected 'small' or a size such as 2G, 512M")
    return int(float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()])


def big_shape(size: int):
    """A Mistral-like shape whose checkpoint is about ``size`` bytes in bf16."""
    from nyxray.demo.synthetic import ModelShape, tensor_shapes

    if size >= 2**30:
        base = dict(hidden=4096, intermediate=14336, vocab=32000, heads=32, kv_heads=8)
    else:
        base = dict(hidden=1024, intermediate=3584, vocab=32000, heads=8, kv_heads=2)

    def nbytes(layers: int) -> int:
        total = 0
        for s in tensor_shapes(ModelShape(layers=layers, **base)).values():
            n = 1
            for d in s:
                n *= d
            total += 2 * n
        return total

    fixed, per_layer = nbytes(0), nbytes(1) - nbytes(0)
    layers = max(1, round((size - fixed) / per_layer))
    return ModelShape(layers=layers, **base), nbytes(layers)


def recipes(layers: int) -> dict[str, str]:
    half = layers // 2
    passthrough = f"""slices:
  - sources:
      - model: A
        layer_range: [0, {half + 2}]
  - sources:
      - model: B
        layer_range: [{half - 2}, {layers}]
merge_method: passthrough
dtype: bfloat16
"""
    slerp = f"""slices:
  - sources:
      - model: A
        layer_range: [0, {layers}]
      - model: B
        layer_range: [0, {layers}]
merge_method: slerp
base_model: A
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""
    return {"passthrough": passthrough, "cast-fp16": passthrough.replace("dtype: bfloat16", "dtype: float16"), "slerp": slerp, **method_recipes()}


# Every other method over a base (A) and fine-tunes of it (C, D, E): method -> (parameters of each
# fine-tune, top-level parameters). Random methods draw on the CPU, so the masks match the CPU run's.
METHODS = {
    "linear": ("{weight: 0.5}", "{}"),
    "task_arithmetic": ("{weight: 0.5}", "{lambda: 0.9}"),
    "ties": ("{weight: 0.5, density: 0.5}", "{}"),
    "dare_ties": ("{weight: 0.5, density: 0.5}", "{}"),
    "dare_linear": ("{weight: 0.5, density: 0.5}", "{}"),
    "breadcrumbs_ties": ("{weight: 0.5, density: 0.9, gamma: 0.02}", "{}"),
    "della": ("{weight: 0.5, density: 0.6, epsilon: 0.1}", "{}"),
    "model_stock": ("{}", "{}"),
    "multislerp": ("{weight: 0.4}", "{}"),
    "karcher": ("{}", "{max_iter: 5}"),
    "sce": ("{}", "{select_topk: 0.5}"),
    "ram": ("{}", "{}"),
    "ramplus_tl": ("{}", "{}"),
}
TWO_INPUT = {"nuslerp": ("{weight: 0.5}", "{}"), "nearswap": ("{}", "{t: 0.001}"), "arcee_fusion": ("{}", "{}")}


def method_recipes() -> dict[str, str]:
    out = {}
    for name, (each, top) in {**METHODS, **TWO_INPUT}.items():
        others = ("C", "D") if name in TWO_INPUT and name != "nuslerp" else ("C", "D", "E")
        others = others[:1] if name in ("nearswap", "arcee_fusion") else others[:2] if name == "nuslerp" else others
        models = "".join(f"  - model: {m}\n    parameters: {each}\n" for m in others)
        baseless = name in ("linear", "karcher", "multislerp")
        base = "" if baseless else "base_model: A\n"
        out[name] = f"merge_method: {name}\n{base}models:\n{models}parameters: {top}\ndtype: bfloat16\n"
    return out


def model_files(out: str) -> dict[str, bytes]:
    """The bytes that make the model: shards and index (the card names the output directory)."""
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".safetensors") or f.endswith(".index.json")}


def compare(out_a: str, out_b: str, device: str) -> dict[str, Any]:
    """Element-wise comparison of two outputs of the same plan: count, max abs error, max ulps."""
    import torch
    from safetensors import safe_open

    def shards(out: str) -> list[str]:
        return sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))

    assert shards(out_a) == shards(out_b)
    stats = {"elements": 0, "differing": 0, "max_abs": 0.0, "max_ulp": 0, "tensors_differing": 0, "worst": None}
    for f in shards(out_a):
        with safe_open(os.path.join(out_a, f), "pt") as fa, safe_open(os.path.join(out_b, f), "pt") as fb:
            for name in fa.keys():
                a, b = fa.get_tensor(name).to(device), fb.get_tensor(name).to(device)
                stats["elements"] += a.numel()
                if a.dtype in (torch.bfloat16, torch.float16):
                    ia, ib = a.view(torch.int16).int() & 0xFFFF, b.view(torch.int16).int() & 0xFFFF
                    # sign-magnitude -> ordered integers: neighbours differ by one (one ulp)
                    ka = torch.where(ia >= 0x8000, 0x8000 - ia, ia)
                    kb = torch.where(ib >= 0x8000, 0x8000 - ib, ib)
                    diff = ia != ib
                    ulp = int((ka - kb).abs().max().item()) if a.numel() else 0
                else:
                    diff = a != b
                    ulp = 0
                n = int(diff.sum().item())
                if n:
                    err = float((a.float() - b.float()).abs().max().item())
                    stats["differing"] += n
                    stats["tensors_differing"] += 1
                    if err > stats["max_abs"]:
                        stats["max_abs"], stats["worst"] = err, name
                    stats["max_ulp"] = max(stats["max_ulp"], ulp)
    return stats


def fmt_cmp(s: dict[str, Any]) -> str:
    pct = 100.0 * s["differing"] / max(1, s["elements"])
    worst = f", worst {s['worst']}" if s["worst"] else ""
    return (
        f"{s['differing']:,} of {s['elements']:,} elements differ ({pct:.4f}%) in {s['tensors_differing']} tensors; "
        f"max abs error {s['max_abs']:.3g}, max {s['max_ulp']} ulp{worst}"
    )


def merge(recipe_text: str, out: str, models: dict[str, str], device: str, executor: str = "local", **kw: Any) -> tuple[dict, float]:
    import nyxray.api as api

    t0 = time.perf_counter()
    report = api.merge(recipe_text, out, models=models, device=device, executor=executor, progress=False, copy_tokenizer=False, **kw)
    return report, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", type=parse_size, default=parse_size("2G"), help="bytes per input model for the throughput SLERP: 'small' (~256M), or e.g. 512M, 2G (default)"
    )
    ap.add_argument("--device", default="cuda", help="device under test (default cuda; 'cpu' = dry run of this script without a GPU)")
    ap.add_argument("--workdir", default=None, help="where to write models and outputs (default: a temporary directory, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep --workdir / the temporary directory")
    ap.add_argument("--skip-ray", action="store_true", help="skip the executor='ray' step")
    ap.add_argument("--skip-throughput", action="store_true", help="skip the large SLERP")
    ap.add_argument("--require-cuda", action="store_true", help="exit 3 (not 0) when there is no CUDA device")
    ap.add_argument("--json", default=None, help="also write every number to this JSON file")
    args = ap.parse_args(argv)

    import torch

    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"no CUDA device (torch {torch.__version__}, cuda build {torch.version.cuda}): nothing to check; "
            "run this on a GPU machine, or with --device cpu for a dry run"
        )
        return 3 if args.require_cuda else 0
    if dev.startswith("cuda"):
        name = torch.cuda.get_device_name(dev)
        print(f"device: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}); CPU threads: {torch.get_num_threads()}")
    else:
        print(f"device: {dev} (dry run: the CPU stands in for the GPU); CPU threads: {torch.get_num_threads()}")

    from nyxray.demo.synthetic import ModelShape, make_model

    work = args.workdir or tempfile.mkdtemp(prefix="nyxray-gpu-check-")
    os.makedirs(work, exist_ok=True)
    results: dict[str, Any] = {"device": dev, "size": args.size}
    failed: list[str] = []
    t_start = time.perf_counter()
    try:
        # 1. correctness on small models
        shape = ModelShape(hidden=256, intermediate=768, layers=8, vocab=9000, heads=8, kv_heads=2)
        models = {
            "A": make_model(os.path.join(work, "small-A"), shape, seed=1, shard_bytes=4_000_000),
            "B": make_model(os.path.join(work, "small-B"), shape, seed=2, shard_bytes=4_000_000),
        }
        for i, name in enumerate("CDE"):  # fine-tunes of A (A + 3% noise): realistic task vectors
            models[name] = make_model(os.path.join(work, f"small-{name}"), shape, seed=5 + i, shard_bytes=4_000_000, like=models["A"], like_noise=0.03)
        texts = recipes(shape.layers)
        print("\n== correctness (small models, executor=local) ==")
        for kind, text in texts.items():
            outs = {}
            for label, d in (("dut", dev), ("cpu", "cpu")):
                outs[label] = os.path.join(work, f"{kind}-{label}", "model")
                merge(text, outs[label], models, d, out_shard_size="3M")
            same = model_files(outs["dut"]) == model_files(outs["cpu"])
            if kind == "passthrough":
                print(f"passthrough  {dev} vs cpu: {'bytes identical' if same else 'BYTES DIFFER'}")
                results["passthrough_identical"] = same
                if not same:
                    failed.append("passthrough output differs between the devices")
                continue
            s = compare(outs["dut"], outs["cpu"], dev)
            results[f"{kind}_vs_cpu"] = s
            print(f"{kind:<12} {dev} vs cpu: {'bytes identical' if same else fmt_cmp(s)}")
        slerp_dut = os.path.join(work, "slerp-dut", "model")

        # 2. the same SLERP on Ray actors that own the GPU(s)
        if not args.skip_ray:
            print("\n== executor=ray (local Ray, GPUs visible) ==")
            import ray

            gpus = torch.cuda.device_count() if dev.startswith("cuda") else 0
            t0 = time.perf_counter()
            ray_tmp = os.path.join(tempfile.gettempdir(), f"nyxray-ray-{os.getpid()}")  # fresh: no stale cluster file
            ray.init(num_gpus=gpus, num_cpus=max(2, min(8, os.cpu_count() or 2)), include_dashboard=False, logging_level="WARNING", _temp_dir=ray_tmp)
            print(
                f"ray.init: {time.perf_counter() - t0:.1f} s; resources {ray.cluster_resources().get('GPU', 0):g} GPU, {ray.cluster_resources().get('CPU', 0):g} CPU"
            )
            try:
                out = os.path.join(work, "slerp-ray", "model")
                report, wall = merge(texts["slerp"], out, models, dev, executor="ray", out_shard_size="3M")
                same = model_files(out) == model_files(slerp_dut)
                devices = sorted({w["device"] for w in report["actors"] if w["units"]})
                print(
                    f"ray slerp: {wall:.1f} s, {len(report['actors'])} actor(s) on {devices}; vs local {dev}: {'bytes identical' if same else 'BYTES DIFFER'}"
                )
                results["ray"] = {"identical_to_local": same, "actors": report["actors"], "wall_s": wall}
                if not same:
                    failed.append("executor=ray output differs from executor=local on the same device")
                want = "cuda" if dev.startswith("cuda") else dev
                if devices != [want]:
                    failed.append(f"ray actors ran on {devices}, not {want}")
            finally:
                ray.shutdown()
                shutil.rmtree(ray_tmp, ignore_errors=True)

        # 3. throughput on large inputs
        if not args.skip_throughput:
            bshape, nbytes = big_shape(args.size)
            print(f"\n== throughput: SLERP of two {nbytes / GB:.2f} GB models ({bshape.layers} layers, hidden {bshape.hidden}) ==")
            t0 = time.perf_counter()
            big = {
                "A": make_model(os.path.join(work, "big-A"), bshape, seed=3, shard_bytes=2**30),
                "B": make_model(os.path.join(work, "big-B"), bshape, seed=4, shard_bytes=2**30),
            }
            print(f"inputs made in {time.perf_counter() - t0:.1f} s")
            text = recipes(bshape.layers)["slerp"]
            outs = {}
            for label, d in (("dut", dev), ("cpu", "cpu")):
                outs[label] = os.path.join(work, f"big-{label}", "model")
                report, wall = merge(text, outs[label], big, d, out_shard_size="1B")
                moved = report["bytes_read_tensors"] + report["bytes_written"]
                results[f"throughput_{label}"] = {
                    "device": d,
                    "wall_s": wall,
                    "bytes_read": report["bytes_read_tensors"],
                    "bytes_written": report["bytes_written"],
                    "gb_s_total": moved / wall / GB,
                    "gb_s_input": report["bytes_read_tensors"] / wall / GB,
                }
                print(f"{d:>6}: {wall:6.1f} s  {moved / wall / GB:6.2f} GB/s read+written  ({report['bytes_read_tensors'] / wall / GB:.2f} GB/s of input)")
            g, c = results["throughput_dut"], results["throughput_cpu"]
            print(f"speed-up {dev} / cpu: {c['wall_s'] / g['wall_s']:.2f}x (inputs from the page cache: they were just written)")
            s = compare(outs["dut"], outs["cpu"], dev)
            results["big_slerp_vs_cpu"] = s
            print(f"large slerp {dev} vs cpu: {fmt_cmp(s)}")
            for label in outs:
                shutil.rmtree(os.path.dirname(outs[label]), ignore_errors=True)

            # the kernel alone: one flat tensor of ~size/2 bf16 elements per input, already on the device
            from nyxray.methods._slerp import slerp

            n = min(args.size, 2**30) // 2  # elements per input: up to 1 GiB of bf16 each
            for label, d in (("dut", dev), ("cpu", "cpu")):
                a = torch.randn(n, dtype=torch.bfloat16, device=d)
                b = torch.randn(n, dtype=torch.bfloat16, device=d)
                slerp(a[: 1 << 20], b[: 1 << 20], 0.3, torch.bfloat16)  # warm-up
                if d.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                slerp(a, b, 0.3, torch.bfloat16)
                if d.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                results[f"kernel_{label}"] = {"device": d, "elements": n, "s": dt, "gb_s": 3 * 2 * n / dt / GB}
                print(f"kernel {d:>6}: slerp of 2 x {n:,} bf16 elements: {dt * 1e3:8.1f} ms, {3 * 2 * n / dt / GB:7.1f} GB/s (2 inputs + 1 output)")
                del a, b
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.workdir is None:
            print(f"kept {work}")
    results["failed"] = failed
    results["total_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(f"\ntotal {results['total_s']:.0f} s; " + ("FAILED: " + "; ".join(failed) if failed else "all byte-identity checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
