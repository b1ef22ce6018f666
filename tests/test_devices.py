"""``--cuda`` / ``--device cuda[:N]`` on a machine without CUDA (this one): one clear error line,
before the output is touched (no ``.nyxray`` folder, nothing rewritten), on every executor and for
sweeps; a re-run over reusable shards fails the same way instead of reporting a device it never
checked."""

from __future__ import annotations

import os

import pytest
import torch

import nyxray
from nyxray.cli import main as cli
from nyxray.errors import NyxrayError

if torch.cuda.is_available():  # pragma: no cover - the point is a machine without CUDA
    pytest.skip("this machine has CUDA", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1A = os.path.join(REPO, "recipes", "loyal-piano-cybertron-11B.yml")


def tree(path: str) -> dict[str, int]:
    """mtime_ns of every file under ``path`` (empty when it does not exist)."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            out[os.path.relpath(os.path.join(d, f), path)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return out


@pytest.mark.parametrize("flags", [["--cuda"], ["--device", "cuda"], ["--device", "cuda:1"]])
def test_cuda_without_cuda_is_one_clear_line_and_creates_nothing(nyxene_sources, tmp_path, capsys, flags):
    out = str(tmp_path / "out")
    rc = cli(["merge", STAGE1A, out, "--models-root", nyxene_sources, "--executor", "local", "--quiet", *flags])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("nyxray: error: device 'cuda") and "no CUDA device" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(out)  # no .nyxray folder, nothing at all


def test_rerun_over_reusable_shards_checks_the_device_too(nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    done = nyxray.merge(STAGE1A, out, models_root=nyxene_sources, executor="local", device="cpu", out_shard_size="6M", progress=False)
    assert {w["device"] for w in done["actors"]} == {"cpu"}  # one worker per core
    before = tree(out)
    with pytest.raises(NyxrayError, match="no CUDA device"):
        nyxray.merge(STAGE1A, out, models_root=nyxene_sources, executor="local", device="cuda", out_shard_size="6M", progress=False)
    assert tree(out) == before  # the complete output is untouched: no state, no rewrite


def test_sweep_with_cuda_creates_nothing(nyxene_sources, tmp_path):
    sweep = tmp_path / "sweep.yml"
    sweep.write_text(f"members:\n  - {{name: a, recipe: {STAGE1A}}}\n")
    out = str(tmp_path / "out")
    with pytest.raises(NyxrayError, match="no CUDA device"):
        nyxray.sweep(str(sweep), out, models_root=nyxene_sources, executor="local", device="cuda", progress=False)
    assert not os.path.exists(out)


def test_ray_cluster_without_gpu_fails_before_the_output_is_claimed(ray_cluster, nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(NyxrayError, match="no CUDA device in the Ray cluster"):
        nyxray.merge(STAGE1A, out, models_root=nyxene_sources, executor="ray", device="cuda", out_shard_size="6M", progress=False)
    assert not os.path.exists(out)
