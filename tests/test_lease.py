"""One writer per output (``OUT/.nyxray-lease.json``), locally and on a real S3 server: a second
merge into an output being written stops at once naming the output and the holder; creation is
atomic (of many concurrent takers exactly one wins); a stale lease (expired, or held by a dead
process of this machine) is taken over; a run that lost its lease does not commit."""

from __future__ import annotations

import contextlib
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

    def objects() -> list[str]:
        """The key of every object under the output, listed by the server (no client-side cache)."""
        listing = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="out/")
        assert not listing.get("IsTruncated")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    with hold([location(out, opts)]) as held:
        with pytest.raises(OutputError, match=rf"{out} is being written by another nyxray run \({held.leases[0].holder}"):
            nyxray.merge(STAGE1A, out, models_root=s3_src, storage_options=opts, executor="local", device="cpu", out_shard_size=SHARD, progress=False)
        assert objects() == [f"out/{LEASE}"]  # the refused run wrote nothing beside the holder's lease
        assert s3_server.list_pending_uploads(s3_bucket) == []  # nor began an upload
    assert objects() == []  # the lease released, nothing else written
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
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
        except Exception as e:  # noqa: BLE001 - counted as neither a win nor a refusal
            results.append(f"error {e!r}")

    threads = [threading.Thread(target=take, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), f"a taker hung: {results}"
    assert len(results) == n, f"only {len(results)} of {n} takers reported: {results}"
    return results


def test_concurrent_takers_exactly_one_wins_locally(tmp_path):
    results = race(location(str(tmp_path / "out")))
    assert results.count("won") == 1, results
    assert all("being written by another nyxray run" in r for r in results if r != "won"), results


def test_concurrent_takers_exactly_one_wins_on_s3(s3_server, s3_bucket):
    for i in range(2):
        results = race(location(f"s3://{s3_bucket}/out{i}", s3_server.storage_options))
        assert results.count("won") == 1, (i, results)
        assert all("being written by another nyxray run" in r for r in results if r != "won"), (i, results)


def test_concurrent_takeover_of_a_stale_lease_exactly_one_wins(tmp_path, s3_server, s3_bucket):
    # Locally the race is cheap: run it many times (a check-then-move design lost 1 round in ~10).
    rounds = [location(str(tmp_path / f"out{i}")) for i in range(20)] + [location(f"s3://{s3_bucket}/out", s3_server.storage_options)]
    for loc in rounds:
        loc.makedirs()
        loc.write_atomic(LEASE, foreign_lease(expires_in=-1))
        results = race(loc)
        assert results.count("won") == 1, (loc.display, results)
        assert all("being written by another nyxray run" in r for r in results if r != "won"), (loc.display, results)


# A taker in a process of its own. For each line ``URL START`` on stdin it sleeps until the wall-clock
# time START (every taker is told the same one: a barrier across processes), tries to take URL's
# lease and prints one JSON line: {"url", "holder", and "won": true | "refused": message | "error"}.
# A winner keeps its lease (unrenewed, TTL 60 s) while its process lives: the parent closes stdin
# only after every taker has reported, so a won lease never belongs to a dead process mid-round.
TAKER = """
import json, sys, time
from nyxray.errors import OutputError
from nyxray.io.location import location
from nyxray.output import lease as lease_mod

opts = json.loads(sys.argv[1])
held = []
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    url, start = line.split()
    lease = lease_mod.Lease(location(url, opts), ttl=60)
    time.sleep(max(0.0, float(start) - time.time()))
    out = {"url": url, "holder": lease.holder}
    try:
        lease.acquire()
        out["won"] = True
        held.append(lease)
    except OutputError as e:
        out["refused"] = str(e)
    except Exception as e:
        out["error"] = repr(e)
    print(json.dumps(out), flush=True)
"""


class Takers:
    """``n`` taker processes (:data:`TAKER`), each answering on its stdout, read by a thread."""

    def __init__(self, n: int, opts: dict | None = None):
        import queue

        self.answers: queue.Queue = queue.Queue()
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", TAKER, json.dumps(opts or {})],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
                start_new_session=True,
            )
            for _ in range(n)
        ]
        self.readers = [threading.Thread(target=self._read, args=(i, p), daemon=True) for i, p in enumerate(self.procs)]
        for t in self.readers:
            t.start()
        ready = self._collect(set(range(n)), timeout=60)
        assert all(a.get("ready") for a in ready.values()), ready

    def _read(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.answers.put((i, line))

    def _collect(self, expected: set[int], timeout: float) -> dict[int, dict]:
        """One answer from each taker in ``expected``, waiting at most ``timeout`` seconds in all."""
        import queue

        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while set(got) != expected:
            try:
                i, line = self.answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            assert i not in got, f"taker {i} answered twice: {got[i]} then {line!r}"
            got[i] = json.loads(line)
        silent = sorted(expected - set(got))
        assert not silent, f"takers {silent} did not report within {timeout} s (exit codes {[self.procs[i].poll() for i in silent]}); the others: {got}"
        return got

    def round(self, url: str) -> dict[int, dict]:
        """Every taker tries to take ``url``'s lease at the same moment: each one's answer."""
        start = time.time() + 0.3
        for p in self.procs:
            p.stdin.write(f"{url} {start}\n")
            p.stdin.flush()
        return self._collect(set(range(len(self.procs))), timeout=60)

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in self.procs:
            try:
                assert p.wait(timeout=30) == 0, f"a taker exited with {p.returncode}"
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def check_round(loc, answers: dict[int, dict]) -> None:
    """Exactly one winner; every other taker refused, naming the output and that winner; the lease
    on storage is the winner's."""
    won = [a for a in answers.values() if a.get("won")]
    assert len(won) == 1, (loc.display, answers)
    winner = won[0]["holder"]
    for a in answers.values():
        if a is not won[0]:
            assert "refused" in a, (loc.display, a)
            assert f"{loc.display} is being written by another nyxray run ({winner};" in a["refused"], (loc.display, winner, a)
    current = loc.backend.cas_read(LEASE)
    assert current is not None and json.loads(current[0])["holder"] == winner, (loc.display, current)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_processes_racing_for_one_lease_exactly_one_wins_every_round(where, tmp_path, request):
    """Several OS processes take the same output's lease at once, round after round (a fresh output,
    then one whose lease expired): each round has exactly one winner and every other taker reports
    a refusal naming it; none is silent."""
    if where == "s3":
        s3_server = request.getfixturevalue("s3_server")
        bucket, opts, rounds = request.getfixturevalue("s3_bucket"), s3_server.storage_options, 4
        base = f"s3://{bucket}"
    else:
        opts, rounds, base = {}, 10, str(tmp_path)
    takers = Takers(6, opts)
    try:
        for r in range(rounds):
            url = f"{base}/out{r}"
            loc = location(url, opts)
            if r % 2:  # an expired lease of a foreign run, to be taken over
                loc.makedirs()
                loc.write_atomic(LEASE, foreign_lease(expires_in=-1))
            check_round(loc, takers.round(url))
    finally:
        takers.close()


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
