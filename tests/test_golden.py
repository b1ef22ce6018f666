"""Parity with mergekit 0.1.5 (CPU): nyxray writes byte-identical shard files.

``tests/golden/golden.json`` was made by running mergekit 0.1.5 on synthetic inputs
(``tests/golden/make_golden.py``; the inputs and recipes are ``tests/golden/cases.py``). Here the
same inputs are rebuilt and every case is merged by nyxray, in process and on Ray; every shard
file (header and data), the file names, the index's weight_map order and total_size must match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import pytest

import nyxray
from nyxray.execute import cpu_capability
from tests.golden import cases as G
from tests.golden.expected import GOLDEN, GOLDEN_FILE, UNKNOWN, VARIANTS
from tests.golden.stats import departures, load_model_tensors, sumsq_distance

pytestmark = pytest.mark.skipif(UNKNOWN is not None, reason=str(UNKNOWN))
# mergekit's SLERP sums a chunk's dot product with as many threads as torch has; nyxray always
# uses one (the output must not depend on the actor's size), so it matches --num-threads 1.
SINGLE_THREAD = [c for c in G.CASES if c.threads == 1 and not c.dense]
RANDOM = [c for c in G.CASES if c.dense]


def test_golden_file_states_what_it_was_made_with():
    """Byte identity holds for one mergekit, one torch and one CPU kernel set: the file must say which."""
    import torch

    assert GOLDEN_FILE["mergekit"] == "0.1.5"
    assert GOLDEN_FILE["torch"] == torch.__version__, "the golden bytes were made with another torch: remake them (tests/golden/make_golden.py)"
    assert GOLDEN_FILE["cpu_capability"].lower() in cpu_capability.CAPABILITIES
    assert set(VARIANTS["cases"]) <= set(cpu_capability.CAPABILITIES) - {GOLDEN_FILE["cpu_capability"].lower()}


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    models = G.build_inputs(str(root / "models"))
    return root, models


def run_case(case: G.Case, golden_inputs, executor: str, outputs: dict[str, str]) -> str:
    root, models = golden_inputs
    for dep in case.depends:
        if dep not in outputs:
            run_case(G.CASES_BY_NAME[dep], golden_inputs, "local", outputs)
    out = str(root / executor / case.name)
    recipe = G.render_recipe(case, models, outputs)
    nyxray.merge(
        recipe,
        out,
        out_shard_size=case.out_shard_size,
        executor=executor,
        progress=False,
        overwrite=True,
        write_model_card=False,
        actors=2 if executor == "ray" else None,
    )
    outputs[case.name] = out
    return out


def check(case: G.Case, out: str, models: dict[str, str]) -> None:
    want = GOLDEN[case.name]
    shards = {f: v for f, v in want["files"].items() if f.endswith(".safetensors")}
    got = {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in os.listdir(out) if f.endswith(".safetensors")}
    assert sorted(got) == sorted(shards)
    if case.dense or case.exact_up_to:  # random draws: the layout and every header must match, the data only statistically
        for shard in want["shards"]:
            with open(os.path.join(out, shard["file"]), "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                assert f.read(n).decode() == shard["header"], f"{case.name}: header of {shard['file']} differs from mergekit's"
                body = f.read()
            for t in shard["tensors"]:
                if math.prod(t["shape"]) <= case.exact_up_to:
                    start, end = t["data_offsets"]
                    assert hashlib.sha256(body[start:end]).hexdigest() == t["sha256"], f"{case.name}: {t['name']} differs from mergekit 0.1.5"
    else:
        mismatched = [f for f in shards if got[f] != shards[f]["sha256"]]
        assert not mismatched, f"{case.name}: shards differ from mergekit 0.1.5: {mismatched}"
    if want.get("index"):
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        assert list(index["weight_map"].items()) == list(want["index"]["weight_map"].items())
        assert index["metadata"]["total_size"] == want["index"]["metadata"]["total_size"]
    else:
        assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert config_disagreements(json.load(open(os.path.join(out, "config.json"))), json.loads(want["config_text"])) == [], case.name
    written = {
        f for f in os.listdir(out) if not f.endswith(".safetensors") and f not in ("config.json", "model.safetensors.index.json", "nyxray-manifest.json")
    }
    assert written == set(want["other_files"])
    for f in want["other_files"]:  # the donor's files, copied as mergekit copied them
        assert want["other_files_equal_donor"][f], f"{case.name}: mergekit rewrote {f}; this check expects a copy"
        assert hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() == want["files"][f]["sha256"], f"{case.name}: {f} differs from mergekit's"
    if case.exact_up_to:
        check_sampled(case, out, models[G.BASE], want["sampled_departures"])


# transformers 5 renames these when mergekit saves the config; nyxray keeps the donor's names
RENAMED = {"torch_dtype": "dtype"}


def config_disagreements(ours: dict, theirs: dict) -> list[str]:
    """Keys of nyxray's config.json whose value mergekit's does not have. mergekit 0.1.5 saves the
    config through transformers (every default field added, rope settings nested, its version
    stamped), nyxray writes the donor's with the merged layer count and dtype: the text differs,
    every value nyxray writes must not."""
    flat = {**theirs, **(theirs.get("rope_parameters") or {})}
    missing = object()
    return [f"{k}: {v!r} vs {flat.get(RENAMED.get(k, k), missing)!r}" for k, v in ours.items() if flat.get(RENAMED.get(k, k), missing) != v]


def check_sampled(case: G.Case, out: str, base_dir: str, theirs: dict[str, dict[str, float]]) -> None:
    """Tensors whose quartiles come from a random sample: nyxray's must move from the base as far,
    and in as many elements, as mergekit's (the sample's error is far below these bounds)."""
    base = load_model_tensors(base_dir)
    ours = departures(load_model_tensors(out), base, sorted(theirs))
    assert theirs, f"{case.name}: the golden file records no sampled tensor"
    for name, t in theirs.items():
        assert t["moved"] > 0.001, f"{case.name}: {name}: mergekit moved no element (the statistic would prove nothing)"
        assert abs(ours[name]["moved"] / t["moved"] - 1) < 0.05, f"{case.name}: {name}: moved {ours[name]['moved']:.4f} of elements, mergekit {t['moved']:.4f}"
        assert abs(ours[name]["sumsq"] / t["sumsq"] - 1) < 0.05, f"{case.name}: {name}: distance from base {ours[name]['sumsq'] / t['sumsq']:.3f}x mergekit's"


@pytest.fixture(scope="module")
def local_outputs():
    return {}


@pytest.mark.parametrize("case", SINGLE_THREAD, ids=[c.name for c in SINGLE_THREAD])
def test_matches_mergekit_in_process(case, golden_inputs, local_outputs):
    check(case, run_case(case, golden_inputs, "local", local_outputs), golden_inputs[1])


@pytest.mark.parametrize("case", RANDOM, ids=[c.name for c in RANDOM])
def test_random_methods_match_mergekit_statistically(case, golden_inputs, local_outputs):
    """DARE/DELLA draw other numbers than mergekit, by design (one generator per output tensor), so
    their bits differ; measured from the dense (unsparsified) merge, nyxray's output must lie as far
    away as mergekit's: the same expected density and the same rescaling."""
    out = run_case(case, golden_inputs, "local", local_outputs)
    check(case, out, golden_inputs[1])
    dense = run_case(G.CASES_BY_NAME[case.dense], golden_inputs, "local", local_outputs)
    ours = sumsq_distance(load_model_tensors(out), load_model_tensors(dense))
    theirs = GOLDEN[case.name]["dense_sumsq"]
    assert sorted(ours) == sorted(theirs)
    # Small tensors (128-element norms) carry a few hundred draws: too few for a tight comparison.
    sizes = {k: v.numel() for k, v in load_model_tensors(dense).items()}
    big = [k for k in ours if sizes[k] >= 1 << 15 and theirs[k] > 0]
    total = sum(ours[k] for k in big) / sum(theirs[k] for k in big)
    assert 0.97 < total < 1.03, f"{case.name}: distance from the dense merge is {total:.3f}x mergekit's"
    for name in big:
        assert 0.85 < ours[name] / theirs[name] < 1.15, f"{case.name}: {name}: {ours[name] / theirs[name]:.3f}x mergekit's distance"
    ratios = sorted(ours[k] / theirs[k] for k in ours if theirs[k] > 0)
    assert 0.9 < ratios[len(ratios) // 2] < 1.1, f"{case.name}: median ratio over all tensors {ratios[len(ratios) // 2]:.3f}"


@pytest.mark.parametrize("name", ["nyxene_slerp", "passthrough_repeat", "slerp_two_slices", "ties", "model_stock"])
def test_matches_mergekit_on_ray(name, ray_cluster, golden_inputs, local_outputs):
    case = G.CASES_BY_NAME[name]
    deps = dict(local_outputs)
    check(case, run_case(case, golden_inputs, "ray", deps), golden_inputs[1])


def test_fused_pipeline_with_a_ties_stage_matches_mergekit_run_stage_by_stage(golden_inputs, tmp_path):
    """A pipeline whose named first stage is TIES and whose final stage SLERPs it with the base:
    fused into one pass, it writes what mergekit wrote running the two recipes one after another."""
    _, models = golden_inputs
    stage = "name: ties_stage\n" + G.render_recipe(G.CASES_BY_NAME["ties"], models, {})
    second = G.CASES_BY_NAME["ties_stage_slerp"]
    final = G.render_recipe(dataclasses.replace(second, recipe=second.recipe.replace("<<case:ties>>", "ties_stage")), models, {})
    out = str(tmp_path / "fused")
    report = nyxray.merge(f"{stage}---\n{final}", out, executor="local", progress=False, write_model_card=False)
    assert report["stages"] == ["ties_stage", "<final>"]
    assert not os.path.exists(str(tmp_path / "ties_stage"))  # fused: the TIES model is never written
    check(G.CASES_BY_NAME["ties_stage_slerp"], out, models)
