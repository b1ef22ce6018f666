"""The embedded default job: small random stand-ins for the four Nyxene source models, merged
through the whole Nyxene-v2-11B pipeline (``recipes/nyxene-v2-11b.pipeline.yml``) on a local Ray.

The stand-ins come from :mod:`.synthetic`, which the tests and the benchmarks use too."""

from __future__ import annotations

import os
from typing import Any

from ..api import merge
from ..errors import NyxrayError
from .synthetic import NYXENE_SOURCES, ModelShape, make_nyxene_sources

PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes", "nyxene-v2-11b.pipeline.yml")


def run_demo(workdir: str = "demo-out", executor: str = "ray") -> dict[str, Any]:
    if not os.path.exists(PIPELINE):
        raise NyxrayError(f"{PIPELINE}: the demo needs the repository's recipes/ folder (run it from a source checkout)")
    sources = os.path.join(workdir, "sources")
    if not all(os.path.exists(os.path.join(sources, name, "config.json")) for name in NYXENE_SOURCES):
        make_nyxene_sources(sources, ModelShape(hidden=128, intermediate=256, layers=32, vocab=9000), shard_bytes=3_000_000)
    return merge(
        PIPELINE,
        os.path.join(workdir, "Nyxene-v2-11B"),
        models_root=sources,
        out_shard_size="6M",
        executor=executor,
        overwrite=True,
        report=os.path.join(workdir, "report.json"),
    )
