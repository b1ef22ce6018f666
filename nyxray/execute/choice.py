"""Which executor runs a merge, and why: Ray when a cluster is named, else this process.

Starting a local Ray costs seconds (processes, torch imported again in each actor) and pays off
only on a cluster, so ``auto`` runs in-process unless a cluster is named: ``address``,
``RAY_ADDRESS``, the environment of a Ray job's entry point, or a Ray already initialised in this
process (an API caller's, or a Ray task's). Deciding never imports Ray.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

EXECUTORS = ("auto", "ray", "local")
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted entry point


@dataclass(frozen=True)
class Choice:
    """The executor that runs (``ray`` or ``local``) and the reason, for the report."""

    name: str
    why: str
    warm: bool = False  # start the workers before planning: a named cluster, where connecting is cheap

    def report(self) -> dict[str, str]:
        return {"name": self.name, "why": self.why}


def choose(executor: str, address: str | None = None, keep_actors: float = 0.0) -> Choice:
    """Resolve ``executor`` (one of :data:`EXECUTORS`, validated by the caller).

    ``warm`` is set where Ray runs on a named cluster: its actors can start while the driver reads
    headers. A local Ray started on demand is not warmed: a bad recipe must fail before seconds of
    Ray start-up, not after.
    """
    cluster = _named_cluster(address)
    if executor != "auto":
        return Choice(executor, f"executor={executor} was asked for", warm=executor == "ray" and cluster is not None)
    if cluster:
        return Choice("ray", cluster, warm=True)
    if keep_actors > 0:
        return Choice("ray", f"keep_actors={keep_actors:g} asks for Ray actors to keep")
    return Choice("local", "no Ray cluster named by address, RAY_ADDRESS or a Ray job: in this process, no Ray start-up")


def _named_cluster(address: str | None) -> str | None:
    """Why a Ray cluster is the one to use, or None when none is named."""
    if address:
        return f"a Ray cluster was named (address={address})"
    if os.environ.get("RAY_ADDRESS"):
        return "a Ray cluster was named (RAY_ADDRESS)"
    if os.environ.get(JOB_ENV):
        return "running as a Ray job"
    ray = sys.modules.get("ray")  # imported by the caller, never by us
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return "Ray is already initialised in this process"
    return None
