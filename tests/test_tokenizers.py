"""Tokenizers as mergekit 0.1.5 builds them: ``tokenizer_source``, ``tokenizer:``, ``chat_template``.

``tests/golden/tokenizers.json`` is mergekit's output for ``tests/golden/tokenizer_cases.py``
(``make_tokenizer_golden.py``). nyxray must write the same shard bytes, layout and vocabulary
size, and a tokenizer that loads in transformers with the same vocabulary, added and special
tokens, chat template, and ids for fixed texts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

import nyxray
from nyxray.errors import RecipeError
from nyxray.recipe.parse import parse_recipe
from tests.golden import tokenizer_cases as T
from tests.golden.cases import render_recipe
from tests.golden.expected import recorded_under

with open(os.path.join(os.path.dirname(__file__), "golden", "tokenizers.json")) as _fh:
    GOLDEN_FILE = json.load(_fh)
GOLDEN = GOLDEN_FILE["cases"]
parity = recorded_under(GOLDEN_FILE, "tokenizers.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return T.build_inputs(str(tmp_path_factory.mktemp("tok-models")))


def merge_case(name: str, models: dict[str, str], out: str, executor: str = "local") -> str:
    nyxray.merge(render_recipe(T.CASES_BY_NAME[name], models, {}), out, executor=executor, progress=False, overwrite=True, write_model_card=False)
    return out


def check_case(name: str, out: str) -> None:
    want = GOLDEN[name]
    got = {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in os.listdir(out) if f.endswith(".safetensors")}
    assert sorted(got) == [s["file"] for s in want["shards"]]
    for shard in want["shards"]:
        with open(os.path.join(out, shard["file"]), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            assert f.read(n).decode() == shard["header"], f"{name}: header of {shard['file']} differs from mergekit's"
            body = f.read()
        bad = [t["name"] for t in shard["tensors"] if hashlib.sha256(body[slice(*t["data_offsets"])]).hexdigest() != t["sha256"]]
        assert not bad, f"{name}: tensors differ from mergekit 0.1.5: {bad}"
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["vocab_size"] == want["config"]["vocab_size"]
    tokenizer_files = {f for f in want["other_files"]}
    assert tokenizer_files <= set(os.listdir(out))
    assert json.loads(json.dumps(T.tokenizer_facts(out))) == want["tokenizer"], f"{name}: the tokenizer differs from mergekit's"


@parity
@pytest.mark.parametrize("name", [c.name for c in T.CASES])
def test_matches_mergekit(name, models, tmp_path):
    check_case(name, merge_case(name, models, str(tmp_path / name)))


@parity
def test_tokenizer_block_on_ray(models, tmp_path, ray_cluster):
    """The row tables travel in the units to Ray actors, which give the same bytes."""
    out = str(tmp_path / "ray")
    case = T.CASES_BY_NAME["tokenizer_block"]
    nyxray.merge(render_recipe(case, models, {}), out, executor="ray", actors=2, progress=False, write_model_card=False)
    check_case("tokenizer_block", out)
    assert nyxray.verify(out) == []


def test_plan_is_deterministic_and_counts_embedding_reads(models):
    recipe = render_recipe(T.CASES_BY_NAME["union_linear"], models, {})
    a, b = nyxray.plan(recipe), nyxray.plan(recipe)
    assert [t.expr.sig() for t in a.final.tensors] == [t.expr.sig() for t in b.final.tensors]
    inputs = sum(os.path.getsize(os.path.join(models[m], f)) for m in ("base", "ft1", "ft2") for f in os.listdir(models[m]) if f.endswith(".safetensors"))
    embed_rows = sum(206 * 64 * 2 * 2 for _ in range(3))  # embed_tokens and lm_head of each input are read
    assert embed_rows < a.bytes_read_min() < inputs


def test_keeping_the_tokenizer_does_not_import_transformers(models, tmp_path):
    recipe = "models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\nparameters:\n  t: 0.5\n".format(a=models["ft1"], b=models["twin"])
    code = f"import sys, nyxray; nyxray.merge({recipe!r}, {str(tmp_path / 'o')!r}, progress=False); print('transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip().endswith("False")


@pytest.mark.parametrize(
    "yaml_tail, path, words",
    [
        ("tokenizer_source: union\ntokenizer: {source: base}\n", "tokenizer", "exclude each other"),
        ("tokenizer: {pad_to_multiple_of: 0}\n", "tokenizer.pad_to_multiple_of", "positive integer"),
        ("tokenizer: {tokens: {'<x>': {source: {kind: model_token, model: a}}}}\n", "tokenizer.tokens.<x>.source", "exactly one of token and token_id"),
        ("tokenizer: {tokens: {'<x>': {force: yes please}}}\n", "tokenizer.tokens.<x>.force", "true or false"),
        ("chat_template: chatmlx\n", "chat_template", "neither auto, a built-in template"),
    ],
)
def test_bad_tokenizer_keys_name_their_path(yaml_tail, path, words):
    import yaml

    text = "models:\n  - model: a\n  - model: b\nmerge_method: linear\nparameters: {weight: 1.0}\n" + yaml_tail
    with pytest.raises(RecipeError) as e:
        parse_recipe(yaml.safe_load(text), text)
    assert e.value.path == path and words in str(e.value)


def test_a_token_source_outside_the_tensor_inputs_is_a_plan_error(models):
    recipe = (
        render_recipe(T.CASES_BY_NAME["union_slerp"], models, {})
        + f"tokenizer_source: null\ntokenizer:\n  tokens:\n    '<|im_end|>':\n      source: {models['ft2']}\n"
    )
    recipe = recipe.replace("tokenizer_source: union\n", "")
    with pytest.raises(RecipeError, match="not an input of this tensor"):
        nyxray.plan(recipe)


def _shards(out: str) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in os.listdir(out) if f.endswith(".safetensors")}


def test_a_union_stage_fused_in_a_pipeline_equals_the_stages_run_one_by_one(models, tmp_path):
    """The union vocabulary a stage builds travels to the next stage, which builds a union of its
    own over it: the fused pipeline writes what the two merges written one after the other do."""
    first = "name: u\n" + render_recipe(T.CASES_BY_NAME["union_linear"], models, {})
    second = (
        "models:\n  - model: {u}\n  - model: {twin}\nmerge_method: slerp\nbase_model: {u}\nparameters:\n  t: 0.3\ntokenizer_source: union\ndtype: bfloat16\n"
    )
    opts = dict(executor="local", progress=False, write_model_card=False)
    fused = str(tmp_path / "fused")
    nyxray.merge(first + "---\n" + second.format(u="u", twin=models["twin"]), fused, **opts)
    stage = str(tmp_path / "u")
    nyxray.merge(first, stage, **opts)
    apart = str(tmp_path / "apart")
    nyxray.merge(second.format(u=stage, twin=models["twin"]), apart, **opts)
    assert _shards(fused) == _shards(apart)
    assert T.tokenizer_facts(fused) == T.tokenizer_facts(apart)
    assert json.load(open(os.path.join(fused, "config.json")))["vocab_size"] == json.load(open(os.path.join(apart, "config.json")))["vocab_size"]


@parity
def test_a_sweep_over_a_union_recipe_writes_each_member_as_merged_alone(models, tmp_path):
    base = render_recipe(T.CASES_BY_NAME["union_slerp"], models, {})
    sweep = {"base": yaml.safe_load(base), "grid": {"parameters.t": [0.2, 0.4]}}
    report = nyxray.sweep(yaml.safe_dump(sweep), str(tmp_path / "sweep"), executor="local", progress=False, write_model_card=False)
    assert sorted(report["members"]) == ["t=0.2", "t=0.4"]
    alone = str(tmp_path / "alone")
    nyxray.merge(base.replace("t: 0.4", "t: 0.2"), alone, executor="local", progress=False, write_model_card=False)
    assert _shards(str(tmp_path / "sweep" / "t=0.2")) == _shards(alone)
    assert T.tokenizer_facts(str(tmp_path / "sweep" / "t=0.2")) == T.tokenizer_facts(alone)
    check_case("union_slerp", str(tmp_path / "sweep" / "t=0.4"))
