"""Crash and resume on S3 at multipart scale, against a real S3 server: every output shard is at
least 3 S3 parts (5 MiB each), written by the whole-shard multipart writer or assembled from
sub-shard parts. The merge process group is SIGKILLed mid-upload and the same command run again;
a part upload is cut over a real socket (``tests/faultproxy.py``) inside a real merge. Nothing here
patches the storage layer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import s3fs

import nyxray
from nyxray.errors import StorageError
from nyxray.synthetic import ModelShape, make_model

# Two 41 MB models; three output shards of 12-15 MB.
SHAPE = ModelShape(hidden=512, intermediate=1024, layers=6, vocab=6000, heads=4, kv_heads=2)
SHARD = "15M"
PART = 5 * 2**20  # the writer's S3 part size (default_block_size): each shard is >= 3 parts
UNIT = "6M"  # with --unit-size, every shard is 3 sub-shard parts, each one S3 part
MANIFEST = "nyxray-manifest.json"


def is_part_upload(r) -> bool:
    return r.method == "PUT" and "partNumber=" in r.query


@pytest.fixture(scope="module")
def recipe(s3_server, tmp_path_factory) -> str:
    """A SLERP of two synthetic models uploaded to s3://nyx/crash-src/{a,b}; the recipe file."""
    root = tmp_path_factory.mktemp("crash")
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    for seed, name in enumerate(("a", "b"), start=1):
        fs.put(make_model(str(root / name), SHAPE, seed=seed, shard_bytes=40_000_000), f"nyx/crash-src/{name}", recursive=True)
    path = root / "slerp.yml"
    path.write_text(
        "merge_method: slerp\nbase_model: s3://nyx/crash-src/a\nmodels:\n  - model: s3://nyx/crash-src/a\n  - model: s3://nyx/crash-src/b\n"
        "parameters: {t: 0.3}\ndtype: bfloat16\n"
    )
    return str(path)


def shard_digests(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.ls(prefix) if p.endswith(".safetensors")}


def part_counts(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, int]:
    """Shard -> how many S3 parts it was uploaded as (a multipart ETag ends in ``-<count>``)."""
    fs.invalidate_cache()
    etags = {p["name"].rsplit("/", 1)[-1]: p["ETag"].strip('"') for p in fs.ls(prefix, detail=True) if p["name"].endswith(".safetensors")}
    return {n: int(e.rpartition("-")[2]) if "-" in e else 1 for n, e in etags.items()}


@pytest.fixture(scope="module")
def clean(s3_server, recipe) -> dict:
    """A clean S3-to-S3 run: its shards' digests and its report."""
    opts = s3_server.storage_options_for(default_block_size=PART)
    report = nyxray.merge(recipe, "s3://nyx/crash-clean", storage_options=opts, executor="local", actors=2, out_shard_size=SHARD, progress=False)
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    parts = part_counts(fs, "nyx/crash-clean")
    assert len(parts) == 3 and min(parts.values()) >= 3, parts  # multipart scale: every shard is >= 3 S3 parts
    return {"digests": shard_digests(fs, "nyx/crash-clean"), "report": report}


def s3_keys(s3_server, bucket: str, prefix: str) -> list[str]:
    r = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in r.get("Contents", [])]


# -- SIGKILL mid-upload, then the same command again ------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["whole-shards", "sub-shard-parts"])
def test_sigkill_mid_upload_then_the_same_command_resumes(s3_server, recipe, clean, s3_bucket, fault_proxy, tmp_path, split):
    """The merge runs as its own process group, through a proxy that holds every part upload for
    0.5 s (a window to kill in); it is SIGKILLed once a shard is committed and recorded while
    uploads are pending. The same command again (the proxy now passes everything at once) aborts the killed
    run's uploads, reuses its committed shards and writes the same bytes as a clean run."""
    proxy = fault_proxy(delay_share=1.0, delay_s=0.5, match=is_part_upload)
    out = f"s3://{s3_bucket}/out"
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "nyxray.cli", "merge", recipe, out, "--executor", "local", "--actors", "2", "--device", "cpu"]
    cmd += ["--out-shard-size", SHARD, "--storage-option", f"default_block_size={PART}", "--quiet", "--report", str(report)]
    cmd += ["--unit-size", UNIT] if split else []
    env = {**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url}
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the merge ended before it could be killed: " + open(tmp_path / "killed.log").read()[-2000:]
            assert time.monotonic() < deadline, "no shard committed with an upload pending within 60 s"
            committed = s3_keys(s3_server, s3_bucket, "out/.nyxray/shards/")  # a shard's record: it is resume state
            pending = s3_server.list_pending_uploads(s3_bucket)
            # A part upload held by the proxy keeps its upload pending past the kill: its
            # completion cannot be on its way yet (seeing "pending" alone raced with it).
            if committed and pending and proxy.inflight:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    time.sleep(1.0)  # let the proxy drop the dead client's held part uploads
    left = s3_server.list_pending_uploads(s3_bucket)
    assert left, "the kill left no pending upload: nothing to clean up"
    keys = s3_keys(s3_server, s3_bucket, "out/")
    assert f"out/{MANIFEST}" not in keys and "out/config.json" not in keys

    proxy.enabled = False  # the same command, now without the slow endpoint
    again = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=180)
    assert again.returncode == 0, again.stdout.decode()[-3000:]
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert shard_digests(fs, f"{s3_bucket}/out") == clean["digests"]
    assert min(part_counts(fs, f"{s3_bucket}/out").values()) >= 3
    resumed = json.loads(report.read_text())
    assert resumed["shards_reused"] >= 1
    assert resumed["bytes_read_tensors"] < clean["report"]["bytes_read_tensors"]
    assert s3_server.list_pending_uploads(s3_bucket) == []  # the killed run's uploads were aborted
    assert nyxray.verify(out, s3_server.storage_options) == []


# -- a part upload cut inside a real merge --------------------------------------------------------------


def test_a_part_cut_three_times_is_resent_and_the_output_is_identical(s3_server, recipe, clean, s3_bucket, fault_proxy):
    """Part 2 of the first shard is cut after 1 MB of its body, three times in a row (botocore makes
    one attempt per call here; s3fs makes five): the part is sent again and the merge completes with
    a clean run's bytes, every shard still >= 3 parts, nothing pending. (Cut more often than the
    backend retries, the merge fails cleanly: the next test.)"""
    target = f"/{s3_bucket}/out/model-00001-of-00003.safetensors"

    def part_2(r) -> bool:
        return is_part_upload(r) and r.path == target and re.search(r"(^|&)partNumber=2(&|$)", r.query) is not None

    proxy = fault_proxy(kill_after_bytes=1_000_000, kill_count=3, match=part_2)
    opts = s3_server.storage_options_for(proxy.endpoint_url, max_attempts=1, default_block_size=PART)
    out = f"s3://{s3_bucket}/out"
    nyxray.merge(recipe, out, storage_options=opts, executor="local", actors=2, out_shard_size=SHARD, progress=False)
    assert proxy.counters["kill"] == 3
    sent = [a for m, t, a in proxy.events if m == "PUT" and t.startswith(target + "?") and re.search(r"[?&]partNumber=2(&|$)", t)]
    assert sent == ["kill"] * 3 + ["forwarded"]  # cut three times, then sent whole once
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert min(part_counts(fs, f"{s3_bucket}/out").values()) >= 3
    assert shard_digests(fs, f"{s3_bucket}/out") == clean["digests"]
    assert s3_server.list_pending_uploads(s3_bucket) == []
    assert nyxray.verify(out, s3_server.storage_options) == []


@pytest.mark.parametrize("split", [False, True], ids=["whole-shards", "sub-shard-parts"])
def test_every_part_upload_cut_fails_cleanly_then_a_healthy_rerun_completes(s3_server, recipe, clean, s3_bucket, fault_proxy, split):
    """Every part upload is cut: the merge fails with a StorageError naming a shard, and leaves no
    shard under its final name, no manifest or config, and no pending upload. The same merge
    through a healthy endpoint then writes a clean run's bytes."""
    proxy = fault_proxy(kill_after_bytes=1_000_000, kill_count=None, match=is_part_upload)
    opts = s3_server.storage_options_for(proxy.endpoint_url, max_attempts=2, read_timeout=10, default_block_size=PART)
    out = f"s3://{s3_bucket}/out"
    kw = dict(executor="local", actors=2, out_shard_size=SHARD, progress=False, unit_size=UNIT if split else None)
    with pytest.raises(StorageError, match=rf"{out}/model-0000\d-of-00003\.safetensors"):
        nyxray.merge(recipe, out, storage_options=opts, **kw)
    assert proxy.counters["kill"] >= 1
    keys = s3_keys(s3_server, s3_bucket, "out/")
    assert not [k for k in keys if k.endswith(".safetensors")], keys  # no shard under its final name
    assert f"out/{MANIFEST}" not in keys and "out/config.json" not in keys
    assert s3_server.list_pending_uploads(s3_bucket) == []  # the failed run aborted its uploads
    assert nyxray.verify(out, s3_server.storage_options)  # incomplete, and says so

    nyxray.merge(recipe, out, storage_options=s3_server.storage_options_for(default_block_size=PART), **kw)
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert shard_digests(fs, f"{s3_bucket}/out") == clean["digests"]
    assert s3_server.list_pending_uploads(s3_bucket) == []
    assert nyxray.verify(out, s3_server.storage_options) == []
