"""Merges from S3 to S3 against a real S3 server on 127.0.0.1, with faults injected over real
sockets (a proxy that resets connections, answers 503 and cuts uploads)."""

from __future__ import annotations

import hashlib
import os

import pytest
import s3fs

import nyxray
from nyxray.cli import main as cli
from nyxray.errors import NyxrayError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(REPO, "recipes", "nyxene-v2-11b.pipeline.yml")
SHARD = "1M"


@pytest.fixture(scope="module")
def s3_sources(s3_server, nyxene_sources):
    """The Nyxene stand-ins uploaded once to s3://nyx/mirror/<org>/<name>."""
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    for org in os.listdir(nyxene_sources):
        for name in os.listdir(os.path.join(nyxene_sources, org)):
            fs.put(os.path.join(nyxene_sources, org, name), f"nyx/mirror/{org}/{name}", recursive=True)
    return "s3://nyx/mirror"


@pytest.fixture(scope="module")
def local_reference(nyxene_sources, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "nyxene")
    nyxray.merge(PIPELINE, out, models_root=nyxene_sources, executor="local", out_shard_size=SHARD, progress=False)
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in os.listdir(out) if f.endswith(".safetensors")}


def s3_hashes(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.ls(prefix) if p.endswith(".safetensors")}


def test_pipeline_s3_to_s3_is_identical_and_reads_the_minimum(s3_server, s3_sources, local_reference, s3_bucket):
    opts = s3_server.storage_options
    report = nyxray.merge(
        PIPELINE, f"s3://{s3_bucket}/nyxene", models_root=s3_sources, storage_options=opts, executor="local", out_shard_size=SHARD, progress=False
    )
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    assert s3_hashes(fs, f"{s3_bucket}/nyxene") == local_reference
    assert report["bytes_read"] <= 1.01 * report["bytes_read_min"]
    assert fs.exists(f"{s3_bucket}/nyxene/nyxray-manifest.json")
    assert nyxray.verify(f"s3://{s3_bucket}/nyxene", opts) == []
    assert s3_server.list_pending_uploads(s3_bucket) == []


def test_ray_actors_read_and_write_s3(ray_cluster, s3_server, s3_sources, local_reference, s3_bucket):
    opts = s3_server.storage_options
    report = nyxray.merge(
        PIPELINE, f"s3://{s3_bucket}/nyxene", models_root=s3_sources, storage_options=opts, executor="ray", actors=2, out_shard_size=SHARD, progress=False
    )
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    assert s3_hashes(fs, f"{s3_bucket}/nyxene") == local_reference
    assert sum(a["units"] for a in report["actors"]) == report["shards"]


def test_faulty_endpoint_still_gives_identical_output(s3_server, s3_sources, local_reference, s3_bucket, fault_proxy):
    # 10% of requests answered 503 SlowDown, 5% reset, 5% delayed: retried with backoff
    proxy = fault_proxy(error503_share=0.10, reset_share=0.05, delay_share=0.05, delay_s=0.2, seed=7)
    opts = s3_server.storage_options_for(proxy.endpoint_url, max_attempts=10)
    nyxray.merge(PIPELINE, f"s3://{s3_bucket}/nyxene", models_root=s3_sources, storage_options=opts, executor="local", out_shard_size=SHARD, progress=False)
    assert proxy.faults > 5, proxy.counters
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert s3_hashes(fs, f"{s3_bucket}/nyxene") == local_reference


def test_upload_cut_mid_shard_leaves_no_object_and_the_rerun_completes(s3_server, s3_sources, local_reference, s3_bucket, fault_proxy):
    # every request with a body over 400 kB is cut: shard uploads (1 MB) die mid-way, small
    # metadata writes pass
    proxy = fault_proxy(kill_after_bytes=400_000, kill_count=None)
    opts = s3_server.storage_options_for(proxy.endpoint_url, max_attempts=2, read_timeout=10)
    out = f"s3://{s3_bucket}/nyxene"
    with pytest.raises(NyxrayError):
        nyxray.merge(PIPELINE, out, models_root=s3_sources, storage_options=opts, executor="local", out_shard_size=SHARD, progress=False)
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert s3_hashes(fs, f"{s3_bucket}/nyxene") == {}  # no shard under its final name
    assert not fs.exists(f"{s3_bucket}/nyxene/nyxray-manifest.json")
    nyxray.merge(PIPELINE, out, models_root=s3_sources, storage_options=s3_server.storage_options, executor="local", out_shard_size=SHARD, progress=False)
    assert s3_hashes(fs, f"{s3_bucket}/nyxene") == local_reference


def test_unwritable_output_fails_before_any_tensor_is_computed(s3_server, s3_sources, capsys):
    rc = cli(
        [
            "merge",
            PIPELINE,
            "s3://no-such-bucket-here/out",
            "--models-root",
            s3_sources,
            "--executor",
            "local",
            "--quiet",
            "--storage-option",
            f"endpoint_url={s3_server.endpoint_url}",
            "--storage-option",
            f"key={s3_server.access_key}",
            "--storage-option",
            f"secret={s3_server.secret_key}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "s3://no-such-bucket-here/out" in err
    assert s3_server.secret_key not in err


def test_wrong_credentials_name_the_url_not_the_secret(s3_server, s3_sources, tmp_path, capsys):
    secret = "wrong-secret-do-not-print-me-42"
    rc = cli(
        [
            "plan",
            PIPELINE,
            "--models-root",
            s3_sources,
            "--storage-option",
            f"endpoint_url={s3_server.endpoint_url}",
            "--storage-option",
            "key=nobody",
            "--storage-option",
            f"secret={secret}",
            "--storage-option",
            "config_kwargs.retries.max_attempts=1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "s3://nyx/mirror" in err
    assert secret not in err and len(err.strip().splitlines()) == 1
