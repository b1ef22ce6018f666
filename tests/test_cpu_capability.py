"""One CPU kernel set per merge, whatever node runs a unit (nyxray.execute.cpu_capability).

torch's float32 kernels round differently under its ``default``, ``avx2`` and ``avx512`` kernel sets,
and arcee_fusion (softmax, log) writes different bytes under ``default`` than under ``avx2``. A Ray
cluster whose nodes' workers would import torch with different kernel sets (the variable torch reads
is set per node here, as different hardware would) must still write the bytes of a one-set run: the
driver pins its own set for every actor, and records it in the report, the state and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

import nyxray
from nyxray.demo.synthetic import ModelShape, make_model
from nyxray.errors import NyxrayError
from nyxray.execute import cpu_capability

SHAPE = ModelShape(hidden=128, intermediate=256, layers=2, vocab=4096, heads=4, kv_heads=2)
RECIPE = "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {ft}\ndtype: bfloat16\n"
HERE = cpu_capability.current()


def shard_hashes(out: str) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in sorted(os.listdir(out)) if f.endswith(".safetensors")}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("capability")
    base = make_model(str(root / "base"), SHAPE, 11, 3_000_000)
    ft = make_model(str(root / "ft"), SHAPE, 12, 3_000_000, like=base, like_noise=0.03)
    path = root / "arcee.yml"
    path.write_text(RECIPE.format(base=base, ft=ft))
    return str(path)


# The nyxray command, with Ray's driver kept on 127.0.0.1 (the nodes listen there only; see conftest).
_LOOPBACK_CLI = """
import sys
import ray._private.services as services
services.get_node_ip_address = lambda address=None: "127.0.0.1"
from nyxray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli_merge(recipe: str, out: str, env_capability: str, *args: str) -> dict:
    """``nyxray merge`` in a child process whose torch would load ``env_capability``'s kernels."""
    report = out + ".report.json"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=env_capability)
    cmd = [sys.executable, "-c", _LOOPBACK_CLI, "merge", recipe, out, "--quiet", "--report", report, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.load(open(report))


@pytest.fixture(scope="module")
def one_set(recipe, tmp_path_factory) -> dict[str, str]:
    out = str(tmp_path_factory.mktemp("one-set") / "out")
    report = nyxray.merge(recipe, out, executor="local", progress=False)
    assert report["cpu_capability"] == HERE
    assert json.load(open(os.path.join(out, "nyxray-manifest.json")))["cpu_capability"] == HERE
    return shard_hashes(out)


NOT_DEFAULT = pytest.mark.skipif(HERE == "default", reason="the session computes with default kernels (a CPU without AVX2): no other set to compare")


@NOT_DEFAULT
def test_the_kernel_set_changes_this_merge(recipe, one_set, tmp_path):
    """The premise: computed under ``default`` kernels, the same merge writes other bytes."""
    report = cli_merge(recipe, str(tmp_path / "default"), "default", "--executor", "local")
    assert report["cpu_capability"] == "default"
    assert shard_hashes(str(tmp_path / "default")) != one_set


@NOT_DEFAULT
def test_cli_pins_the_named_set_before_torch_loads(recipe, tmp_path):
    """``--cpu-capability default`` in a process whose torch would load another set."""
    report = cli_merge(recipe, str(tmp_path / "named"), HERE, "--executor", "local", "--cpu-capability", "default")
    assert report["cpu_capability"] == "default"
    assert shard_hashes(str(tmp_path / "named")) == shard_hashes(_default_run(recipe, tmp_path))


def _default_run(recipe: str, tmp_path) -> str:
    out = str(tmp_path / "reference-default")
    cli_merge(recipe, out, "default", "--executor", "local")
    return out


@NOT_DEFAULT
def test_resume_keeps_the_set_the_output_was_begun_with(recipe, tmp_path):
    """An unfinished output begun under ``default`` is not finished with another set: in a process
    computing with another one the merge refuses, naming the set, and writes no shard."""
    out = tmp_path / "begun"
    nyxray.merge(recipe, str(out), executor="local", progress=False)
    manifest = json.loads((out / "nyxray-manifest.json").read_text())
    # the state an interrupted run under default kernels leaves: its plan, its kernel set, no shard yet
    (out / "nyxray-manifest.json").unlink()
    for f in manifest["shards"]:
        (out / f["name"]).unlink()
    (out / ".nyxray" / "shards").mkdir(parents=True)
    state = {
        "plan_id": manifest["plan_id"],
        "nyxray_version": manifest["nyxray_version"],
        "recipe_sha256": manifest["recipe_sha256"],
        "cpu_capability": "default",
    }
    (out / ".nyxray" / "state.json").write_text(json.dumps(state))
    with pytest.raises(NyxrayError, match=f"torch in this process computes with {HERE} kernels"):
        nyxray.merge(recipe, str(out), executor="local", progress=False)
    assert not [f for f in os.listdir(out) if f.endswith(".safetensors")]
    with pytest.raises(NyxrayError, match="begun with other CPU kernels"):
        nyxray.merge(recipe, str(out), executor="local", progress=False, cpu_capability=HERE)


def test_bad_capability_is_refused_before_any_read(recipe, tmp_path):
    with pytest.raises(NyxrayError, match="cpu_capability 'avx3'"):
        nyxray.merge(recipe, str(tmp_path / "never"), cpu_capability="avx3", progress=False)
    assert not os.path.exists(tmp_path / "never")


@pytest.mark.slow
@NOT_DEFAULT
def test_ray_nodes_with_different_kernel_sets_write_one_sets_bytes(recipe, one_set, tmp_path, monkeypatch):
    """Two worker nodes whose processes would load ``default`` and ``avx512`` kernels; the driver's
    set (this session's) is pinned for both actors: the output is the one-set run's, byte for byte."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        for capability in ("default", "avx512" if "avx512" in cpu_capability.runnable() else HERE):
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)  # what the node's workers inherit
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", HERE)
        cluster.wait_for_nodes(timeout=60)
        out = str(tmp_path / "ray")
        report = cli_merge(recipe, out, HERE, "--executor", "ray", "--address", cluster.address, "--actors", "2", "--unit-size", "1M")
    finally:
        cluster.shutdown()
    assert any(a["units"] for a in report["actors"])  # on nodes whose own kernel set is not the pinned one
    assert report["cpu_capability"] == HERE
    assert json.load(open(os.path.join(out, "nyxray-manifest.json")))["cpu_capability"] == HERE
    assert shard_hashes(out) == one_set
