"""Repair of a damaged complete output, on local files and on a real S3 server: a byte flipped in a
shard, a shard deleted, a shard truncated. Re-running the same command rewrites exactly the damaged
shards (the others keep their bytes and, locally, their very files), and from the moment the repair
starts until it commits the output is not a model: no manifest, no index, no config.json, and
``verify`` says so. An intact complete output is left untouched."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import threading
import time

import pytest
import s3fs

import nyxray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1A = os.path.join(REPO, "recipes", "loyal-piano-cybertron-11B.yml")
SHARD = "1M"
MANIFEST = "nyxray-manifest.json"


def merge(out: str, src: str, **kw):
    return nyxray.merge(STAGE1A, out, models_root=src, executor="local", device="cpu", out_shard_size=SHARD, progress=False, **kw)


def shards(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "model-*.safetensors")))


def digests(path: str) -> dict[str, str]:
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in shards(path)}


def flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


DAMAGE = {
    "flip": lambda data: flip(data),
    "truncate": lambda data: data[: len(data) - 1000],
    "delete": lambda data: None,
}


@pytest.fixture(scope="module")
def reference(nyxene_sources, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("repair") / "ref")
    merge(out, nyxene_sources)
    assert len(shards(out)) >= 4
    return out


def damage_local(path: str, how: str) -> None:
    data = open(path, "rb").read()
    new = DAMAGE[how](data)
    if new is None:
        os.unlink(path)
    else:
        with open(path, "r+b") as f:  # in place, as disk rot would
            f.write(new)
            f.truncate(len(new))


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_local_repair_rewrites_only_the_damaged_shard(reference, nyxene_sources, tmp_path, how):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    victim = shards(out)[2]
    damage_local(victim, how)
    assert nyxray.verify(out)  # damaged
    others = {f: os.stat(f) for f in shards(out) if f != victim}
    report = merge(out, nyxene_sources)
    assert digests(out) == digests(reference)
    assert report["shards_reused"] == report["shards"] - 1 and not report["already_complete"]
    assert report["bytes_written"] == os.path.getsize(victim)
    for f, st in others.items():  # the intact shards are the very same files, untouched
        now = os.stat(f)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
    assert nyxray.verify(out) == []
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # no state, lease or temp file left


def test_intact_output_is_left_untouched(reference, nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    report = merge(out, nyxene_sources)
    assert report["already_complete"] and report["bytes_written"] == 0 and report["bytes_read_tensors"] == 0
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == before


def test_local_missing_config_is_repaired_without_rewriting_shards(reference, nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    os.unlink(os.path.join(out, "config.json"))
    report = merge(out, nyxene_sources)
    assert report["bytes_written"] == 0 and report["shards_reused"] == report["shards"]
    assert nyxray.verify(out) == [] and os.path.exists(os.path.join(out, "config.json"))


# -- S3 ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_src(s3_server, nyxene_sources):
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    for repo in ("fblgit/una-cybertron-7b-v2", "chargoddard/loyal-piano-m7-cdpo"):
        fs.put(os.path.join(nyxene_sources, repo), f"nyx/repair-mirror/{repo}", recursive=True)
    return "s3://nyx/repair-mirror"


def s3_merge(out: str, src: str, opts: dict):
    return nyxray.merge(STAGE1A, out, models_root=src, storage_options=opts, executor="local", device="cpu", out_shard_size=SHARD, progress=False)


def test_s3_repair_of_three_damages_rewrites_exactly_those(s3_server, s3_src, s3_bucket, reference):
    opts = s3_server.storage_options
    out = f"s3://{s3_bucket}/out"
    s3_merge(out, s3_src, opts)
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    names = [os.path.basename(f) for f in shards(reference)]
    victims = dict(zip(sorted(DAMAGE), names[1:4]))
    for how, name in victims.items():
        new = DAMAGE[how](fs.cat_file(f"{s3_bucket}/out/{name}"))
        if new is None:
            fs.rm_file(f"{s3_bucket}/out/{name}")
        else:
            fs.pipe_file(f"{s3_bucket}/out/{name}", new)
    assert len(nyxray.verify(out, opts)) == 3
    etags = {n: fs.info(f"{s3_bucket}/out/{n}", refresh=True)["ETag"] for n in names if n not in victims.values()}
    report = s3_merge(out, s3_src, opts)
    assert report["shards_reused"] == report["shards"] - 3
    assert report["bytes_written"] == sum(os.path.getsize(os.path.join(reference, n)) for n in victims.values())
    fs.invalidate_cache()
    assert {n: fs.info(f"{s3_bucket}/out/{n}", refresh=True)["ETag"] for n in etags} == etags  # intact shards not rewritten
    assert {n: hashlib.sha256(fs.cat_file(f"{s3_bucket}/out/{n}")).hexdigest() for n in names} == digests(reference)
    assert nyxray.verify(out, opts) == []
    assert s3_server.list_pending_uploads(s3_bucket) == []


def test_s3_output_is_not_a_model_from_repair_start_to_commit(s3_server, s3_src, s3_bucket, fault_proxy):
    """Source reads go through a proxy that delays each by 1 s, which holds the repair open; the proxy
    also logs every request in order, so the test sees the manifest go before any shard is written."""
    opts = s3_server.storage_options
    out = f"s3://{s3_bucket}/out"
    s3_merge(out, s3_src, opts)
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    victim = sorted(p for p in fs.ls(f"{s3_bucket}/out") if p.endswith(".safetensors"))[1]
    fs.pipe_file(victim, flip(fs.cat_file(victim)))
    proxy = fault_proxy(delay_share=1.0, delay_s=1.0, match=lambda r: r.method == "GET" and "/repair-mirror/" in r.path and "range" in r.headers)
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(report=s3_merge(out, s3_src, s3_server.storage_options_for(proxy.endpoint_url))))
    th.start()
    seen = []  # while the damaged shard is not rewritten: (verify says incomplete, no config.json, no index)
    while th.is_alive():
        fs.invalidate_cache()
        if not fs.exists(victim):  # removed by the repair's invalidation, not yet rewritten
            problems = nyxray.verify(out, opts)
            seen.append(
                (
                    bool(problems) and "incomplete" in problems[0],
                    *(not fs.exists(f"{s3_bucket}/out/{f}") for f in ("config.json", "model.safetensors.index.json")),
                )
            )
        time.sleep(0.1)
    th.join()
    assert "report" in box, "the repair failed"
    assert len(seen) >= 3 and all(all(s) for s in seen), seen
    order = [(m, t.split("?")[0]) for m, t, _ in proxy.events]  # every request, in the order it arrived
    manifest_gone = order.index(("DELETE", f"/{s3_bucket}/out/{MANIFEST}"))
    shard_writes = [i for i, (m, t) in enumerate(order) if m in ("PUT", "POST") and t.endswith(".safetensors")]
    assert shard_writes and manifest_gone < min(shard_writes)
    assert nyxray.verify(out, opts) == []


def test_overwrite_drops_another_plans_resume_records(tmp_path):
    """An unfinished output of plan A (shards written and recorded, no manifest) overwritten by
    plan B, whose first run is killed: the re-run of B must not take A's shards for its own
    (same names, and their bytes still match A's records)."""
    import json

    from nyxray.demo.synthetic import ModelShape, make_model
    from nyxray.output.commit import STATE, STATE_DIR, plan_id

    shape = ModelShape(hidden=64, intermediate=128, layers=4, vocab=2048, heads=4, kv_heads=2)
    src = {n: make_model(str(tmp_path / n), shape, seed=i, shard_bytes=10**9) for i, n in enumerate(("a", "b"), start=1)}

    def recipe(t: float) -> str:
        return f"merge_method: slerp\nbase_model: {src['a']}\nmodels:\n  - model: {src['a']}\n  - model: {src['b']}\nparameters: {{t: {t}}}\n"

    kw = dict(executor="local", progress=False, out_shard_size="300K")
    nyxray.merge(recipe(0.3), str(tmp_path / "a_done"), **kw)
    nyxray.merge(recipe(0.7), str(tmp_path / "b_clean"), **kw)
    out = tmp_path / "out"  # what a killed run of plan A leaves: its shards and their records
    (out / STATE_DIR / "shards").mkdir(parents=True)
    manifest = json.load(open(tmp_path / "a_done" / "nyxray-manifest.json"))
    for rec in manifest["shards"]:
        shutil.copy(tmp_path / "a_done" / rec["name"], out / rec["name"])
        (out / STATE_DIR / "shards" / f"{rec['name']}.json").write_text(json.dumps(rec))
    (out / STATE).write_text(json.dumps({"plan_id": plan_id(nyxray.plan(recipe(0.3), out_shard_size="300K").final)}))

    import nyxray.execute.local as local_pool

    def killed(*args, **kwargs):  # the run dies after claiming the output, before any unit
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local_pool, "run_unit", killed)
        with pytest.raises(KeyboardInterrupt):
            nyxray.merge(recipe(0.7), str(out), overwrite=True, **kw)
    nyxray.merge(recipe(0.7), str(out), **kw)
    assert digests(str(out)) == digests(str(tmp_path / "b_clean"))
