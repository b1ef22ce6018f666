"""Regenerate ``golden.json``: what mergekit 0.1.5 writes for the cases of ``cases.py``, on the CPU.

Run with nyxray's venv python (mergekit itself runs from its own venv, as a subprocess)::

    .venv/bin/python tests/golden/make_golden.py [--mergekit-bin /work/mk-venv/bin] [--keep DIR] [--cases NAME ...]

Steps: build the synthetic inputs of ``cases.MODELS`` in a temporary directory, render each recipe of
``cases.CASES`` with absolute paths, run ``mergekit-yaml`` on it (HF_HUB_OFFLINE=1, CPU, the case's
``--num-threads``), and record what it wrote. About two minutes on a 2-core machine.

golden.json: {"mergekit", "torch", "transformers", "safetensors": versions, "shape", "cases": {name: C}}
with, for each case C:

* ``recipe`` (the template), ``cli`` (mergekit-yaml options), ``out_shard_size``, ``threads``, ``donor``;
* ``files``: every file written, name -> {size, sha256};
* ``shards``: in shard order, {file, header_len, header (the raw JSON text, padding included),
  metadata, tensors: [{name, dtype, shape, data_offsets, sha256 of the raw bytes}] in file order};
* ``file_order``: tensor names in file order across shards (NOT mergekit's write order: inside a
  shard safetensors sorts by dtype, then name); mergekit's write order is the key order of
  ``index["weight_map"]`` (``index``/``index_text`` are null for a single model.safetensors);
* ``config`` (parsed) and ``config_text`` (as written by transformers ``save_pretrained``);
* ``other_files`` (tokenizer/generation files) and whether each equals the donor's file;
* ``warnings``: mergekit's WARNING log lines, temp paths replaced by <IN>/<OUT>/<RECIPES>.

mergekit picks the config/tokenizer donor from a Python set when the recipe has no base_model, so the
choice depends on PYTHONHASHSEED (and, under Python 3.11, on hash(None), an address). For each such case
this script runs mergekit without address randomisation (``setarch -R``) under a PYTHONHASHSEED for
which the donor is ``case.donor`` (nyxray's rule: the first source of the first slice), and reruns
until the copied tokenizer files show that donor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.golden import cases as C  # noqa: E402

GOLDEN_PATH = os.path.join(HERE, "golden.json")

_DONOR_PROBE = """
import sys, yaml
from mergekit.config import MergeConfiguration
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
m = cfg.base_model or cfg.referenced_models()[0]
print(m.model.path)
"""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_shard(path: str) -> dict:
    """The raw header text and each tensor's (name, dtype, shape, offsets, sha256), in data order."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header_text = data[8 : 8 + n].decode("utf-8")
    header = json.loads(header_text)
    body = data[8 + n :]
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors.append(
            {
                "name": name,
                "dtype": info["dtype"],
                "shape": info["shape"],
                "data_offsets": [start, end],
                "sha256": hashlib.sha256(body[start:end]).hexdigest(),
            }
        )
    tensors.sort(key=lambda t: (t["data_offsets"][0], t["data_offsets"][1]))
    return {"header_len": n, "header": header_text, "metadata": header.get("__metadata__"), "tensors": tensors}


def shard_sort_key(fname: str):
    # model-00002-of-00005.safetensors -> 2 ; model.safetensors -> 0
    stem = fname[: -len(".safetensors")]
    parts = stem.split("-")
    return (int(parts[1]) if len(parts) >= 4 else 0, fname)


def _no_aslr_prefix() -> list[str]:
    """``setarch <arch> -R``: without address randomisation hash(None) is fixed (Python 3.11 hashes None
    by address, and mergekit's ModelReference hash includes a None field), so PYTHONHASHSEED alone then
    fixes mergekit's set order. Empty if setarch is unavailable (the run is then retried instead)."""
    setarch = shutil.which("setarch")
    if not setarch:
        return []
    prefix = [setarch, os.uname().machine, "-R"]
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return prefix


def pick_hash_seed(prefix: list[str], mk_python: str, recipe_path: str, want_dir: str, env: dict, base_set: bool) -> int:
    if base_set:
        return 0
    for seed in range(64):
        e = dict(env, PYTHONHASHSEED=str(seed))
        out = subprocess.run([*prefix, mk_python, "-c", _DONOR_PROBE, recipe_path], env=e, capture_output=True, text=True, check=True)
        if os.path.abspath(out.stdout.strip()) == os.path.abspath(want_dir):
            return seed
    raise RuntimeError(f"no PYTHONHASHSEED < 64 makes {want_dir} the donor for {recipe_path}")


def collect(case: C.Case, out_dir: str, roots: dict[str, str]) -> dict:
    files = {}
    for fname in sorted(os.listdir(out_dir)):
        p = os.path.join(out_dir, fname)
        files[fname] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    shard_files = sorted((f for f in files if f.endswith(".safetensors")), key=shard_sort_key)
    shards = []
    for f in shard_files:
        s = read_shard(os.path.join(out_dir, f))
        s = {"file": f, **s}
        shards.append(s)
    index_text = None
    index = None
    ip = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(ip):
        with open(ip) as fh:
            index_text = fh.read()
        index = json.loads(index_text)
    with open(os.path.join(out_dir, "config.json")) as fh:
        config_text = fh.read()
    weight_files = set(shard_files) | {"model.safetensors.index.json", "config.json"}
    other = [f for f in files if f not in weight_files]
    file_order = [t["name"] for s in shards for t in s["tensors"]]
    return {
        "files": files,
        "shards": shards,
        "file_order": file_order,
        "index_text": index_text,
        "index": index,
        "config": json.loads(config_text),
        "config_text": config_text,
        "other_files": other,
    }


def dense_sumsq(out_dir: str, dense_dir: str) -> dict[str, float]:
    """Per tensor, the float64 sum of squared differences between a random method's output and the
    dense (unsparsified) output of the same merge: what nyxray's output must match statistically."""
    from tests.golden.stats import load_model_tensors, sumsq_distance

    return sumsq_distance(load_model_tensors(out_dir), load_model_tensors(dense_dir))


def sampled_departures(case: C.Case, out_dir: str, model_dirs: dict[str, str]) -> dict[str, dict[str, float]]:
    """For a method that samples only its big tensors: how far each of those moved from the base."""
    from tests.golden.stats import departures, load_model_tensors

    got = load_model_tensors(out_dir)
    big = sorted(n for n, t in got.items() if t.numel() > case.exact_up_to)
    return departures(got, load_model_tensors(model_dirs[C.BASE]), big)


def _is_leaf(v) -> bool:
    if isinstance(v, list):
        return all(not isinstance(e, (list, dict)) for e in v)
    if isinstance(v, dict):
        return all(not isinstance(e, (list, dict)) or _is_leaf(e) and isinstance(e, list) for e in v.values())
    return True


def dump_json(obj, level: int = 0) -> str:
    """JSON with one line per leaf record (a tensor, a file), so golden.json stays small and diffable."""
    if _is_leaf(obj) and not (isinstance(obj, dict) and level < 3 and any(isinstance(v, str) and len(v) > 200 for v in obj.values())):
        return json.dumps(obj)
    pad = " " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {dump_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    items = [pad + dump_json(v, level + 1) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + " " * level + "]"


def normalise(text: str, roots: dict[str, str]) -> str:
    for label, root in roots.items():
        text = text.replace(root, f"<{label}>")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-bin", default="/work/mk-venv/bin", help="directory holding mergekit-yaml and python")
    ap.add_argument("--out", default=GOLDEN_PATH, help="where to write golden.json")
    ap.add_argument("--keep", default=None, help="build in this directory and keep it (default: a temp dir, removed)")
    ap.add_argument("--cases", nargs="*", default=None, help="only these cases (plus their dependencies)")
    ap.add_argument(
        "--cpu-capability",
        default="avx2",
        choices=["avx512", "avx2", "default"],
        help="torch's CPU kernels for mergekit (ATEN_CPU_CAPABILITY): the golden bytes hold under this capability only (default: avx2)",
    )
    args = ap.parse_args(argv)

    mk_yaml = os.path.join(args.mergekit_bin, "mergekit-yaml")
    mk_python = os.path.join(args.mergekit_bin, "python")
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", ATEN_CPU_CAPABILITY=args.cpu_capability)
    version = subprocess.run(
        [
            mk_python,
            "-c",
            "import importlib.metadata as m, torch; print(m.version('mergekit'), m.version('torch'), m.version('transformers'), m.version('safetensors'),"
            " torch.backends.cpu.get_cpu_capability())",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    if version[4] != args.cpu_capability.upper():  # torch falls back to what the CPU has
        raise SystemExit(f"mergekit's torch runs {version[4]} kernels, not {args.cpu_capability}: this CPU cannot make that golden file")

    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="nyxray-golden-")
    os.makedirs(work, exist_ok=True)
    in_root = os.path.join(work, "in")
    out_root = os.path.join(work, "out")
    rec_root = os.path.join(work, "recipes")
    for d in (out_root, rec_root):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    roots = {"OUT": out_root, "IN": in_root, "RECIPES": rec_root}

    wanted = None
    if args.cases:
        wanted = set()
        stack = list(args.cases)
        while stack:
            n = stack.pop()
            if n not in wanted:
                wanted.add(n)
                stack.extend(C.CASES_BY_NAME[n].depends)
                stack.extend([C.CASES_BY_NAME[n].dense] if C.CASES_BY_NAME[n].dense else [])

    t0 = time.time()
    names = None if wanted is None else set().union(*(C.case_inputs(C.CASES_BY_NAME[n]) for n in wanted))
    model_dirs = C.build_inputs(in_root, names)
    print(f"built {len(model_dirs)} inputs in {time.time() - t0:.1f}s", flush=True)

    prefix = _no_aslr_prefix()
    case_dirs: dict[str, str] = {}
    golden_cases = {}
    for case in C.CASES:
        if wanted is not None and case.name not in wanted:
            continue
        recipe = C.render_recipe(case, model_dirs, case_dirs)
        rp = os.path.join(rec_root, case.name + ".yml")
        with open(rp, "w") as fh:
            fh.write(recipe)
        out_dir = os.path.join(out_root, case.name)
        donor_dir = case_dirs[case.donor[5:]] if case.donor.startswith("case:") else model_dirs[case.donor]
        seed = pick_hash_seed(prefix, mk_python, rp, donor_dir, env, base_set="\nbase_model:" in recipe)
        with open(os.path.join(donor_dir, "tokenizer_config.json")) as fh:
            want_source = json.load(fh).get("source")
        cmd = [*prefix, mk_yaml, *C.mergekit_args(case, rp, out_dir)]
        for _ in range(12):
            shutil.rmtree(out_dir, ignore_errors=True)
            t1 = time.time()
            proc = subprocess.run(cmd, env=dict(env, PYTHONHASHSEED=str(seed)), capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"mergekit failed on {case.name}")
            dt = time.time() - t1
            # which donor's tokenizer files were copied (the synthetic tokenizer_config.json names its model)
            with open(os.path.join(out_dir, "tokenizer_config.json")) as fh:
                donor_seen = json.load(fh).get("source")
            if donor_seen == want_source:
                break
            print(f"{case.name}: donor was {donor_seen!r}, not {want_source!r}; rerunning", flush=True)
        else:
            raise SystemExit(f"{case.name}: could not get donor {donor_dir}")
        case_dirs[case.name] = out_dir
        data = collect(case, out_dir, roots)
        warnings = [normalise(line[line.index("WARNING") :], roots) for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line]
        copied = {}
        for fname in data["other_files"]:
            src = os.path.join(donor_dir, fname)
            copied[fname] = os.path.exists(src) and sha256_file(src) == data["files"][fname]["sha256"]
        if case.dense:
            data["dense_sumsq"] = dense_sumsq(out_dir, case_dirs[case.dense])
        if case.exact_up_to:
            data["sampled_departures"] = sampled_departures(case, out_dir, model_dirs)
        golden_cases[case.name] = {
            "description": case.description,
            "recipe": case.recipe,
            "cli": list(C.COMMON_CLI) + list(case.cli),
            "out_shard_size": case.out_shard_size,
            "depends": list(case.depends),
            "donor": case.donor,
            "threads": case.threads,
            "warnings": warnings,
            "other_files_equal_donor": copied,
            **data,
        }
        n_sh = len(data["shards"])
        print(f"{case.name}: {n_sh} shard(s), {len(data['file_order'])} tensors, {dt:.1f}s (PYTHONHASHSEED={seed})", flush=True)

    if wanted is not None and os.path.exists(args.out):  # a partial run updates the cases it ran
        with open(args.out) as fh:
            golden_cases = {**json.load(fh)["cases"], **golden_cases}
    golden = {
        "generator": "tests/golden/make_golden.py",
        "mergekit": version[0],
        "torch": version[1],
        "transformers": version[2],
        "safetensors": version[3],
        "device": "cpu",
        "cpu_capability": version[4],
        "shape": C.SHAPE.__dict__,
        "input_shard_bytes": C.INPUT_SHARD_BYTES,
        "cases": golden_cases,
    }
    with open(args.out, "w") as fh:
        fh.write(dump_json(golden) + "\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) in {time.time() - t0:.1f}s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
