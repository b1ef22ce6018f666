"""Input models: their shapes, building them once (cached in the work dir), the recipes run on them,
and reading them once before timing (a warm page cache).

* ``BenchInputs``: ``bench.py``'s four Nyxene source models (``nyxray.demo.synthetic.make_model``), the
  48-layer stage-1 pair built from them with nyxray, the recipes (nyxray's and mergekit's, with
  absolute paths) and nyxray's plans of them.
* ``write_random_model``: a random bf16 checkpoint of any size written in chunks, never more than
  one chunk in memory (``series.py``: two 14.5 GB models in minutes; ``make_model`` holds the whole
  model in memory and draws it with ``torch.randn``, ~20x slower).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from typing import Any

from common import CHUNK, REPO, human, log

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
DONE = ".bench-done"  # written last into a finished input model's directory

# -- model shapes ---------------------------------------------------------------------------------


def shape_dims(hidden: int) -> dict[str, int]:
    """Mistral-like dims for ``hidden``: 32 layers, vocab 32000, intermediate 3.5x hidden, heads of
    128 (64 below hidden 1024), a quarter as many KV heads. ``shape_dims(4096)`` is Mistral-7B's."""
    head_dim = 128 if hidden >= 1024 and hidden % 128 == 0 else 64
    heads = max(1, hidden // head_dim)
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 4))
    inter = max(128, int(round(3.5 * hidden / 128)) * 128)
    return {"hidden": hidden, "intermediate": inter, "layers": 32, "vocab": 32000, "heads": heads, "kv_heads": kv}


def model_bytes(d: dict[str, int]) -> int:
    """bf16 bytes of a model of dims ``d`` (embeddings and lm_head untied)."""
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


def shape_tag(d: dict[str, int]) -> str:
    """The cache directory name of a shape."""
    return f"h{d['hidden']}-i{d['intermediate']}-v{d['vocab']}-L{d['layers']}"


# -- recipes --------------------------------------------------------------------------------------


def remap(doc: Any, mapping: dict[str, str]) -> Any:
    """A recipe with its ``model``/``base_model`` names replaced by ``mapping``'s paths."""
    if isinstance(doc, dict):
        return {k: (mapping.get(v, v) if k in ("model", "base_model") and isinstance(v, str) else remap(v, mapping)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [remap(x, mapping) for x in doc]
    return doc


def write_yaml(path: str, doc: Any) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def card_slerp() -> dict:
    """Stage 3 of the Nyxene card's pipeline: the SLERP of the two 48-layer stage-1 models."""
    import yaml

    with open(PIPELINE) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return copy.deepcopy(docs[2])


def card_slerp_for(a: str, b: str, layers: int) -> dict:
    """The card's SLERP (its t curve: self_attn/mlp layer gradients, 0.5 elsewhere) of the models at
    paths ``a`` (the base, t=0) and ``b``, over their ``layers`` layers."""
    doc = remap(card_slerp(), {STAGE_A: a, STAGE_B: b})
    for s in doc["slices"]:
        for src in s["sources"]:
            src["layer_range"] = [0, layers]
    return doc


# -- page cache -----------------------------------------------------------------------------------


def warm_read(roots: list[str]) -> tuple[int, float]:
    """Read every file under ``roots`` once (plain ``readinto``): all runs start from the same warm
    page cache. Returns (bytes, seconds)."""
    t0 = time.perf_counter()
    n = 0
    buf = bytearray(CHUNK)
    for root in roots:
        for d, _, files in os.walk(root):
            for f in files:
                with open(os.path.join(d, f), "rb", buffering=0) as fh:
                    while k := fh.readinto(buf):
                        n += k
    return n, time.perf_counter() - t0


# -- bench.py's inputs ----------------------------------------------------------------------------


class BenchInputs:
    """The four Nyxene sources at one size, the 48-layer pair, the recipes and nyxray's plans, under
    ``WORK/<shape tag>/`` (built once, reused by later runs)."""

    def __init__(self, work: str, size: int, out_shard_size: str | None, sweep_k: int):
        self.dims = shape_for(size)
        self.model_size = model_bytes(self.dims)
        self.tag = shape_tag(self.dims)
        self.base = os.path.join(work, self.tag)
        self.models = os.path.join(self.base, "models")
        self.stage1 = os.path.join(self.base, "stage1")
        self.recipes = os.path.join(self.base, "recipes")
        self.in_shard = max(1_000_000, self.model_size // 4 + 1)
        self.out_shard = out_shard_size or f"{max(1, round(self.model_size / 4 / 1e6))}M"
        self.sweep_k = sweep_k
        self.stage1_map = {STAGE_A: os.path.join(self.stage1, STAGE_A), STAGE_B: os.path.join(self.stage1, STAGE_B)}
        self.plans: dict[str, Any] = {}

    def _sub(self, code: str, what: str) -> None:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        log(f"{what}: {time.monotonic() - t0:.1f}s")

    def build(self) -> None:
        os.makedirs(self.recipes, exist_ok=True)
        shape = "ModelShape(" + ", ".join(f"{k}={v}" for k, v in self.dims.items()) + ")"
        for seed, name in enumerate(SOURCES, start=1):
            path = os.path.join(self.models, name)
            if os.path.exists(os.path.join(path, DONE)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            self._sub(
                "from nyxray.demo.synthetic import make_model, ModelShape\n"
                f"make_model({path!r}, {shape}, seed={seed}, shard_bytes={self.in_shard})\n"
                f"open({os.path.join(path, DONE)!r}, 'w').close()\n",
                f"built {name} ({human(self.model_size)})",
            )
        for name, recipe in ((STAGE_A, RECIPE_A), (STAGE_B, RECIPE_B)):
            path = self.stage1_map[name]
            if os.path.exists(os.path.join(path, DONE)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            self._sub(
                "import nyxray\n"
                f"nyxray.merge({recipe!r}, {path!r}, executor='local', models_root={self.models!r}, out_shard_size={self.in_shard},"
                " write_model_card=False, progress=False, overwrite=True)\n"
                f"open({os.path.join(path, DONE)!r}, 'w').close()\n",
                f"built 48-layer {name} (nyxray passthrough)",
            )
        import yaml

        self.slerp_doc = card_slerp()
        self.slerp_yml = self._yaml("slerp.yml", self.slerp_doc)
        src_map = {n: os.path.join(self.models, n) for n in SOURCES}
        # mergekit: the same recipes with absolute model paths
        for fname, recipe in (("mk-passthrough-A.yml", RECIPE_A), ("mk-passthrough-B.yml", RECIPE_B)):
            with open(recipe) as f:
                self._yaml(fname, remap(yaml.safe_load(f), src_map))
        self._yaml("mk-slerp.yml", remap(copy.deepcopy(self.slerp_doc), self.stage1_map))
        # sweep members: the SLERP with the self_attn t curve varied
        k = self.sweep_k
        self.sweep_members = []
        for i in range(k):
            a = 0.75 - 0.5 * i / max(1, k - 1)
            doc = copy.deepcopy(self.slerp_doc)
            for rule in doc["parameters"]["t"]:
                if rule.get("filter") == "self_attn":
                    rule["value"] = [round(a, 4), round(1 - a, 4)]
            p = self._yaml(f"sweep-m{i}.yml", doc)
            self.sweep_members.append((f"m{i}", p))
        self.sweep_file = self._yaml("sweep.yml", {"members": [{"name": n, "recipe": p} for n, p in self.sweep_members]})

    def _yaml(self, name: str, doc: Any) -> str:
        return write_yaml(os.path.join(self.recipes, name), doc)

    def recipe(self, name: str) -> str:
        return os.path.join(self.recipes, name)

    def make_plans(self) -> None:
        import nyxray

        self.plans["passthrough"] = nyxray.plan(RECIPE_A, out_shard_size=self.out_shard, models_root=self.models)
        self.plans["slerp"] = nyxray.plan(self.slerp_yml, out_shard_size=self.out_shard, models=self.stage1_map)
        self.plans["pipeline"] = nyxray.plan(PIPELINE, out_shard_size=self.out_shard, models_root=self.models)

    def recipe_args(self, recipe: str, s3_models: str | None = None, s3_stage1: str | None = None) -> tuple[str, dict]:
        """(recipe path, nyxray.merge keywords) of ``passthrough``, ``slerp`` or ``pipeline``; with the
        S3 roots, the models are read from there."""
        if recipe == "passthrough":
            return RECIPE_A, {"models_root": s3_models or self.models}
        if recipe == "slerp":
            mapping = {k: f"{s3_stage1}/{k}" for k in self.stage1_map} if s3_stage1 else self.stage1_map
            return self.slerp_yml, {"models": mapping}
        return PIPELINE, {"models_root": s3_models or self.models}


# -- large random models --------------------------------------------------------------------------


def write_random_model(path: str, dims: dict[str, int], seed: int, shard_bytes: int = 5 * 10**9) -> float:
    """Write a random bf16 Mistral checkpoint of ``dims`` to the directory ``path`` (safetensors
    shards of at most ``shard_bytes``, the index, config and tokenizer files of
    ``nyxray.demo.synthetic``); marks it done last. Returns the seconds it took.

    Each tensor is drawn and written in chunks of ``CHUNK`` bytes: random sign, exponent and mantissa
    bits with magnitudes in [2^-7, 2^-4) (like 0.02 * N(0, 1) weights: two such models take SLERP's
    spherical branch), norm weights 1 +- 0.03 (nearly colinear: the lerp branch, as in trained models).
    """
    import numpy as np

    from nyxray.demo.synthetic import ModelShape, _tokenizer_files, config_dict, tensor_shapes

    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    shape = ModelShape(**dims)
    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, s in tensor_shapes(shape).items():
        nbytes = 2 * int(np.prod(s))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s, nbytes))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total, n = {}, 0, len(shards)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, s, nbytes in shard:
            header[name] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[name] = fname
        total += off
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for name, _, nbytes in shard:
                left = nbytes // 2  # elements
                while left:
                    k = min(left, CHUNK // 2)
                    if "norm" in name:
                        bits = (0x3F80 + rng.integers(-4, 5, size=k)).astype(np.uint16)
                    else:
                        bits = rng.integers(0, 2**64 - 1, size=(k + 3) // 4, dtype=np.uint64, endpoint=True).view(np.uint16)[:k]
                        bits &= 0x81FF  # sign, the exponent's 2 low bits, the mantissa
                        bits |= 120 << 7  # exponent 120-123: 2^-7 .. 2^-4
                    f.write(bits.tobytes())
                    left -= k
    if n > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict(shape), f, indent=2)
    for fname, text in _tokenizer_files(os.path.basename(path.rstrip("/"))).items():
        with open(os.path.join(path, fname), "w") as f:
            f.write(text)
    open(os.path.join(path, DONE), "w").close()
    return time.perf_counter() - t0
