"""The driver's steps after planning: claim outputs, make work units, run them, commit.

Used by single merges (one target, or one per pipeline stage with ``--intermediates``) and by
sweeps (one target per member). With ``share_reads`` the units of different targets that write
the same tensors in the same order are fused into one unit with siblings, so each input byte is
read once for all of them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import NyxrayError, OutputError, RecipeError
from .execute import cpu_capability as cpu_capability_module
from .execute.choice import EXECUTORS, Choice, choose
from .execute.devices import check_device
from .execute.progress import Progress
from .execute.unit import Unit, UnitResult
from .io.location import Location, location
from .methods.registry import METHODS
from .output.assemble import Assemblies
from .output.commit import Claim, claim, finalize, inspect, record_shard
from .output.lease import hold
from .output.parts import parse_unit_size
from .plan.expr import Leaf, leaf_bytes
from .plan.sources import Model, Resolver
from .plan.stages import Plan, StagePlan, parse_size
from .plan.stages import plan as make_plan
from .recipe.parse import Recipe
from .recipe.sweep import expand


@dataclass
class Target:
    """One model to write: a stage plan, where it goes, and the recipe text for its card."""

    loc: Location
    stage: StagePlan
    text: str
    results: list[UnitResult] = field(default_factory=list)
    claim: Claim | None = None
    not_reread: int = 0  # source bytes of the shards and parts found intact from an earlier run


DEVICES = ("auto", "cpu", "cuda")


def check_execution(
    device: str, executor: str, actors: int | None, keep_actors: float = 0.0, unit_size: int | str | None = None, cpu_capability: str | None = None
) -> None:
    """Validate the execution arguments of a merge or sweep before any model is opened."""
    parse_unit_size(unit_size)
    cpu_capability_module.validate(cpu_capability)
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise NyxrayError(f"device {device!r}: expected one of {', '.join(DEVICES)} or cuda:N")
    if executor not in EXECUTORS:
        raise NyxrayError(f"executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if actors is not None and actors < 1:
        raise NyxrayError(f"actors={actors}: expected at least 1")
    if not keep_actors >= 0:
        raise NyxrayError(f"keep_actors={keep_actors}: expected seconds >= 0 (0: stop the actors when the merge ends)")
    if keep_actors and executor == "local":
        raise NyxrayError(f"keep_actors={keep_actors}: only the ray executor has actors to keep")


def needs_math(recipes: list[Recipe]) -> bool:
    """Whether a merge will compute tensors (rather than copy them), guessed before planning: only a
    method that may copy (``copies_unless``), in the stored dtype, copies. A wrong guess costs
    time, never correctness."""
    return any(METHODS[r.merge_method].copies_unless is None or r.dtype or r.out_dtype for r in recipes)


@contextmanager
def prepared(
    executor: str,
    device: str,
    math: bool,
    address: str | None = None,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    actor_gpus: float | None = None,
    keep_actors: float = 0.0,
    cpu_capability: str | None = None,
) -> Iterator[Choice]:
    """Choose the executor and check the device; on a named Ray cluster start the actors, so that
    they come up while the caller plans inside this block (they are stopped if planning fails).
    Warmed actors compute with ``cpu_capability``, else the driver's kernel set."""
    chosen = choose(executor, address, keep_actors)
    check_device(device, chosen.name, address, actor_gpus)  # before any output is claimed
    if not chosen.warm:
        yield chosen
        return
    from .execute.ray_exec import cool_down, warm_up

    pin = (cpu_capability or cpu_capability_module.current()) if math else None
    handles = warm_up(device, address, actors, actor_cpus, actor_gpus, math, pin)
    try:
        yield chosen
    except BaseException:
        cool_down(handles)
        raise


def _signature(unit: Unit) -> tuple:
    return (unit.shard.name, tuple((e.name, e.dtype, e.shape) for e in unit.shard.entries))


def pin_capability(targets: list[Target], named: str | None, overwrite: bool) -> str | None:
    """The CPU kernel set every worker computes with (:mod:`.execute.cpu_capability`): the one an
    unfinished or repaired output was begun with, else ``named``, else the driver's. None when
    nothing is computed (copies run no kernel)."""
    if not any(not isinstance(t.expr, Leaf) for tg in targets for t in tg.stage.tensors):
        return None
    begun = {tg.claim.cpu_capability: tg.loc.display for tg in targets if tg.claim and tg.claim.cpu_capability and not overwrite}
    if len(begun) > 1 or (named and begun and named not in begun):
        shown = "; ".join(f"{loc} with {cap}" for cap, loc in begun.items())
        raise OutputError(f"outputs were begun with other CPU kernels ({shown}): resume each with its own --cpu-capability, or pass --overwrite to start again")
    return next(iter(begun), None) or named or cpu_capability_module.current()


def make_units(targets: list[Target], overwrite: bool, share_reads: bool, named_capability: str | None = None) -> list[Unit]:
    """Claim every target's location (refusing what must not be touched) and build the units."""
    units: list[Unit] = []
    for tg in targets:  # every location is checked before any is written to
        tg.claim = inspect(tg.loc, tg.stage, overwrite)
    pin = pin_capability(targets, named_capability, overwrite)
    for tg in targets:
        assert tg.claim is not None
        tg.claim.cpu_capability = pin
        claim(tg.loc, tg.stage, tg.claim, overwrite)
        # Shards claim checked byte for byte (a complete output's) need no unit; a damaged one is rewritten.
        verified = tg.claim.verified
        tg.results = [UnitResult.from_record(n, r) for n, r in verified.items()]
        tg.not_reread = sum(leaf_bytes(t.expr for t in sh.tensors) for sh in tg.stage.shards if sh.name in verified)
        units += [Unit(tg.loc, f"{tg.loc.display}/", sh, tg.claim.records.get(sh.name)) for sh in tg.stage.shards if sh.name not in verified]
    if not share_reads:
        return units
    groups: dict[tuple, Unit] = {}
    for u in units:
        head = groups.setdefault(_signature(u), u)
        if head is not u:
            head.siblings.append(u)
    return list(groups.values())


def run_targets(
    targets: list[Target],
    *,
    device: str,
    overwrite: bool,
    executor: Choice,
    progress: bool,
    copy_tokenizer: bool,
    write_model_card: bool,
    share_reads: bool = False,
    address: str | None = None,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    actor_gpus: float | None = None,
    keep_actors: float = 0.0,
    unit_size: int | str | None = None,
    cpu_capability: str | None = None,
) -> tuple[list[dict], dict[str, float], dict[str, str]]:
    """Run and commit every target on ``executor`` (from :func:`prepared`); returns the per-worker
    summaries, the phase timings and the executor's report (``name`` and ``why``).

    Timings, in seconds: ``start`` (claiming outputs, connecting, starting workers: until the first
    unit is handed out), ``run`` (until the last unit is done), ``commit`` (index, config, manifest).
    ``actors`` is the number of workers (Ray actors, or threads of this process for ``local``).
    A shard larger than ``unit_size`` is computed as parts by several workers (:mod:`.assemble`).
    Every worker computes with one CPU kernel set (:func:`pin_capability`).
    """
    unit_bytes = parse_unit_size(unit_size)
    started = time.monotonic()
    with hold([tg.loc for tg in targets]) as leases:  # one writer per output, from claim to commit
        units = make_units(targets, overwrite, share_reads, cpu_capability)
        pin = targets[0].claim.cpu_capability if targets[0].claim else None
        by_loc = {tg.loc.display: tg for tg in targets}
        assemblies = Assemblies()

        def on_result(unit: Unit, result: UnitResult) -> None:
            for u, r in zip([unit, *unit.siblings], [result, *result.siblings]):
                tg = by_loc[u.out.display]
                tg.not_reread += u.own_read_bytes if r.reused else 0
                shard = assemblies.take(u, r) if u.part else r  # a part: the shard's result once its last part is in
                if shard is None:
                    continue
                tg.results.append(shard)
                if not shard.reused:
                    record_shard(u.out, u.shard.name, shard.record())

        try:
            units = assemblies.split(units, unit_bytes, {tg.loc.display: tg.claim.plan_id for tg in targets if tg.claim})
            pending = [u for u in units if u.expected is None]
            bar = Progress(len(units), sum(u.read_bytes for u in pending), sum(u.write_bytes for u in units), enabled=progress)
            if not units:
                workers: list[dict] = []
            elif executor.name == "local":
                from .execute.local import execute as run_local

                workers = run_local(units, device, bar, on_result, workers=actors, cpu_capability=pin)
            else:
                from .execute.ray_exec import execute as run_ray

                workers = run_ray(
                    units,
                    device,
                    bar,
                    on_result,
                    address=address,
                    actors=actors,
                    actor_cpus=actor_cpus,
                    actor_gpus=actor_gpus,
                    keep_actors=keep_actors,
                    cpu_capability=pin,
                )
        except BaseException:
            assemblies.abort()  # S3: no pending upload left; locally the parts stay for a resume
            raise
        bar.render(final=True)
        ran = time.monotonic()
        began = bar.began or ran
        leases.check()  # a run that lost an output's lease must not commit there
        for tg in targets:
            assert tg.claim is not None
            if not tg.claim.complete or any(not r.reused for r in tg.results):
                records = {r.path: r.record() for r in tg.results}
                finalize(tg.loc, tg.stage, records, tg.text, copy_tokenizer, write_model_card, tg.claim.cpu_capability)
    timings = {"start": began - started, "run": ran - began, "commit": time.monotonic() - ran}
    return workers, {k: round(v, 3) for k, v in timings.items()}, executor.report()


def target_report(tg: Target) -> dict[str, Any]:
    """Per-output numbers for the report."""
    reused = [r for r in tg.results if r.reused]
    return {
        "output": tg.loc.display,
        "tensors": len(tg.stage.tensors),
        "shards": len(tg.stage.shards),
        "shards_reused": len(reused),
        "parts_reused": sum(r.parts_reused for r in tg.results),  # parts of split shards taken from an earlier run
        "bytes_not_reread": tg.not_reread,
        "bytes_read_tensors": sum(r.bytes_read for r in tg.results),
        "bytes_written": sum(r.bytes_written for r in tg.results),
        "already_complete": bool(tg.claim and tg.claim.complete and not any(not r.reused for r in tg.results)),
        "cpu_capability": tg.claim.cpu_capability if tg.claim else None,
    }


def pipeline_text(recipes: list[Recipe]) -> str:
    """The recipe text a model card carries: the document, or every stage of a pipeline."""
    if len(recipes) == 1:
        return recipes[0].text
    return "---\n".join(r.text if r.text.endswith("\n") else r.text + "\n" for r in recipes)


def write_report(result: dict[str, Any], path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


def balance(workers: list[dict]) -> float:
    """max / mean bytes moved per actor that did any work (1.0 = perfectly even)."""
    busy = [w["bytes_read"] + w["bytes_written"] for w in workers if w["units"]]
    return round(max(busy) / (sum(busy) / len(busy)), 3) if busy and sum(busy) else 1.0


def run_sweep(
    sweep: str,
    out: str,
    *,
    fail_fast: bool = False,
    out_shard_size: int | str = "5B",
    models: dict[str, str] | None = None,
    models_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_crimes: bool = False,
    unsafe_truncate_embeddings: bool = False,
    report: str | None = None,
    random_seed: int | None = None,
    **execution: Any,
) -> dict[str, Any]:
    """Run a sweep file into ``out`` (member ``M`` at ``out/M``); returns the sweep report.

    ``random_seed`` seeds every member's random methods (default: each recipe's, else 0).
    """
    started = time.monotonic()
    check_execution(
        execution.get("device", "auto"),
        execution.get("executor", "auto"),
        execution.get("actors"),
        execution.get("keep_actors", 0.0),
        execution.get("unit_size"),
        execution.get("cpu_capability"),
    )
    parse_size(out_shard_size)
    sweep = os.fspath(sweep)
    if "\n" not in sweep and (sweep.endswith((".yml", ".yaml")) or os.path.exists(sweep)):
        try:
            with open(sweep, encoding="utf-8") as f:
                text, origin = f.read(), sweep
        except OSError as e:
            raise RecipeError("", f"cannot read sweep file: {e.strerror}", sweep) from None
    else:
        text, origin = sweep, "<sweep>"
    members = expand(text, origin)
    resolver = Resolver(dict(models or {}), models_root, dict(storage_options or {}))
    cache: dict[str, Model] = {}
    plans: dict[str, Plan] = {}
    failed: dict[str, str] = {}
    math = needs_math([r for rs in members.values() if not isinstance(rs, NyxrayError) for r in rs])
    workers_at = {k: execution[k] for k in ("address", "actors", "actor_cpus", "actor_gpus", "keep_actors", "cpu_capability") if k in execution}
    with prepared(execution.pop("executor", "auto"), execution.setdefault("device", "auto"), math, **workers_at) as chosen:
        for name, recipes in members.items():
            try:
                if isinstance(recipes, NyxrayError):
                    raise recipes
                plans[name] = make_plan(recipes, resolver, out_shard_size, allow_crimes, unsafe_truncate_embeddings, model_cache=cache, random_seed=random_seed)
            except NyxrayError as e:
                if fail_fast:
                    raise NyxrayError(f"sweep member {name!r}: {e}") from None
                failed[name] = str(e)
        root = location(out, storage_options)
        targets = {name: Target(root.child(name), p.final, pipeline_text(members[name])) for name, p in plans.items()}  # type: ignore[arg-type]
    execution.setdefault("progress", True)
    execution.setdefault("copy_tokenizer", True)
    execution.setdefault("write_model_card", True)
    execution.setdefault("overwrite", False)
    planned = time.monotonic() - started
    workers, timings, ran_on = run_targets(list(targets.values()), share_reads=True, executor=chosen, **execution) if targets else ([], {}, {})
    header_bytes = sum(m.header_bytes for m in cache.values())
    member_reports = {}
    for name, tg in targets.items():
        r = target_report(tg)
        r["bytes_read_min"] = plans[name].bytes_read_min()
        member_reports[name] = r
    result = {
        "output": root.display,
        "wall_s": round(time.monotonic() - started, 3),
        "bytes_read": sum(r["bytes_read_tensors"] for r in member_reports.values()) + header_bytes,
        "bytes_read_headers": header_bytes,
        "bytes_written": sum(r["bytes_written"] for r in member_reports.values()),
        "timings_s": {"plan": round(planned, 3), **timings},
        "members": member_reports,
        "failed": failed,
        "executor": ran_on,
        "actors": workers,
        "balance": balance(workers),
    }
    write_report(result, report)
    return result
