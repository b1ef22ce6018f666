"""Hugging Face repo ids (``org/name``, ``org/name@revision``) resolved from a local hub cache in
offline mode (HF_HUB_OFFLINE=1, set by conftest): no network, same bytes as a plain directory."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil

import pytest

import nyxray
from nyxray.errors import NyxrayError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1A = os.path.join(REPO, "recipes", "loyal-piano-cybertron-11B.yml")
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(nyxene_sources, tmp_path, monkeypatch):
    """A hand-made hub cache (models--org--name/snapshots/<sha>, refs/main) of two source models."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    for repo in ("fblgit/una-cybertron-7b-v2", "chargoddard/loyal-piano-m7-cdpo"):
        base = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(os.path.join(nyxene_sources, repo), base / "snapshots" / SHA)
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def hashes(path: str) -> dict[str, str]:
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in glob.glob(os.path.join(path, "*.safetensors"))}


def test_repo_ids_resolve_from_the_offline_cache(hub_cache, nyxene_sources, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # repo ids must not be mistaken for local paths
    from_hub = str(tmp_path / "hub-out")
    nyxray.merge(STAGE1A, from_hub, executor="local", out_shard_size="6M", progress=False)
    from_dir = str(tmp_path / "dir-out")
    nyxray.merge(STAGE1A, from_dir, models_root=nyxene_sources, executor="local", out_shard_size="6M", progress=False)
    assert hashes(from_hub) and hashes(from_hub) == hashes(from_dir)


OLD = "89abcdef0123456789abcdef0123456789abcdef"  # an older snapshot, not what refs/main names


@pytest.fixture
def two_snapshots(hub_cache, nyxene_sources):
    """fblgit/una-cybertron-7b-v2 gains snapshot OLD holding other weights (loyal-piano's); main stays SHA."""
    base = hub_cache / "models--fblgit--una-cybertron-7b-v2"
    shutil.copytree(os.path.join(nyxene_sources, "chargoddard/loyal-piano-m7-cdpo"), base / "snapshots" / OLD)
    assert (base / "refs" / "main").read_text() == SHA
    return hub_cache


def test_pinned_revision_reads_that_snapshot_not_main(two_snapshots, nyxene_sources, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    una = "fblgit/una-cybertron-7b-v2"
    recipe = f"models:\n  - model: {una}@{OLD}\nmerge_method: passthrough\ndtype: bfloat16\n"
    p = nyxray.plan(recipe, out_shard_size="6M")
    assert list(p.sources) == [f"{una}@{OLD}"]
    pinned, main, old = (str(tmp_path / n) for n in ("pinned", "main", "old"))
    nyxray.merge(recipe, pinned, executor="local", out_shard_size="6M", progress=False)
    nyxray.merge(recipe.replace(f"@{OLD}", ""), main, executor="local", out_shard_size="6M", progress=False)
    nyxray.merge(
        recipe.replace(f"@{OLD}", ""),
        old,
        models={una: os.path.join(nyxene_sources, "chargoddard/loyal-piano-m7-cdpo")},
        executor="local",
        out_shard_size="6M",
        progress=False,
    )
    assert hashes(pinned) == hashes(old) != hashes(main)


def test_pinned_revision_with_models_root_is_refused_naming_it(two_snapshots, nyxene_sources, tmp_path):
    recipe = open(STAGE1A).read().replace("una-cybertron-7b-v2\n", f"una-cybertron-7b-v2@{OLD}\n")
    out = tmp_path / "out"
    with pytest.raises(NyxrayError, match=rf"una-cybertron-7b-v2@{OLD}.*--models-root.*revision.*--model"):
        nyxray.merge(recipe, str(out), models_root=nyxene_sources, executor="local", out_shard_size="6M", progress=False)
    assert not out.exists()
    # mapped explicitly, the pinned name is honoured (--model wins over --models-root)
    mapped = {f"fblgit/una-cybertron-7b-v2@{OLD}": os.path.join(nyxene_sources, "fblgit/una-cybertron-7b-v2")}
    p = nyxray.plan(recipe, models=mapped, models_root=nyxene_sources, out_shard_size="6M")
    assert f"fblgit/una-cybertron-7b-v2@{OLD}" in p.sources


def test_repo_missing_from_the_cache_is_a_clear_error(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = open(STAGE1A).read().replace("fblgit/una-cybertron-7b-v2", "nobody/not-cached")
    with pytest.raises(NyxrayError, match=r"nobody/not-cached.*HF_HUB_OFFLINE"):
        nyxray.plan(recipe)
