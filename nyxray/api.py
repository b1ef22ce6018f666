"""The public API: :func:`plan`, :func:`merge`, :func:`verify`. The CLI is a thin layer over it.

Arguments are validated here, in one place, before any model is opened; then the flow is
recipe -> plan (headers only) -> claim the output -> work units -> executor -> commit.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .errors import NyxrayError
from .execute import cpu_capability as cpu_capability_module
from .io.location import location
from .output.commit import verify as verify_output
from .plan.sources import Resolver
from .plan.stages import Plan, parse_size
from .plan.stages import plan as make_plan
from .recipe.parse import Recipe, load_pipeline
from .run import Target, balance, check_execution, needs_math, pipeline_text, prepared, run_targets, target_report, write_report


def _resolver(models: dict[str, str] | None, models_root: str | None, storage_options: dict[str, Any] | None) -> Resolver:
    return Resolver(dict(models or {}), models_root, dict(storage_options or {}))


def plan(
    recipe: str | os.PathLike[str] | Recipe | list[Recipe],
    *,
    out_shard_size: int | str = "5B",
    models: dict[str, str] | None = None,
    models_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_crimes: bool = False,
    unsafe_truncate_embeddings: bool = False,
    random_seed: int | None = None,
) -> Plan:
    """Plan a recipe (a path, YAML text, or parsed recipes) from model headers alone.

    ``random_seed`` seeds random methods (DARE, DELLA); default: the recipe's ``random_seed``, else 0.

    Raises :class:`~nyxray.errors.NyxrayError` subclasses naming the culprit for any recipe or
    model problem; reads no tensor data and writes nothing.
    """
    parse_size(out_shard_size)
    recipes = load_pipeline(recipe)
    return make_plan(
        recipes, _resolver(models, models_root, storage_options), out_shard_size, allow_crimes, unsafe_truncate_embeddings, random_seed=_seed(random_seed)
    )


def _seed(random_seed: int | None) -> int | None:
    if random_seed is not None and (isinstance(random_seed, bool) or not isinstance(random_seed, int) or not 0 <= random_seed < 2**63):
        raise NyxrayError(f"random_seed={random_seed!r}: expected an integer in [0, 2**63)")
    return random_seed


def merge(
    recipe: str | os.PathLike[str] | Recipe | list[Recipe],
    out: str,
    *,
    out_shard_size: int | str = "5B",
    device: str = "auto",
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    allow_crimes: bool = False,
    unsafe_truncate_embeddings: bool = False,
    models: dict[str, str] | None = None,
    models_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    intermediates: str | None = None,
    overwrite: bool = False,
    executor: str = "auto",
    address: str | None = None,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    actor_gpus: float | None = None,
    keep_actors: float = 0.0,
    unit_size: int | str | None = None,
    progress: bool = True,
    report: str | None = None,
    random_seed: int | None = None,
    cpu_capability: str | None = None,
) -> dict[str, Any]:
    """Merge ``recipe`` into ``out`` (a local path or any fsspec URL) and return the run report.

    ``recipe`` may be a pipeline; its named stages are fused into one pass and written only when
    ``intermediates`` (a location; each stage goes to ``intermediates/<name>``) is given.
    ``executor="auto"`` runs on Ray when a cluster is named (``address``, ``RAY_ADDRESS``, a Ray
    job, or a Ray already initialised in this process), else in this process with no Ray start-up;
    ``"ray"`` always runs on Ray (a local instance unless a cluster is named); ``"local"`` runs in
    this process on one worker thread per core (or per local GPU; ``actors`` sets how many), each
    unit's math on one torch thread. The report's ``executor`` says which ran and why.
    ``keep_actors`` (seconds, Ray only) keeps the Ray actors
    alive that long after the merge, for the next merge of this process to reuse (no process start,
    no torch import); they hold their CPUs/GPUs meanwhile (:func:`release_actors` stops them).
    ``unit_size`` (bytes, or ``"256M"``; default 256 MiB) caps the output of one work unit: a larger
    shard is computed as parts by several workers and assembled into the one file (locally and on S3).
    Re-running the same recipe into the same ``out``
    resumes: shards already written and intact are kept. The report has ``wall_s``,
    ``timings_s`` (plan, start, run, commit), ``throughput_mb_s`` (bytes read and written per
    second of wall time), ``steady_throughput_mb_s`` (the same per second of ``run``),
    ``bytes_read``, ``bytes_read_min``, ``bytes_written``, ``tensors``, ``shards``, ``actors``...

    ``cpu_capability`` (``default``, ``avx2`` or ``avx512``: torch's CPU kernel sets, whose float32
    rounding differs) is the one every worker computes with; default: the one an unfinished output
    was begun with, else the driver's. A worker whose CPU cannot run it fails the run; in this
    process it must be the one torch was imported with (the ``nyxray`` command sets it first).
    The report's ``cpu_capability`` says which ran (None when nothing was computed).
    """
    started = time.monotonic()
    check_execution(device, executor, actors, keep_actors, unit_size, cpu_capability)
    recipes = load_pipeline(recipe)
    workers_at = {
        "address": address,
        "actors": actors,
        "actor_cpus": actor_cpus,
        "actor_gpus": actor_gpus,
        "keep_actors": keep_actors,
        "cpu_capability": cpu_capability_module.validate(cpu_capability),
    }
    with prepared(executor, device, needs_math(recipes), **workers_at) as chosen:  # on a named cluster, actors start while the headers are read
        p = plan(
            recipes,
            out_shard_size=out_shard_size,
            models=models,
            models_root=models_root,
            storage_options=storage_options,
            random_seed=random_seed,
            allow_crimes=allow_crimes,
            unsafe_truncate_embeddings=unsafe_truncate_embeddings,
        )
        targets = [Target(location(out, storage_options), p.final, pipeline_text(recipes))]
        if intermediates:
            root = location(intermediates, storage_options)
            targets = [Target(root.child(st.name), st, st.recipe.text) for st in p.stages[:-1]] + targets
    planned = time.monotonic() - started
    workers, timings, ran_on = run_targets(
        targets,
        device=device,
        overwrite=overwrite,
        executor=chosen,
        progress=progress,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
        unit_size=unit_size,
        **workers_at,
    )
    parts = [target_report(tg) for tg in targets]
    wall = time.monotonic() - started
    moved = sum(x["bytes_read_tensors"] + x["bytes_written"] for x in parts)
    result = {
        **parts[-1],
        "wall_s": round(wall, 3),
        "bytes_read": sum(x["bytes_read_tensors"] for x in parts) + p.header_bytes,
        "bytes_read_tensors": sum(x["bytes_read_tensors"] for x in parts),
        "bytes_read_headers": p.header_bytes,
        "bytes_read_min": p.bytes_read_min(intermediates=bool(intermediates)),
        "bytes_written": sum(x["bytes_written"] for x in parts),
        "shards_reused": sum(x["shards_reused"] for x in parts),
        "parts_reused": sum(x["parts_reused"] for x in parts),
        "bytes_not_reread": sum(x["bytes_not_reread"] for x in parts),
        "throughput_mb_s": round(moved / max(wall, 1e-9) / 1e6, 1),
        "timings_s": {"plan": round(planned, 3), **timings},
        "steady_throughput_mb_s": round(moved / max(timings["run"], 1e-9) / 1e6, 1),
        "executor": ran_on,
        "actors": workers,
        "balance": balance(workers),
        "warnings": p.warnings,
        "stages": [st.name or "<final>" for st in p.stages],
        "random_seed": p.final.random_seed,
    }
    if intermediates:
        result["intermediates"] = parts[:-1]
    write_report(result, report)
    return result


def verify(out: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Check a written model against its manifest; returns the problems (empty when intact)."""
    return verify_output(location(out, storage_options))


def release_actors() -> int:
    """Stop the Ray actors that ``keep_actors`` kept for later merges; returns how many."""
    from .execute.actor_pool import release

    return release()


def sweep(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a sweep file (see :mod:`nyxray.recipe.sweep`)."""
    from .run import run_sweep

    return run_sweep(*args, **kwargs)
