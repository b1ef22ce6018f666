"""How a run executes: one frozen, validated value, built from the keywords of ``merge``/``sweep``.

It is checked when built (a bad option fails before any model is opened) and travels whole to
the executor choice, the warm-up, the pool factory and the pools, so no layer passes the options
on one by one. What a run writes (overwrite, tokenizer, model card) is not here: that is the
output's business (:class:`Writes`), and the pools never see it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import NyxrayError
from ..output.parts import parse_unit_size
from . import cpu_capability as cpu_capability_module
from .choice import EXECUTORS

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Execution:
    """Where and how the units of a merge or sweep run; checked when built.

    ``executor="auto"`` runs on Ray when a cluster is named (``address``, ``RAY_ADDRESS``, a Ray
    job, or a Ray already initialised in this process), else in this process with no Ray start-up;
    ``"ray"`` always runs on Ray (a local instance unless a cluster is named); ``"local"`` runs in
    this process on one worker thread per core (or per local GPU; ``actors`` sets how many), each
    unit's math on one torch thread. The report's ``executor`` says which ran and why.
    ``device``: ``auto`` (a GPU where the worker has one), ``cpu``, ``cuda`` or ``cuda:N``.
    ``actor_cpus``/``actor_gpus``: what each Ray actor reserves. ``keep_actors`` (seconds, Ray
    only) keeps the Ray actors alive that long after the merge, for the next merge of this process
    to reuse (no process start, no torch import); they hold their CPUs/GPUs meanwhile
    (:func:`nyxray.release_actors` stops them).
    ``unit_size`` (bytes, or ``"256M"``; default 256 MiB; bytes once built) caps the output of one
    work unit: a larger shard is computed as parts by several workers and assembled into the one
    file (locally and on S3).
    ``cpu_capability`` (``default``, ``avx2`` or ``avx512``: torch's CPU kernel sets, whose float32
    rounding differs) is the one every worker computes with; default: the one an unfinished output
    was begun with, else the driver's. A worker whose CPU cannot run it fails the run; in this
    process it must be the one torch was imported with (the ``nyxray`` command sets it first).
    ``progress``: draw the progress line.
    """

    executor: str = "auto"
    device: str = "auto"
    address: str | None = None
    actors: int | None = None
    actor_cpus: float = 1.0
    actor_gpus: float | None = None
    keep_actors: float = 0.0
    unit_size: int = None  # type: ignore[assignment]  # parsed in __post_init__
    cpu_capability: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit_size", parse_unit_size(self.unit_size))
        object.__setattr__(self, "cpu_capability", cpu_capability_module.validate(self.cpu_capability))
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise NyxrayError(f"device {self.device!r}: expected one of {', '.join(DEVICES)} or cuda:N")
        if self.executor not in EXECUTORS:
            raise NyxrayError(f"executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if self.actors is not None and self.actors < 1:
            raise NyxrayError(f"actors={self.actors}: expected at least 1")
        if not self.keep_actors >= 0:
            raise NyxrayError(f"keep_actors={self.keep_actors}: expected seconds >= 0 (0: stop the actors when the merge ends)")
        if self.keep_actors and self.executor == "local":
            raise NyxrayError(f"keep_actors={self.keep_actors}: only the ray executor has actors to keep")


@dataclass(frozen=True)
class Writes:
    """What a run writes beside the shards, and whether it may replace what is there: read when
    outputs are claimed and committed, never by a worker."""

    overwrite: bool = False
    copy_tokenizer: bool = True
    write_model_card: bool = True


OPTIONS = frozenset(f.name for cls in (Execution, Writes) for f in fields(cls))  # the keywords build() takes


def build(**options: Any) -> tuple[Execution, Writes]:
    """The one place keyword arguments (``merge``'s, ``sweep``'s, the CLI's) become an
    :class:`Execution` and :class:`Writes`; an unknown keyword is a ``TypeError``, as for any call."""
    writes = {f.name: options.pop(f.name) for f in fields(Writes) if f.name in options}
    return Execution(**options), Writes(**writes)
