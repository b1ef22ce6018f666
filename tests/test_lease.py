"""One writer per output (``OUT/.nyxray-lease.json``), locally and on a real S3 server: a second
merge into an output being written stops at once naming the output and the holder; creation is
atomic (of many concurrent takers exactly one wins); a stale lease (expired, or held by a dead
process of this machine) is taken over; a run that lost its lease does not commit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import s3fs

import nyxray
from nyxray.errors import OutputError
from nyxray.io.location import location
from nyxray.output import lease as lease_mod
from nyxray.output.lease import LEASE, hold

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1A = os.path.join(REPO, "recipes", "loyal-piano-cybertron-11B.yml")
SHARD = "1M"


def merge(out: str, src: str, **kw):
    kw.setdefault("out_shard_size", SHARD)
    return nyxray.merge(STAGE1A, out, models_root=src, executor="local", device="cpu", progress=False, **kw)


def foreign_lease(expires_in: float) -> bytes:
    now = time.time()
    return json.dumps(
        {
            "holder": "elsewhere pid 4242 run feedface",
            "host": "elsewhere",
            "pid": 4242,
            "pidns": "",
            "renewed": now - 10,
            "expires": now + expires_in,
            "ttl": 120,
        }
    ).encode()


@pytest.fixture(scope="module")
def s3_src(s3_server, nyxene_sources):
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    for repo in ("fblgit/una-cybertron-7b-v2", "chargoddard/loyal-piano-m7-cdpo"):
        fs.put(os.path.join(nyxene_sources, repo), f"nyx/lease-mirror/{repo}", recursive=True)
    return "s3://nyx/lease-mirror"


# -- a second merge into a busy output --------------------------------------------------------------


def merge_command(out: str, sources: str) -> list[str]:
    """``nyxray merge`` of the first Nyxene stage into ``out``, in process, as a user types it."""
    return [sys.executable, "-m", "nyxray.cli", "merge", STAGE1A, out, "--models-root", sources, "--executor", "local", "--device", "cpu",
            "--out-shard-size", "300K", "--quiet"]  # fmt: skip


def test_second_local_merge_stops_at_once_naming_output_and_holder(nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    cmd = merge_command(out, nyxene_sources)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(out, LEASE)) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # hold the first merge mid-run, lease taken
        assert os.path.exists(os.path.join(out, LEASE)), "the first merge never took the lease"
        before = sorted(os.listdir(out))
        t0 = time.monotonic()
        with pytest.raises(OutputError) as e:
            merge(out, nyxene_sources)
        assert time.monotonic() - t0 < 10
        msg = str(e.value)
        assert out in msg and f"pid {first.pid}" in msg and "being written by another nyxray run" in msg
        assert sorted(os.listdir(out)) == before  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    assert nyxray.verify(out) == []
    assert not os.path.exists(os.path.join(out, LEASE))  # released after the commit


def test_second_s3_merge_stops_at_once(s3_server, s3_src, s3_bucket):
    opts = s3_server.storage_options
    out = f"s3://{s3_bucket}/out"
    with hold([location(out, opts)]) as held:
        with pytest.raises(OutputError, match=rf"{out} is being written by another nyxray run \({held.leases[0].holder}"):
            nyxray.merge(STAGE1A, out, models_root=s3_src, storage_options=opts, executor="local", device="cpu", out_shard_size=SHARD, progress=False)
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    assert fs.ls(f"{s3_bucket}/out") if fs.exists(f"{s3_bucket}/out") else [] == []  # lease released, nothing else written
    nyxray.merge(STAGE1A, out, models_root=s3_src, storage_options=opts, executor="local", device="cpu", out_shard_size=SHARD, progress=False)
    assert nyxray.verify(out, opts) == []
    assert not fs.exists(f"{s3_bucket}/out/{LEASE}")


# -- atomic creation ----------------------------------------------------------------------------------


def race(loc, n: int = 8) -> list[str]:
    """``n`` threads take the same lease at once: what each got ("won" or the error's text)."""
    results: list[str] = []
    barrier = threading.Barrier(n)

    def take() -> None:
        lease = lease_mod.Lease(loc, ttl=60)
        barrier.wait()
        try:
            lease.acquire()
            results.append("won")
        except OutputError as e:
            results.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_takers_exactly_one_wins_locally(tmp_path):
    results = race(location(str(tmp_path / "out")))
    assert results.count("won") == 1, results
    assert all("being written by another nyxray run" in r for r in results if r != "won")


def test_concurrent_takers_exactly_one_wins_on_s3(s3_server, s3_bucket):
    results = race(location(f"s3://{s3_bucket}/out", s3_server.storage_options))
    assert results.count("won") == 1, results


def test_concurrent_takeover_of_a_stale_lease_exactly_one_wins(tmp_path, s3_server, s3_bucket):
    # Locally the race is cheap: run it many times (a check-then-move design lost 1 round in ~10).
    rounds = [location(str(tmp_path / f"out{i}")) for i in range(20)] + [location(f"s3://{s3_bucket}/out", s3_server.storage_options)]
    for loc in rounds:
        loc.makedirs()
        loc.write_atomic(LEASE, foreign_lease(expires_in=-1))
        results = race(loc)
        assert results.count("won") == 1, (loc.display, results)


# -- stale leases -------------------------------------------------------------------------------------


def test_expired_lease_is_taken_over_locally_and_on_s3(nyxene_sources, s3_server, s3_src, s3_bucket, tmp_path):
    local = str(tmp_path / "out")
    os.makedirs(local)
    with open(os.path.join(local, LEASE), "wb") as f:
        f.write(foreign_lease(expires_in=-5))
    merge(local, nyxene_sources)
    assert nyxray.verify(local) == [] and not os.path.exists(os.path.join(local, LEASE))

    opts = s3_server.storage_options
    remote = f"s3://{s3_bucket}/out"
    location(remote, opts).write_atomic(LEASE, foreign_lease(expires_in=-5))
    nyxray.merge(STAGE1A, remote, models_root=s3_src, storage_options=opts, executor="local", device="cpu", out_shard_size=SHARD, progress=False)
    assert nyxray.verify(remote, opts) == []
    assert not s3fs.S3FileSystem(**opts, skip_instance_cache=True).exists(f"{s3_bucket}/out/{LEASE}")


def test_live_foreign_lease_blocks_and_a_dead_local_holder_does_not(nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, LEASE), "wb") as f:
        f.write(foreign_lease(expires_in=100))
    with pytest.raises(OutputError, match="elsewhere pid 4242"):
        merge(out, nyxene_sources)
    # the same lease, but held by a process of this machine that has exited: stale at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {**json.loads(foreign_lease(expires_in=100)), **lease_mod._process(), "pid": dead.pid}
    with open(os.path.join(out, LEASE), "w") as f:
        json.dump(info, f)
    merge(out, nyxene_sources)
    assert nyxray.verify(out) == []


def test_a_run_that_lost_its_lease_does_not_commit(nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    env = dict(os.environ, NYXRAY_LEASE_TTL="2")
    cmd = merge_command(out, nyxene_sources)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(out, LEASE)) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        time.sleep(2.5)  # its lease expires unrenewed
        merge(out, nyxene_sources, out_shard_size="300K")  # takes the expired lease over and commits
        committed = open(os.path.join(out, "nyxray-manifest.json"), "rb").read()
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 1
    err = first.stderr.read().decode()
    assert "no longer owns the output" in err, err
    assert open(os.path.join(out, "nyxray-manifest.json"), "rb").read() == committed
    assert nyxray.verify(out) == []
