"""Regenerate ``families.json``: every architecture family's tiny checkpoint layout, and what mergekit
0.1.5 writes for the cases of ``families.py``, on the CPU.

Run with nyxray's venv python (transformers builds the layouts; mergekit runs from its own venv)::

    .venv/bin/python tests/golden/make_families.py [--mergekit-bin /work/mk-venv/bin] [--keep DIR] [--cases NAME ...]

The per-case records are those of ``make_golden.py`` (its ``collect``), made the same way:
HF_HUB_OFFLINE=1, ``--num-threads 1``, ATEN_CPU_CAPABILITY=avx2 by default, and a PYTHONHASHSEED
fixed (0): a family's two models share config and tokenizer files, so the donor mergekit picks
from a set when a recipe has no base_model does not change what it writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.golden import families as F  # noqa: E402
from tests.golden.cases import mergekit_args, render_recipe  # noqa: E402
from tests.golden.make_golden import _no_aslr_prefix, collect, dump_json, normalise  # noqa: E402


def _config(f: F.Family):
    from transformers import AutoConfig

    text = {k: v for k, v in dict(F.TEXT, **f.config).items() if v is not None}  # None: a key the family's config refuses
    if f.vision is None:
        return AutoConfig.for_model(f.model_type, **text)
    return AutoConfig.for_model(f.model_type, text_config=text, vision_config=f.vision, image_token_index=255)


def _neox_buffers(tensors: dict, layers: int, positions: int, rotary: int) -> None:
    """The attention buffers GPT-NeoX checkpoints saved before transformers 4.32 (mergekit declares them)."""
    for i in range(layers):
        tensors[f"gpt_neox.layers.{i}.attention.bias"] = ("BOOL", [1, 1, positions, positions])
        tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = ("F32", [])
        tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = ("F32", [rotary // 2])


def layout(f: F.Family, work: str) -> dict:
    """What transformers writes for a tiny model of ``f``: config.json text, tensors (name, dtype, shape)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    cfg = _config(f)
    model = (AutoModelForImageTextToText if f.vision else AutoModelForCausalLM).from_config(cfg).to(torch.bfloat16)
    path = os.path.join(work, "layouts", f.name)
    model.save_pretrained(path)
    tensors: dict[str, tuple[str, list[int]]] = {}
    for shard in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        with safe_open(os.path.join(path, shard), "pt") as fh:
            for name in fh.keys():
                t = fh.get_slice(name)
                tensors[name] = (t.get_dtype(), list(t.get_shape()))
    if f.buffers:
        _neox_buffers(tensors, F.TEXT["num_hidden_layers"], F.TEXT["max_position_embeddings"], 2)
    renamed = []
    for name, (dtype, shape) in tensors.items():
        if any(d in name for d in f.drop):
            continue
        for old, new in f.rename:
            name = name.replace(old, new, 1)
        renamed.append([name, dtype, shape])
    config = json.load(open(os.path.join(path, "config.json")))
    # transformers 5 writes a per-layer list that older Hub configs lack, and refuses a config whose
    # list is not as long as its layer count: mergekit then fails on every layer-changing merge
    config.pop("layer_types", None)
    files = {}
    if f.architecture:
        config["architectures"] = [f.architecture]
    if f.remote:
        config.update(architectures=[f.remote[0]], model_type=f.remote[1], auto_map={"AutoConfig": "configuration_remote.RemoteConfig"})
        config.pop("use_cache", None)  # a generic configuration class does not keep it: mergekit's config would lack it
        files["configuration_remote.py"] = F._REMOTE_CONFIG.format(model_type=f.remote[1])
    return {"family": f.name, "config_text": json.dumps(config, indent=2, sort_keys=True) + "\n", "tensors": renamed, "files": files}


def run_case(case, model_dirs: dict[str, str], dirs: dict[str, str], mk: str, env: dict, prefix: list[str]) -> dict:
    rp = os.path.join(dirs["RECIPES"], case.name + ".yml")
    with open(rp, "w") as fh:
        fh.write(render_recipe(case, model_dirs, {}))
    out = os.path.join(dirs["OUT"], case.name)
    # A family's two models share their config and tokenizer files, so mergekit's donor (picked from
    # a set when the recipe has no base_model) writes the same files whichever it is.
    proc = subprocess.run(
        [*prefix, os.path.join(mk, "mergekit-yaml"), *mergekit_args(case, rp, out)], env=dict(env, PYTHONHASHSEED="0"), capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"description": case.description, "error": normalise((proc.stdout + proc.stderr).strip().splitlines()[-1], dirs)}
    data = collect(case, out, dirs)
    warnings = [normalise(line[line.index("WARNING") :], dirs) for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line]
    return {
        "description": case.description,
        "recipe": case.recipe,
        "cli": list(mergekit_args(case, "<R>", "<O>")[2:]),
        "donor": case.donor,
        "warnings": warnings,
        **data,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-bin", default="/work/mk-venv/bin")
    ap.add_argument("--keep", default=None, help="build in this directory and keep it")
    ap.add_argument("--cases", nargs="*", default=None, help="only these cases")
    ap.add_argument("--cpu-capability", default="avx2", choices=["avx512", "avx2", "default"])
    args = ap.parse_args(argv)
    mk = args.mergekit_bin
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", ATEN_CPU_CAPABILITY=args.cpu_capability)
    probe = "import importlib.metadata as m, torch; print(m.version('mergekit'), m.version('torch'), m.version('transformers'), torch.backends.cpu.get_cpu_capability())"
    version = subprocess.run([os.path.join(mk, "python"), "-c", probe], capture_output=True, text=True, check=True, env=env).stdout.split()
    if version[3] != args.cpu_capability.upper():
        raise SystemExit(f"mergekit's torch runs {version[3]} kernels, not {args.cpu_capability}")
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="nyxray-families-")
    dirs = {"OUT": os.path.join(work, "out"), "IN": os.path.join(work, "in"), "RECIPES": os.path.join(work, "recipes")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    cases = [c for c in F.CASES if args.cases is None or c.name in args.cases]
    wanted = set().union(*(F.case_families(c) for c in cases))
    old = F.load_golden() if os.path.exists(F.FAMILIES_PATH) else {"layouts": {}, "cases": {}}
    layouts = {**old["layouts"], **{f.name: layout(f, work) for f in F.FAMILIES if f.name in wanted}}
    model_dirs = F.build_inputs(dirs["IN"], layouts, wanted)
    results = dict(old["cases"])
    for case in cases:
        results[case.name] = run_case(case, model_dirs, dirs, mk, env, _no_aslr_prefix())
        r = results[case.name]
        print(f"{case.name}: {r.get('error') or str(len(r['shards'])) + ' shard(s), ' + str(len(r['file_order'])) + ' tensors'}", flush=True)
    golden = {
        "generator": "tests/golden/make_families.py",
        "mergekit": version[0],
        "torch": version[1],
        "transformers": version[2],
        "cpu_capability": version[3],
        "layouts": {f.name: layouts[f.name] for f in F.FAMILIES if f.name in layouts},
        "cases": {c.name: results[c.name] for c in F.CASES if c.name in results},
    }
    with open(F.FAMILIES_PATH, "w") as fh:
        fh.write(dump_json(golden) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
