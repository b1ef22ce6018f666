"""The public API: :func:`plan`, :func:`merge`, :func:`verify`. The CLI is a thin layer over it.

Arguments are validated here, in one place, before any model is opened; then the flow is
recipe -> plan (headers only) -> claim the output -> work units -> executor -> commit.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .commit import claim, finalize, record_shard
from .commit import verify as verify_output
from .errors import NyxrayError
from .execute.progress import Progress
from .execute.unit import Unit, UnitResult
from .models import Resolver
from .plan import Plan, parse_size
from .plan import plan as make_plan
from .recipe import Recipe, load_pipeline
from .storage import Location, location

DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("ray", "local")


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
) -> Plan:
    """Plan a recipe (a path, YAML text, or parsed recipes) from model headers alone.

    Raises :class:`~nyxray.errors.NyxrayError` subclasses naming the culprit for any recipe or
    model problem; reads no tensor data and writes nothing.
    """
    parse_size(out_shard_size)
    recipes = load_pipeline(recipe)
    return make_plan(recipes, _resolver(models, models_root, storage_options), out_shard_size, allow_crimes, unsafe_truncate_embeddings)


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
    executor: str = "ray",
    address: str | None = None,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    actor_gpus: float | None = None,
    progress: bool = True,
    report: str | None = None,
) -> dict[str, Any]:
    """Merge ``recipe`` into ``out`` (a local path or any fsspec URL) and return the run report.

    ``recipe`` may be a pipeline; its named stages are fused into one pass and written only when
    ``intermediates`` (a location; each stage goes to ``intermediates/<name>``) is given.
    ``executor="ray"`` runs on Ray (a local instance unless ``address``/``RAY_ADDRESS`` names a
    cluster); ``"local"`` runs in this process. Re-running the same recipe into the same ``out``
    resumes: shards already written and intact are kept. The report has ``wall_s``,
    ``bytes_read``, ``bytes_read_min``, ``bytes_written``, ``tensors``, ``shards``, ``actors``...
    """
    started = time.monotonic()
    if device not in DEVICES and not device.startswith("cuda:"):
        raise NyxrayError(f"device {device!r}: expected one of {', '.join(DEVICES)} or cuda:N")
    if executor not in EXECUTORS:
        raise NyxrayError(f"executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if actors is not None and actors < 1:
        raise NyxrayError(f"actors={actors}: expected at least 1")
    recipes = load_pipeline(recipe)
    p = plan(recipes, out_shard_size=out_shard_size, models=models, models_root=models_root, storage_options=storage_options,
             allow_crimes=allow_crimes, unsafe_truncate_embeddings=unsafe_truncate_embeddings)
    targets = [(location(out, storage_options), p.final)]
    if intermediates:
        root = location(intermediates, storage_options)
        targets = [(root.child(st.name), st) for st in p.stages[:-1]] + targets
    return run_plan(p, targets, pipeline_text=_pipeline_text(recipes), device=device, copy_tokenizer=copy_tokenizer,
                    write_model_card=write_model_card, overwrite=overwrite, executor=executor, address=address, actors=actors,
                    actor_cpus=actor_cpus, actor_gpus=actor_gpus, progress=progress, report=report, started=started)


def _pipeline_text(recipes: list[Recipe]) -> str:
    if len(recipes) == 1:
        return recipes[0].text
    return "---\n".join(r.text if r.text.endswith("\n") else r.text + "\n" for r in recipes)


def run_plan(p: Plan, targets: list[tuple[Location, Any]], *, pipeline_text: str, device: str, copy_tokenizer: bool, write_model_card: bool,
             overwrite: bool, executor: str, address: str | None, actors: int | None, actor_cpus: float, actor_gpus: float | None,
             progress: bool, report: str | None, started: float) -> dict[str, Any]:
    """Execute a plan into its target locations (stage plans with where each goes) and commit."""
    units: list[Unit] = []
    claims = []
    for loc, stage in targets:
        c = claim(loc, stage, overwrite)
        claims.append(c)
        # A complete output is still checked shard by shard: a damaged one is rewritten.
        units += [Unit(loc, f"{loc.display}/", sh, c.records.get(sh.name)) for sh in stage.shards]
    records: dict[str, dict[str, dict]] = {loc.display: {} for loc, _ in targets}
    results: list[UnitResult] = []
    reread_saved: list[int] = []

    done: list[tuple[str, UnitResult]] = []

    def on_result(unit: Unit, result: UnitResult) -> None:
        results.append(result)
        done.append((unit.out.display, result))
        rec = {"size": result.size, "sha256": result.sha256, "tensors": result.tensors}
        records[unit.out.display][unit.shard.name] = rec
        if result.reused:
            reread_saved.append(unit.read_bytes)
        else:
            record_shard(unit.out, unit.shard.name, **rec)

    todo_read = sum(u.read_bytes for u in units if u.expected is None)
    bar = Progress(len(units), todo_read, sum(u.shard.size for u in units), enabled=progress)
    if executor == "local":
        from .execute.local import execute as run_local

        workers = run_local(units, device, bar, on_result)
    else:
        from .execute.ray_exec import execute as run_ray

        workers = run_ray(units, device, bar, on_result, address=address, actors=actors, actor_cpus=actor_cpus, actor_gpus=actor_gpus) if units else []
    bar.render(final=True)
    redone = {where for where, r in done if not r.reused}
    for (loc, stage), c in zip(targets, claims):
        if not c.complete or loc.display in redone:
            finalize(loc, stage, records[loc.display], pipeline_text if stage is p.final else stage.recipe.text, copy_tokenizer, write_model_card)
    wall = time.monotonic() - started
    busy = [w["bytes_read"] + w["bytes_written"] for w in workers if w["units"]]
    reused = [r for r in results if r.reused]
    out = {
        "output": targets[-1][0].display,
        "wall_s": round(wall, 3),
        "bytes_read": sum(r.bytes_read for r in results) + p.header_bytes,
        "bytes_read_tensors": sum(r.bytes_read for r in results),
        "bytes_read_headers": p.header_bytes,
        "bytes_read_min": p.bytes_read_min(intermediates=len(targets) > 1),
        "bytes_written": sum(r.bytes_written for r in results),
        "tensors": sum(len(st.tensors) for _, st in targets),
        "shards": sum(len(st.shards) for _, st in targets),
        "shards_reused": len(reused),
        "bytes_not_reread": sum(reread_saved),
        "already_complete": all(c.complete for c in claims),
        "throughput_mb_s": round((sum(r.bytes_read + r.bytes_written for r in results)) / max(wall, 1e-9) / 1e6, 1),
        "actors": workers,
        "balance": round(max(busy) / (sum(busy) / len(busy)), 3) if busy else 1.0,
        "warnings": p.warnings,
        "stages": [st.name or "<final>" for st in p.stages],
    }
    if report:
        with open(report, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


def verify(out: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Check a written model against its manifest; returns the problems (empty when intact)."""
    return verify_output(location(out, storage_options))


def sweep(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a sweep file (see :mod:`nyxray.sweep`)."""
    from .sweep import run_sweep

    return run_sweep(*args, **kwargs)
