"""Sub-shard work units (nyxray/output/parts.py, nyxray/output/assemble.py): a shard larger than the unit size is
computed as parts by several workers and assembled into the same bytes as an unsplit run, locally
(pwrite into a preallocated file, renamed at the end), on S3 (parts of one multipart upload of at
least 5 MiB) and on Ray; a resume redoes only the missing parts; a failed S3 run leaves no upload."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import pytest
import s3fs

import nyxray
from nyxray.demo.synthetic import ModelShape, make_model
from nyxray.errors import NyxrayError, StorageError
from nyxray.io.backends.local import LocalPartWriter
from nyxray.io.backends.s3 import MIN_PART, S3PartWriter
from nyxray.output import parts as P

SHAPE = ModelShape(hidden=512, intermediate=1024, layers=16, vocab=2048, heads=8, kv_heads=4)  # about 80 MB in bf16
RECIPE = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 16]
      - model: b
        layer_range: [0, 16]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0.75, 0.25]
    - filter: mlp
      value: [0.25, 0.75]
    - value: 0.5
dtype: bfloat16
"""
SHARD = "18M"  # 5 output shards
WARM = ModelShape(hidden=64, intermediate=128, layers=16, vocab=512, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("subshard-src")
    return {m: make_model(str(root / m), SHAPE, seed=i, shard_bytes=40_000_000) for i, m in enumerate("ab")}


def merge(out: str, sources: dict[str, str], **kw) -> dict:
    kw.setdefault("executor", "local")
    return nyxray.merge(RECIPE, out, models=sources, out_shard_size=SHARD, progress=False, **kw)


def hashes(path: str) -> dict[str, str]:
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))}


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory) -> dict[str, str]:
    """The shards of an unsplit run (every shard one unit)."""
    out = str(tmp_path_factory.mktemp("subshard-ref") / "m")
    report = merge(out, sources, unit_size="1B")
    assert report["shards"] == 5 and sum(a["units"] for a in report["actors"]) == 5
    return hashes(out)


def tensor_bytes(sources: dict[str, str]) -> int:
    """Tensor data in the source models (every byte of which the SLERP reads once)."""
    total = 0
    for f in (f for path in sources.values() for f in glob.glob(os.path.join(path, "*.safetensors"))):
        with open(f, "rb") as fh:
            total += os.path.getsize(f) - 8 - int.from_bytes(fh.read(8), "little")
    return total


def manifest(path: str) -> dict:
    return json.loads(open(os.path.join(path, "nyxray-manifest.json")).read())


def test_layout_parts_are_contiguous_runs_of_whole_tensors(sources, tmp_path):
    plan = nyxray.plan(RECIPE, models=sources, out_shard_size=SHARD)
    for shard in plan.final.shards:
        for unit, smallest in (("1M", 1), ("6M", MIN_PART)):
            parts = P.layout(shard, P.cuts(shard, P.parse_unit_size(unit), smallest))
            assert parts[0].start == 0 and parts[-1].end == shard.size
            assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
            assert all(p.size >= smallest for p in parts[:-1])
            big = max(e.end - e.start for e in shard.entries)
            assert all(p.size <= max(P.parse_unit_size(unit), smallest + big) + len(shard.header) for p in parts)
    with pytest.raises(NyxrayError, match="unit_size"):
        merge(str(tmp_path / "x"), sources, unit_size="10K")
    assert not os.path.exists(tmp_path / "x")


def test_local_parts_are_byte_identical_and_verified_per_part(sources, reference, tmp_path):
    out = str(tmp_path / "m")
    report = merge(out, sources, unit_size="6M")
    assert hashes(out) == reference
    units = sum(a["units"] for a in report["actors"])
    assert units > 2 * report["shards"]  # parts count as units
    assert report["bytes_written"] == sum(os.path.getsize(os.path.join(out, f)) for f in reference)
    recs = manifest(out)["shards"]
    assert all(len(r["parts"]) > 1 and "sha256" not in r for r in recs)
    assert nyxray.verify(out) == []
    assert not os.path.exists(os.path.join(out, ".nyxray"))
    # verify checks every part's bytes: flip one byte in the middle of a shard
    name = recs[0]["name"]
    at = recs[0]["parts"][1]["start"] + 100
    with open(os.path.join(out, name), "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))
    assert any("sha256 does not match" in p for p in nyxray.verify(out))
    merge(out, sources, unit_size="6M")  # the repair finds the damaged part's shard and rewrites it, in parts
    assert hashes(out) == reference and nyxray.verify(out) == []


def test_resume_after_a_part_failure_redoes_only_the_missing_parts(sources, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "m")
    commit = LocalPartWriter.commit
    failing = {"at": None}

    def fail_third(self) -> None:  # the third part to finish fails (after two are recorded)
        if failing["at"] is None and len(glob.glob(os.path.join(out, ".nyxray/parts/*/part-*.json"))) >= 2:
            failing["at"] = self.offset
        if self.offset == failing["at"]:
            commit(self)
            raise StorageError("injected part failure")
        commit(self)

    monkeypatch.setattr(LocalPartWriter, "commit", fail_third)
    with pytest.raises(NyxrayError, match="injected part failure"):
        merge(out, sources, unit_size="6M", actors=1)
    assert not os.path.exists(os.path.join(out, "nyxray-manifest.json"))
    assert not glob.glob(os.path.join(out, "*.safetensors"))  # no shard was whole yet: none under its final name
    done = {(os.path.basename(os.path.dirname(f)), json.load(open(f))["part"]) for f in glob.glob(os.path.join(out, ".nyxray/parts/*/part-*.json"))}
    assert len(done) == 2

    monkeypatch.setattr(LocalPartWriter, "commit", commit)
    opened: list[tuple[str, int]] = []
    job_open = P.PartJob.open

    def spy(self, loc, name):
        opened.append((name, self.part.index))
        return job_open(self, loc, name)

    monkeypatch.setattr(P.PartJob, "open", spy)
    report = merge(out, sources, unit_size="6M")
    everything = {(r["name"], i) for r in manifest(out)["shards"] for i in range(len(r["parts"]))}
    assert set(opened) == everything - done and len(opened) == len(set(opened))
    assert hashes(out) == reference
    assert nyxray.verify(out) == []
    assert report["bytes_written"] < sum(os.path.getsize(os.path.join(out, f)) for f in reference)
    assert report["parts_reused"] == 2
    assert 0 < report["bytes_not_reread"] and report["bytes_read_tensors"] + report["bytes_not_reread"] == tensor_bytes(sources)


def test_s3_parts_are_one_multipart_upload_each(sources, reference, s3_server, s3_bucket):
    opts = s3_server.storage_options
    url = f"s3://{s3_bucket}/m"
    report = merge(url, sources, unit_size="6M", storage_options=opts)
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    got = {p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.ls(f"{s3_bucket}/m") if p.endswith(".safetensors")}
    assert got == reference
    assert sum(a["units"] for a in report["actors"]) > 2 * report["shards"]
    for rec in json.loads(fs.cat_file(f"{s3_bucket}/m/nyxray-manifest.json"))["shards"]:
        assert len(rec["parts"]) > 1 and all(p["end"] - p["start"] >= MIN_PART for p in rec["parts"][:-1])
        etag = fs.info(f"{s3_bucket}/m/{rec['name']}")["ETag"].strip('"')
        assert int(etag.rsplit("-", 1)[1]) >= len(rec["parts"])  # one upload, every part in it
    assert nyxray.verify(url, opts) == []
    assert s3_server.list_pending_uploads(s3_bucket) == []


def test_s3_failed_part_aborts_the_uploads(sources, s3_server, s3_bucket, monkeypatch):
    opts = s3_server.storage_options
    commit = S3PartWriter.commit
    seen = []

    def fail_second(self) -> None:
        seen.append(1)
        if len(seen) == 2:
            raise StorageError("injected upload failure")
        commit(self)

    monkeypatch.setattr(S3PartWriter, "commit", fail_second)
    with pytest.raises(NyxrayError, match="injected upload failure"):
        merge(f"s3://{s3_bucket}/m", sources, unit_size="6M", storage_options=opts, actors=1)
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    assert not [p for p in fs.ls(f"{s3_bucket}/m") if p.endswith((".safetensors", "nyxray-manifest.json"))]
    assert s3_server.list_pending_uploads(s3_bucket) == []


def test_ray_parts_spread_over_eight_actors_on_three_nodes(ray_cluster, sources, reference, tmp_path):
    """A 5-shard output split into 1M parts on 8 actors of the 3-node test cluster: the bytes of the
    unsplit run; every part is one unit, run once, by an actor the report names with its node.

    Which actor gets which part is a race (the first idle actor takes the largest part left), so
    the test asserts what the report must say whatever the timing, not that all 8 were busy or a
    balance figure: on 2 shared cores an actor may still be answering while the others take
    every part."""
    kw = dict(executor="ray", actors=8, actor_cpus=0.5, unit_size="1M")
    try:
        # Start the 8 actors (torch loaded) on a tiny merge of 10 shards: the run below measures work, not start-up.
        tiny = {m: make_model(str(tmp_path / "tiny" / m), WARM, seed=i) for i, m in enumerate("ab")}
        nyxray.merge(RECIPE, str(tmp_path / "warm"), models=tiny, out_shard_size="100K", progress=False, keep_actors=60, **kw)
        out = str(tmp_path / "m")
        report = merge(out, sources, **kw)
    finally:
        nyxray.release_actors()
    assert hashes(out) == reference
    assert report["shards"] == 5 and len(report["actors"]) == 8
    parts = sum(len(r["parts"]) for r in manifest(out)["shards"])
    assert parts > 8 * 2  # more units than actors: no actor is idle for want of a shard
    assert sum(a["units"] for a in report["actors"]) == parts  # each part one unit, run once
    nodes = {n.node_id for n in [ray_cluster.head_node, *ray_cluster.worker_nodes]}
    working = [a for a in report["actors"] if a["units"]]
    assert working and all(a["node_id"] in nodes and a["bytes_written"] > 0 for a in working), report["actors"]
    assert sum(a["bytes_written"] for a in report["actors"]) == report["bytes_written"]
    moved = [a["bytes_read"] + a["bytes_written"] for a in working]
    assert report["balance"] == pytest.approx(max(moved) / (sum(moved) / len(moved)), abs=1e-3)
    print(f"\nactors (node, units): {[(a['node_id'] and a['node_id'][:8], a['units']) for a in report['actors']]}; balance {report['balance']}")


def test_sweep_members_share_reads_part_by_part(sources, tmp_path):
    """A sweep's members with the same tensors are split at the same places: one unit computes the
    same part of every member (each input byte read once), each member's shard assembled apart."""
    with open(tmp_path / "base.yml", "w") as f:
        f.write(RECIPE)
    doc = f"base: {tmp_path / 'base.yml'}\ngrid:\n  parameters.t: [0.3, 0.7]\n"
    report = nyxray.sweep(doc, str(tmp_path / "sw"), models=sources, out_shard_size=SHARD, progress=False, executor="local", unit_size="6M")
    members = sorted(os.listdir(tmp_path / "sw"))
    assert len(members) == 2 and sum(a["units"] for a in report["actors"]) > 2 * 5
    for name, t in zip(members, ("0.3", "0.7")):
        single = str(tmp_path / f"single-{t}")
        nyxray.merge(
            RECIPE.replace(
                "    - filter: self_attn\n      value: [0.75, 0.25]\n    - filter: mlp\n      value: [0.25, 0.75]\n    - value: 0.5\n", f"    - value: {t}\n"
            ),
            single,
            models=sources,
            out_shard_size=SHARD,
            progress=False,
            executor="local",
            unit_size="1B",
        )
        assert hashes(str(tmp_path / "sw" / name)) == hashes(single)
        assert nyxray.verify(str(tmp_path / "sw" / name)) == []
