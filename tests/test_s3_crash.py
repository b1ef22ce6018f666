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
import urllib.parse

import pytest
import s3fs

import nyxray
from nyxray.demo.synthetic import ModelShape, make_model
from nyxray.errors import StorageError
from nyxray.io.backends.s3 import MIN_PART
from nyxray.output import parts as P
from nyxray.plan.expr import leaves

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


def merge_command(recipe: str, out: str, report, unit_size: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "nyxray.cli", "merge", recipe, out, "--executor", "local", "--actors", "2", "--device", "cpu"]
    cmd += ["--out-shard-size", SHARD, "--storage-option", f"default_block_size={PART}", "--quiet", "--report", str(report)]
    return cmd + (["--unit-size", unit_size] if unit_size else [])


def run_and_kill(cmd: list[str], env: dict, log_path, ready, what: str) -> None:
    """Run ``cmd`` as its own process group and SIGKILL the group once ``ready()``."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the merge ended before it could be killed: " + open(log_path).read()[-2000:]
            assert time.monotonic() < deadline, f"not {what} within 60 s"
            if ready():
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


# -- SIGKILL mid-upload, then the same command again ------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["whole-shards", "sub-shard-parts"])
def test_sigkill_mid_upload_then_the_same_command_resumes(s3_server, recipe, clean, s3_bucket, fault_proxy, tmp_path, split):
    """The merge runs as its own process group, through a proxy that holds every part upload for
    0.5 s (a window to kill in); it is SIGKILLed once a shard is committed and recorded while
    uploads are pending. The same command again (the proxy now passes everything at once) aborts the killed
    run's uploads (a split shard's are adopted instead: the next test), reuses its committed shards
    and writes the same bytes as a clean run."""
    proxy = fault_proxy(delay_share=1.0, delay_s=0.5, match=is_part_upload)
    out = f"s3://{s3_bucket}/out"
    report = tmp_path / "report.json"
    cmd = merge_command(recipe, out, report, UNIT if split else None)
    env = {**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url}

    def ready() -> bool:
        committed = s3_keys(s3_server, s3_bucket, "out/.nyxray/shards/")  # a shard's record: it is resume state
        # A part upload held by the proxy keeps its upload pending past the kill: its completion
        # cannot be on its way yet (seeing "pending" alone raced with it).
        return bool(committed and s3_server.list_pending_uploads(s3_bucket) and proxy.inflight)

    run_and_kill(cmd, env, tmp_path / "killed.log", ready, "a shard committed with an upload pending")
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
    assert s3_server.list_pending_uploads(s3_bucket) == []  # the killed run's uploads were aborted or completed
    assert nyxray.verify(out, s3_server.storage_options) == []


def part_costs(recipe: str, opts: dict, unit_size: str) -> dict[str, list[tuple[int, int]]]:
    """Shard -> (bytes written, input bytes read) of each of its parts at ``unit_size``, from the plan."""
    plan = nyxray.plan(recipe, out_shard_size=SHARD, storage_options=opts)
    out = {}
    for shard in plan.final.shards:
        order = shard.in_file_order()
        cuts = P.layout(shard, P.cuts(shard, P.parse_unit_size(unit_size), MIN_PART))
        out[shard.name] = [(p.size, sum(x.end - x.start for x in {x for t in order[p.first : p.last] for x in leaves(t.expr)})) for p in cuts]
    return out


def s3_json(s3_server, bucket: str, key: str) -> dict:
    return json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def upload_calls(proxy, bucket: str) -> list[tuple[str, str, str]]:
    """(method, shard, upload id, or "new" for a create) of the calls on the output's multipart
    uploads that the proxy passed (part uploads left out)."""
    calls = []
    for method, target, action in list(proxy.events):
        path, _, query = target.partition("?")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        if action == "forwarded" and path.startswith(f"/{bucket}/out/model-") and "partNumber" not in params:
            if "uploads" in params or "uploadId" in params:
                calls.append((method, path.rsplit("/", 1)[-1], params["uploadId"][0] if "uploadId" in params else "new"))
    return calls


@pytest.mark.parametrize("rerun", ["same-command", "upload-aborted-meanwhile", "other-unit-size"])
def test_sigkill_after_parts_are_recorded_then_the_pending_upload_is_adopted(s3_server, recipe, clean, s3_bucket, fault_proxy, tmp_path, rerun):
    """A merge of split shards (3 parts each, one S3 part each) is SIGKILLed once a shard has parts
    recorded (``.nyxray/parts/<shard>/part-NNNNN.json``) while its upload is pending. The same
    command again adopts that upload: the recorded parts are reused (neither read nor written
    again), the others put into the same upload, which is completed (no new upload for the shard).
    If the upload was aborted behind nyxray's back meanwhile, or the rerun uses another unit size,
    the shard starts afresh in a new upload (the old one aborted). Always: a clean run's bytes, no
    pending upload, no resume state left, a clean verify."""
    proxy = fault_proxy(delay_share=1.0, delay_s=0.5, match=is_part_upload)
    out = f"s3://{s3_bucket}/out"
    report = tmp_path / "report.json"
    env = {**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url}

    def ready() -> bool:
        keys = s3_keys(s3_server, s3_bucket, "out/.nyxray/")
        whole = {k.rsplit("/", 1)[-1].removesuffix(".json") for k in keys if k.startswith("out/.nyxray/shards/")}
        parted = {k.split("/")[3] for k in keys if k.startswith("out/.nyxray/parts/") and "/part-" in k}
        return bool(parted - whole) and proxy.inflight > 0  # a part upload held: the run is mid-upload

    run_and_kill(merge_command(recipe, out, report, UNIT), env, tmp_path / "killed.log", ready, "a part recorded")
    pending = {u["UploadId"] for u in s3_server.list_pending_uploads(s3_bucket)}
    keys = s3_keys(s3_server, s3_bucket, "out/.nyxray/")
    whole = {k.rsplit("/", 1)[-1].removesuffix(".json") for k in keys if k.startswith("out/.nyxray/shards/")}
    layouts = {k.split("/")[3]: s3_json(s3_server, s3_bucket, k) for k in keys if k.endswith("/layout.json")}
    # The shards the rerun may adopt: assembling, upload pending, parts recorded with their ETags.
    adoptable = {n: lay["upload_id"] for n, lay in layouts.items() if n not in whole and lay["upload_id"] in pending}
    recorded = {n: [s3_json(s3_server, s3_bucket, k) for k in keys if k.startswith(f"out/.nyxray/parts/{n}/part-")] for n in adoptable}
    assert sum(map(len, recorded.values())) >= 1, (keys, pending)
    assert all(r["receipt"]["etags"] and r["sha256"] for recs in recorded.values() for r in recs)

    proxy.enabled = False
    proxy.events.clear()
    if rerun == "upload-aborted-meanwhile":
        for n, upload in adoptable.items():
            s3_server.client().abort_multipart_upload(Bucket=s3_bucket, Key=f"out/{n}", UploadId=upload)
    again = subprocess.run(
        merge_command(recipe, out, report, "8M" if rerun == "other-unit-size" else UNIT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        timeout=180,
    )
    assert again.returncode == 0, again.stdout.decode()[-3000:]
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert shard_digests(fs, f"{s3_bucket}/out") == clean["digests"]
    assert s3_server.list_pending_uploads(s3_bucket) == []
    assert s3_keys(s3_server, s3_bucket, "out/.nyxray") == []  # the commit removed the resume state
    assert nyxray.verify(out, s3_server.storage_options) == []

    resumed = json.loads(report.read_text())
    costs = part_costs(recipe, s3_server.storage_options, UNIT)
    calls = upload_calls(proxy, s3_bucket)
    whole_cost = [sum(c[i] for c in costs[n]) for n in whole for i in (0, 1)]
    assert resumed["shards_reused"] == len(whole)
    if rerun == "same-command":
        reused = [costs[n][r["part"]] for n, recs in recorded.items() for r in recs]
        assert resumed["parts_reused"] == len(reused) >= 1
        # exactly the recorded parts (and shards) are neither written nor read again
        total = [sum(c[i] for cs in costs.values() for c in cs) for i in (0, 1)]
        assert resumed["bytes_written"] == total[0] - sum(w for w, _ in reused) - sum(whole_cost[0::2])
        assert resumed["bytes_read_tensors"] == total[1] - sum(r for _, r in reused) - sum(whole_cost[1::2])
        assert resumed["bytes_read_tensors"] < clean["report"]["bytes_read_tensors"]
        assert resumed["bytes_not_reread"] == sum(r for _, r in reused) + sum(whole_cost[1::2])
        for n, upload in adoptable.items():  # the killed run's upload was completed, no other begun
            assert ("POST", n, upload) in calls and ("POST", n, "new") not in calls, calls
    else:
        assert resumed["parts_reused"] == 0
        for n, upload in adoptable.items():  # a new upload; the old one aborted (by nyxray, unless it was gone)
            assert ("POST", n, "new") in calls and ("POST", n, upload) not in calls, calls
            assert (("DELETE", n, upload) in calls) == (rerun == "other-unit-size"), calls


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
    shard under its final name, no manifest or config, no pending upload and no record of a split
    shard's upload (a rerun begins afresh without asking the store). The same merge through a
    healthy endpoint then writes a clean run's bytes."""
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
    assert s3_keys(s3_server, s3_bucket, "out/.nyxray/parts/") == []  # and dropped their layouts and part records
    assert nyxray.verify(out, s3_server.storage_options)  # incomplete, and says so

    again = nyxray.merge(recipe, out, storage_options=s3_server.storage_options_for(default_block_size=PART), **kw)
    assert again["parts_reused"] == 0
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert shard_digests(fs, f"{s3_bucket}/out") == clean["digests"]
    assert s3_server.list_pending_uploads(s3_bucket) == []
    assert nyxray.verify(out, s3_server.storage_options) == []


def test_a_split_run_failing_after_parts_were_recorded_leaves_no_upload_and_no_part_record(s3_server, recipe, clean, s3_bucket, fault_proxy):
    """Sub-shard parts; every upload of the first shard's last S3 part is cut, the other parts go
    through and are recorded: the merge fails, aborts every upload and drops the split shards'
    layouts and part records (the uploads they name are gone), so the healthy rerun begins every
    unfinished shard afresh without asking the store (no ListParts) and writes a clean run's bytes."""
    target = f"/{s3_bucket}/out/model-00001-of-00003.safetensors"

    def last_part(r) -> bool:
        return is_part_upload(r) and r.path == target and re.search(r"(^|&)partNumber=3(&|$)", r.query) is not None

    proxy = fault_proxy(kill_after_bytes=1_000_000, kill_count=None, match=last_part)
    opts = s3_server.storage_options_for(proxy.endpoint_url, max_attempts=2, read_timeout=10, default_block_size=PART)
    out = f"s3://{s3_bucket}/out"
    kw = dict(executor="local", actors=2, out_shard_size=SHARD, progress=False, unit_size=UNIT)
    with pytest.raises(StorageError, match=rf"{out}/model-00001-of-00003\.safetensors"):
        nyxray.merge(recipe, out, storage_options=opts, **kw)
    records = [t for m, t, a in proxy.events if m == "PUT" and a == "forwarded" and "/.nyxray/parts/" in t and "/part-" in t]
    assert records, "no part was recorded before the run failed"
    assert s3_server.list_pending_uploads(s3_bucket) == []
    assert s3_keys(s3_server, s3_bucket, "out/.nyxray/parts/") == []

    proxy.enabled = False
    proxy.events.clear()
    again = nyxray.merge(recipe, out, storage_options=opts, **kw)
    assert again["parts_reused"] == 0
    assert not [t for m, t, _ in proxy.events if m == "GET" and "uploadId=" in t]  # no ListParts: nothing recorded to adopt
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert shard_digests(fs, f"{s3_bucket}/out") == clean["digests"]
    assert s3_server.list_pending_uploads(s3_bucket) == []
    assert nyxray.verify(out, s3_server.storage_options) == []
