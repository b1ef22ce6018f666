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


def test_pinned_revision_resolves(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = open(STAGE1A).read().replace("una-cybertron-7b-v2\n", f"una-cybertron-7b-v2@{SHA}\n")
    p = nyxray.plan(recipe, out_shard_size="6M")
    assert any(m.startswith("fblgit/una-cybertron-7b-v2@") for m in p.sources)


def test_repo_missing_from_the_cache_is_a_clear_error(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = open(STAGE1A).read().replace("fblgit/una-cybertron-7b-v2", "nobody/not-cached")
    with pytest.raises(NyxrayError, match=r"nobody/not-cached.*HF_HUB_OFFLINE"):
        nyxray.plan(recipe)
