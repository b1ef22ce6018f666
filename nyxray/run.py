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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .errors import NyxrayError, OutputError, RecipeError
from .execute import cpu_capability as cpu_capability_module
from .execute.choice import Choice, choose
from .execute.execution import Execution, Writes
from .execute.pools import check_device, run_units
from .execute.progress import Progress
from .execute.unit import Unit, UnitResult
from .io.location import Location, location
from .methods.registry import METHODS
from .output.assemble import Assemblies
from .output.commit import Claim, claim, finalize, inspect, record_shard
from .output.lease import hold
from .plan.distinct import check_axes, same_models
from .plan.expr import Leaf, leaf_bytes
from .plan.sources import Model, Resolver
from .plan.stages import Plan, StagePlan
from .plan.stages import plan as make_plan
from .recipe.parse import Recipe
from .recipe.sweep import Sweep


@dataclass
class Target:
    """One model to write: a stage plan, where it goes, and the recipe text for its card."""

    loc: Location
    stage: StagePlan
    text: str
    results: list[UnitResult] = field(default_factory=list)
    claim: Claim | None = None
    not_reread: int = 0  # source bytes of the shards and parts found intact from an earlier run


def needs_math(recipes: list[Recipe]) -> bool:
    """Whether a merge will compute tensors (rather than copy them), guessed before planning: only a
    method that may copy (``copies_unless``), in the stored dtype, copies. A wrong guess costs
    time, never correctness."""
    return any(METHODS[r.merge_method].copies_unless is None or r.dtype or r.out_dtype for r in recipes)


@contextmanager
def prepared(execution: Execution, math: bool) -> Iterator[Choice]:
    """Choose the executor and check the device; on a named Ray cluster start the actors, so that
    they come up while the caller plans inside this block (they are stopped if planning fails).
    Warmed actors compute with the execution's ``cpu_capability``, else the driver's kernel set."""
    chosen = choose(execution.executor, execution.address, execution.keep_actors)
    check_device(execution, chosen.name)  # before any output is claimed
    if not chosen.warm:
        yield chosen
        return
    from .execute.ray_exec import cool_down, warm_up

    pin = (execution.cpu_capability or cpu_capability_module.current()) if math else None
    handles = warm_up(execution, math, pin)
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


class Ran(NamedTuple):
    """What :func:`run_targets` reports: per-worker summaries, phase timings, the executor's report."""

    workers: list[dict]
    timings: dict[str, float]
    executor: dict[str, str]


def run_targets(targets: list[Target], execution: Execution, executor: Choice, writes: Writes, share_reads: bool = False) -> Ran:
    """Run and commit every target on ``executor`` (from :func:`prepared`); returns the per-worker
    summaries, the phase timings and the executor's report (``name`` and ``why``).

    Timings, in seconds: ``start`` (claiming outputs, connecting, starting workers: until the first
    unit is handed out), ``run`` (until the last unit is done), ``commit`` (index, config, manifest).
    ``execution.actors`` is the number of workers (Ray actors, or threads of this process for ``local``).
    A shard larger than ``execution.unit_size`` is computed as parts by several workers (:mod:`.output.assemble`).
    Every worker computes with one CPU kernel set (:func:`pin_capability`).
    """
    started = time.monotonic()
    with hold([tg.loc for tg in targets]) as leases:  # one writer per output, from claim to commit
        units = make_units(targets, writes.overwrite, share_reads, execution.cpu_capability)
        pin = targets[0].claim.cpu_capability if targets[0].claim else None
        assemblies = Assemblies()
        try:
            units = assemblies.split(units, execution.unit_size, {tg.loc.display: tg.claim.plan_id for tg in targets if tg.claim})
            pending = [u for u in units if u.expected is None]
            bar = Progress(len(units), sum(u.read_bytes for u in pending), sum(u.write_bytes for u in units), enabled=execution.progress)
            workers = run_units(executor.name, units, execution, pin, bar, _collector(targets, assemblies)) if units else []
        except BaseException:
            assemblies.abort()  # S3: no pending upload left; locally the parts stay for a resume
            raise
        bar.render(final=True)
        ran = time.monotonic()
        began = bar.began or ran
        leases.check()  # a run that lost an output's lease must not commit there
        _commit(targets, writes)
    timings = {"start": began - started, "run": ran - began, "commit": time.monotonic() - ran}
    return Ran(workers, {k: round(v, 3) for k, v in timings.items()}, executor.report())


def _collector(targets: list[Target], assemblies: Assemblies) -> Callable[[Unit, UnitResult], None]:
    """What the scheduler calls with each finished unit: its results (and its siblings') go to
    their targets, a part's once its shard's last part is in; a new shard is recorded at once."""
    by_loc = {tg.loc.display: tg for tg in targets}

    def on_result(unit: Unit, result: UnitResult) -> None:
        for u, r in zip([unit, *unit.siblings], [result, *result.siblings]):
            tg = by_loc[u.out.display]
            tg.not_reread += u.own_read_bytes if r.reused else 0
            shard = assemblies.take(u, r) if u.part else r
            if shard is None:
                continue
            tg.results.append(shard)
            if not shard.reused:
                record_shard(u.out, u.shard.name, shard.record())

    return on_result


def _commit(targets: list[Target], writes: Writes) -> None:
    """Commit every target that is not already complete as it stands."""
    for tg in targets:
        assert tg.claim is not None
        if not tg.claim.complete or any(not r.reused for r in tg.results):
            records = {r.path: r.record() for r in tg.results}
            finalize(tg.loc, tg.stage, records, tg.text, writes.copy_tokenizer, writes.write_model_card, tg.claim.cpu_capability)


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


class Job(Protocol):
    """One command's work for :func:`run_job`: a merge, a sweep (and the coming ``moe``, ``search``)."""

    share_reads: bool  # fuse the units of targets that write the same tensors (a sweep's members)

    def needs_math(self) -> bool:
        """Whether the job will compute tensors, guessed before planning (:func:`needs_math`)."""

    def plan(self) -> list[Target]:
        """Plan the job (headers only): the outputs to write. Ray actors may be starting meanwhile."""

    def report(self, ran: Ran, wall_s: float, plan_s: float) -> dict[str, Any]:
        """The run report, from what the targets (planned above) and the run did."""


def run_job(job: Job, execution: Execution, writes: Writes, report: str | None, started: float) -> dict[str, Any]:
    """The one run path: plan -> claim -> run -> commit -> report (written to ``report`` if given).
    ``started``: when the caller began (its parsing counts as planning)."""
    with prepared(execution, job.needs_math()) as chosen:  # on a named cluster, actors start while the headers are read
        targets = job.plan()
    planned = time.monotonic() - started
    ran = run_targets(targets, execution, chosen, writes, job.share_reads) if targets else Ran([], {}, {})
    result = job.report(ran, time.monotonic() - started, planned)
    write_report(result, report)
    return result


def sweep_text(sweep: str | os.PathLike[str]) -> tuple[str, str]:
    """A sweep's YAML and where it came from: a file's path, or ``<sweep>`` for text."""
    sweep = os.fspath(sweep)
    if "\n" in sweep or not (sweep.endswith((".yml", ".yaml")) or os.path.exists(sweep)):
        return sweep, "<sweep>"
    try:
        with open(sweep, encoding="utf-8") as f:
            return f.read(), sweep
    except OSError as e:
        raise RecipeError("", f"cannot read sweep file: {e.strerror}", sweep) from None


@dataclass
class SweepJob:
    """A sweep for :func:`run_job`: every member planned (a bad one noted, or fatal with
    ``fail_fast``), one target per distinct model at ``out/<member>`` (a member whose plan is another's
    is reported as that one, and a grid axis that changes nothing is refused), reads shared between
    members."""

    sweep: Sweep
    out: str
    storage_options: dict[str, Any] | None
    resolver: Resolver
    planning: tuple  # out_shard_size, allow_crimes, unsafe_truncate_embeddings, random_seed, lora_merge_dtype, strict
    fail_fast: bool
    share_reads: bool = True
    cache: dict[str, Model] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    same: dict[str, str] = field(default_factory=dict)  # member -> the member whose model it is
    targets: dict[str, Target] = field(default_factory=dict)
    root: Location = field(init=False)

    def needs_math(self) -> bool:
        return needs_math([r for rs in self.sweep.members.values() if not isinstance(rs, NyxrayError) for r in rs])

    def plan(self) -> list[Target]:
        shard_size, crimes, truncate, seed, lora_dtype, strict = self.planning
        for name, recipes in self.sweep.members.items():
            try:
                if isinstance(recipes, NyxrayError):
                    raise recipes
                self.plans[name] = make_plan(
                    recipes, self.resolver, shard_size, crimes, truncate, model_cache=self.cache, random_seed=seed, lora_dtype=lora_dtype, strict=strict
                )
            except NyxrayError as e:
                if self.fail_fast:
                    raise NyxrayError(f"sweep member {name!r}: {e}") from None
                self.failed[name] = str(e)
        self.same = same_models(self.plans)
        check_axes(self.sweep.points, self.plans, self.same, self.sweep.origin)
        self.root = location(self.out, self.storage_options)
        distinct = {name: p for name, p in self.plans.items() if name not in self.same}
        self.targets = {name: Target(self.root.child(name), p.final, pipeline_text(self.sweep.members[name])) for name, p in distinct.items()}  # type: ignore[arg-type]
        return list(self.targets.values())

    def report(self, ran: Ran, wall_s: float, plan_s: float) -> dict[str, Any]:
        header_bytes = sum(m.header_bytes for m in self.cache.values())
        members = {name: {**target_report(tg), "bytes_read_min": self.plans[name].bytes_read_min()} for name, tg in self.targets.items()}
        return {
            "output": self.root.display,
            "wall_s": round(wall_s, 3),
            "bytes_read": sum(r["bytes_read_tensors"] for r in members.values()) + header_bytes,
            "bytes_read_headers": header_bytes,
            "bytes_written": sum(r["bytes_written"] for r in members.values()),
            "timings_s": {"plan": round(plan_s, 3), **ran.timings},
            "members": members,
            "same_as": self.same,
            "failed": self.failed,
            "executor": ran.executor,
            "actors": ran.workers,
            "balance": balance(ran.workers),
        }
