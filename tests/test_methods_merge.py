"""The merge methods on nyxray's engine: plan-time errors naming the recipe key, reproducible random
methods whatever runs them, sweeps over method parameters sharing reads, the plan view, the
mergekit-yaml command line. Byte parity with mergekit itself is tests/test_golden.py's job."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

import nyxray
from nyxray.cli import main as cli
from nyxray.demo.synthetic import ModelShape, make_model
from nyxray.errors import ModelError, NyxrayError, RecipeError
from nyxray.plan.describe import plan_text

SHAPE = ModelShape(hidden=64, intermediate=128, layers=4, vocab=2048, heads=4, kv_heads=2)
OTHER_SHAPE = ModelShape(hidden=64, intermediate=160, layers=4, vocab=2048, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A base, three fine-tunes of it (base + 3% noise) and an unrelated model of another shape."""
    root = tmp_path_factory.mktemp("method-models")
    out = {"base": make_model(str(root / "base"), SHAPE, seed=1, shard_bytes=200_000)}
    for i in (1, 2, 3):
        out[f"ft{i}"] = make_model(str(root / f"ft{i}"), SHAPE, seed=10 + i, shard_bytes=200_000, like=out["base"], like_noise=0.03)
    out["wide"] = make_model(str(root / "wide"), OTHER_SHAPE, seed=5, shard_bytes=200_000)
    return out


def ties(m: dict[str, str], method: str = "ties", density: str = "0.5", extra: str = "") -> str:
    return f"""\
merge_method: {method}
base_model: {m["base"]}
models:
  - model: {m["ft1"]}
    parameters: {{weight: 0.6, density: {density}}}
  - model: {m["ft2"]}
    parameters: {{weight: 0.4, density: [0.3, 0.9]}}
  - model: {m["ft3"]}
    parameters: {{weight: 0.2}}
dtype: bfloat16
{extra}"""


def tensors(out: str) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            got.update({k: v.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() for k, v in load_file(os.path.join(out, f)).items()})
    return got


# -- errors at plan time, naming the recipe key, before any tensor byte is read -------------------


def _errors(m: dict[str, str]) -> dict[str, tuple[str, str, type, list[str]]]:
    two = f"models:\n  - model: {m['ft1']}\n  - model: {m['ft2']}\n"
    return {
        "a parameter the method does not take": (
            ties(m, extra="parameters: {t: 0.5}\n"),
            RecipeError,
            ["parameters.t", "ties takes no parameter 't'", "density"],
        ),
        "dare_ties without a base_model": (
            ties(m, "dare_ties").replace(f"base_model: {m['base']}\n", ""),
            RecipeError,
            ["base_model", "dare_ties needs a base_model"],
        ),
        "nearswap with two other models": (
            f"merge_method: nearswap\nbase_model: {m['base']}\n{two}parameters: {{t: 0.01}}\n",
            RecipeError,
            ["models", "nearswap takes exactly two sources", "got 3"],
        ),
        "arcee_fusion with the base alone": (
            f"merge_method: arcee_fusion\nbase_model: {m['base']}\nmodels:\n  - model: {m['base']}\n",
            RecipeError,
            ["models", "arcee_fusion takes exactly two sources", "got 1"],
        ),
        "density above 1": (ties(m, density="1.5"), RecipeError, ["models[0].parameters.density", "density=1.5 is out of range (0, 1]"]),
        "density 0 from a gradient": (ties(m, density="[0.0, 0.5]"), RecipeError, ["models[0].parameters.density", "density=0.0 is out of range"]),
        "weights summing to 0 with normalize": (
            f"merge_method: linear\n{two}  - model: {m['ft3']}\nparameters:\n  weight: [{{filter: mlp, value: 0}}, {{value: 1}}]\n",
            RecipeError,
            ["parameters.weight[0]", "sum to 0", "normalize: false"],
        ),
        "a required per-model parameter missing": (
            ties(m).replace("    parameters: {weight: 0.2}\n", ""),
            RecipeError,
            ["models[2].parameters.weight", "missing required parameter weight"],
        ),
        "della's density +/- epsilon outside (0, 1)": (
            ties(m, "della", density="0.1"),
            RecipeError,
            ["models[0].parameters", "density=0.1 with epsilon=0.15", "inside (0, 1)"],
        ),
        "a boolean given a number": (ties(m, extra="parameters: {normalize: 0.5}\n"), RecipeError, ["parameters.normalize", "must be bool"]),
        "models whose tensor shapes differ": (
            f"merge_method: linear\nmodels:\n  - model: {m['ft1']}\n    parameters: {{weight: 1}}\n  - model: {m['wide']}\n    parameters: {{weight: 1}}\n",
            ModelError,
            ["tensor size mismatch for model.layers", "[128, 64]", "[160, 64]"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "a parameter the method does not take",
        "dare_ties without a base_model",
        "nearswap with two other models",
        "arcee_fusion with the base alone",
        "density above 1",
        "density 0 from a gradient",
        "weights summing to 0 with normalize",
        "a required per-model parameter missing",
        "a boolean given a number",
        "della's density +/- epsilon outside (0, 1)",
        "models whose tensor shapes differ",
    ],
)
def test_bad_method_recipes_fail_at_plan_time_naming_the_key(case, models, tmp_path):
    text, kind, needles = _errors(models)[case]
    out = tmp_path / "out"
    with pytest.raises(kind) as info:
        nyxray.merge(text, str(out), executor="local", progress=False)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert not out.exists()  # nothing written, not even the state folder


# -- random methods are reproducible whatever runs them -------------------------------------------


def test_dare_bytes_do_not_depend_on_shard_size_worker_or_order(models, tmp_path):
    text = ties(models, "dare_ties")
    a = nyxray.merge(text, str(tmp_path / "a"), executor="local", progress=False)
    nyxray.merge(text, str(tmp_path / "b"), executor="local", progress=False, out_shard_size="300K", actors=2)
    assert a["random_seed"] == 0 and a["shards"] == 1
    assert a["bytes_read_tensors"] == a["bytes_read_min"]  # each input byte once: 4 models, nothing more
    assert tensors(str(tmp_path / "a")) == tensors(str(tmp_path / "b"))
    card = open(tmp_path / "a" / "README.md").read()
    assert "random_seed 0" in card and "DARE TIES" in card


def test_dare_on_ray_equals_in_process(models, tmp_path, ray_cluster):
    text = ties(models, "della", extra="parameters: {epsilon: 0.05}\n")
    nyxray.merge(text, str(tmp_path / "local"), executor="local", progress=False, out_shard_size="400K")
    nyxray.merge(text, str(tmp_path / "ray"), executor="ray", progress=False, actors=2, out_shard_size="150K")
    assert tensors(str(tmp_path / "local")) == tensors(str(tmp_path / "ray"))


def test_the_seed_decides_the_draws(models, tmp_path):
    text = ties(models, "dare_linear")
    nyxray.merge(text, str(tmp_path / "s0"), executor="local", progress=False)
    nyxray.merge(text + "random_seed: 7\n", str(tmp_path / "recipe7"), executor="local", progress=False)
    r = nyxray.merge(text, str(tmp_path / "arg7"), executor="local", progress=False, random_seed=7)
    assert r["random_seed"] == 7
    s0, r7, a7 = (tensors(str(tmp_path / d)) for d in ("s0", "recipe7", "arg7"))
    assert r7 == a7
    differ = [k for k in s0 if s0[k] != r7[k]]
    assert len(differ) > len(s0) // 2  # another seed draws other masks for (nearly) every tensor
    with pytest.raises(NyxrayError, match="random_seed"):
        nyxray.merge(text, str(tmp_path / "bad"), executor="local", progress=False, random_seed=-1)


# -- sweeps over method parameters share reads ---------------------------------------------------


def test_ties_density_weight_grid_reads_inputs_once(models, tmp_path):
    base = ties(models).replace("{weight: 0.6, density: 0.5}", "{weight: 0.6, density: 0.5}")
    sweep = {"base": base, "grid": {"parameters.density": [0.3, 0.7], "models[1].parameters.weight": [0.2, 0.8]}}
    import yaml

    report = nyxray.sweep(yaml.safe_dump(sweep), str(tmp_path / "sweep"), executor="local", progress=False)
    assert report["failed"] == {} and len(report["members"]) == 4
    one = nyxray.plan(base + "parameters: {density: 0.3}\n").bytes_read_min()
    assert report["bytes_read"] - report["bytes_read_headers"] <= 1.05 * one
    outs = [tensors(m["output"]) for m in report["members"].values()]
    name = "model.layers.1.mlp.up_proj.weight"
    assert len({o[name] for o in outs}) == 4  # every grid point is a different model


def test_grid_may_set_a_parameter_the_base_recipe_leaves_to_its_default(models, tmp_path):
    import yaml

    sweep = {"base": ties(models), "grid": {"parameters.lambda": [0.5, 1.5]}}
    report = nyxray.sweep(yaml.safe_dump(sweep), str(tmp_path / "sweep"), executor="local", progress=False)
    assert report["failed"] == {} and sorted(report["members"]) == ["lambda=0.5", "lambda=1.5"]


# -- what the user sees ----------------------------------------------------------------------------


def test_plan_shows_each_parameter_range_and_its_source(models):
    text = plan_text(nyxray.plan(ties(models, "dare_ties")))
    assert "parameters of dare_ties (random_seed 0):" in text
    ft2 = models["ft2"]
    assert f"model.layers.*.mlp.up_proj.weight: density[{ft2}] = 0.3 .. 0.9 (varies by layer)  [models[1].parameters.density]" in text
    assert "every tensor: rescale = True  [default]" in text and "embed_tokens.weight: rescale" not in text
    assert f"every tensor: weight[{models['ft1']}] = 0.6  [models[0].parameters.weight]" in text


def test_mergekit_yaml_flags_are_accepted(models, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(ties(models, "dare_ties"))
    out = str(tmp_path / "out")
    flags = [
        "--random-seed",
        "3",
        "-j",
        "2",
        "--lazy-unpickle",
        "--low-cpu-memory",
        "--no-read-to-gpu",
        "--multi-gpu",
        "--trust-remote-code",
        "--clone-tensors",
        "--async-write",
        "--write-threads",
        "2",
        "--safe-serialization",
        "--copy-tokenizer",
        "--write-model-card",
        "--quiet",
        "--device",
        "cpu",
        "--executor",
        "local",
    ]
    assert cli(["merge", str(recipe), out, *flags]) == 0
    err = capsys.readouterr().err
    assert "--lazy-unpickle: accepted, not needed" in err and "--num-threads: accepted, not needed" in err
    assert "random_seed 3" in open(os.path.join(out, "README.md")).read()
    assert cli(["merge", str(recipe), str(tmp_path / "bin"), "--no-safe-serialization", "--executor", "local"]) == 1
    assert "safetensors only" in capsys.readouterr().err and not os.path.exists(tmp_path / "bin")


def test_readme_support_table_is_the_registry():
    """The README's table is generated from the registry (``nyxray methods``): it cannot drift."""
    from nyxray.plan.describe import methods_table

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    table = readme.split("<!-- methods:begin -->\n", 1)[1].split("\n<!-- methods:end -->", 1)[0]
    assert table == methods_table(), "README's method table is stale: paste the output of `nyxray methods`"
