"""End-to-end merges in-process (executor="local"): bytes against the sources, layout, pipeline
fusion, resume after SIGKILL, verify."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import nyxray
from nyxray.cli import main as cli
from nyxray.execute.runtime import pool_settings
from nyxray.methods._slerp import slerp
from tests.golden import cases as G
from tests.golden.expected import GOLDEN, UNKNOWN
from tests.records import finished_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
STAGE1A = os.path.join(RECIPES, "loyal-piano-cybertron-11B.yml")
STAGE1B = os.path.join(RECIPES, "Starling-DPOHermes-11B.yml")
SLERP = os.path.join(RECIPES, "Nyxene-11B.yml")
PIPELINE = os.path.join(RECIPES, "nyxene-v2-11b.pipeline.yml")


def load_dir(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def shard_hashes(path: str) -> dict[str, str]:
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))}


@pytest.fixture(scope="module")
def stage1(nyxene_sources, tmp_path_factory):
    """The two passthrough stages run one by one (as mergekit users do)."""
    root = tmp_path_factory.mktemp("stage1")
    a, b = str(root / "loyal-piano-cybertron-11B"), str(root / "Starling-DPOHermes-11B")
    nyxray.merge(STAGE1A, a, models_root=nyxene_sources, executor="local", out_shard_size="6M", progress=False)
    nyxray.merge(STAGE1B, b, models_root=nyxene_sources, executor="local", out_shard_size="6M", progress=False)
    return a, b


def test_passthrough_copies_source_bytes_and_renumbers_layers(nyxene_sources, stage1):
    out = load_dir(stage1[0])
    una = load_dir(os.path.join(nyxene_sources, "fblgit/una-cybertron-7b-v2"))
    loyal = load_dir(os.path.join(nyxene_sources, "chargoddard/loyal-piano-m7-cdpo"))
    assert torch.equal(out["model.embed_tokens.weight"].view(torch.int16), una["model.embed_tokens.weight"].view(torch.int16))
    for i in range(48):
        src, j = (una, i) if i < 24 else (loyal, i - 16)
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{i}.{suffix}"].view(torch.int16), src[f"model.layers.{j}.{suffix}"].view(torch.int16))
    assert torch.equal(out["model.norm.weight"].view(torch.int16), loyal["model.norm.weight"].view(torch.int16))
    assert torch.equal(out["lm_head.weight"].view(torch.int16), loyal["lm_head.weight"].view(torch.int16))
    assert len(out) == 2 + 48 * 9 + 1
    config = json.load(open(os.path.join(stage1[0], "config.json")))
    assert config["num_hidden_layers"] == 48
    assert config["torch_dtype"] == "bfloat16"
    # the donor's tokenizer files are copied verbatim
    donor = os.path.join(nyxene_sources, "fblgit/una-cybertron-7b-v2")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert open(os.path.join(stage1[0], f), "rb").read() == open(os.path.join(donor, f), "rb").read()
    card = open(os.path.join(stage1[0], "README.md")).read()
    assert "passthrough" in card and "fblgit/una-cybertron-7b-v2" in card
    assert open(os.path.join(stage1[0], "mergekit_config.yml")).read() == open(STAGE1A).read()


def test_shard_layout_is_greedy_by_bytes_in_write_order(stage1):
    index = json.load(open(os.path.join(stage1[0], "model.safetensors.index.json")))
    files = sorted(glob.glob(os.path.join(stage1[0], "model-*.safetensors")))
    assert [os.path.basename(f) for f in files] == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    tensors = load_dir(stage1[0])
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # replay the greedy rule over the weight_map order: every boundary is where the next tensor
    # would have overflowed 6M
    names = list(index["weight_map"])
    shard, size = index["weight_map"][names[0]], 0
    for n in names:
        if index["weight_map"][n] != shard:
            assert size + sizes[n] > 6_000_000
            shard, size = index["weight_map"][n], 0
        size += sizes[n]
        assert size <= 6_000_000


def test_slerp_against_float64_reference_and_t_rules(stage1, tmp_path):
    out = str(tmp_path / "nyxene")
    models = {"loyal-piano-cybertron-11B": stage1[0], "Starling-NeuralHermes-11B": stage1[1]}
    report = nyxray.merge(SLERP, out, models=models, executor="local", progress=False)
    assert report["shards"] == 1 and os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    a, b, got = load_dir(stage1[0]), load_dir(stage1[1]), load_dir(out)

    def expect_t(name: str) -> float:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0.75
        if name == "model.norm.weight" or "layernorm" in name:
            return 0.5
        i = int(name.split(".")[2])
        f = i / 47
        return (1 - f) * 0.75 + f * 0.25 if "self_attn" in name else (1 - f) * 0.25 + f * 0.75

    for name, t in got.items():
        tt = expect_t(name)
        with pool_settings(math=True):  # one torch thread, as every executor's workers compute
            ref = slerp(a[name], b[name], tt, torch.bfloat16)
        assert torch.equal(t.view(torch.int16), ref.view(torch.int16)), name
        if name.endswith("q_proj.weight"):  # true SLERP branch: close to a float64 reference
            x, y = a[name].double().flatten(), b[name].double().flatten()
            th = torch.acos(torch.dot(x / x.norm(), y / y.norm()))
            r = (torch.sin((1 - tt) * th) * x + torch.sin(tt * th) * y) / torch.sin(th)
            assert (t.double().flatten() - r).norm() / r.norm() < 3e-3


def test_units_in_parallel_write_the_bytes_of_one_unit_at_a_time(tmp_path):
    """SLERP units side by side on the in-process pool's threads write the tensors one worker
    writes, and that one is mergekit --num-threads 1's file, while the caller runs torch on 2
    threads: the big pair's chunk sums split across threads (other bits) unless every worker keeps
    one torch thread for the pool's whole life, whatever the other units do meanwhile."""
    case = G.CASES_BY_NAME["slerp_threads_j1"]
    recipe = G.render_recipe(case, G.build_inputs(str(tmp_path / "models"), [G.BIG_NEAR]), {})
    if UNKNOWN:
        pytest.skip(UNKNOWN)
    golden = GOLDEN[case.name]  # mergekit's bytes under this process's CPU kernel set
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        nyxray.merge(recipe, one, executor="local", actors=1, progress=False, write_model_card=False)
        report = nyxray.merge(recipe, many, executor="local", actors=4, out_shard_size="8M", progress=False, write_model_card=False)
        assert torch.get_num_threads() == 2  # the caller's setting comes back
    finally:
        torch.set_num_threads(before)
    assert shard_hashes(one) == {"model.safetensors": golden["files"]["model.safetensors"]["sha256"]}
    assert report["shards"] >= 8 and len(report["actors"]) == 4 and sum(w["units"] for w in report["actors"]) == report["shards"]
    assert all(0 < w["hash_s"] < w["busy_s"] for w in report["actors"] if w["units"])  # the hashing share is measured
    a, b = load_dir(one), load_dir(many)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name


def test_fused_pipeline_equals_stages_run_one_by_one(nyxene_sources, stage1, tmp_path):
    staged = str(tmp_path / "staged")
    nyxray.merge(
        SLERP,
        staged,
        models={"loyal-piano-cybertron-11B": stage1[0], "Starling-NeuralHermes-11B": stage1[1]},
        executor="local",
        out_shard_size="6M",
        progress=False,
    )
    fused, inter = str(tmp_path / "fused"), str(tmp_path / "inter")
    report = nyxray.merge(PIPELINE, fused, models_root=nyxene_sources, executor="local", out_shard_size="6M", progress=False)
    assert shard_hashes(fused) == shard_hashes(staged)
    assert (
        json.load(open(os.path.join(fused, "model.safetensors.index.json")))["weight_map"]
        == json.load(open(os.path.join(staged, "model.safetensors.index.json")))["weight_map"]
    )
    # one pass over the sources: every needed byte once, nothing more; no intermediate written
    assert report["bytes_read_tensors"] == report["bytes_read_min"]
    assert sorted(os.listdir(tmp_path)) == ["fused", "staged"]
    # the phases partition the wall time; steady throughput counts only the run phase
    phases = report["timings_s"]
    assert set(phases) == {"plan", "start", "run", "commit"} and min(phases.values()) >= 0
    assert sum(phases.values()) <= report["wall_s"] + 0.01
    moved = report["bytes_read_tensors"] + report["bytes_written"]
    assert report["steady_throughput_mb_s"] == pytest.approx(moved / phases["run"] / 1e6, rel=0.01, abs=0.2)
    # with --intermediates the stages are written too, identical to running them alone
    nyxray.merge(PIPELINE, str(tmp_path / "fused2"), models_root=nyxene_sources, executor="local", out_shard_size="6M", intermediates=inter, progress=False)
    assert shard_hashes(os.path.join(inter, "loyal-piano-cybertron-11B")) == shard_hashes(stage1[0])
    assert shard_hashes(os.path.join(inter, "Starling-DPOHermes-11B")) == shard_hashes(stage1[1])


def test_card_as_written_stops_at_plan_time_with_a_suggestion(nyxene_sources, tmp_path, capsys):
    text = "".join(f"name: {n}\n" + open(p).read() + "---\n" for n, p in (("loyal-piano-cybertron-11B", STAGE1A), ("Starling-DPOHermes-11B", STAGE1B)))
    text += open(SLERP).read()
    recipe = tmp_path / "card.yml"
    recipe.write_text(text)
    out = tmp_path / "out"
    assert cli(["merge", str(recipe), str(out), "--models-root", nyxene_sources, "--executor", "local", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Starling-NeuralHermes-11B" in err and "did you mean 'Starling-DPOHermes-11B'" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_sigkill_midway_then_resume_is_identical_and_reads_less(nyxene_sources, tmp_path):
    ref = str(tmp_path / "ref")
    fresh = nyxray.merge(PIPELINE, ref, models_root=nyxene_sources, executor="local", out_shard_size="300K", progress=False)
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "nyxray.cli",
        "merge",
        PIPELINE,
        out,
        "--models-root",
        nyxene_sources,
        "--executor",
        "local",
        "--out-shard-size",
        "300K",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(finished_shards(out)) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the merge finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "nyxray-manifest.json"))
    assert not os.path.exists(os.path.join(out, "config.json"))  # nothing that looks like a model
    assert nyxray.verify(out)  # and verify says so
    resumed = nyxray.merge(PIPELINE, out, models_root=nyxene_sources, executor="local", out_shard_size="300K", progress=False)
    assert shard_hashes(out) == shard_hashes(ref)
    assert resumed["shards_reused"] >= 3
    assert resumed["bytes_read"] < fresh["bytes_read"]
    assert resumed["bytes_not_reread"] > 0
    assert nyxray.verify(out) == []
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files or state left


def test_verify_catches_one_flipped_byte(stage1, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(stage1[0], out)
    assert cli(["verify", out]) == 0
    shard = sorted(glob.glob(os.path.join(out, "model-*.safetensors")))[1]
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    assert cli(["verify", out]) == 1
    assert os.path.basename(shard) in capsys.readouterr().err


def test_rerun_of_complete_output_reads_nothing_and_repairs_damage(stage1, nyxene_sources):
    again = nyxray.merge(STAGE1A, stage1[0], models_root=nyxene_sources, executor="local", out_shard_size="6M", progress=False)
    assert again["already_complete"] and again["bytes_read_tensors"] == 0


def test_different_recipe_into_existing_output_is_refused(stage1, nyxene_sources, capsys):
    before = shard_hashes(stage1[1])
    rc = cli(["merge", STAGE1A, stage1[1], "--models-root", nyxene_sources, "--executor", "local", "--out-shard-size", "6M", "--quiet"])
    assert rc == 1 and "--overwrite" in capsys.readouterr().err
    assert shard_hashes(stage1[1]) == before


def test_plan_shows_stages_fusion_shards_reads_and_t(nyxene_sources, capsys):
    assert cli(["plan", PIPELINE, "--models-root", nyxene_sources, "--out-shard-size", "6M"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "loyal-piano-cybertron-11B: passthrough",
        "fused:  read 37.6 MB, write 18.8 MB",
        "staged: read 75.2 MB, write 56.5 MB",
        "model-00004-of-00004.safetensors",
        "fblgit/una-cybertron-7b-v2: 9.4 MB",
        "model.layers.*.self_attn.q_proj.weight: t = 0.25 .. 0.75 (varies by layer)  [parameters.t[2]]",
        "model.norm.weight: t = 0.5  [parameters.t[6]]",
        "filter 'modelnorm' matches no tensor",
    ):
        assert needle in text, needle


def test_cli_summary_states_the_phases(nyxene_sources, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli(["merge", STAGE1A, out, "--models-root", nyxene_sources, "--executor", "local", "--out-shard-size", "6M", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^time: plan \d+\.\ds, start-up \d+\.\ds, run \d+\.\ds \([\d.]+ MB/s\), commit \d+\.\ds$", text, re.M), text


def test_auto_runs_in_process_without_ray_and_says_why(stage1, tmp_path):
    """With no cluster named, the default executor runs here: Ray is never imported (its import and
    start-up cost seconds), and the report and the CLI summary say which executor ran and why."""
    out = str(tmp_path / "out")
    code = "import json, sys; from nyxray.cli import main; rc = main(sys.argv[1:]); print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules}))"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "merge",
            SLERP,
            out,
            "--model",
            f"loyal-piano-cybertron-11B={stage1[0]}",
            "--model",
            f"Starling-NeuralHermes-11B={stage1[1]}",
            "--quiet",
            "--report",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert json.loads(lines[-1]) == {"rc": 0, "ray": False}
    assert "executor: local (no Ray cluster named" in run.stdout
    report = json.load(open(tmp_path / "r.json"))
    assert report["executor"]["name"] == "local" and "no Ray cluster named" in report["executor"]["why"]
