"""Recipe parsing and validation (key paths, typos, unsupported features, pipelines) and the
evaluation of parameter settings (gradients, filters, precedence), down to the Nyxene SLERP t table."""

from __future__ import annotations

import os
import textwrap

import pytest

from nyxray import api
from nyxray.demo.synthetic import ModelShape, make_model
from nyxray.errors import NyxrayError, RecipeError
from nyxray.recipe.parameters import evaluate, filter_matches, gradient, resolve
from nyxray.recipe.parse import load_pipeline, parse_pipeline

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
SMALL = ModelShape(hidden=32, intermediate=64, layers=4, vocab=512)

SLERP = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 4]
merge_method: slerp
base_model: a
parameters:
  t: 0.5
dtype: bfloat16
"""

PASSTHROUGH = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
  - sources:
      - model: b
        layer_range: [2, 4]
merge_method: passthrough
"""


def parse_error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_pipeline(textwrap.dedent(text), "r.yml")
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("r.yml"), message
    return info.value


# -- parsing -------------------------------------------------------------------------------------


def test_valid_recipes_parse():
    (r,) = parse_pipeline(SLERP, "r.yml")
    assert r.merge_method == "slerp" and r.base_model == "a" and r.dtype == "bfloat16"
    assert [s.layer_range for s in r.slices[0].sources] == [(0, 4), (0, 4)]
    assert r.slices[0].sources[1].path == "slices[0].sources[1]"
    assert r.model_refs() == ["a", "b"]
    assert r.text == SLERP
    (p,) = parse_pipeline(PASSTHROUGH)
    assert [s.sources[0].layer_range for s in p.slices] == [(0, 2), (2, 4)]
    (m,) = parse_pipeline("models:\n  - model: a\n  - model: b\nmerge_method: slerp\nbase_model: a\nparameters: {t: [0, 1]}\n")
    assert m.slices is None and [s.model for s in m.models] == ["a", "b"]


def test_every_shipped_recipe_parses():
    for name in sorted(os.listdir(RECIPES)):
        recipes = load_pipeline(os.path.join(RECIPES, name))
        assert recipes and all(r.merge_method in ("slerp", "passthrough") for r in recipes)


def test_dtype_takes_torch_prefix():
    (r,) = parse_pipeline(SLERP.replace("dtype: bfloat16", "dtype: torch.float16\nout_dtype: float32"))
    assert (r.dtype, r.out_dtype) == ("float16", "float32")


# (text, ignored key path, hint, the error a recipe without that key then has, or None: it parses)
IGNORED_KEYS = [
    (SLERP.replace("dtype:", "dtpye:"), "dtpye", "did you mean 'dtype'", None),
    (SLERP.replace("merge_method:", "merge_methd:"), "merge_methd", "did you mean 'merge_method'", "merge_method: is required"),
    (SLERP.replace("base_model:", "basemodel:"), "basemodel", "did you mean 'base_model'", "slerp needs a base_model"),
    (SLERP.replace("  - sources:", "  - source:"), "slices[0].source", "did you mean 'sources'", "slices[0].sources: must be a non-empty list"),
    (SLERP.replace("      - model: b", "      - modle: b"), "slices[0].sources[1].modle", "did you mean 'model'", "slices[0].sources[1].model: is required"),
    (
        SLERP.replace("        layer_range: [0, 4]\n      - model: b", "        layer_rang: [0, 4]\n      - model: b"),
        "slices[0].sources[0].layer_rang",
        "did you mean 'layer_range'",
        "slices[0].sources[0].layer_range: is required",
    ),
    (SLERP.replace("  t: 0.5", "  t:\n    - filtr: mlp\n      value: 0.5"), "parameters.t[0].filtr", "did you mean 'filter'", None),
    (SLERP + "metadata: {author: me}\n", "metadata", "ignored as mergekit 0.1.5 ignores it", None),
    (SLERP.replace("      - model: b\n", "      - model: b\n        revision: main\n"), "slices[0].sources[1].revision", "ignored", None),
    (SLERP.replace("  - sources:", "  - residual_weight: 0.1\n    sources:"), "slices[0].residual_weight", "never uses it", None),
]


@pytest.mark.parametrize("text, path, hint, error", IGNORED_KEYS, ids=[c[1] for c in IGNORED_KEYS])
def test_keys_mergekit_ignores_are_set_aside_with_their_path_and_a_hint(text, path, hint, error):
    """mergekit 0.1.5 drops keys it does not know, so such a recipe must merge; the key is named,
    and when its absence breaks the recipe the error names it as the likely cause."""
    if error:
        e = parse_error(text)
        assert error in str(e) and f"[{path}: " in str(e) and hint in str(e), str(e)
        return
    (r,) = parse_pipeline(text, "r.yml")
    assert [i.path for i in r.ignored] == [path] and hint in r.ignored[0].why
    # strict refuses it, before any model is looked for (a and b do not exist)
    e = pytest.raises(RecipeError, api.plan, text, strict=True).value
    assert e.path == path and hint in str(e) and "strict" in str(e)


def test_an_ignored_key_is_a_plan_warning(tmp_path):
    root = tmp_path / "m"
    for seed, name in enumerate("ab", 1):
        make_model(str(root / name), SMALL, seed=seed, shard_bytes=10**9)
    p = api.plan(SLERP.replace("dtype:", "dtype: float32\ndype:"), models_root=str(root))
    assert [w for w in p.warnings if "dype: unknown key" in w and "did you mean 'dtype'" in w]
    assert p.stages[0].recipe.dtype == "float32"


def test_unknown_merge_method():
    e = parse_error(SLERP.replace("merge_method: slerp", "merge_method: slurp"))
    assert e.path == "merge_method"
    assert "'slurp'" in str(e) and "did you mean 'slerp'" in str(e) and "passthrough, slerp" in str(e)
    e = parse_error(SLERP.replace("merge_method: slerp", "merge_method: frobnicate"))
    assert "unknown or unsupported merge method 'frobnicate'" in str(e) and "ties" in str(e)


def test_merge_method_required_and_a_name():
    assert parse_error(SLERP.replace("merge_method: slerp\n", "")).path == "merge_method"
    e = parse_error(SLERP.replace("merge_method: slerp", "merge_method: [slerp]"))
    assert e.path == "merge_method" and "['slerp']" in str(e)


def test_exactly_one_of_slices_and_models():
    both = SLERP + "models:\n  - model: a\n"
    for text in (both, "merge_method: passthrough\n", "merge_method: passthrough\nslices:\n"):
        e = parse_error(text)
        assert "exactly one of slices: and models:" in str(e)
    assert parse_error("merge_method: passthrough\nslices: []\n").path == "slices"
    assert parse_error("merge_method: passthrough\nmodels: []\n").path == "models"
    assert parse_error("merge_method: passthrough\nslices:\n  - sources: []\n").path == "slices[0].sources"


def test_reversed_layer_range():
    text = PASSTHROUGH.replace("layer_range: [2, 4]", "layer_range: [4, 2]")
    e = parse_error(text)
    assert e.path == "slices[1].sources[0].layer_range"
    assert "[4, 2] is reversed" in str(e)


def test_empty_layer_range_is_allowed():
    # mergekit's zero-length slice (issue #308): no layers, but it can choose where post-weights come from.
    (r,) = parse_pipeline(PASSTHROUGH.replace("layer_range: [2, 4]", "layer_range: [4, 4]"))
    assert r.slices[1].sources[0].layer_range == (4, 4)


@pytest.mark.parametrize("value", ["[0, 4.0]", "['0', 4]", "[0]", "[0, 2, 4]", "[true, 4]", "4", "{start: 0, end: 4}", "[-1, 4]"])
def test_layer_range_must_be_two_ints(value):
    e = parse_error(PASSTHROUGH.replace("layer_range: [2, 4]", f"layer_range: {value}"))
    assert e.path == "slices[1].sources[0].layer_range", str(e)


def test_layer_range_is_required_in_slices():
    e = parse_error(PASSTHROUGH.replace("        layer_range: [2, 4]\n", ""))
    assert e.path == "slices[1].sources[0].layer_range" and "is required" in str(e)


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_bad_dtype(key):
    e = parse_error(SLERP.replace("dtype: bfloat16", f"{key}: bfloat61"))
    assert e.path == key
    assert "'bfloat61'" in str(e) and "did you mean 'bfloat16'" in str(e) and "float32" in str(e)


def test_t_per_source_is_refused():
    text = SLERP.replace("      - model: b\n", "      - model: b\n        parameters:\n          t: 0.3\n")
    e = parse_error(text)
    assert e.path == "slices[0].sources[1].parameters.t"
    assert "shared" in str(e) and "not per source" in str(e)


def test_t_on_the_slice_is_accepted():
    text = SLERP.replace("        layer_range: [0, 4]\nmerge_method", "        layer_range: [0, 4]\n    parameters:\n      t: 0.3\nmerge_method")
    (r,) = parse_pipeline(text)
    assert r.slices[0].parameters == {"t": 0.3}


def test_passthrough_takes_no_t():
    e = parse_error(PASSTHROUGH + "parameters:\n  t: 0.5\n")
    assert e.path == "parameters.t" and "passthrough takes no parameter 't'" in str(e)


@pytest.mark.parametrize(
    "setting, path",
    [
        ("t: '0.5'", "parameters.t"),
        ("t: []", "parameters.t"),
        ("t: [0.5, x]", "parameters.t"),
        ("t: .nan", "parameters.t"),
        ("t: [0, .inf]", "parameters.t"),
        ("t: [{filter: mlp}]", "parameters.t[0]"),
        ("t: [{filter: 3, value: 1}]", "parameters.t[0].filter"),
        ("t: [{filter: mlp, value: [a]}]", "parameters.t[0].value"),
        ("t: [{filter: mlp, value: .nan}]", "parameters.t[0].value"),
        ("t: [{filter: mlp, value: 1}, 0.5]", "parameters.t"),
    ],
)
def test_bad_settings(setting, path):
    assert parse_error(SLERP.replace("t: 0.5", setting)).path == path


def test_single_conditional_is_a_list_of_one():
    (r,) = parse_pipeline(SLERP.replace("t: 0.5", "t: {filter: mlp, value: [0, 1]}"))
    assert r.parameters["t"] == [{"filter": "mlp", "value": [0, 1]}]


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("modules", "{text_decoder: {slices: []}}", "multi-module"),
    ],
)
def test_unsupported_keys_are_refused_clearly(key, value, words):
    e = parse_error(SLERP + f"{key}: {value}\n")
    assert e.path == key
    assert words in str(e) and "unknown key" not in str(e)


def test_tokenizer_keys_become_one_spec():
    (r,) = parse_pipeline(SLERP + "tokenizer_source: union\nchat_template: chatml\n")
    assert (r.tokenizer.source, r.tokenizer.tokens, r.chat_template) == ("union", (), "chatml")
    (r,) = parse_pipeline(SLERP + "tokenizer:\n  tokens: {'<x>': {source: {kind: zero}, force: true}}\n  pad_to_multiple_of: 8\n")
    assert r.tokenizer.source == "union" and r.tokenizer.pad_to_multiple_of == 8  # mergekit's default source
    ((token, spec),) = r.tokenizer.tokens
    assert token == "<x>" and spec.force and spec.source.model is None


def test_a_mergekit_moe_config_is_named_as_such():
    text = "base_model: a\ngate_mode: cheap_embed\ndtype: bfloat16\nexperts:\n  - source_model: b\n    positive_prompts: [code]\n"
    e = parse_error(text)
    assert "mergekit-moe config (gate_mode:, experts:)" in str(e) and "merge_method" not in str(e)


def test_model_references():
    assert parse_error(SLERP.replace("model: b", "model: ''")).path == "slices[0].sources[1].model"
    assert parse_error(SLERP.replace("model: b", "model: [b]")).path == "slices[0].sources[1].model"
    assert parse_pipeline(SLERP.replace("model: b", "model: org/b+org/lora"))[0].slices[0].sources[1].model == "org/b+org/lora"
    assert "more than one '+'" in str(parse_error(SLERP.replace("model: b", "model: org/b+org/l1+org/l2")))
    assert "needs both parts" in str(parse_error(SLERP.replace("model: b", "model: org/b+")))
    assert "'@revision'" in str(parse_error(SLERP.replace("model: b", "model: org/b@v1+org/lora@v1@v2")))
    assert "'@revision'" in str(parse_error(SLERP.replace("model: b", "model: org/b@v1@v2")))
    assert parse_error(SLERP.replace("base_model: a", "base_model: 3")).path == "base_model"


def test_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    e = parse_error(f"!!python/object/apply:os.system ['touch {marker}']\n")
    assert "python/object" in str(e)
    e = parse_error(SLERP.replace("t: 0.5", f"t: !!python/object/apply:os.system ['touch {marker}']"))
    assert "python/object" in str(e)
    assert not marker.exists()


def test_repeated_keys_are_refused():
    e = parse_error(SLERP + "merge_method: passthrough\n")
    assert "'merge_method' appears twice" in str(e) and "line 12" in str(e)
    e = parse_error(SLERP.replace("  t: 0.5", "  t: 0.5\n  t: 0.7"))
    assert "'t' appears twice" in str(e)


def test_yaml_merge_keys_may_be_overridden():
    text = "merge_method: passthrough\nslices:\n  - sources:\n    - {<<: {model: a, layer_range: [0, 4]}, layer_range: [0, 2]}\n"
    (r,) = parse_pipeline(text)
    assert r.slices[0].sources[0].layer_range == (0, 2) and r.slices[0].sources[0].model == "a"


def test_not_yaml_and_empty():
    assert "not valid YAML" in str(parse_error("slices: [\n"))
    assert "empty" in str(parse_error("# nothing\n"))
    assert "expected a mapping" in str(parse_error("- a\n- b\n"))


def test_recipe_files(tmp_path):
    assert "cannot read recipe file" in str(pytest.raises(RecipeError, load_pipeline, str(tmp_path / "missing.yml")).value)
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(SLERP.replace("base_model: a", "base_model: caf\xe9").encode("latin-1"))
    e = pytest.raises(RecipeError, load_pipeline, str(bad)).value
    assert str(bad) in str(e) and "UTF-8" in str(e)
    good = tmp_path / "r.yml"
    good.write_text(SLERP)
    (r,) = load_pipeline(str(good))
    assert r.origin == str(good) and r.text == SLERP


# -- pipelines -----------------------------------------------------------------------------------


def _stage(name: str | None, a: str, b: str | None = None) -> str:
    head = f"name: {name}\n" if name else ""
    if b is None:
        return head + f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 4]\n"
    return head + SLERP.replace("model: a", f"model: {a}").replace("model: b", f"model: {b}").replace("base_model: a", f"base_model: {a}")


def test_pipeline_parses_stages_with_their_own_text():
    text = _stage("one", "a") + "---\n" + _stage("two", "b") + "---\n" + _stage(None, "one", "two")
    stages = parse_pipeline(text, "p.yml")
    assert [s.name for s in stages] == ["one", "two", None]
    assert stages[1].origin == "p.yml document 2"
    assert stages[0].text == _stage("one", "a") and stages[2].text == _stage(None, "one", "two")


def test_pipeline_errors_name_the_document():
    text = _stage("one", "a") + "---\n" + _stage(None, "one", "b").replace("layer_range: [0, 4]\nmerge", "layer_range: [0, 9]\nmerge")
    text = text.replace("merge_method: slerp", "merge_methd: slerp")
    e = parse_error(text)
    assert str(e).startswith("r.yml document 2: merge_method:") and "did you mean 'merge_method'" in str(e)


def test_pipeline_duplicate_stage_names():
    e = parse_error(_stage("one", "a") + "---\n" + _stage("one", "b") + "---\n" + _stage(None, "one", "b"))
    assert e.path == "name" and "'one' is used twice" in str(e) and "document 1" in str(e) and "document 2" in str(e)


def test_pipeline_two_unnamed_stages():
    e = parse_error(_stage(None, "a") + "---\n" + _stage(None, "b"))
    assert e.path == "name" and "at most one unnamed" in str(e)


@pytest.mark.parametrize("name", ["'a/b'", "''", ".hidden", "[x]", "3"])
def test_pipeline_stage_names_are_plain(name):
    assert parse_error(_stage(None, "a").replace("merge_method", f"name: {name}\nmerge_method")).path == "name"


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("small")
    for seed, name in enumerate(("a", "b"), start=1):
        make_model(str(root / name), SMALL, seed=seed, shard_bytes=40_000)
    return str(root)


def test_pipeline_cycle(small_models):
    text = _stage("one", "two", "a") + "---\n" + _stage("two", "one", "b") + "---\n" + _stage(None, "one", "two")
    with pytest.raises(RecipeError) as info:
        api.plan(text, models_root=small_models)
    message = str(info.value)
    assert "cycle" in message and ("one -> two -> one" in message or "two -> one -> two" in message), message


def test_pipeline_stage_used_by_itself(small_models):
    text = _stage("one", "one", "a") + "---\n" + _stage(None, "one")
    with pytest.raises(RecipeError) as info:
        api.plan(text, models_root=small_models)
    message = str(info.value)
    assert "slices[0].sources[0].model" in message and "'one'" in message, message
    assert "before it is defined" in message or "cycle" in message, message


def test_pipeline_stage_defined_after_use_is_ordered(small_models):
    # A stage may be written after the stage that uses it: stages run in dependency order.
    text = _stage(None, "one", "two") + "---\n" + _stage("one", "a") + "---\n" + _stage("two", "b")
    p = api.plan(text, models_root=small_models)
    assert [s.name for s in p.stages] == ["one", "two", None]
    assert sorted(p.sources) == ["a", "b"]


def test_pipeline_misspelt_stage_reference(small_models):
    text = _stage("one", "a") + "---\n" + _stage("two", "b") + "---\n" + _stage(None, "one", "tow")
    with pytest.raises(RecipeError) as info:
        api.plan(text, models_root=small_models)
    assert "slices[0].sources[1].model" in str(info.value) and "did you mean 'two'" in str(info.value)


# -- parameter evaluation ------------------------------------------------------------------------


def _reference_gradient(values: list[float], t: float) -> float:
    n = len(values)
    s = t * (n - 1)
    i0 = int(s // 1)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * values[i0] + f * values[i1]


@pytest.mark.parametrize(
    "values, t, expected",
    [
        ([0.5], 0.0, 0.5),
        ([0.5], 1.0, 0.5),
        ([0.75, 0.25], 0.0, 0.75),
        ([0.75, 0.25], 1.0, 0.25),
        ([0.75, 0.25], 0.5, 0.5),
        ([0, 1, 0], 0.25, 0.5),
        ([0, 1, 0], 0.5, 1.0),
        ([0, 1, 0], 0.75, 0.5),
        ([0, 0.5, 0.3, 0.7, 1], 0.625, 0.5),
        ([0, 0.5, 0.3, 0.7, 1], 1.0, 1.0),
    ],
)
def test_gradient_examples(values, t, expected):
    assert gradient(values, t) == pytest.approx(expected, abs=1e-15)


def test_gradient_is_the_one_minus_f_form_bit_for_bit():
    for n in (2, 3, 5):
        values = [0.75, 0.25, 0.6, 0.1, 0.9][:n]
        for length in (2, 3, 24, 48):
            for i in range(length):
                t = i / (length - 1)
                assert gradient(values, t) == _reference_gradient(values, t)
    # self_attn of Nyxene: the (1-f)*v0 + f*v1 form, not numpy.interp (which differs in the last bit).
    assert [gradient([0.75, 0.25], i / 47) for i in range(48)] == [(1 - i / 47) * 0.75 + (i / 47) * 0.25 for i in range(48)]


def test_filters_are_plain_substrings():
    assert filter_matches(None, "anything") and filter_matches("*", "anything")
    assert filter_matches("self_attn", "model.layers.3.self_attn.q_proj.weight")
    assert filter_matches("layernorm", "model.layers.3.post_attention_layernorm.weight")
    assert not filter_matches("layernorm", "model.norm.weight")
    assert not filter_matches("modelnorm", "model.norm.weight")
    assert filter_matches("norm", "model.norm.weight")
    assert not filter_matches("Self_Attn", "model.layers.3.self_attn.q_proj.weight")  # case-sensitive
    assert not filter_matches("layers.*.mlp", "model.layers.3.mlp.up_proj.weight")  # no globs
    # "layers.1" also hits layers 10..19 (and 100..): substring semantics, as in mergekit.
    hits = [i for i in range(48) if filter_matches("layers.1", f"model.layers.{i}.mlp.up_proj.weight")]
    assert hits == [1] + list(range(10, 20))


def test_first_match_wins_and_fallback():
    setting = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "q_proj", "value": 0.2},
        {"filter": None, "value": [0.0, 1.0]},
        {"filter": "mlp", "value": 0.9},
    ]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == (0.1, 0)
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.25) == (0.25, 2)  # fallback before the mlp rule
    assert evaluate([{"filter": "*", "value": 0.3}], "x", 0.0) == (0.3, 0)
    assert evaluate([{"filter": "mlp", "value": 0.3}], "lm_head.weight", 0.0) is None
    assert evaluate(0.4, "lm_head.weight", 1.0) == (0.4, None)
    assert evaluate([0.0, 1.0], "lm_head.weight", 0.0) == (0.0, None)


def test_precedence_slice_over_top_and_fall_through():
    top = ("parameters", {"t": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]})
    sl = ("slices[1].parameters", {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}]})
    r = resolve("t", [sl, top], "model.layers.7.self_attn.o_proj.weight", 0.25)
    assert (r.value, r.source) == (0.25, "slices[1].parameters.t[0]")
    r = resolve("t", [sl, top], "model.layers.7.mlp.up_proj.weight", 0.25)  # slice has no match: falls through
    assert (r.value, r.source) == (0.9, "parameters.t[0]")
    r = resolve("t", [("slices[0].parameters", {"t": 0.2}), top], "lm_head.weight", 0.0)
    assert (r.value, r.source) == (0.2, "slices[0].parameters.t")
    assert resolve("t", [("slices[0].parameters", {}), ("parameters", {"t": [{"filter": "mlp", "value": 1}]})], "lm_head.weight", 0.0) is None
    assert resolve("t", [], "x", 0.0) is None


def test_precedence_in_a_plan(small_models):
    text = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
    parameters:
      t:
        - filter: self_attn
          value: 0.1
  - sources:
      - model: a
        layer_range: [2, 4]
      - model: b
        layer_range: [2, 4]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - value: 0.5
"""
    p = api.plan(text, models_root=small_models)
    t = {x.name: x.param("t") for x in p.final.tensors}
    assert t["model.layers.1.self_attn.q_proj.weight"] == (0.1, "slices[0].parameters.t[0]")
    assert t["model.layers.1.mlp.up_proj.weight"] == (0.5, "parameters.t[1]")
    # the gradient restarts in each slice: output layers 2 and 3 are offsets 0 and 1 of slice 1
    assert t["model.layers.2.self_attn.q_proj.weight"] == (0.2, "parameters.t[0]")
    assert t["model.layers.3.self_attn.q_proj.weight"] == (0.8, "parameters.t[0]")
    # pre-weights take the first slice's parameters (no match there: top level), post-weights the last's
    assert t["model.embed_tokens.weight"] == (0.5, "parameters.t[1]")
    assert t["lm_head.weight"] == (0.5, "parameters.t[1]")


def test_filter_sees_output_layer_numbers(small_models):
    # A shared parameter's filter sees the output name: source layer 2 becomes output layer 0.
    text = SLERP.replace("layer_range: [0, 4]", "layer_range: [2, 4]").replace("  t: 0.5", "  t:\n    - filter: layers.0.\n      value: 0.1\n    - value: 0.9")
    p = api.plan(text, models_root=small_models)
    t = {x.name: x.param("t")[0] for x in p.final.tensors}
    assert t["model.layers.0.mlp.up_proj.weight"] == 0.1 and t["model.layers.1.mlp.up_proj.weight"] == 0.9


# -- the Nyxene SLERP t table --------------------------------------------------------------------


@pytest.fixture(scope="module")
def nyxene_stage_outputs(nyxene_sources, tmp_path_factory) -> dict[str, str]:
    """The two 48-layer passthrough models of the Nyxene card, merged from the synthetic sources."""
    out = {}
    for name in ("loyal-piano-cybertron-11B", "Starling-DPOHermes-11B"):
        path = str(tmp_path_factory.mktemp(name))
        api.merge(os.path.join(RECIPES, f"{name}.yml"), path, executor="local", models_root=nyxene_sources, progress=False, overwrite=True)
        out[name] = path
    return out


def test_nyxene_slerp_t_table(nyxene_stage_outputs):
    # recipes/Nyxene-11B.yml as on the model card: its second input is "Starling-NeuralHermes-11B".
    p = api.plan(
        os.path.join(RECIPES, "Nyxene-11B.yml"),
        models={
            "loyal-piano-cybertron-11B": nyxene_stage_outputs["loyal-piano-cybertron-11B"],
            "Starling-NeuralHermes-11B": nyxene_stage_outputs["Starling-DPOHermes-11B"],
        },
    )
    final = p.final
    assert final.config["num_hidden_layers"] == 48
    t = {x.name: x.param("t")[0] for x in final.tensors}
    src = {x.name: x.param("t")[1] for x in final.tensors}
    assert len(t) == 2 + 48 * 9 + 1 and all(x.op == "slerp" for x in final.tensors)
    assert (t["model.embed_tokens.weight"], src["model.embed_tokens.weight"]) == (0.75, "parameters.t[1]")
    assert (t["lm_head.weight"], src["lm_head.weight"]) == (0.75, "parameters.t[0]")
    assert (t["model.norm.weight"], src["model.norm.weight"]) == (0.5, "parameters.t[6]")
    for i in range(48):
        f = i / 47
        attn = (1 - f) * 0.75 + f * 0.25
        mlp = (1 - f) * 0.25 + f * 0.75
        for proj in "qkvo":
            assert t[f"model.layers.{i}.self_attn.{proj}_proj.weight"] == attn
        for proj in ("gate", "up", "down"):
            assert t[f"model.layers.{i}.mlp.{proj}_proj.weight"] == mlp
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert t[f"model.layers.{i}.{norm}.weight"] == (1 - f) * 0.5 + f * 0.5
            assert src[f"model.layers.{i}.{norm}.weight"] == "parameters.t[4]"
    assert t["model.layers.0.self_attn.q_proj.weight"] == 0.75 and t["model.layers.47.self_attn.q_proj.weight"] == 0.25
    assert t["model.layers.0.mlp.up_proj.weight"] == 0.25 and t["model.layers.47.mlp.up_proj.weight"] == 0.75
    assert any("modelnorm" in w and "parameters.t[5]" in w and "matches no tensor" in w for w in p.warnings), p.warnings
    assert len(p.warnings) == 1


def test_nyxene_recipe_as_written_names_a_missing_model(nyxene_stage_outputs):
    with pytest.raises(NyxrayError) as info:
        api.plan(
            os.path.join(RECIPES, "Nyxene-11B.yml"),
            models={"loyal-piano-cybertron-11B": nyxene_stage_outputs["loyal-piano-cybertron-11B"]},
            models_root=os.path.dirname(nyxene_stage_outputs["Starling-DPOHermes-11B"]),
        )
    assert "slices[0].sources[1].model" in str(info.value) and "Starling-NeuralHermes-11B" in str(info.value)
