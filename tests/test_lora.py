"""LoRA references (``model+adapter``): byte parity with mergekit 0.1.5 (which merges the adapter
through peft into a full copy first), adapters from S3 and the hub cache, the refusals, the plan
view and read figures, Ray with sub-shard parts, and resume identity.

``tests/golden/lora.json`` was made by ``tests/golden/make_lora_golden.py`` from the inputs and
recipes of ``tests/golden/lora_cases.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

import nyxray
from nyxray.errors import NyxrayError
from nyxray.plan.describe import plan_text
from tests.golden import cases as C
from tests.golden import lora_cases as L
from tests.golden.expected import recorded_under
from tests.test_golden import config_disagreements

GOLDEN = json.load(open(L.GOLDEN_PATH))
# lora.json holds mergekit's bytes under one CPU kernel set; the merges around the adapters (linear
# sums...) round differently under others, so byte parity is checked under that set only.
parity = recorded_under(GOLDEN, "lora.json")


def test_golden_file_states_what_it_was_made_with():
    import torch

    assert GOLDEN["mergekit"] == "0.1.5" and GOLDEN["torch"] == torch.__version__
    assert set(GOLDEN["cases"]) == set(L.CASES_BY_NAME)


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora-in"))
    return C.build_inputs(root, {C.BASE, *C.FT}), L.build_adapters(root)


def lora_dtype(case: C.Case) -> str | None:
    cli = list(case.cli)
    return cli[cli.index("--lora-merge-dtype") + 1] if "--lora-merge-dtype" in cli else None


def run(case: C.Case, lora_inputs, out: str, adapters: dict[str, str] | None = None, **options) -> dict:
    models, local_adapters = lora_inputs
    recipe = L.render(case, models, adapters or local_adapters)
    defaults = {"executor": "local", "progress": False, "overwrite": True, "write_model_card": False, "lora_merge_dtype": lora_dtype(case)}
    return nyxray.merge(recipe, out, out_shard_size=case.out_shard_size, **{**defaults, **options})


def sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def check(case: C.Case, out: str) -> None:
    """Every shard byte for byte as mergekit wrote it, the index's order and total, the config's values."""
    want = GOLDEN["cases"][case.name]
    shards = {f: v["sha256"] for f, v in want["files"].items() if f.endswith(".safetensors")}
    got = {f: sha256(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")}
    assert sorted(got) == sorted(shards), f"{case.name}: shard files differ"
    differ = [t["name"] for s in want["shards"] for t in s["tensors"] if got[s["file"]] != shards[s["file"]]]
    assert got == shards, f"{case.name}: shards differ from mergekit 0.1.5 (in shards holding {differ[:3]}...)"
    if want["index"]:
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        assert list(index["weight_map"].items()) == list(want["index"]["weight_map"].items())
        assert index["metadata"]["total_size"] == want["index"]["metadata"]["total_size"]
    assert config_disagreements(json.load(open(os.path.join(out, "config.json"))), json.loads(want["config_text"])) == []


@pytest.mark.parametrize("case", L.CASES, ids=lambda c: c.name)
@parity
def test_matches_mergekit(case, lora_inputs, tmp_path):
    run(case, lora_inputs, str(tmp_path / "out"))
    check(case, str(tmp_path / "out"))


@parity
def test_ray_with_sub_shard_parts_matches_and_resumes(lora_inputs, tmp_path, ray_cluster):
    case = L.CASES_BY_NAME["lora_ties_base"]
    out = str(tmp_path / "out")
    report = run(case, lora_inputs, out, executor="ray", actors=2, unit_size="1M")
    assert sum(a["units"] for a in report["actors"]) > len(GOLDEN["cases"][case.name]["shards"]), "no shard was split into parts"
    check(case, out)
    assert nyxray.verify(out) == []
    again = run(case, lora_inputs, out, executor="local", overwrite=False)
    assert again["shards_reused"] == len(GOLDEN["cases"][case.name]["shards"]) and again["bytes_read_tensors"] == 0


def test_the_adapter_is_part_of_the_output_identity(lora_inputs, tmp_path):
    """Resume keeps shards only for the same tensors: another LoRA merge dtype, or another adapter
    behind the same name, is another output."""
    case = L.CASES_BY_NAME["lora_linear_ft"]
    out = str(tmp_path / "out")
    run(case, lora_inputs, out)
    with pytest.raises(NyxrayError, match="overwrite"):
        run(case, lora_inputs, out, overwrite=False, lora_merge_dtype="float32")
    models, adapters = lora_inputs
    other = {**adapters, L.ATTN_MLP.name: shutil.copytree(adapters[L.RSLORA.name], str(tmp_path / "same-name"))}
    other_case = C.Case(case.name, case.recipe.replace(L.ATTN_MLP.name, L.RSLORA.name), out_shard_size=case.out_shard_size)
    with pytest.raises(NyxrayError, match="overwrite"):
        run(other_case, lora_inputs, out, adapters=other, overwrite=False)


@parity
def test_adapter_on_s3(lora_inputs, tmp_path, s3_server, s3_bucket):
    import s3fs

    _, adapters = lora_inputs
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    fs.put(adapters[L.ATTN_MLP.name], f"{s3_bucket}/attn-mlp", recursive=True)
    case = L.CASES_BY_NAME["lora_linear_ft"]
    on_s3 = {**adapters, L.ATTN_MLP.name: f"s3://{s3_bucket}/attn-mlp"}
    out = str(tmp_path / "out")
    run(case, lora_inputs, out, adapters=on_s3, storage_options=s3_server.storage_options)
    check(case, out)


@parity
def test_adapter_from_the_hub_cache(lora_inputs, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--attn-mlp-lora"
    shutil.copytree(lora_inputs[1][L.ATTN_MLP.name], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    case = L.CASES_BY_NAME["lora_linear_ft"]
    out = str(tmp_path / "out")
    run(case, lora_inputs, out, adapters={L.ATTN_MLP.name: "someone/attn-mlp-lora"})
    check(case, out)


def test_plan_shows_what_each_adapter_changes_and_counts_its_reads(lora_inputs):
    models, adapters = lora_inputs
    case = L.CASES_BY_NAME["lora_ties_base"]
    p = nyxray.plan(L.render(case, models, adapters), out_shard_size=case.out_shard_size)
    text = plan_text(p)
    assert "LoRA adapters" in text
    for adapter, module in ((L.ATTN_MLP, "down_proj"), (L.RSLORA, "o_proj")):
        path = os.path.join(adapters[adapter.name], "adapter_model.safetensors")
        with open(path, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        assert p.read_bytes_by_source()[adapters[adapter.name]] == os.path.getsize(path) - header
        adapted = [m for m in p.sources.values() if m.adapter and m.adapter.ref == adapters[adapter.name]]
        assert [m.header_bytes for m in adapted] == [header], "the adapter's header, once; its model's are counted on the model"
        assert f"model.layers.*.{'mlp' if module == 'down_proj' else 'self_attn'}.{module}.weight" in text
    assert "model.layers.*.mlp.gate_proj.weight" not in text.split("LoRA adapters")[1].split("parameters of")[0]


# -- refusals: named before any tensor byte is read ------------------------------------------------


def broken_adapter(root: str, spec: L.AdapterSpec, edit=None) -> str:
    path = spec.build(root)
    if edit:
        edit(path)
    return path


def edit_config(**fields):
    def edit(path: str) -> None:
        cfg_path = os.path.join(path, "adapter_config.json")
        cfg = json.load(open(cfg_path))
        cfg.update(fields)
        json.dump(cfg, open(cfg_path, "w"))

    return edit


def add_tensor(*names: str, shape=(8, 128)):
    def edit(path: str) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        f = os.path.join(path, "adapter_model.safetensors")
        tensors = load_file(f)
        tensors.update({name: torch.zeros(shape) for name in names})
        save_file(tensors, f)

    return edit


REFUSALS = [
    ("dora", L.ATTN_MLP, edit_config(use_dora=True), "use_dora=True is not supported"),
    ("loha", L.ATTN_MLP, edit_config(peft_type="LOHA"), "peft_type 'LOHA' is not supported"),
    ("modules_to_save", L.ATTN_MLP, edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    ("bias", L.ATTN_MLP, edit_config(bias="all"), "bias='all' is not supported"),
    ("pissa", L.ATTN_MLP, edit_config(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    ("embedding", L.ATTN_MLP, add_tensor("base_model.model.model.embed_tokens.lora_embedding_A"), "embedding layer"),
    ("wrong rank", L.ATTN_MLP, edit_config(r=16), "rank for it is 16"),
    ("not targeted", L.ATTN_MLP, edit_config(target_modules=["q_proj", "v_proj"]), "which its target_modules"),
    ("targeted, no factors", L.ATTN_MLP, edit_config(target_modules=["q_proj", "v_proj", "down_proj", "k_proj"]), "no factors for it"),
    ("absent module", L.ATTN_MLP, add_tensor(*(f"base_model.model.model.layers.12.self_attn.q_proj.lora_{f}.weight" for f in "AB")), "does not have"),
    ("shape", L.ATTN_MLP, add_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", shape=(128, 8)), "lora_A.weight missing"),
]


@pytest.mark.parametrize("name,spec,edit,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_adapters_are_named_before_any_read(name, spec, edit, message, lora_inputs, tmp_path):
    models, _ = lora_inputs
    adapter = broken_adapter(str(tmp_path), spec, edit)
    case = L.CASES_BY_NAME["lora_linear_ft"]
    out = tmp_path / "out"
    with pytest.raises(NyxrayError, match=message) as e:
        run(case, lora_inputs, str(out), adapters={spec.name: adapter})
    assert adapter in str(e.value), "the error names the adapter"
    assert not out.exists(), "nothing was written"


def test_shapes_that_do_not_fit_the_model_are_named(lora_inputs, tmp_path):
    """An adapter trained on a wider model: B @ A is not the weight's shape."""

    def widen(path: str) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        f = os.path.join(path, "adapter_model.safetensors")
        tensors = {k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in load_file(f).items()}
        save_file(tensors, f)

    adapter = broken_adapter(str(tmp_path), L.ATTN_MLP, widen)
    with pytest.raises(NyxrayError, match=r"down_proj: B @ A is \[128, 512\] but .*down_proj.weight of .* is \[128, 256\]"):
        run(L.CASES_BY_NAME["lora_linear_ft"], lora_inputs, str(tmp_path / "out"), adapters={L.ATTN_MLP.name: adapter})


def test_a_pickled_adapter_or_a_missing_one_is_refused(lora_inputs, tmp_path):
    adapter = broken_adapter(str(tmp_path), L.ATTN_MLP)
    os.rename(os.path.join(adapter, "adapter_model.safetensors"), os.path.join(adapter, "adapter_model.bin"))
    case = L.CASES_BY_NAME["lora_linear_ft"]
    with pytest.raises(NyxrayError, match="pickle"):
        run(case, lora_inputs, str(tmp_path / "out"), adapters={L.ATTN_MLP.name: adapter})
    with pytest.raises(NyxrayError, match="LoRA adapter .*not found"):
        run(case, lora_inputs, str(tmp_path / "out"), adapters={L.ATTN_MLP.name: str(tmp_path / "nowhere")})


def test_an_adapter_on_a_pipeline_stage_is_refused_naming_it(lora_inputs):
    models, adapters = lora_inputs
    stage = L.render(L.CASES_BY_NAME["lora_task_arithmetic_default_dtype"], models, adapters).replace("models:", "name: first\nmodels:", 1)
    final = f"merge_method: passthrough\nmodels:\n  - model: first+{adapters[L.ATTN_MLP.name]}\n"
    with pytest.raises(NyxrayError, match="models\\[0\\].model: 'first\\+.*LoRA adapter on a pipeline stage's output is not supported"):
        nyxray.plan(stage + "---\n" + final)


def test_lora_merge_dtype_is_checked_in_one_place(lora_inputs, tmp_path):
    case = L.CASES_BY_NAME["lora_linear_ft"]
    for bad in ("fp32", "int64"):
        with pytest.raises(NyxrayError, match="lora_merge_dtype"):
            run(case, lora_inputs, str(tmp_path / "out"), lora_merge_dtype=bad)
    with pytest.raises(NyxrayError, match="lora_merge_dtype"):
        nyxray.sweep("members: {}", str(tmp_path / "sweep"), lora_merge_dtype="fp32")


@parity
def test_mergekit_lora_flags_work_unchanged(lora_inputs, tmp_path, capsys):
    from nyxray.cli import main

    models, adapters = lora_inputs
    case = L.CASES_BY_NAME["lora_merge_dtype_f32"]
    recipe = tmp_path / "r.yml"
    recipe.write_text(L.render(case, models, adapters))
    out = str(tmp_path / "out")
    argv = [str(recipe), out, "--lora-merge-cache", str(tmp_path / "cache"), "--lora-merge-dtype", "float32", "--executor", "local", "--quiet"]
    assert main(["merge", *argv, "--no-write-model-card"]) == 0
    assert "--lora-merge-cache: accepted, not needed" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    check(case, out)
    assert main(["plan", str(recipe), "--lora-merge-dtype", "float32"]) == 0
    assert "loaded in F32" in capsys.readouterr().out
