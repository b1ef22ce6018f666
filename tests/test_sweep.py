"""Sweeps (``nyxray.sweep`` / ``nyxray sweep``): many SLERP recipes over the same two synthetic
Nyxene sources in one run.

* every member's shards are byte-identical to the member's recipe merged alone, and the sweep reads
  about what one member reads (each input tensor once for all members);
* members are independent: a bad one is reported at plan time and the others are written, unless
  ``fail_fast`` (then nothing is written); the CLI exits 1 when a member failed;
* a re-run into the same OUT skips complete members and reads only headers;
* errors in the sweep file itself name the culprit;
* the same sweep on the session's Ray cluster, and submitted as a Ray job (``ray job submit``) to a
  Ray head this test starts, writes the same bytes.

The job test starts its own head (``ray start --head --block``, in a new session, a fresh temp dir,
every port chosen free) and, whatever happens, stops exactly that head: it signals the ``ray start``
process and then kills whatever is left in its session. It never runs ``ray stop``: that kills every
Ray process on the machine, the session's ``ray_cluster`` included.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import yaml

import nyxray
import nyxray.api as api
from nyxray.cli import main as cli
from nyxray.errors import NyxrayError, RecipeError

SHARD_SIZE = "4M"  # three output shards per member: several fused units
TIMEOUT = 150  # seconds, for any one Ray run (actor start-up imports torch on 2 busy cores)
UNA, LOYAL = "fblgit/una-cybertron-7b-v2", "chargoddard/loyal-piano-m7-cdpo"

BASE = f"""\
slices:
  - sources:
      - model: {UNA}
        layer_range: [0, 16]
      - model: {LOYAL}
        layer_range: [0, 16]
merge_method: slerp
base_model: {UNA}
parameters:
  t: 0.5
dtype: bfloat16
"""
FILTERS = BASE.replace(
    "  t: 0.5\n", "  t:\n    - filter: self_attn\n      value: [0.75, 0.25]\n    - filter: mlp\n      value: [0.25, 0.75]\n    - value: 0.4\n"
)
INLINE = {  # another base model and t: the same tensors to read, other bytes to write
    "slices": [{"sources": [{"model": LOYAL, "layer_range": [0, 16]}, {"model": UNA, "layer_range": [0, 16]}]}],
    "merge_method": "slerp",
    "base_model": LOYAL,
    "parameters": {"t": 0.3},
    "dtype": "bfloat16",
}
T_VALUES = [0.25, 0.5, 0.75]
GRID_NAMES = [f"t={t}" for t in T_VALUES]
NAMES = sorted(GRID_NAMES + ["filters", "inline"])


def sweep_doc(**extra: Any) -> dict:
    doc = {
        "base": "base.yml",
        "grid": {"parameters.t": list(T_VALUES)},
        "members": [{"name": "filters", "recipe": "members/filters.yml"}, {"name": "inline", "recipe": copy.deepcopy(INLINE)}],
    }
    doc.update(extra)
    return doc


def write_sweep(d: str, doc: dict, name: str = "sweep.yml") -> str:
    os.makedirs(os.path.join(d, "members"), exist_ok=True)
    with open(os.path.join(d, "base.yml"), "w") as f:
        f.write(BASE)
    with open(os.path.join(d, "members", "filters.yml"), "w") as f:
        f.write(FILTERS)
    path = os.path.join(d, name)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def alone_recipe(name: str) -> str:
    """The YAML of member ``name`` as a recipe of its own, written independently of the sweep code."""
    if name == "filters":
        return FILTERS
    if name == "inline":
        return yaml.safe_dump(INLINE, sort_keys=False)
    t = name.removeprefix("t=")
    assert name.startswith("t=") and "  t: 0.5\n" in BASE
    return BASE.replace("  t: 0.5\n", f"  t: {t}\n")


def digests(out: str) -> dict[str, str]:
    """sha256 of the model files of an output: shards, index, config."""
    names = [os.path.basename(p) for p in glob.glob(os.path.join(out, "*.safetensors"))]
    assert names, f"{out}: no shards"
    names += ["model.safetensors.index.json", "config.json"]
    return {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest() for n in sorted(names)}


def file_stats(root: str) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def bounded(fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """``fn()`` in a thread: its result or its exception; the test fails if it hangs."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    th = threading.Thread(target=target, name="nyxray-test-sweep", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        pytest.fail(f"the sweep did not finish within {timeout} s (hang)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_nyxray_sweep_stays_the_function():
    import nyxray.run  # noqa: F401 - what api.sweep runs on

    assert callable(nyxray.sweep)


def sweep(path: str, out: str, src: str, **kw: Any) -> dict:
    kw.setdefault("executor", "local")
    return api.sweep(path, out, models_root=src, out_shard_size=SHARD_SIZE, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> str:
    return write_sweep(str(tmp_path_factory.mktemp("sweepdef")), sweep_doc())


@pytest.fixture(scope="module")
def local_sweep(nyxene_sources, sweep_file, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("sweep") / "out")
    return out, sweep(sweep_file, out, nyxene_sources)


@pytest.fixture(scope="module")
def alone(nyxene_sources, tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """Every member's recipe merged on its own: name -> (output, report)."""
    root = tmp_path_factory.mktemp("alone")
    done = {}
    for name in NAMES:
        recipe = root / f"{name}.yml"
        recipe.write_text(alone_recipe(name))
        out = str(root / name)
        done[name] = out, nyxray.merge(str(recipe), out, models_root=nyxene_sources, out_shard_size=SHARD_SIZE, executor="local", device="cpu", progress=False)
    return done


def test_every_member_equals_its_recipe_merged_alone(local_sweep, alone):
    out, report = local_sweep
    assert sorted(os.listdir(out)) == NAMES  # readable names: t=0.25, ..., filters, inline
    assert sorted(report["members"]) == NAMES and report["failed"] == {}
    for name in NAMES:
        got, want = digests(os.path.join(out, name)), digests(alone[name][0])
        assert got == want, f"member {name}: differs from its recipe merged alone"
        assert len([n for n in got if n.endswith(".safetensors")]) == 3
        assert nyxray.verify(os.path.join(out, name)) == []
    # the members really are different models (t and the base model matter)
    shards = {name: digests(os.path.join(out, name))["model-00001-of-00003.safetensors"] for name in NAMES}
    assert len(set(shards.values())) == len(NAMES)
    # a grid member's card holds its own recipe: the base with its t
    card = yaml.safe_load(open(os.path.join(out, "t=0.75", "mergekit_config.yml")))
    assert card == yaml.safe_load(alone_recipe("t=0.75"))


def test_the_sweep_reads_about_what_one_member_reads(local_sweep, alone):
    out, report = local_sweep
    assert {"wall_s", "bytes_read", "bytes_written", "members", "failed"} <= set(report)
    assert report["wall_s"] > 0
    one = alone["t=0.5"][1]
    assert one["bytes_read"] > 2_000_000
    assert report["bytes_read"] <= 1.1 * one["bytes_read"], (report["bytes_read"], one["bytes_read"])
    # five models written, each as many bytes as alone
    assert report["bytes_written"] == sum(alone[n][1]["bytes_written"] for n in NAMES)
    for name, member in report["members"].items():
        assert member["output"] == os.path.join(out, name)
        assert member["bytes_written"] == alone[name][1]["bytes_written"]
        assert member["shards"] == 3 and member["shards_reused"] == 0 and not member["already_complete"]
    assert sum(m["bytes_read_tensors"] for m in report["members"].values()) + report["bytes_read_headers"] == report["bytes_read"]
    assert json.loads(json.dumps(report)) == report  # the report is plain JSON


def test_rerun_skips_complete_members_and_reads_only_headers(nyxene_sources, sweep_file, local_sweep):
    out, first = local_sweep
    before = file_stats(out)
    again = sweep(sweep_file, out, nyxene_sources)
    assert sorted(again["members"]) == NAMES and again["failed"] == {}
    for name, member in again["members"].items():
        assert member["already_complete"], name
        assert member["shards_reused"] == member["shards"] == 3
        assert member["bytes_read_tensors"] == 0 and member["bytes_written"] == 0
    assert again["bytes_read"] == again["bytes_read_headers"] == first["bytes_read_headers"]
    assert again["bytes_read"] < 100_000
    assert again["bytes_written"] == 0
    assert all(w["bytes_read"] == 0 for w in again["actors"])
    assert file_stats(out) == before  # nothing rewritten, nothing added


BAD_MEMBERS = [
    {
        "name": "too_deep",
        "recipe": {**copy.deepcopy(INLINE), "slices": [{"sources": [{"model": UNA, "layer_range": [0, 40]}, {"model": LOYAL, "layer_range": [0, 40]}]}]},
    },
    {
        "name": "ghost",
        "recipe": {
            **copy.deepcopy(INLINE),
            "slices": [{"sources": [{"model": "nobody/missing-7b", "layer_range": [0, 16]}, {"model": UNA, "layer_range": [0, 16]}]}],
            "base_model": "nobody/missing-7b",
        },
    },
]


UPPER = BASE.replace("[0, 16]", "[16, 32]")  # the same tensors to write from other inputs: fused, reads differ


def test_a_bad_member_is_reported_and_the_others_are_written(nyxene_sources, alone, tmp_path, capsys):
    path = write_sweep(
        str(tmp_path), {"base": "base.yml", "grid": {"parameters.t": [0.25, 0.75]}, "members": [{"name": "upper", "recipe": UPPER}, *BAD_MEMBERS]}
    )
    (tmp_path / "upper.yml").write_text(UPPER)
    upper_alone = str(tmp_path / "upper-alone")
    nyxray.merge(
        str(tmp_path / "upper.yml"), upper_alone, models_root=nyxene_sources, out_shard_size=SHARD_SIZE, executor="local", device="cpu", progress=False
    )

    # fail_fast: the first bad member stops the run at plan time; nothing is written
    out = str(tmp_path / "ff")
    with pytest.raises(NyxrayError, match=r"sweep member 'too_deep'.*layer_range"):
        sweep(path, out, nyxene_sources, fail_fast=True)
    assert not os.path.exists(out)
    assert cli(["sweep", path, out, "--models-root", nyxene_sources, "--executor", "local", "--quiet", "--out-shard-size", SHARD_SIZE, "--fail-fast"]) == 1
    assert "too_deep" in capsys.readouterr().err
    assert not os.path.exists(out)

    # without: both bad members are reported, each naming its problem; the good ones are written
    out = str(tmp_path / "out")
    report = sweep(path, out, nyxene_sources)
    assert sorted(report["failed"]) == ["ghost", "too_deep"]
    assert "layer_range" in report["failed"]["too_deep"] and "40" in report["failed"]["too_deep"]
    assert "nobody/missing-7b" in report["failed"]["ghost"]
    assert sorted(report["members"]) == sorted(os.listdir(out)) == ["t=0.25", "t=0.75", "upper"]
    for name in ("t=0.25", "t=0.75"):
        assert digests(os.path.join(out, name)) == digests(alone[name][0])
    assert digests(os.path.join(out, "upper")) == digests(upper_alone)

    # the CLI says so with its exit status; a re-run skips the complete members
    report_file = str(tmp_path / "report.json")
    code = cli(["sweep", path, out, "--models-root", nyxene_sources, "--executor", "local", "--quiet", "--out-shard-size", SHARD_SIZE, "--report", report_file])
    assert code == 1
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed["failed"]) == ["ghost", "too_deep"]
    saved = json.load(open(report_file))
    assert all(m["already_complete"] for m in saved["members"].values()) and saved["bytes_written"] == 0

    # nothing valid at all: every member reported, nothing written
    only_bad = write_sweep(str(tmp_path / "bad"), {"members": BAD_MEMBERS})
    report = sweep(only_bad, str(tmp_path / "none"), nyxene_sources)
    assert sorted(report["failed"]) == ["ghost", "too_deep"] and report["members"] == {} and report["bytes_written"] == 0
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"base": "base.yml", "gird": {"parameters.t": [0.5]}}, r"gird: unknown sweep key \(did you mean 'grid'\?\)"),
        (
            {"base": "base.yml", "grid": {"parameters.tt": [0.5]}},
            r"grid\.parameters\.tt: the base recipe has no 'tt' under 'parameters' \(did you mean 't'\?\)",
        ),
        ({"base": "base.yml", "grid": {"parameter.t": [0.5]}}, r"grid\.parameter\.t: the base recipe has no 'parameter' \(did you mean 'parameters'\?\)"),
        (
            {"base": "base.yml", "grid": {"slices[1].sources[0].layer_range": [[0, 8]]}},
            r"grid\.slices\[1\]\.sources\[0\]\.layer_range: index \[1\].*slices has 1 entries",
        ),
        ({"base": "nowhere.yml", "grid": {"parameters.t": [0.5]}}, r"base: cannot read recipe 'nowhere.yml'"),
        ({"base": "base.yml"}, r"base: and grid: go together"),
        ({"members": [{"name": "a", "recipe": "base.yml"}, {"name": "a", "recipe": "members/filters.yml"}]}, r"members\[1\]: member name 'a' is used twice"),
        ({"base": "base.yml", "grid": {"parameters.t": [0.5]}, "members": [{"name": "t=0.5", "recipe": "base.yml"}]}, r"member name 't=0.5' is used twice"),
        ({"base": "base.yml", "grid": {"parameters.t": [0.5, 0.5]}}, r"member name 't=0.5' is used twice"),
        ({"members": []}, r"the sweep has no members"),
    ],
    ids=["unknown-key", "grid-leaf", "grid-key", "grid-index", "base-file", "base-alone", "dup-names", "dup-grid-member", "dup-grid", "empty"],
)
def test_sweep_file_errors_name_the_culprit(nyxene_sources, tmp_path, doc, match):
    path = write_sweep(str(tmp_path), doc)
    out = str(tmp_path / "out")
    with pytest.raises(RecipeError, match=match) as e:
        sweep(path, out, nyxene_sources)
    assert str(e.value).startswith(f"{path}: ")
    assert not os.path.exists(out)


def test_sweep_file_error_on_the_command_line(nyxene_sources, tmp_path, capsys):
    path = write_sweep(str(tmp_path), {"base": "base.yml", "grid": {"parameters.tt": [0.5]}})
    assert cli(["sweep", path, str(tmp_path / "out"), "--models-root", nyxene_sources, "--executor", "local", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nyxray: error: ") and "grid.parameters.tt" in err and "Traceback" not in err
    assert cli(["sweep", str(tmp_path / "missing.yml"), str(tmp_path / "out"), "--executor", "local"]) == 1
    assert "missing.yml: cannot read sweep file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_sweep_on_ray_writes_the_same_bytes(ray_cluster, nyxene_sources, sweep_file, local_sweep, tmp_path):
    local_out, local_report = local_sweep
    out = str(tmp_path / "out")
    report = bounded(lambda: sweep(sweep_file, out, nyxene_sources, executor="ray", actors=2))
    assert report["failed"] == {} and sorted(report["members"]) == NAMES
    for name in NAMES:
        assert digests(os.path.join(out, name)) == digests(os.path.join(local_out, name)), name
    assert report["bytes_read"] == local_report["bytes_read"]
    assert len(report["actors"]) == 2 and sum(w["units"] for w in report["actors"]) == 3  # 3 fused units of 5 shards each


# --- a real job submission ------------------------------------------------------------------------

VENV_BIN = os.path.dirname(sys.executable)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line + environment) of every live process but this one."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                text = f.read()
            with open(f"/proc/{d}/environ", "rb") as f:
                text += b"\0" + f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp session ...
        if fields[0] not in ("Z", "X"):
            out[int(d)] = (int(fields[1]), int(fields[3]), text.decode(errors="replace"))
    return out


def _cluster_pids(sid: int, markers: tuple[str, ...], known: set[int]) -> set[int]:
    """The live processes of one Ray head: its session, what names one of ``markers`` (its temp dir,
    its GCS address: every driver and worker has RAY_ADDRESS or the address in its environment),
    anything in ``known``, and all their descendants (the job's driver runs in a session of its own)."""
    procs = _procs()
    found = {p for p, (_, s, text) in procs.items() if s == sid or p in known or any(m in text for m in markers)}
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(p)
    todo = list(found)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


class RayHead:
    """``ray start --head --block`` in its own session, on 127.0.0.1 only, with every port free."""

    def __init__(self) -> None:
        # Short: Ray's unix socket paths under it must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="nyxray-job-", dir="/tmp")
        gcs, dash, agent_http, agent_grpc, runtime_env, metrics, client, node_manager, object_manager = _free_ports(9)
        self.url = f"http://127.0.0.1:{dash}"
        self.gcs_address = f"127.0.0.1:{gcs}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS of the session's cluster
        env.update(
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            # Without this, Ray turns --node-ip-address=127.0.0.1 into the host's interface address
            # (resolve_ip_for_localhost): single-node loopback only, for the head and the job's driver.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),  # the job's python / nyxray: this venv's
        )
        self.env = env
        self.cmd = [
            os.path.join(VENV_BIN, "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            "--disable-usage-stats",
        ]
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the Ray dashboard did not answer at {self.url} within {timeout} s:\n{self.log_tail()}")

    def ray(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(VENV_BIN, "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def pids(self, known: set[int] = frozenset()) -> set[int]:  # type: ignore[assignment]
        return _cluster_pids(self.proc.pid, (self.temp_dir, self.gcs_address), set(known))

    def stop(self) -> list[str]:
        """Stop this head and everything it started; returns what could not be stopped."""
        known = self.pids()  # start_new_session made ray start the leader of a session of its own
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block stops its node's processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 15
        while (left := self.pids(known)) and time.monotonic() < deadline:
            known |= left
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.3)
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        survivors = []
        for pid in self.pids(known):
            try:
                survivors.append(f"{pid}: {open(f'/proc/{pid}/cmdline', 'rb').read().decode(errors='replace')[:200]}")
            except OSError:
                pass
        return survivors


@pytest.fixture
def ray_head():
    head = RayHead()
    try:
        yield head
    finally:
        survivors = head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes of the test's head still running: {survivors}"


def test_sweep_submitted_as_a_ray_job(ray_head, nyxene_sources, local_sweep, tmp_path):
    """``ray job submit --working-dir DIR -- nyxray sweep sweep.yml OUT ...`` on a head started here."""
    local_out, _ = local_sweep
    job_dir = str(tmp_path / "job")
    write_sweep(job_dir, sweep_doc())  # sweep.yml + the recipes it names, relative to it: they travel with the job
    out = str(tmp_path / "out")
    ray_head.wait_ready()
    entrypoint = [
        "nyxray",
        "sweep",
        "sweep.yml",
        out,
        "--models-root",
        nyxene_sources,
        "--executor",
        "ray",
        "--quiet",
        "--out-shard-size",
        SHARD_SIZE,
        "--device",
        "cpu",
    ]
    deadline = time.monotonic() + 240
    for attempt in range(1, 20):
        job_id = f"nyxray-sweep-test-{attempt}"
        run = ray_head.ray(
            "job",
            "submit",
            "--address",
            ray_head.url,
            "--submission-id",
            job_id,
            "--working-dir",
            job_dir,
            "--",
            *entrypoint,
            timeout=max(10, deadline - time.monotonic()),
        )
        # The Jobs API answers before the node's dashboard agent has registered: try again shortly.
        if run.returncode != 0 and "No available agent" in run.stdout + run.stderr and time.monotonic() < deadline - 30:
            time.sleep(2)
            continue
        break
    logs = f"--- stdout\n{run.stdout[-6000:]}\n--- stderr\n{run.stderr[-6000:]}\n--- ray start\n{ray_head.log_tail(2000)}"
    assert run.returncode == 0, f"ray job submit failed:\n{logs}"
    with urllib.request.urlopen(f"{ray_head.url}/api/jobs/{job_id}", timeout=30) as r:  # the Jobs API's own word
        job = json.load(r)
    assert job["status"] == "SUCCEEDED", f"{job}\n{logs}"
    assert job["entrypoint"] == " ".join(entrypoint)
    report = json.loads(run.stdout[run.stdout.index("{\n") : run.stdout.rindex("\n}") + 2])  # what the job printed
    assert report["failed"] == {} and report["output"] == out
    assert report["actors"] and all(w["device"] == "cpu" for w in report["actors"])
    assert sorted(os.listdir(out)) == NAMES
    for name in NAMES:
        assert digests(os.path.join(out, name)) == digests(os.path.join(local_out, name)), name


# -- axes that change nothing, members that are the same model -------------------------------------

TIES_BASE = """\
models:
  - model: base
  - model: ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: ft2
    parameters: {weight: 0.7, density: 0.5}
  - model: ft3
    parameters: {weight: 0.4, density: 0.5}
merge_method: ties
base_model: base
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def ties_models(tmp_path_factory) -> str:
    from nyxray.demo.synthetic import ModelShape, make_model

    root = tmp_path_factory.mktemp("ties-models")
    shape = ModelShape(hidden=32, intermediate=64, layers=2, vocab=256)
    make_model(str(root / "base"), shape, seed=5, shard_bytes=10**9)
    for i in (1, 2, 3):
        make_model(str(root / f"ft{i}"), shape, seed=5 + i, shard_bytes=10**9, like=str(root / "base"), like_noise=0.03)
    return str(root)


def test_an_axis_every_tensor_overrides_is_refused_naming_the_overrides(ties_models, tmp_path):
    """The issue's sweep: the top-level density loses to each model's own for every tensor, so its
    three values write the same model; refused at plan time, before anything is written."""
    doc = {"base": yaml.safe_load(TIES_BASE), "grid": {"parameters.density": [0.3, 0.5, 0.7], "models[1].parameters.weight": [0.5, 1.0]}}
    out = tmp_path / "out"
    e = pytest.raises(RecipeError, nyxray.sweep, yaml.safe_dump(doc), str(out), models_root=ties_models, progress=False, executor="local").value
    assert e.path == "grid.parameters.density" and "changes nothing" in str(e)
    assert "models[1..3].parameters.density" in str(e), str(e)
    assert not out.exists()
    # the other axis is live: without the dead one, two distinct models
    del doc["grid"]["parameters.density"]
    report = nyxray.sweep(yaml.safe_dump(doc), str(out), models_root=ties_models, progress=False, executor="local")
    assert sorted(report["members"]) == ["models1weight=0.5", "models1weight=1.0"] and report["same_as"] == {}


def test_members_with_the_same_plan_are_merged_once(ties_models, tmp_path):
    """Two members spelling the same merge differently (a default written out) are one model."""
    same = TIES_BASE.replace("merge_method: ties", "merge_method: ties\nparameters: {normalize: true}")
    other = TIES_BASE.replace("weight: 0.4", "weight: 0.9")
    doc = {
        "members": [
            {"name": "a", "recipe": yaml.safe_load(TIES_BASE)},
            {"name": "b", "recipe": yaml.safe_load(same)},
            {"name": "c", "recipe": yaml.safe_load(other)},
        ]
    }
    out = tmp_path / "out"
    report = nyxray.sweep(yaml.safe_dump(doc), str(out), models_root=ties_models, progress=False, executor="local")
    assert report["same_as"] == {"b": "a"} and sorted(report["members"]) == ["a", "c"]
    assert sorted(os.listdir(out)) == ["a", "c"]
    alone = tmp_path / "alone"
    nyxray.merge(same, str(alone), models_root=ties_models, progress=False, executor="local")
    assert _shard_hashes(str(alone)) == _shard_hashes(str(out / "a"))


def _shard_hashes(path: str) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in os.listdir(path) if f.endswith(".safetensors")}
