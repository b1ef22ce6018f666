"""Shared fixtures: one Ray cluster (head + 2 worker nodes on this machine) for the whole session,
the synthetic Nyxene source models, and (from conftest_s3) a real S3 server on 127.0.0.1."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import subprocess
import sys

import pytest

pytest_plugins = ["tests.conftest_s3"]


def _pin_golden_capability() -> None:
    """Compute with the CPU kernel set golden.json was made under, where this CPU can run it.

    torch reads ATEN_CPU_CAPABILITY once, when imported, so this runs before anything imports it;
    the merges' bytes then match mergekit's recorded ones on AVX-512 and AVX2 machines alike. A
    variable set by the caller (to emulate another CPU) is kept. Which kernel sets this CPU can
    run is asked of torch in a child process, which imports it without the variable.
    """
    if "ATEN_CPU_CAPABILITY" in os.environ:
        return
    with open(os.path.join(os.path.dirname(__file__), "golden", "capabilities.json")) as f:
        wanted = json.load(f)["golden"]
    probe = "from nyxray.execute.cpu_capability import runnable; print(' '.join(runnable()))"
    runnable = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    if wanted in runnable:
        os.environ["ATEN_CPU_CAPABILITY"] = wanted


_pin_golden_capability()

from nyxray.demo.synthetic import ModelShape, make_nyxene_sources  # noqa: E402 - after the Ray environment is set

SHAPE = ModelShape(hidden=128, intermediate=256, layers=32, vocab=9000, heads=4, kv_heads=2)
INPUT_SHARD_BYTES = 3_000_000


@pytest.fixture(scope="session")
def nyxene_sources(tmp_path_factory) -> str:
    """The four Nyxene source models as small random stand-ins, laid out as ROOT/org/name."""
    root = str(tmp_path_factory.mktemp("sources"))
    make_nyxene_sources(root, SHAPE, INPUT_SHARD_BYTES)
    return root


RAY_WORKER_NODE_ARGS = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}  # each worker node of ray_cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A real multi-node Ray cluster on this machine: a head (1 CPU) and two worker nodes (2 CPUs
    each), all on 127.0.0.1. Started once; every Ray test runs on it. A test that removes a worker
    node adds one back (same arguments: ``RAY_WORKER_NODE_ARGS``) before it ends."""
    from unittest import mock

    import ray
    import ray._private.services as services
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "resources": {"head": 1}},
    )
    for i in range(2):
        cluster.add_node(**RAY_WORKER_NODE_ARGS, resources={f"worker{i}": 1})
    cluster.wait_for_nodes(timeout=60)
    # ray.init turns a 127.0.0.1 address into the host's interface address (resolve_ip_for_localhost),
    # where nothing listens: the nodes bind 127.0.0.1 only, so the driver would time out after ~60 s
    # ("Failed to connect to Ray cluster at <host ip>:<port>"). Keep the driver on 127.0.0.1 too.
    with mock.patch.object(services, "get_node_ip_address", lambda address=None: "127.0.0.1"):
        ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
