"""Which sweep members are the same model, and which grid axes change nothing.

A grid over a recipe place that no tensor's resolved parameters depend on (``parameters.density``
when every model sets its own ``density``) writes the same model once per value. That is caught
from the plans alone, before anything is read: two members are the same model when their final
stages would write the same shard headers and the same tensor expressions, and an axis changes
nothing when, among members that differ only on that axis, every plan is the same.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from typing import Any

from ..errors import RecipeError
from .stages import Plan, StagePlan

# member name -> ((axis, value), ...): where a grid member sits on each axis
GridPoints = dict[str, tuple[tuple[str, Any], ...]]


def content_id(stage: StagePlan) -> str:
    """A fingerprint of the model a stage writes (its recipe text aside)."""
    h = hashlib.sha256(b"nyxray-content-v1\n")
    for chunk in stage.content():
        h.update(chunk)
    return h.hexdigest()


def same_models(plans: dict[str, Plan]) -> dict[str, str]:
    """Member -> the earlier member whose model it is the same as (members in plan order)."""
    first: dict[str, str] = {}
    same: dict[str, str] = {}
    for name, p in plans.items():
        cid = content_id(p.final)
        if cid in first:
            same[name] = first[cid]
        else:
            first[cid] = name
    return same


def check_axes(points: GridPoints, plans: dict[str, Plan], same: dict[str, str], origin: str) -> None:
    """Raise naming the first grid axis whose values give the same model, and what outranks it."""
    model = {name: same.get(name, name) for name in plans}
    axes = next(iter(points.values()), ())
    for i, (axis, _) in enumerate(axes):
        rows: dict[tuple, set[str]] = defaultdict(set)
        values: dict[tuple, set[str]] = defaultdict(set)
        for name, pts in points.items():
            if name in model:
                rest = tuple(repr(v) for j, (_, v) in enumerate(pts) if j != i)
                rows[rest].add(model[name])
                values[rest].add(repr(pts[i][1]))
        if any(len(values[r]) > 1 for r in rows) and all(len(m) == 1 for m in rows.values()):
            raise RecipeError(f"grid.{axis}", f"changes nothing: every value gives the same model{_outranked(axis, plans)}", origin)


def _outranked(axis: str, plans: dict[str, Plan]) -> str:
    """``; models[0..2].parameters.density sets it for every tensor``: the places that gave the
    axis's parameter to the tensors, when they are not the axis itself."""
    param = axis.rsplit(".", 1)[-1]
    if not re.fullmatch(r"\w+", param):
        return ""
    plan = next(iter(plans.values()))
    places = {src for t in plan.final.tensors for name, _, src in t.params if name.split("[", 1)[0] == param and not src.startswith(axis)}
    return f"; {_compact(sorted(places))} outrank it for every tensor" if places else ""


def _compact(paths: list[str]) -> str:
    """``models[0].parameters.density``, ``models[1]...``, ``models[2]...`` -> ``models[0..2].parameters.density``."""
    groups: dict[str, list[int]] = defaultdict(list)
    rest = []
    for p in paths:
        m = re.fullmatch(r"(\w+)\[(\d+)\](.*)", p)
        if m:
            groups[f"{m.group(1)}[{{}}]{m.group(3)}"].append(int(m.group(2)))
        else:
            rest.append(p)
    for shape, idx in groups.items():
        idx.sort()
        span = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))
        rest.append(shape.format(span))
    return ", ".join(rest)
