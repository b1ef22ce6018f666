"""Regenerate ``lora.json``: what mergekit 0.1.5 writes for the LoRA cases of ``lora_cases.py``.

Run with nyxray's venv python (mergekit runs from its own venv, as a subprocess)::

    .venv/bin/python tests/golden/make_lora_golden.py [--mergekit-bin /work/mk-venv/bin] [--keep DIR]

The inputs are ``cases.py``'s method models and ``lora_cases.py``'s adapters; each case runs
``mergekit-yaml`` (HF_HUB_OFFLINE=1, CPU, ``--num-threads 1``, the avx2 kernels) with a fresh
``--lora-merge-cache`` (mergekit keys its cache by the model and adapter paths only, so a cache
shared between cases with different ``--lora-merge-dtype`` would serve stale copies). What is
recorded per case is ``make_golden.collect``'s (files, shards with each tensor's sha256, the
index, the config), plus mergekit's warnings and errors: with an adapter on the config donor,
mergekit finds no tokenizer in its merged copy and reloads it from the hub name (see
docs/lora.md), which the synthetic tokenizer files do not survive.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.golden import cases as C  # noqa: E402
from tests.golden import lora_cases as L  # noqa: E402
from tests.golden.make_golden import collect, dump_json, normalise  # noqa: E402

CAPABILITY = "avx2"


def _versions(mk_python: str, env: dict) -> list[str]:
    code = "import importlib.metadata as m, torch; print(*(m.version(p) for p in ('mergekit', 'torch', 'transformers', 'peft')), torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([mk_python, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()


def run_case(case: C.Case, mk_yaml: str, work: str, model_dirs: dict[str, str], adapter_dirs: dict[str, str], env: dict) -> dict:
    recipe = L.render(case, model_dirs, adapter_dirs)
    rp = os.path.join(work, "recipes", case.name + ".yml")
    with open(rp, "w") as fh:
        fh.write(recipe)
    out_dir = os.path.join(work, "out", case.name)
    cache = os.path.join(work, "lora-cache", case.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [mk_yaml, *C.mergekit_args(case, rp, out_dir), "--lora-merge-cache", cache]
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mergekit failed on {case.name}")
    roots = {"IN": os.path.join(work, "in"), "OUT": os.path.join(work, "out"), "CACHE": os.path.join(work, "lora-cache")}
    log = [normalise(line, roots) for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line or "ERROR" in line]
    data = collect(case, out_dir, roots)
    print(f"{case.name}: {len(data['shards'])} shard(s), {len(data['file_order'])} tensors, {time.time() - t:.1f}s", flush=True)
    return {"description": case.description, "recipe": case.recipe, "cli": list(C.COMMON_CLI) + list(case.cli), "log": log, **data}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-bin", default="/work/mk-venv/bin", help="directory holding mergekit-yaml and python")
    ap.add_argument("--out", default=L.GOLDEN_PATH, help="where to write lora.json")
    ap.add_argument("--keep", default=None, help="build in this directory and keep it (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", ATEN_CPU_CAPABILITY=CAPABILITY)
    versions = _versions(os.path.join(args.mergekit_bin, "python"), env)
    if versions[4] != CAPABILITY.upper():
        raise SystemExit(f"mergekit's torch runs {versions[4]} kernels, not {CAPABILITY}")
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="nyxray-lora-golden-")
    for d in ("recipes", "out", "lora-cache"):
        os.makedirs(os.path.join(work, d), exist_ok=True)
    model_dirs = C.build_inputs(os.path.join(work, "in"), {C.BASE, *C.FT})
    adapter_dirs = L.build_adapters(os.path.join(work, "in"))
    mk_yaml = os.path.join(args.mergekit_bin, "mergekit-yaml")
    cases = {case.name: run_case(case, mk_yaml, work, model_dirs, adapter_dirs, env) for case in L.CASES}
    golden = {
        "generator": "tests/golden/make_lora_golden.py",
        **dict(zip(("mergekit", "torch", "transformers", "peft", "cpu_capability"), versions)),
        "cases": cases,
    }
    with open(args.out, "w") as fh:
        fh.write(dump_json(golden) + "\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
