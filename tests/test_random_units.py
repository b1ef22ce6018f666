"""Random merge methods (DARE, DELLA) computed in sub-shard units: a shard split into parts of
``unit_size="1M"`` (``--unit-size 1M``) and run by several workers writes the same bytes as the
unsplit run, in process and on Ray. Each output tensor draws from its own generator, seeded from
the recipe's seed and the tensor's name (DESIGN.md §11), so neither the split nor the worker that
runs a part can change what it draws. The report and the manifest show that the shards really
were split."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import pytest

import nyxray
from nyxray.demo.synthetic import ModelShape, make_model

# About 8.5 MB per model in bf16, tensors of 64-512 KB: an 8M shard splits into several 1M parts.
SHAPE = ModelShape(hidden=256, intermediate=512, layers=6, vocab=1024, heads=4, kv_heads=2)
SHARD = "3M"
METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
EXTRA = {"della": "      epsilon: 0.05\n", "della_linear": "      epsilon: 0.05\n"}


def recipe(method: str) -> str:
    models = "".join(
        f"  - model: {m}\n    parameters:\n      weight: {w}\n      density: {d}\n{EXTRA.get(method, '')}" for m, w, d in (("a", 0.6, 0.5), ("b", 0.4, 0.3))
    )
    return f"models:\n{models}merge_method: {method}\nbase_model: base\nparameters:\n  normalize: false\ndtype: bfloat16\nrandom_seed: 1234\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("random-units-src")
    base = make_model(str(root / "base"), SHAPE, seed=0, shard_bytes=4_000_000)
    tuned = {m: make_model(str(root / m), SHAPE, seed=i + 1, shard_bytes=4_000_000, like=base, like_noise=0.05) for i, m in enumerate("ab")}
    return {"base": base, **tuned}


def merge(method: str, out: str, sources: dict[str, str], **kw) -> dict:
    kw.setdefault("executor", "local")
    return nyxray.merge(recipe(method), out, models=sources, out_shard_size=SHARD, progress=False, **kw)


def hashes(path: str) -> dict[str, str]:
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))}


def check_split(out: str, report: dict) -> None:
    """Every shard of ``out`` was written as several parts, each a unit of some worker."""
    shards = json.load(open(os.path.join(out, "nyxray-manifest.json")))["shards"]
    assert len(shards) == report["shards"] >= 2
    assert all(len(r.get("parts", ())) >= 3 for r in shards), [(r["name"], len(r.get("parts", ()))) for r in shards]
    assert sum(a["units"] for a in report["actors"]) == sum(len(r["parts"]) for r in shards)
    assert nyxray.verify(out) == []


@pytest.fixture(scope="module")
def unsplit(sources, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per method, the shards of an in-process run in which every shard is one unit."""
    refs = {}
    for method in METHODS:
        out = str(tmp_path_factory.mktemp(f"unsplit-{method}") / "m")
        report = merge(method, out, sources, unit_size="1B")
        assert sum(a["units"] for a in report["actors"]) == report["shards"] >= 2  # whole shards
        manifest = json.load(open(os.path.join(out, "nyxray-manifest.json")))["shards"]
        assert not any(r.get("parts") for r in manifest)
        refs[method] = hashes(out)
    # the methods really draw: their outputs differ from each other
    assert len({json.dumps(h, sort_keys=True) for h in refs.values()}) == len(METHODS)
    return refs


@pytest.mark.parametrize("method", METHODS)
def test_random_method_in_process_parts_equal_the_unsplit_run(method, sources, unsplit, tmp_path):
    out = str(tmp_path / "m")
    report = merge(method, out, sources, unit_size="1M", actors=3)
    check_split(out, report)
    assert sum(1 for a in report["actors"] if a["units"]) >= 2  # parts of one shard ran on several workers
    assert hashes(out) == unsplit[method]


def test_random_methods_on_ray_parts_equal_the_unsplit_run(ray_cluster, sources, unsplit, tmp_path):
    """On Ray actors (kept across the methods' runs), split at 1M and unsplit: the in-process bytes."""
    kw = dict(executor="ray", actors=3, actor_cpus=0.5, keep_actors=120)
    try:
        for method in METHODS:
            out = str(tmp_path / method / "parts")
            report = merge(method, out, sources, unit_size="1M", **kw)
            check_split(out, report)
            assert hashes(out) == unsplit[method], method
            whole = str(tmp_path / method / "whole")
            merge(method, whole, sources, unit_size="1B", **kw)
            assert hashes(whole) == unsplit[method], method
    finally:
        nyxray.release_actors()
