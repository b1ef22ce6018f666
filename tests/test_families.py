"""Parity with mergekit 0.1.5 (CPU) for every architecture family: byte-identical shards.

``tests/golden/families.json`` (``tests/golden/make_families.py``) holds each family's tiny
checkpoint layout and what mergekit wrote for the cases of ``tests/golden/families.py``. The inputs
are rebuilt from the layouts and every case is merged by nyxray (in process; two on Ray): every
shard file (header and data), the file names, the index's weight_map order and total_size, the
config values and the copied files must match.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import nyxray
from nyxray.errors import ModelError, NyxrayError
from nyxray.plan.architectures import CATALOGUE
from tests.golden import families as F
from tests.golden.cases import render_recipe
from tests.golden.expected import recorded_under
from tests.test_golden import config_disagreements

GOLDEN = F.load_golden()
pytestmark = recorded_under(GOLDEN, "families.json")
MERGED = [c for c in F.CASES if "error" not in GOLDEN["cases"][c.name]]


@pytest.fixture(scope="module")
def family_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return root, F.build_inputs(str(root / "models"), GOLDEN["layouts"])


def merge(case, family_inputs, executor: str = "local", **kw) -> str:
    root, models = family_inputs
    out = str(root / executor / case.name)
    nyxray.merge(
        render_recipe(case, models, {}),
        out,
        out_shard_size=case.out_shard_size,
        executor=executor,
        progress=False,
        overwrite=True,
        write_model_card=False,
        allow_crimes="--allow-crimes" in case.cli,
        **kw,
    )
    return out


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def check(case, out: str) -> None:
    want = GOLDEN["cases"][case.name]
    shards = {f: v["sha256"] for f, v in want["files"].items() if f.endswith(".safetensors")}
    got = {f: _sha(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")}
    assert sorted(got) == sorted(shards), f"{case.name}: shard files differ from mergekit's"
    differ = [s["file"] for s in want["shards"] if got[s["file"]] != shards[s["file"]]]
    if differ:  # name the first tensor that differs, or the header
        with open(os.path.join(out, differ[0]), "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(n).decode()
        theirs = next(s for s in want["shards"] if s["file"] == differ[0])
        assert header == theirs["header"], f"{case.name}: header of {differ[0]} differs from mergekit's"
        raise AssertionError(f"{case.name}: tensor bytes of {differ} differ from mergekit's")
    if want["index"]:
        with open(os.path.join(out, "model.safetensors.index.json")) as fh:
            index = json.load(fh)
        assert list(index["weight_map"].items()) == list(want["index"]["weight_map"].items()), f"{case.name}: write order differs"
        assert index["metadata"]["total_size"] == want["index"]["metadata"]["total_size"]
    with open(os.path.join(out, "config.json")) as fh:
        assert config_disagreements(json.load(fh), json.loads(want["config_text"])) == [], case.name
    for f in want["other_files"]:
        assert _sha(os.path.join(out, f)) == want["files"][f]["sha256"], f"{case.name}: {f} differs from mergekit's"


@pytest.mark.parametrize("case", MERGED, ids=[c.name for c in MERGED])
def test_family_matches_mergekit(case, family_inputs):
    check(case, merge(case, family_inputs))


@pytest.mark.parametrize("name", ["mixtral_slerp", "gemma3_vl_slerp"])
def test_family_matches_mergekit_on_ray(name, ray_cluster, family_inputs):
    case = F.CASES_BY_NAME[name]
    check(case, merge(case, family_inputs, executor="ray", actors=2))


def test_mixing_architectures_needs_allow_crimes(family_inputs):
    _, models = family_inputs
    case = F.CASES_BY_NAME["crimes_mistral_llama"]
    with pytest.raises(ModelError, match=r"different architectures \(LlamaForCausalLM, MistralForCausalLM\).*--allow-crimes"):
        nyxray.plan(render_recipe(case, models, {}))


def test_every_declared_family_has_a_golden_case():
    """The catalogue and the golden suite cover the same families (the inferred one aside)."""
    declared = {a.model_type for a in CATALOGUE}
    built = {json.loads(GOLDEN["layouts"][f.name]["config_text"])["model_type"] for f in F.FAMILIES}
    assert declared <= built


def test_a_slices_recipe_on_a_multimodal_model_is_refused(family_inputs):
    """mergekit needs its modules: syntax to slice a model of several modules; nyxray says which modules."""
    _, models = family_inputs
    recipe = F._STACK.format(f="gemma3_vl").replace("<<model:gemma3_vl/a>>", models["gemma3_vl/a"]).replace("<<model:gemma3_vl/b>>", models["gemma3_vl/b"])
    with pytest.raises(ModelError, match=r"several modules \(text_decoder, multi_modal_projector, vision_tower\).*models:"):
        nyxray.plan(recipe)


def test_an_undeclared_model_without_a_layer_pattern_is_refused(family_inputs, tmp_path):
    _, models = family_inputs
    src = models["llama/a"]
    dst = tmp_path / "flat"
    dst.mkdir()
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    config["architectures"] = ["FlatForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    flat = {k: v for f in os.listdir(src) if f.endswith(".safetensors") for k, v in load_file(os.path.join(src, f)).items() if ".layers." not in k}
    save_file(flat, str(dst / "model.safetensors"))
    with pytest.raises(NyxrayError, match=r"'FlatForCausalLM' is not in nyxray's catalogue.*<prefix>.<N>.<suffix>"):
        nyxray.plan(f"models:\n  - model: {dst}\nmerge_method: passthrough\n")


@pytest.mark.parametrize("family", ["gemma", "mixtral"])
def test_a_pipeline_stage_on_the_family_equals_the_stages_run_one_by_one(family, family_inputs, tmp_path):
    """A SLERP stage of Gemma (tied head) or Mixtral (joined experts) fed to a layer stack: fused in
    one pass, it writes what the two merges written one after the other do."""
    _, models = family_inputs
    first = "name: s\n" + render_recipe(F.CASES_BY_NAME[f"{family}_slerp"], models, {})
    stack = "slices:\n  - sources:\n      - model: {s}\n        layer_range: [0, 2]\n  - sources:\n      - model: {s}\n        layer_range: [1, 3]\nmerge_method: passthrough\n"
    opts = dict(executor="local", progress=False, write_model_card=False)
    nyxray.merge(first + "---\n" + stack.format(s="s"), str(tmp_path / "fused"), **opts)
    nyxray.merge(first, str(tmp_path / "s"), **opts)
    nyxray.merge(stack.format(s=tmp_path / "s"), str(tmp_path / "apart"), **opts)
    shards = {f: _sha(str(tmp_path / "apart" / f)) for f in os.listdir(tmp_path / "apart") if f.endswith(".safetensors")}
    assert shards and {f: _sha(str(tmp_path / "fused" / f)) for f in shards} == shards


def test_a_sweep_over_a_multimodal_recipe(family_inputs, tmp_path):
    """Grid members of a Gemma 3 multimodal SLERP: the one with the golden's t is mergekit's model."""
    import yaml

    _, models = family_inputs
    case = F.CASES_BY_NAME["gemma3_vl_slerp"]
    doc = {"base": yaml.safe_load(render_recipe(case, models, {})), "grid": {"parameters.t": [[0.1, 0.6, 0.9], 0.5]}}
    report = nyxray.sweep(yaml.safe_dump(doc), str(tmp_path), executor="local", progress=False, write_model_card=False, out_shard_size=case.out_shard_size)
    assert sorted(report["members"]) == ["t=0.1_0.6_0.9", "t=0.5"] and not report["failed"]
    check(case, str(tmp_path / "t=0.1_0.6_0.9"))
