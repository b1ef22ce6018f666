"""The Ray executor on a real multi-node cluster (the session's ``ray_cluster``: a head with 1 CPU and
two worker nodes with 2 CPUs each, all on 127.0.0.1).

* the output is byte-identical whatever the number of actors, and identical to the in-process
  executor's;
* units run on more than one node, and the report says which actor ran what, where;
* a worker node removed mid-merge costs only the units it was running: the run completes with the
  same bytes;
* a unit that fails for a deterministic reason (a source file truncated or deleted after planning)
  fails the run once, at once, naming the file; no retries;
* actors the cluster cannot place never hold a unit hostage; ``device="cuda"`` without a GPU fails
  at once.

Every merge runs under a time bound so that a hang fails the test instead of blocking CI, and
every ``ray.get`` has a timeout (the test itself calls none).

Determinism without a test hook in nyxray: where a test needs actors to be in the middle of a
unit at a given moment, the sources are served over HTTP from this process (:class:`GatedFiles`)
through a gate the test opens and closes. Actors that wait at the gate are provably mid-unit; the
test knows which units are waiting from the byte ranges requested.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import nyxray.api as api
from nyxray.errors import NyxrayError
from nyxray.execute.choice import choose
from nyxray.execute.execution import Execution, Writes
from nyxray.io.location import location
from nyxray.plan.expr import leaves
from nyxray.run import Target, run_targets
from tests.conftest import RAY_WORKER_NODE_ARGS
from tests.records import finished_shards

ray = pytest.importorskip("ray")

PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "nyxene-v2-11b.pipeline.yml")
SHARD_SIZE = "1M"  # 17 output shards from the synthetic Nyxene sources: many units
MERGE_TIMEOUT = 150  # seconds; an actor's start imports torch (seconds on 2 busy cores)
ACTOR_FIELDS = ("actor", "node_id", "device", "units", "bytes_read", "bytes_written", "busy_s", "hash_s", "units_lost")


# -- helpers -------------------------------------------------------------------------------------


class Background:
    """``fn()`` in a daemon thread; :meth:`result` joins it with a bound (a hang fails the test)."""

    def __init__(self, fn: Callable[[], Any]):
        self.box: dict = {}

        def target() -> None:
            try:
                self.box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                self.box["error"] = e

        self.thread = threading.Thread(target=target, name="nyxray-test-merge", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout: float = MERGE_TIMEOUT) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"the merge did not finish within {timeout} s (hang)")
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]


def bounded(fn: Callable[[], Any], timeout: float = MERGE_TIMEOUT) -> Any:
    return Background(fn).result(timeout)


def merge(out: str, models_root: str, **kw: Any) -> dict:
    kw.setdefault("executor", "ray")
    return api.merge(PIPELINE, out, models_root=models_root, out_shard_size=SHARD_SIZE, device=kw.pop("device", "cpu"), progress=False, **kw)


def stray_temps(out: str) -> list[str]:
    """Temporary shard files of writers that never finished (``.<shard>.nyxray-<id>.tmp``)."""
    return sorted(n for n in os.listdir(out) if n.startswith(".") and ".nyxray-" in n and n.endswith(".tmp"))


def files_of(out: str) -> dict[str, str]:
    """sha256 of every file of a committed output (no leftover state directory allowed; stray
    temporary files are checked separately, see :func:`stray_temps`)."""
    names = sorted(set(os.listdir(out)) - set(stray_temps(out)))
    assert ".nyxray" not in names, f"{out}: the run state was not cleaned up"
    assert "nyxray-manifest.json" in names, f"{out}: not committed"
    digests = {}
    for n in names:
        with open(os.path.join(out, n), "rb") as f:
            digests[n] = hashlib.sha256(f.read()).hexdigest()
    return digests


def check_report(report: dict, actors: int, alive_only: bool = True) -> None:
    """The report's per-actor part: every field, consistent totals, a sane balance."""
    workers = report["actors"]
    assert len(workers) == actors
    for w in workers:
        assert set(ACTOR_FIELDS) <= set(w), w
        assert w["device"] == "cpu"
        assert isinstance(w["node_id"], str) and len(w["node_id"]) == 56, w  # a Ray node id (hex)
        assert w["units"] >= 1 and w["busy_s"] > 0 and w["bytes_written"] > 0 and w["bytes_read"] > 0, w
        assert 0 < w["hash_s"] < w["busy_s"], w  # every written byte is hashed, inside the unit's time
    assert sum(w["units"] for w in workers) == report["shards"]
    assert sum(w["bytes_written"] for w in workers) == report["bytes_written"]
    assert sum(w["bytes_read"] for w in workers) == report["bytes_read_tensors"]
    moved = [w["bytes_read"] + w["bytes_written"] for w in workers]
    assert report["balance"] == pytest.approx(max(moved) / (sum(moved) / len(moved)), abs=1e-3)
    assert 1.0 <= report["balance"] <= actors
    if alive_only:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert {w["node_id"] for w in workers} <= alive


class GatedFiles:
    """Serve a directory over HTTP/1.1 (listings, HEAD, Range) from this process, with a gate.

    Ranged reads of tensor data wait while the gate is closed (reads from byte 0 or 8, the
    safetensors length and header that planning reads, always pass). ``waiting`` holds the
    (file, first byte) of every read waiting at the gate.
    """

    def __init__(self, root: str):
        self.root = root
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.waiting: dict[tuple[str, int], int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                try:
                    outer._serve(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a reader that died with its node

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="gated-files", daemon=True).start()

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = os.path.join(self.root, h.path.split("?", 1)[0].lstrip("/"))
        if os.path.isdir(path):
            data = "".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>\n' for n in sorted(os.listdir(path))).encode()
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if body:
                h.wfile.write(data)
            return
        if not os.path.isfile(path):
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        size = os.path.getsize(path)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if m and body and int(m.group(1)) > 8:
            key = (os.path.relpath(path, self.root), int(m.group(1)))
            with self.lock:
                self.waiting[key] = self.waiting.get(key, 0) + 1
            try:
                while not self.gate.wait(0.05):
                    pass
            finally:
                with self.lock:
                    self.waiting[key] -= 1
                    if not self.waiting[key]:
                        del self.waiting[key]
        with open(path, "rb") as f:
            if m:
                a = int(m.group(1))
                b = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
                f.seek(a)
                data = f.read(b - a + 1)
                h.send_response(206)
                h.send_header("Content-Range", f"bytes {a}-{b}/{size}")
            else:
                data = f.read() if body else b""
                h.send_response(200)
            h.send_header("Accept-Ranges", "bytes")
            h.send_header("Content-Length", str(len(data) if (m or body) else size))
            h.end_headers()
            if body:
                h.wfile.write(data)

    def unit_map(self, plan: Any) -> dict[tuple[str, int], str]:
        """(file, first byte) of each source tensor -> the output shard (unit) that reads it.
        In this pipeline every source tensor feeds exactly one output tensor."""
        out = {}
        for shard in plan.final.shards:
            for t in shard.tensors:
                for leaf in leaves(t.expr):
                    out[(leaf.loc.url(leaf.file)[len(self.url) + 1 :], leaf.start)] = shard.name
        return out

    def wait_for_units(self, unit_of: dict, count: int, run: Background, timeout: float = 90) -> set[str]:
        """Wait until ``count`` distinct units have reads waiting at the gate, unchanged for 1 s."""
        deadline = time.monotonic() + timeout
        last: set[str] = set()
        since = time.monotonic()
        while time.monotonic() < deadline and run.alive():
            with self.lock:
                now = {unit_of.get(k, f"?{k}") for k in self.waiting}
            if now != last:
                last, since = now, time.monotonic()
            elif len(now) >= count and time.monotonic() - since >= 1.0:
                return now
            time.sleep(0.05)
        self.gate.set()
        if not run.alive():
            run.result(0)  # raises the merge's own error
        pytest.fail(f"{count} units did not reach the gate within {timeout} s: waiting {sorted(last)}")

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(nyxene_sources):
    srv = GatedFiles(nyxene_sources)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def served_plan(served):
    p = api.plan(PIPELINE, models_root=served.url, out_shard_size=SHARD_SIZE)
    return p, served.unit_map(p)


@pytest.fixture(scope="module")
def served_baseline(served, tmp_path_factory):
    """The in-process executor's output for the HTTP-served sources (same plan as the Ray runs)."""
    out = str(tmp_path_factory.mktemp("served-local") / "out")
    report = bounded(lambda: merge(out, served.url, executor="local"))
    assert report["shards"] >= 8, "too few units to spread over actors"
    assert stray_temps(out) == []
    return files_of(out), report


@pytest.fixture(scope="module")
def local_baseline(nyxene_sources, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local") / "out")
    report = bounded(lambda: merge(out, nyxene_sources, executor="local"))
    return files_of(out), report


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("actors", [1, 2, 4])
def test_same_bytes_whatever_the_number_of_actors(ray_cluster, served, served_plan, served_baseline, tmp_path, actors):
    """Every one of the actors runs units (the gate holds the first units until each actor waits
    in one), and the output is the in-process executor's, byte for byte."""
    expected, local_report = served_baseline
    _, unit_of = served_plan
    out = str(tmp_path / "out")
    served.gate.clear()
    try:
        run = Background(lambda: merge(out, served.url, actors=actors))
        served.wait_for_units(unit_of, actors, run)
    finally:
        served.gate.set()
    report = run.result()
    assert files_of(out) == expected
    assert stray_temps(out) == []
    assert report["bytes_written"] == local_report["bytes_written"]
    assert report["bytes_read_tensors"] == local_report["bytes_read_tensors"]
    check_report(report, actors)
    assert sum(w["units_lost"] for w in report["actors"]) == 0
    if actors == 4:
        # 4 one-CPU actors that all ran units cannot share a node (the largest has 2 CPUs).
        assert len({w["node_id"] for w in report["actors"]}) > 1, report["actors"]


def test_local_paths_same_bytes_as_in_process(ray_cluster, nyxene_sources, local_baseline, tmp_path):
    """Sources on a local path (no gate): as many actors as the cluster has CPUs."""
    expected, _ = local_baseline
    out = str(tmp_path / "out")
    report = bounded(lambda: merge(out, nyxene_sources))  # actors=None: one per CPU of the cluster
    assert files_of(out) == expected
    assert len(report["actors"]) == 5  # 1 + 2 + 2 CPUs
    assert sum(w["units"] for w in report["actors"]) == report["shards"]


def test_deterministic_unit_failure_fails_once_naming_the_cause(ray_cluster, nyxene_sources, tmp_path):
    src = str(tmp_path / "sources")
    shutil.copytree(nyxene_sources, src)
    p = api.plan(PIPELINE, models_root=src, out_shard_size=SHARD_SIZE)
    # The last shard's first tensor: break its file after planning, before any byte is read.
    leaf = next(iter(leaves(p.final.shards[-1].tensors[0].expr)))
    victim = leaf.loc.path(leaf.file)
    with open(victim, "r+b") as f:
        f.truncate(leaf.start + 10)  # inside the tensor's range: the header still parses
    text = open(PIPELINE, encoding="utf-8").read()
    # api.merge = plan + run_targets; here the two steps are apart so the file breaks in between.
    out = str(tmp_path / "out")
    started = time.monotonic()
    with pytest.raises(NyxrayError) as err:
        bounded(
            lambda: run_targets(
                [Target(location(out), p.final, text)], Execution(executor="ray", device="cpu", actors=3, progress=False), choose("ray"), Writes()
            )
        )
    elapsed = time.monotonic() - started
    msg = str(err.value)
    assert "RayTaskError" not in type(err.value).__name__ and "Traceback" not in msg and "\n" not in msg, msg
    assert leaf.file in msg and "truncated" in msg, msg
    assert "lost" not in msg and "giving up" not in msg, msg  # not taken for a lost actor and retried
    assert elapsed < 60, f"failed only after {elapsed:.0f} s: retried?"
    assert not os.path.exists(os.path.join(out, "nyxray-manifest.json"))

    # A deleted file: the same, with "not found". Asked to keep its actors, a failed run stops them.
    os.unlink(victim)
    out2 = str(tmp_path / "out2")
    seen = set(_merge_actor_states())
    with pytest.raises(NyxrayError) as err:
        bounded(
            lambda: run_targets(
                [Target(location(out2), p.final, text)],
                Execution(executor="ray", device="cpu", actors=2, keep_actors=120, progress=False),
                choose("ray"),
                Writes(),
            )
        )
    assert leaf.file in str(err.value) and "not found" in str(err.value), str(err.value)
    assert not os.path.exists(os.path.join(out2, "nyxray-manifest.json"))
    started_here = set(_merge_actor_states()) - seen
    assert len(started_here) == 2
    _wait_dead(started_here)
    assert api.release_actors() == 0


def test_more_actors_than_the_cluster_holds(ray_cluster, nyxene_sources, local_baseline, tmp_path):
    """8 one-CPU actors on 5 CPUs: those that cannot start get no unit; the run completes."""
    expected, _ = local_baseline
    out = str(tmp_path / "out")
    report = bounded(lambda: merge(out, nyxene_sources, actors=8), timeout=90)
    assert files_of(out) == expected
    assert len(report["actors"]) == 8
    worked = [w for w in report["actors"] if w["units"]]
    assert 1 <= len(worked) <= 5
    assert sum(w["units"] for w in report["actors"]) == report["shards"]
    for w in report["actors"]:
        if w["node_id"] is None:  # never started
            assert w["units"] == 0 and w["device"] is None, w


def test_cuda_without_a_gpu_fails_at_once(ray_cluster, nyxene_sources, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(NyxrayError, match="no CUDA device"):
        bounded(lambda: merge(out, nyxene_sources, device="cuda", actors=2), timeout=90)
    assert not os.path.exists(os.path.join(out, "nyxray-manifest.json"))


def _merge_actors() -> dict[str, dict]:
    """Actor id -> GCS record of every MergeActor this cluster has had (no dashboard needed)."""
    from ray._private import state

    return {aid: info for aid, info in state.actors().items() if info["ActorClassName"].endswith("MergeActor")}


def _merge_actor_nodes() -> dict[str, int]:
    """Node id -> number of live MergeActors there."""
    out: dict[str, int] = {}
    for info in _merge_actors().values():
        if info["State"] == "ALIVE":
            node = info["Address"]["NodeID"]
            out[node] = out.get(node, 0) + 1
    return out


def test_worker_node_killed_mid_merge(ray_cluster, served, served_plan, served_baseline, tmp_path):
    """Remove a worker node while its actor is in the middle of a unit: the run completes, the
    output is the same, and the report counts the lost unit. The node is added back after."""
    expected, _ = served_baseline
    p, unit_of = served_plan
    total = len(p.final.shards)
    out = str(tmp_path / "out")
    removed = None
    served.gate.clear()
    try:
        run = Background(lambda: merge(out, served.url, actors=3))
        # Each of the 3 actors starts a unit and waits at the gate. Let them through until a unit
        # is recorded, then close the gate again: every actor waits in its next unit.
        served.wait_for_units(unit_of, 3, run)
        served.gate.set()
        deadline = time.monotonic() + 60
        while not finished_shards(out):
            assert time.monotonic() < deadline and run.alive(), "no unit finished"
            time.sleep(0.005)
        served.gate.clear()
        in_flight = served.wait_for_units(unit_of, 3, run)
        done = finished_shards(out)
        assert 1 <= len(done) <= total - 3, (done, total)
        assert not in_flight & done

        hosts = _merge_actor_nodes()
        assert sum(hosts.values()) == 3, hosts
        victims = [n for n in ray_cluster.worker_nodes if hosts.get(n.node_id)]
        assert victims, f"no worker node hosts a merge actor: {hosts}"
        removed = victims[0]
        t0 = time.monotonic()
        ray_cluster.remove_node(removed)  # its actor waits at the gate, in the middle of a unit
        removed_s = time.monotonic() - t0
        served.gate.set()
        report = run.result()
        finished_s = time.monotonic() - t0
    finally:
        served.gate.set()
        if removed is not None:  # restore the session's cluster for the tests that follow
            ray_cluster.add_node(**RAY_WORKER_NODE_ARGS, resources=dict(removed._ray_params.resources or {}))
            ray_cluster.wait_for_nodes(timeout=60)
    print(
        f"\nremoved node {removed.node_id[:8]} in {removed_s:.1f} s after {len(done)}/{total} units; run done {finished_s:.1f} s after;"
        f" actors (node, units, lost): {[(w['node_id'][:8], w['units'], w['units_lost']) for w in report['actors']]}"
    )
    assert files_of(out) == expected
    assert report["shards"] == total
    lost = sum(w["units_lost"] for w in report["actors"])
    assert lost >= 1, f"no unit was lost with the node: {report['actors']}"
    check_report(report, 3, alive_only=False)  # an actor's last unit may have run on the removed node
    assert not stray_temps(out), "a killed writer's temporary file was left in the committed output"


def _merge_actor_states() -> dict[str, str]:
    """Actor id -> state (ALIVE, DEAD, ...) of every MergeActor this cluster has had."""
    return {aid: info["State"] for aid, info in _merge_actors().items()}


def _wait_dead(ids: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _merge_actor_states()
        if all(states.get(a) == "DEAD" for a in ids):
            return
        time.sleep(0.2)
    pytest.fail(f"kept actors still alive after {timeout} s: {[(a, _merge_actor_states().get(a)) for a in ids]}")


def test_kept_actors_run_the_next_merge_and_are_stopped(ray_cluster, nyxene_sources, local_baseline, tmp_path):
    """keep_actors: the next merge runs on the same actors (no new one), which is then stopped;
    kept actors stop by themselves after the idle time, on release_actors(), and when a merge
    needs actors of another shape."""
    import nyxray

    expected, _ = local_baseline
    seen = set(_merge_actor_states())

    def new_actors() -> set[str]:
        ids = set(_merge_actor_states()) - seen
        seen.update(ids)
        return ids

    bounded(lambda: merge(str(tmp_path / "a" / "out"), nyxene_sources, actors=2, keep_actors=120))
    kept = new_actors()
    assert len(kept) == 2 and all(_merge_actor_states()[a] == "ALIVE" for a in kept)
    report = bounded(lambda: merge(str(tmp_path / "b" / "out"), nyxene_sources, actors=2))  # reuses them, keeps nothing
    assert files_of(str(tmp_path / "b" / "out")) == expected
    assert new_actors() == set(), "the second merge started actors instead of reusing the kept ones"
    check_report(report, 2)
    _wait_dead(kept)

    bounded(lambda: merge(str(tmp_path / "c" / "out"), nyxene_sources, actors=2, keep_actors=1))
    _wait_dead(new_actors())  # the idle timer stops them

    bounded(lambda: merge(str(tmp_path / "d" / "out"), nyxene_sources, actors=2, keep_actors=120))
    assert nyxray.release_actors() == 2
    _wait_dead(new_actors())
    assert nyxray.release_actors() == 0

    bounded(lambda: merge(str(tmp_path / "e" / "out"), nyxene_sources, actors=2, keep_actors=120))
    kept = new_actors()
    bounded(lambda: merge(str(tmp_path / "f" / "out"), nyxene_sources, actors=1, actor_cpus=2))  # another shape
    assert files_of(str(tmp_path / "f" / "out")) == expected
    assert len(new_actors()) == 1
    _wait_dead(kept)  # stopped before the new actor was asked for: no CPUs held hostage


def _watch_plan(monkeypatch, seen: set[str], expected: int) -> dict[str, set[str]]:
    """Make ``api.plan`` note (under ``"actors"``) the merge actors alive, beyond ``seen``, when it starts.

    Ray registers an actor with the GCS a little after ``.remote()`` returns, and no actor can be
    asked for while the merge waits for its plan: so the watch waits (up to 60 s) until the
    ``expected`` actors asked for before the plan have registered, then looks for a second more
    for any extra one. A slow registration costs time, never a wrong count."""
    during_plan: dict[str, set[str]] = {}
    real_plan = api.plan

    def watched_plan(*args: Any, **kwargs: Any):
        def alive() -> set[str]:
            return {a for a, s in _merge_actor_states().items() if a not in seen and s != "DEAD"}

        deadline = time.monotonic() + 60
        found = alive()
        while len(found) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
            found = alive()
        extra_until = time.monotonic() + 1.0  # only an extra actor (a bug) can still appear
        while time.monotonic() < extra_until and len(found) == expected:
            time.sleep(0.1)
            found = alive()
        during_plan["actors"] = found
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(api, "plan", watched_plan)
    return during_plan


def test_merge_actors_allocate_from_one_malloc_arena(ray_cluster):
    """Actors are started with MALLOC_ARENA_MAX=1 (nyxray.execute.heap: a thread's own arena maps
    and unmaps every big buffer, faulting it in afresh), whatever the job's environment, and with
    the merge's CPU kernel set for torch to read when it loads (nyxray.execute.cpu_capability)."""
    from nyxray.execute import ray_exec

    _, create = ray_exec._actor_kind("cpu", 0.5, 0, "default")
    actor = create(0)
    try:
        ray.get(actor.ready.remote(False), timeout=MERGE_TIMEOUT)
        pid = _merge_actors()[actor._actor_id.hex()]["Pid"]
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        assert b"MALLOC_ARENA_MAX=1" in environ
        assert b"ATEN_CPU_CAPABILITY=default" in environ
    finally:
        ray.kill(actor)


def test_actors_start_while_the_driver_plans(ray_cluster, nyxene_sources, local_baseline, tmp_path, monkeypatch):
    """On a named cluster the merge actors are started before the plan is made (their start-up
    overlaps the header reads) and the merge then runs on exactly those; a plan that fails stops them."""
    expected, _ = local_baseline
    seen = set(_merge_actor_states())
    during_plan = _watch_plan(monkeypatch, seen, 2)
    out = str(tmp_path / "out")
    report = bounded(lambda: merge(out, nyxene_sources, actors=2))
    assert files_of(out) == expected
    assert len(during_plan["actors"]) == 2, "no actor was started before planning"
    assert set(_merge_actor_states()) - seen == during_plan["actors"], "the merge started other actors than the warmed ones"
    check_report(report, 2)
    _wait_dead(during_plan["actors"])  # not kept: stopped with the merge

    seen = set(_merge_actor_states())
    with pytest.raises(NyxrayError, match="no-such-model"):
        bounded(
            lambda: api.merge(
                PIPELINE,
                str(tmp_path / "bad"),
                models={"fblgit/una-cybertron-7b-v2": str(tmp_path / "no-such-model")},
                models_root=nyxene_sources,
                executor="ray",
                actors=2,
                progress=False,
            )
        )
    warmed = set(_merge_actor_states()) - seen
    assert len(warmed) == 2  # started before the plan failed...
    _wait_dead(warmed)  # ...and stopped because it did
    assert not os.path.exists(str(tmp_path / "bad"))


def test_warm_up_is_capped_and_the_merge_starts_the_rest(ray_cluster, nyxene_sources, local_baseline, tmp_path, monkeypatch):
    """At most WARM_MAX actors start before the plan (a big cluster's every slot would be waste for a
    small merge); a merge with more units starts the others after planning."""
    from nyxray.execute import ray_exec

    expected, _ = local_baseline
    monkeypatch.setattr(ray_exec, "WARM_MAX", 1)
    seen = set(_merge_actor_states())
    during_plan = _watch_plan(monkeypatch, seen, 1)
    out = str(tmp_path / "out")
    report = bounded(lambda: merge(out, nyxene_sources, actors=2))
    assert files_of(out) == expected
    assert len(during_plan["actors"]) == 1
    assert len(set(_merge_actor_states()) - seen) == 2
    check_report(report, 2)
