"""The public API: :func:`plan`, :func:`merge`, :func:`verify`. The CLI is a thin layer over it.

Arguments are validated here, in one place, before any model is opened; then the flow is
recipe -> plan (headers only) -> claim the output -> work units -> executor -> commit.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import NyxrayError
from .execute.execution import OPTIONS, build
from .io.location import location
from .output.commit import verify as verify_output
from .plan.lora import lora_merge_dtype
from .plan.sources import Resolver
from .plan.stages import Plan, parse_size
from .plan.stages import plan as make_plan
from .recipe.parse import Recipe, load_pipeline
from .recipe.sweep import expand
from .run import Ran, SweepJob, Target, balance, needs_math, pipeline_text, run_job, sweep_text, target_report


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
    strict: bool = False,
    lora_merge_dtype: str | None = None,
) -> Plan:
    """Plan a recipe (a path, YAML text, or parsed recipes) from model headers alone.

    ``random_seed`` seeds random methods (DARE, DELLA); default: the recipe's ``random_seed``, else 0.
    Keys mergekit 0.1.5 ignores (a typo such as ``dype:``, ``metadata:``) are ignored too, each
    with a warning in the plan (did-you-mean included); ``strict`` makes them errors.
    ``lora_merge_dtype`` (``bfloat16``, ``float16``, ``float32``, ``float64``) is the dtype a
    ``model+adapter`` reference's model is loaded in to apply its adapter, as mergekit's
    ``--lora-merge-dtype``; default: the model's own (docs/lora.md).

    Raises :class:`~nyxray.errors.NyxrayError` subclasses naming the culprit for any recipe or
    model problem; reads no tensor data and writes nothing.
    """
    parse_size(out_shard_size)
    recipes = load_pipeline(recipe)
    return make_plan(
        recipes,
        _resolver(models, models_root, storage_options),
        out_shard_size,
        allow_crimes,
        unsafe_truncate_embeddings,
        random_seed=_seed(random_seed),
        strict=strict,
        lora_dtype=lora_merge_dtype,
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
    strict: bool = False,
    lora_merge_dtype: str | None = None,
) -> dict[str, Any]:
    """Merge ``recipe`` into ``out`` (a local path or any fsspec URL) and return the run report.

    ``recipe`` may be a pipeline; its named stages are fused into one pass and written only when
    ``intermediates`` (a location; each stage goes to ``intermediates/<name>``) is given.
    Re-running the same recipe into the same ``out`` resumes: shards already written and intact
    are kept. How the merge runs (``executor``, ``device``, ``address``, ``actors``,
    ``actor_cpus``, ``actor_gpus``, ``keep_actors``, ``unit_size``, ``cpu_capability``,
    ``progress``) is one :class:`~nyxray.execute.execution.Execution`, documented there.
    ``random_seed`` seeds random methods (DARE, DELLA), ``strict`` refuses keys mergekit ignores
    and ``lora_merge_dtype`` sets the dtype LoRA adapters are merged in: see :func:`plan`.

    The report has ``wall_s``, ``timings_s`` (plan, start, run, commit), ``throughput_mb_s``
    (bytes read and written per second of wall time), ``steady_throughput_mb_s`` (the same per
    second of ``run``), ``bytes_read``, ``bytes_read_min``, ``bytes_written``, ``tensors``,
    ``shards``, ``actors``, ``executor`` (which ran and why), ``cpu_capability`` (the CPU kernel
    set computed with; None when nothing was computed)...
    """
    given = locals()  # the arguments as called, before any other local exists
    started = time.monotonic()
    execution, writes = build(**{k: v for k, v in given.items() if k in OPTIONS})
    recipes = load_pipeline(recipe)
    job = _MergeJob(recipes, out, intermediates, {k: v for k, v in given.items() if k in _PLAN_OPTIONS})
    return run_job(job, execution, writes, report, started)


_PLAN_OPTIONS = frozenset(inspect.signature(plan).parameters) - {"recipe"}  # the keywords merge passes on to plan()


@dataclass
class _MergeJob:
    """A merge for :func:`~nyxray.run.run_job`: one target, or one per named stage with ``intermediates``."""

    recipes: list[Recipe]
    out: str
    intermediates: str | None
    planning: dict[str, Any]  # plan()'s keywords
    share_reads: bool = False
    targets: list[Target] = field(default_factory=list)

    def needs_math(self) -> bool:
        return needs_math(self.recipes)

    def plan(self) -> list[Target]:
        self.p = plan(self.recipes, **self.planning)  # the module's plan, looked up now (tests watch it)
        storage_options = self.planning["storage_options"]
        self.targets = [Target(location(self.out, storage_options), self.p.final, pipeline_text(self.recipes))]
        if self.intermediates:
            root = location(self.intermediates, storage_options)
            self.targets = [Target(root.child(st.name), st, st.recipe.text) for st in self.p.stages[:-1]] + self.targets
        return self.targets

    def report(self, ran: Ran, wall_s: float, plan_s: float) -> dict[str, Any]:
        p, parts = self.p, [target_report(tg) for tg in self.targets]
        moved = sum(x["bytes_read_tensors"] + x["bytes_written"] for x in parts)
        result = {
            **parts[-1],
            "wall_s": round(wall_s, 3),
            "bytes_read": sum(x["bytes_read_tensors"] for x in parts) + p.header_bytes,
            "bytes_read_tensors": sum(x["bytes_read_tensors"] for x in parts),
            "bytes_read_headers": p.header_bytes,
            "bytes_read_min": p.bytes_read_min(intermediates=bool(self.intermediates)),
            "bytes_written": sum(x["bytes_written"] for x in parts),
            "shards_reused": sum(x["shards_reused"] for x in parts),
            "parts_reused": sum(x["parts_reused"] for x in parts),
            "bytes_not_reread": sum(x["bytes_not_reread"] for x in parts),
            "throughput_mb_s": round(moved / max(wall_s, 1e-9) / 1e6, 1),
            "timings_s": {"plan": round(plan_s, 3), **ran.timings},
            "steady_throughput_mb_s": round(moved / max(ran.timings["run"], 1e-9) / 1e6, 1),
            "executor": ran.executor,
            "actors": ran.workers,
            "balance": balance(ran.workers),
            "warnings": p.warnings,
            "stages": [st.name or "<final>" for st in p.stages],
            "random_seed": p.final.random_seed,
        }
        if self.intermediates:
            result["intermediates"] = parts[:-1]
        return result


def verify(out: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Check a written model against its manifest; returns the problems (empty when intact)."""
    return verify_output(location(out, storage_options))


def release_actors() -> int:
    """Stop the Ray actors that ``keep_actors`` kept for later merges; returns how many."""
    from .execute.actor_pool import release

    return release()


def sweep(sweep: str | os.PathLike[str], out: str, *, fail_fast: bool = False, report: str | None = None, **options: Any) -> dict[str, Any]:
    """Run a sweep file or text (:mod:`nyxray.recipe.sweep`) into ``out`` (member ``M`` at
    ``out/M``); returns the sweep report.

    ``options`` are :func:`merge`'s: those of :func:`plan` (``random_seed`` seeds every member's
    random methods; default: each recipe's, else 0) and the execution and output ones
    (:class:`~nyxray.execute.execution.Execution`). A member whose recipe is bad is reported in
    ``failed`` and the others run, unless ``fail_fast``.
    """
    started = time.monotonic()
    planning = dict(_PLAN_DEFAULTS, **{k: options.pop(k) for k in _PLAN_OPTIONS & options.keys()})
    execution, writes = build(**options)
    parse_size(planning["out_shard_size"])
    resolver = _resolver(planning["models"], planning["models_root"], planning["storage_options"])
    how = (
        planning["out_shard_size"],
        planning["allow_crimes"],
        planning["unsafe_truncate_embeddings"],
        _seed(planning["random_seed"]),
        lora_merge_dtype(planning["lora_merge_dtype"]),
        planning["strict"],
    )
    job = SweepJob(expand(*sweep_text(sweep)), out, planning["storage_options"], resolver, how, fail_fast)
    return run_job(job, execution, writes, report, started)


_PLAN_DEFAULTS = {k: p.default for k, p in inspect.signature(plan).parameters.items() if k != "recipe"}
