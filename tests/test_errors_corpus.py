"""Every bad input a user can hand nyxray, through the CLI: a non-zero exit, one line on stderr
naming the culprit (recipe key path, file or tensor), and nothing written to the output.

Covers the error table of mergekit-semantics §9 (nyxray reports all of it at plan time) plus
nyxray's stricter rules: hostile model files, pickle checkpoints, foreign outputs, credentials.
"""

from __future__ import annotations

import builtins
import glob
import hashlib
import json
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from nyxray import cli
from nyxray.demo.synthetic import ModelShape, make_model

SMALL = ModelShape(hidden=32, intermediate=64, layers=4, vocab=512)
SHARD_BYTES = 40_000  # four shards and an index for SMALL
SHARD2 = "model-00002-of-00004.safetensors"
SECRET = "nyxray-test-Secret-9f8e7d6c5b4a"


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path) -> str:
    """A models root with three small models a, b, c (four shards each, with an index)."""
    r = tmp_path / "models"
    for seed, name in enumerate("abc", start=1):
        make_model(str(r / name), SMALL, seed=seed, shard_bytes=SHARD_BYTES)
    return str(r)


def model(root: str, name: str, shape: ModelShape = SMALL, seed: int = 7) -> str:
    return make_model(os.path.join(root, name), shape, seed=seed, shard_bytes=SHARD_BYTES)


def recipe(tmp_path, text: str, name: str = "r.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def slerp(ra="[0, 4]", rb="[0, 4]", a="a", b="b", base="base_model: a", t="  t: 0.5") -> str:
    return (
        f"slices:\n  - sources:\n      - model: {a}\n        layer_range: {ra}\n      - model: {b}\n        layer_range: {rb}\n"
        f"merge_method: slerp\n{base}\nparameters:\n{t}\ndtype: bfloat16\n"
    )


def only(name: str) -> str:
    return f"models:\n  - model: {name}\nmerge_method: passthrough\n"


def tree_hashes(path: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(list(args))
    return rc, capsys.readouterr().err


def fails(capsys, args: list[str], *culprits: str) -> str:
    """Run the CLI; assert a non-zero exit and one error line holding every culprit string."""
    rc, err = run_cli(capsys, *args)
    assert rc != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("nyxray: error: "), line
    for c in culprits:
        assert c in line, f"{c!r} not in {line!r}"
    return line


def merge_fails(capsys, tmp_path, recipe_path: str, root: str, *culprits: str, extra: tuple[str, ...] = ()) -> str:
    """`nyxray merge` must fail naming the culprits and leave no output behind, both into a fresh
    location and into an existing directory that holds a user's file."""
    out = str(tmp_path / "out")
    args = ["merge", recipe_path, out, "--executor", "local", "--quiet", "--models-root", root, *extra]
    line = fails(capsys, args, *culprits)
    assert not os.path.exists(out), os.listdir(out)
    kept = tmp_path / "kept"
    kept.mkdir(exist_ok=True)
    (kept / "mine.txt").write_text("the user's notes")
    before = tree_hashes(str(kept))
    args[2] = str(kept)
    assert fails(capsys, args, *culprits) == line
    assert tree_hashes(str(kept)) == before
    assert sorted(os.listdir(kept)) == ["mine.txt"]
    return line


# -- recipe errors (semantics §9), found at plan time -------------------------------------------


RECIPE_CASES = {
    "layer_range beyond the model": (slerp(ra="[0, 5]", rb="[0, 5]"), ["slices[0].sources[0].layer_range", "[0, 5]", "beyond", "4 layers"]),
    "layer_range reversed": (slerp(ra="[3, 1]"), ["slices[0].sources[0].layer_range", "[3, 1] is reversed"]),
    "layer_range not integers": (slerp(rb="[0, 4.5]"), ["slices[0].sources[1].layer_range", "two integers"]),
    "sources of different lengths": (slerp(ra="[0, 3]"), ["slices[0].sources", "same number of layers", "[3, 4]"]),
    "passthrough with 2 sources": (
        slerp(base="").replace("slerp", "passthrough").replace("parameters:\n  t: 0.5\n", ""),
        ["slices[0].sources", "passthrough takes exactly one source", "got 2"],
    ),
    "slerp with 3 sources": (
        slerp().replace("merge_method", "      - model: c\n        layer_range: [0, 4]\nmerge_method"),
        ["slices[0].sources", "exactly two sources", "got 3"],
    ),
    "slerp without base_model": (slerp(base=""), ["base_model", "slerp needs a base_model"]),
    "slerp base not in the slice": (slerp(base="base_model: c"), ["slices[0].sources", "base model 'c' must be one of"]),
    "filter matches nothing, no fallback": (
        slerp(t="  t:\n    - filter: self_attn\n      value: 0.5"),
        ["parameters.t", "missing required parameter t for model.embed_tokens.weight"],
    ),
    "unknown merge method": (slerp().replace("merge_method: slerp", "merge_method: lineer"), ["merge_method", "'lineer'", "did you mean 'linear'"]),
    "t per source": (
        slerp().replace("      - model: b\n", "      - model: b\n        parameters: {t: 0.2}\n"),
        ["slices[0].sources[1].parameters.t", "not per source"],
    ),
    "missing model": (slerp(b="nobody"), ["slices[0].sources[1].model", "'nobody'"]),
    "tokenizer: padding": (slerp() + "tokenizer: {source: union, pad_to_multiple_of: -8}\n", ["tokenizer.pad_to_multiple_of", "positive integer"]),
    "pipeline: stage used by itself": (
        "name: s\nmerge_method: passthrough\nslices:\n  - sources:\n    - model: s\n      layer_range: [0, 4]\n---\n" + only("s"),
        ["slices[0].sources[0].model", "stage 's'"],
    ),
    "not YAML": ("slices: [\n", ["r.yml", "not valid YAML"]),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_recipe_errors(case, capsys, tmp_path, root):
    text, culprits = RECIPE_CASES[case]
    merge_fails(capsys, tmp_path, recipe(tmp_path, text), root, "r.yml", *culprits)


def test_a_misspelt_key_is_a_warning_and_strict_refuses_it(capsys, tmp_path, root):
    """mergekit ignores unknown keys, so a merge goes on, naming the key; --strict refuses it."""
    path = recipe(tmp_path, slerp().replace("dtype:", "dtpye:"))
    merge_fails(capsys, tmp_path, path, root, "r.yml", "dtpye", "did you mean 'dtype'", "strict", extra=("--strict",))
    capsys.readouterr()
    assert cli.main(["merge", path, str(tmp_path / "lenient"), "--executor", "local", "--quiet", "--models-root", root]) == 0
    summary = capsys.readouterr().out
    assert "r.yml: dtpye: unknown key" in summary and "did you mean 'dtype'" in summary, summary


def test_plan_command_reports_the_same(capsys, tmp_path, root):
    line = fails(capsys, ["plan", recipe(tmp_path, slerp(ra="[0, 5]", rb="[0, 5]")), "--models-root", root], "slices[0].sources[0].layer_range", "beyond")
    assert "Traceback" not in line


def test_missing_required_tensor(capsys, tmp_path, root):
    path = os.path.join(root, "b")
    shard = os.path.join(path, SHARD2)
    tensors = load_file(shard)
    victim = sorted(tensors)[0]
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    del index["weight_map"][victim]
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    merge_fails(capsys, tmp_path, recipe(tmp_path, slerp()), root, f"tensor {victim!r} required but not present in model 'b'")


def test_mixed_architectures_need_allow_crimes(capsys, tmp_path, root):
    cfg_path = os.path.join(root, "b", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    r = recipe(tmp_path, slerp())
    merge_fails(capsys, tmp_path, r, root, "LlamaForCausalLM", "MistralForCausalLM", "--allow-crimes")
    rc, err = run_cli(capsys, "plan", r, "--models-root", root, "--allow-crimes")
    assert rc == 0, err


def test_vocabulary_mismatch(capsys, tmp_path, root):
    model(root, "v", ModelShape(hidden=32, intermediate=64, layers=4, vocab=520))
    r = recipe(tmp_path, slerp(b="v"))
    merge_fails(capsys, tmp_path, r, root, "model.embed_tokens.weight", "[512, 32]", "[520, 32]", "--unsafe-truncate-embeddings")
    out = str(tmp_path / "truncated")
    rc, err = run_cli(capsys, "merge", r, out, "--executor", "local", "--quiet", "--models-root", root, "--unsafe-truncate-embeddings")
    assert rc == 0, err
    merged = load_file(os.path.join(out, "model.safetensors"))
    assert merged["model.embed_tokens.weight"].shape == (512, 32)
    assert merged["lm_head.weight"].shape == (512, 32)
    assert merged["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)


# -- hostile model files -------------------------------------------------------------------------


def _rewrite_header(path: str, change) -> None:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _tensors(header: dict) -> list[str]:
    """Tensor names of a header in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _set_length(path: str, n: int) -> None:
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", n))


def _patch(path: str, old: bytes, new: bytes) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert old in data and len(old) == len(new)
    with open(path, "wb") as f:
        f.write(data.replace(old, new, 1))


def _overlap(h: dict) -> None:
    same = [k for k in _tensors(h) if h[k]["shape"] == [32, 32]]  # q_proj and o_proj of a layer
    h[same[1]]["data_offsets"] = list(h[same[0]]["data_offsets"])


def _gap(h: dict) -> None:
    del h[_tensors(h)[1]]


def _shape(h: dict) -> None:
    name = next(k for k in _tensors(h) if h[k]["shape"] == [32, 32])
    h[name]["shape"] = [32, 31]


def _replace_header(path: str, raw: bytes) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)


def _deep_json(path: str) -> None:
    _replace_header(path, b"[" * 100_000 + b"]" * 100_000)


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 10)


def _append(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 16)


HOSTILE_SHARDS = {
    "header length beyond the file": (lambda p: _set_length(p, os.path.getsize(p)), "runs past the end"),
    "header length over 100 MB": (lambda p: _set_length(p, 200_000_000), "over the 100000000-byte limit"),
    "header length over 2**63": (lambda p: _set_length(p, 2**64 - 1), "over the 100000000-byte limit"),
    "malformed JSON": (lambda p: _patch(p, b'{"', b"{{"), "malformed safetensors header"),
    "header not an object": (lambda p: _replace_header(p, b"[]      "), "not a JSON object"),
    "deeply nested JSON": (_deep_json, "malformed safetensors header"),
    "unknown dtype": (lambda p: _patch(p, b'"BF16"', b'"BX16"'), "unknown dtype 'BX16'"),
    "dtype not a string": (lambda p: _rewrite_header(p, lambda h: h[_tensors(h)[0]].update(dtype=["BF16"])), "unknown dtype ['BF16']"),
    "negative shape": (lambda p: _rewrite_header(p, lambda h: h[_tensors(h)[0]].update(shape=[-32, -64])), "not a list of non-negative integers"),
    "offsets reversed": (lambda p: _rewrite_header(p, lambda h: h[_tensors(h)[0]].update(data_offsets=[8, 0])), "not an ordered pair"),
    "overlapping offsets": (lambda p: _rewrite_header(p, _overlap), "overlaps the previous tensor"),
    "gap between tensors": (lambda p: _rewrite_header(p, _gap), "leaves a gap before it"),
    "offsets past the end (truncated)": (_truncate, "runs past the end of the file (truncated?)"),
    "bytes after the last tensor": (_append, "bytes after the last tensor"),
    "offsets disagree with the shape": (lambda p: _rewrite_header(p, _shape), "but shape [32, 31] of BF16 needs"),
    "metadata not strings": (lambda p: _rewrite_header(p, lambda h: h.update(__metadata__={"format": 1})), "__metadata__"),
    "extra header field": (lambda p: _rewrite_header(p, lambda h: h[_tensors(h)[0]].update(evil=1)), "exactly dtype, shape and data_offsets"),
    "empty file": (lambda p: os.truncate(p, 0), "not a safetensors file (only 0 bytes)"),
    "absurd shape": (lambda p: _rewrite_header(p, lambda h: h[_tensors(h)[0]].update(shape=[10**30, 1])), "data_offsets span"),
}


@pytest.mark.parametrize("case", HOSTILE_SHARDS)
def test_hostile_shard(case, capsys, tmp_path, root):
    corrupt, words = HOSTILE_SHARDS[case]
    path = model(root, "h")
    corrupt(os.path.join(path, SHARD2))
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "models[0].model", f"{path}/{SHARD2}", words)


def test_hostile_header_with_a_5000_digit_integer(capsys, tmp_path, root):
    path = model(root, "h")
    shard = os.path.join(path, SHARD2)
    with open(shard, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + n].replace(b'"shape":[', b'"shape":[' + b"9" * 5000 + b",", 1)
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, f"{path}/{SHARD2}", "malformed safetensors header")


def _index(path: str, change) -> None:
    ipath = os.path.join(path, "model.safetensors.index.json")
    with open(ipath) as f:
        index = json.load(f)
    change(index)
    with open(ipath, "w") as f:
        json.dump(index, f)


def test_index_path_escape(capsys, tmp_path, root):
    path = model(root, "h")
    # a perfectly valid shard outside the model's directory: it must not be read
    evil_dir = os.path.join(root, "elsewhere")
    make_model(evil_dir, SMALL, seed=9, shard_bytes=SHARD_BYTES)
    escape = f"../elsewhere/{SHARD2}"
    _index(path, lambda ix: ix["weight_map"].update({k: escape for k, v in ix["weight_map"].items() if v == SHARD2}))
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "model.safetensors.index.json", repr(escape), "not a plain .safetensors file name")
    _index(path, lambda ix: ix["weight_map"].update({k: f"{evil_dir}/{SHARD2}" for k, v in ix["weight_map"].items() if escape in v}))
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "model.safetensors.index.json", "not a plain .safetensors file name")


def test_index_names_a_missing_shard(capsys, tmp_path, root):
    path = model(root, "h")
    os.rename(os.path.join(path, SHARD2), os.path.join(path, "moved.safetensors"))
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "'h'", "do not exist", SHARD2)


def test_index_without_weight_map(capsys, tmp_path, root):
    path = model(root, "h")
    _index(path, lambda ix: ix.pop("weight_map"))
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "model.safetensors.index.json", "no weight_map")


def test_index_and_header_disagree(capsys, tmp_path, root):
    path = model(root, "h")
    _index(path, lambda ix: ix["weight_map"].update({"model.layers.0.mlp.up_proj.weight": "model-00004-of-00004.safetensors"}))
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "'model.layers.0.mlp.up_proj.weight'", "model-00004-of-00004.safetensors", "lacks it")


class _Bomb:
    """Unpickling this writes a marker file: proof that someone loaded the pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('loaded')",))


def test_pickle_checkpoints_are_refused_unopened(capsys, tmp_path, root, monkeypatch):
    path = model(root, "h")
    for f in glob.glob(os.path.join(path, "model*.safetensors*")):
        os.remove(f)
    marker = str(tmp_path / "unpickled")
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(_Bomb(marker), f)
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if str(file).endswith(".bin"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "'h'", "pytorch_model.bin", "pickle", "refuses")
    assert opened == [] and not os.path.exists(marker)


def test_config_malformed(capsys, tmp_path, root):
    path = model(root, "h")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"architectures": ["MistralForCausalLM"], ')
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "models[0].model", f"{path}/config.json", "not valid JSON")


def test_config_deeply_nested(capsys, tmp_path, root):
    path = model(root, "h")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, f"{path}/config.json", "not valid JSON")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c.pop("architectures"), "no 'architectures' list"),
        (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "n_layer is None"),  # a declared family whose config lacks its key
        (lambda c: c.update(num_hidden_layers="4"), "num_hidden_layers is '4'"),
        (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers is 0"),
        # the planner walks every layer the config claims: an absurd count must stop at load time
        (lambda c: c.update(num_hidden_layers=10**8), "num_hidden_layers=100000000"),
    ],
)
def test_config_contents(change, words, capsys, tmp_path, root):
    path = model(root, "h")
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    change(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    started = time.monotonic()
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "'h'", words)
    assert time.monotonic() - started < 10


def test_missing_config(capsys, tmp_path, root):
    path = model(root, "h")
    os.remove(os.path.join(path, "config.json"))
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "models[0].model", "'h'", "no config.json")


def test_no_weights_at_all(capsys, tmp_path, root):
    path = model(root, "h")
    for f in glob.glob(os.path.join(path, "model*.safetensors*")):
        os.remove(f)
    merge_fails(capsys, tmp_path, recipe(tmp_path, only("h")), root, "'h'", "no model.safetensors")


def test_hostile_file_through_the_real_entry_point(tmp_path, root):
    path = model(root, "h")
    _patch(os.path.join(path, SHARD2), b'"BF16"', b'"BX16"')
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "nyxray.cli", "merge", recipe(tmp_path, only("h")), out, "--executor", "local", "--quiet", "--models-root", root],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert SHARD2 in proc.stderr and "BX16" in proc.stderr
    assert not os.path.exists(out)


# -- outputs -------------------------------------------------------------------------------------


def test_foreign_output_is_refused(capsys, tmp_path, root):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\1\2\3")
    before = tree_hashes(str(out))
    args = ["merge", recipe(tmp_path, slerp()), str(out), "--executor", "local", "--quiet", "--models-root", root]
    fails(capsys, args, str(out), "thesis.tex", "--overwrite")
    assert tree_hashes(str(out)) == before
    assert sorted(os.listdir(out)) == ["sub", "thesis.tex"]
    rc, err = run_cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    after = tree_hashes(str(out))
    assert {k: after[k] for k in before} == before  # --overwrite writes the model beside the user's files
    assert "nyxray-manifest.json" in after


def test_other_recipes_output_is_refused(capsys, tmp_path, root):
    out = str(tmp_path / "out")
    rc, err = run_cli(capsys, "merge", recipe(tmp_path, slerp()), out, "--executor", "local", "--quiet", "--models-root", root)
    assert rc == 0, err
    before = tree_hashes(out)
    fails(
        capsys,
        ["merge", recipe(tmp_path, slerp(t="  t: 0.25"), "r2.yml"), out, "--executor", "local", "--quiet", "--models-root", root],
        out,
        "different recipe",
        "--overwrite",
    )
    assert tree_hashes(out) == before


def test_refused_output_writes_no_intermediates(capsys, tmp_path, root):
    stage = "name: {n}\nmerge_method: passthrough\nslices:\n  - sources:\n      - model: {m}\n        layer_range: [0, 4]\n"
    text = stage.format(n="one", m="a") + "---\n" + stage.format(n="two", m="b") + "---\n" + slerp(a="one", b="two", base="base_model: one")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    inter = tmp_path / "inter"
    fails(
        capsys,
        ["merge", recipe(tmp_path, text), str(out), "--intermediates", str(inter), "--executor", "local", "--quiet", "--models-root", root],
        "notes.txt",
        "--overwrite",
    )
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert not inter.exists() or tree_hashes(str(inter)) == {}, tree_hashes(str(inter))


# -- command line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model", "a"], ["--model 'a'", "NAME=URL"]),
        (["--out-shard-size", "5Q"], ["--out-shard-size '5Q'"]),
        (["--storage-option", "endpoint_url"], ["--storage-option 'endpoint_url'", "KEY=VALUE"]),
        (["--device", "tpu"], ["device 'tpu'"]),
    ],
)
def test_bad_options(extra, words, capsys, tmp_path, root):
    merge_fails(capsys, tmp_path, recipe(tmp_path, slerp()), root, *words, extra=tuple(extra))


def test_missing_recipe_file(capsys, tmp_path, root):
    merge_fails(capsys, tmp_path, str(tmp_path / "nope.yml"), root, "nope.yml", "cannot read recipe file")


# -- credentials ---------------------------------------------------------------------------------


def test_unreachable_s3_names_the_url_and_hides_the_secret(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANYXRAYTESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = "s3://nyxray-bucket/org/model"
    out = str(tmp_path / "out")
    options = ["--storage-option", f"endpoint_url=http://127.0.0.1:{port}", "--storage-option", "config_kwargs.retries.max_attempts=1"]
    started = time.monotonic()
    line = fails(capsys, ["merge", recipe(tmp_path, only(url)), out, "--executor", "local", "--quiet", *options], "r.yml", "models[0].model", url, "127.0.0.1")
    elapsed = time.monotonic() - started
    assert SECRET not in line and SECRET[:12] not in line
    assert not os.path.exists(out)
    assert elapsed < 20, elapsed  # nyxray's own retries back off for several seconds

    # the same secret given as a storage option (s3fs's key/secret) stays out of the message too
    second = SECRET[::-1]
    line = fails(
        capsys,
        [
            "merge",
            recipe(tmp_path, only(url)),
            out,
            "--executor",
            "local",
            "--quiet",
            *options,
            "--storage-option",
            "key=AKIANYXRAYTESTKEY",
            "--storage-option",
            f"secret={second}",
        ],
        url,
    )
    assert second not in line and SECRET not in line
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"keep_actors": -1}, "keep_actors=-1: expected seconds >= 0"),
        ({"keep_actors": 30, "executor": "local"}, "only the ray executor"),
        ({"actors": 0}, "actors=0: expected at least 1"),
    ],
)
def test_bad_execution_arguments_fail_before_any_model_is_opened(kwargs, words, tmp_path):
    import nyxray
    from nyxray.errors import NyxrayError

    kwargs.setdefault("executor", "ray")
    with pytest.raises(NyxrayError, match=re.escape(words)):
        nyxray.merge(recipe(tmp_path, slerp()), str(tmp_path / "out"), models_root=str(tmp_path / "no-such-root"), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
