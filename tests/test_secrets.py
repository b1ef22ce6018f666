"""Secrets go nowhere: a Ray merge from and to a real S3 server, with the secret key given as a
``--storage-option`` and another secret in ``AWS_SECRET_ACCESS_KEY``; afterwards neither appears in
Ray's session folder (driver, raylet, GCS and worker logs), the report, the manifest, the model
card or any written file, nor in the error of a run refused for a wrong secret.

Not checked here: the task and actor arguments as Ray's state API shows them. The session cluster
runs without the dashboard, and without it Ray 2.60 has no state API (``ray.util.state``). The
arguments (a unit, whose locations carry the storage options so that actors can open S3) travel
pickled through Ray's in-memory object transport; the session folder grep covers what Ray writes
to disk."""

from __future__ import annotations

import os

import pytest
import s3fs

from nyxray.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1A = os.path.join(REPO, "recipes", "loyal-piano-cybertron-11B.yml")
ENV_SECRET = "nyxray-env-Secret-5e4d3c2b1a"


def session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def files_holding(root: str, needles: list[bytes]) -> list[str]:
    hits = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                with open(p, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            hits += [f"{p}: {n!r}" for n in needles if n in data]
    return hits


@pytest.fixture(scope="module")
def s3_src(s3_server, nyxene_sources):
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    for repo in ("fblgit/una-cybertron-7b-v2", "chargoddard/loyal-piano-m7-cdpo"):
        fs.put(os.path.join(nyxene_sources, repo), f"nyx/secrets-mirror/{repo}", recursive=True)
    return "s3://nyx/secrets-mirror"


def test_secrets_appear_nowhere_after_a_ray_merge(ray_cluster, s3_server, s3_src, s3_bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    secret = s3_server.secret_key
    assert len(secret) >= 16
    opts = [
        "--storage-option",
        f"endpoint_url={s3_server.endpoint_url}",
        "--storage-option",
        f"key={s3_server.access_key}",
        "--storage-option",
        f"secret={secret}",
    ]
    out = f"s3://{s3_bucket}/out"
    report = str(tmp_path / "report.json")
    rc = cli(
        [
            "merge",
            STAGE1A,
            out,
            "--models-root",
            s3_src,
            "--executor",
            "ray",
            "--actors",
            "2",
            "--device",
            "cpu",
            "--out-shard-size",
            "1M",
            "--report",
            report,
            "--quiet",
            *opts,
        ]
    )
    ok = capsys.readouterr()
    assert rc == 0, ok.err
    # a refused run: wrong secret; its error names the URL, not the secret
    wrong = "nyxray-wrong-Secret-0f9e8d7c6b"
    rc = cli(
        [
            "merge",
            STAGE1A,
            f"s3://{s3_bucket}/out2",
            "--models-root",
            s3_src,
            "--executor",
            "ray",
            "--quiet",
            "--storage-option",
            f"endpoint_url={s3_server.endpoint_url}",
            "--storage-option",
            f"key={s3_server.access_key}",
            "--storage-option",
            f"secret={wrong}",
            "--storage-option",
            "config_kwargs.retries.max_attempts=1",
        ]
    )
    failed = capsys.readouterr()
    assert rc == 1 and "secrets-mirror" in failed.err and len(failed.err.strip().splitlines()) == 1, failed.err
    needles = [secret.encode(), ENV_SECRET.encode(), wrong.encode()]
    for text in (ok.out, ok.err, failed.out, failed.err, open(report).read()):
        assert not [n for n in needles if n.decode() in text], text
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    written = {p: fs.cat_file(p) for p in fs.find(f"{s3_bucket}/out")}
    assert {os.path.basename(p) for p in written} >= {"nyxray-manifest.json", "README.md", "config.json", "mergekit_config.yml"}
    assert not [p for p, data in written.items() if any(n in data for n in needles)]
    assert files_holding(session_dir(), needles) == []
