"""Sweeps: many recipes over the same inputs in one job, each input byte read once for all.

A sweep file is YAML with ``members:`` (a list of ``{name, recipe}``, the recipe a path relative
to the sweep file or an inline mapping; pipelines allowed) and/or ``base:`` (a recipe) with
``grid:`` (a map from a place in the recipe, e.g. ``parameters.t`` or ``parameters.t[2].value``,
to the list of values it takes; every step of the place must exist in the base, else the sweep
file is refused naming it). The grid expands to the cross product, with readable member names
(``grid_prefix`` + ``t=0.3``...). Member ``M`` is written to ``OUT/M`` as a complete model.

Members are planned separately: one member's bad recipe is reported and the others still run,
unless ``fail_fast``. Their shards that write the same tensors in the same order become one unit,
so an actor reads each input tensor once and computes every member's outputs from it.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import NyxrayError, RecipeError, did_you_mean
from ..methods.registry import METHODS
from .parse import YAML_FAILURES, Recipe, _StrictLoader, parse_pipeline, parse_recipe

SWEEP_KEYS = ("members", "base", "grid", "grid_prefix")
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("._") or "member"


def _steps(path: str) -> list[tuple[str | None, str | None]]:
    steps = [(m.group(1), m.group(2)) for m in _STEP.finditer(path)]
    if not steps or "".join(m.group(0) for m in _STEP.finditer(path)) != path.replace(".", ""):
        raise RecipeError(f"grid.{path}", "not a recipe place: expected keys and [index] steps such as parameters.t or parameters.t[2].value")
    return steps


def _walk(doc: Any, path: str) -> tuple[Any, str | int]:
    """The container holding ``path``'s last step in ``doc``, and that step; every step must exist,
    except a method parameter the base leaves to its default (``parameters.density``,
    ``models[1].parameters.weight``): a missing ``parameters`` mapping is added (empty) to ``doc``."""
    steps = _steps(path)
    node, done = doc, ""
    for i, (key, index) in enumerate(steps):
        last = i == len(steps) - 1
        if key is not None and isinstance(node, dict) and key not in node:
            if key == "parameters" and not last:
                node[key] = {}
            elif last and done.rsplit(".", 1)[-1] == "parameters" and key in _method_parameters(doc):
                return node, key
        if key is not None:
            if not isinstance(node, dict) or key not in node:
                have = tuple(str(k) for k in node) if isinstance(node, dict) else ()
                at = f" under {done!r}" if done else ""
                raise RecipeError(f"grid.{path}", f"the base recipe has no {key!r}{at}{did_you_mean(key, have)}")
            step: str | int = key
            done = f"{done}.{key}" if done else key
        else:
            j = int(index)  # type: ignore[arg-type]
            if not isinstance(node, list) or j >= len(node):
                size = f"has {len(node)} entries" if isinstance(node, list) else "is not a list"
                raise RecipeError(f"grid.{path}", f"index [{j}] is not in the base recipe: {done or 'the recipe'} {size}")
            step = j
            done = f"{done}[{j}]"
        if last:
            return node, step
        node = node[step]
    raise AssertionError("unreachable")


def _method_parameters(doc: Any) -> set[str]:
    """The parameter names the recipe's merge method takes (none if the method is unknown)."""
    method = METHODS.get(doc.get("merge_method")) if isinstance(doc.get("merge_method"), str) else None
    return {p.name for p in method.params} if method else set()


def _short(path: str) -> str:
    """``parameters.t[2].value`` -> ``t2``: the member-name label of a grid axis."""
    parts = [p for p in re.split(r"[.\[\]]+", path) if p and p not in ("parameters", "value", "slices", "sources")]
    return "".join(parts) or path


def _label(value: Any) -> str:
    """A grid value as it appears in a member name: ``0.3``, ``[0.75, 0.25]`` -> ``0.75_0.25``."""
    if isinstance(value, (list, tuple)):
        return "_".join(_label(v) for v in value)
    if isinstance(value, dict):
        return "_".join(f"{k}-{_label(v)}" for k, v in value.items())
    return str(value).replace(" ", "")


def _load_base(base: Any, base_dir: str, origin: str) -> dict:
    """The grid's base recipe (a path, YAML text or a mapping) as one YAML document."""
    where = "base"
    if isinstance(base, str) and "\n" not in base:
        path = base if os.path.isabs(base) else os.path.join(base_dir, base)
        try:
            with open(path, encoding="utf-8") as f:
                base, where = f.read(), path
        except OSError as e:
            raise RecipeError("base", f"cannot read recipe {base!r}: {e.strerror}", origin) from None
    if isinstance(base, str):
        try:
            docs = [d for d in yaml.load_all(base, Loader=_StrictLoader) if d is not None]
        except YAML_FAILURES as e:
            raise RecipeError("base", f"not valid YAML ({where}): {' '.join(str(e).split())}", origin) from None
        if len(docs) != 1:
            raise RecipeError("base", f"a grid's base is one recipe, not a pipeline of {len(docs)} documents ({where})", origin)
        base = docs[0]
    if not isinstance(base, dict):
        raise RecipeError("base", "must be a recipe: a path, YAML text or a mapping", origin)
    return base


def _member_recipe(spec: Any, base_dir: str, where: str) -> list[Recipe]:
    if isinstance(spec, str) and "\n" not in spec:
        path = spec if os.path.isabs(spec) else os.path.join(base_dir, spec)
        try:
            with open(path, encoding="utf-8") as f:
                return parse_pipeline(f.read(), path)
        except OSError as e:
            raise RecipeError(where, f"cannot read recipe {spec!r}: {e.strerror}") from None
    if isinstance(spec, str):
        return parse_pipeline(spec, where)
    if isinstance(spec, dict):
        return [parse_recipe(spec, yaml.safe_dump(spec, sort_keys=False), where)]
    raise RecipeError(where, "a member recipe is a path, YAML text or a mapping")


@dataclass(frozen=True)
class Sweep:
    """A sweep file, expanded."""

    members: dict[str, list[Recipe] | NyxrayError]  # name -> its recipes, or what makes it invalid
    points: dict[str, tuple[tuple[str, Any], ...]]  # grid member -> (axis, value) per axis, in grid order
    origin: str


def expand(text: str, origin: str = "<sweep>") -> Sweep:
    """Sweep YAML -> its members (each member's recipes, or the error that makes it invalid)."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except YAML_FAILURES as e:
        raise RecipeError("", f"not valid YAML: {' '.join(str(e).split())}", origin) from None
    if not isinstance(doc, dict):
        raise RecipeError("", "a sweep file is a mapping with members: and/or base: + grid:", origin)
    for key in doc:
        if key not in SWEEP_KEYS:
            raise RecipeError(str(key), f"unknown sweep key{did_you_mean(str(key), SWEEP_KEYS)}", origin)
    base_dir = os.path.dirname(os.path.abspath(origin)) if os.path.exists(origin) else os.getcwd()
    members: dict[str, list[Recipe] | NyxrayError] = {}
    points: dict[str, tuple[tuple[str, Any], ...]] = {}

    def add(name: str, where: str, make: Any) -> None:
        if name in members:
            raise RecipeError(where, f"member name {name!r} is used twice", origin)
        try:
            members[name] = make()
        except NyxrayError as e:
            members[name] = e

    if not isinstance(doc.get("members") or [], list):
        raise RecipeError("members", "must be a list of {name, recipe}", origin)
    for i, m in enumerate(doc.get("members") or []):
        where = f"members[{i}]"
        if not isinstance(m, dict) or set(m) - {"name", "recipe"} or "recipe" not in m:
            raise RecipeError(where, "a member is {name, recipe}", origin)
        name = _safe_name(str(m.get("name") or f"member{i}"))
        add(name, where, lambda m=m, where=where: _member_recipe(m["recipe"], base_dir, f"{origin} {where}"))
    if ("base" in doc) != ("grid" in doc):
        raise RecipeError("grid" if "base" in doc else "base", "base: and grid: go together", origin)
    if "grid" in doc:
        points = _expand_grid(doc, base_dir, origin, add)
    if not members:
        raise RecipeError("members", "the sweep has no members", origin)
    return Sweep(members, points, origin)


def _expand_grid(doc: dict, base_dir: str, origin: str, add: Any) -> dict[str, tuple[tuple[str, Any], ...]]:
    """Add the grid's members (the cross product of its axes over the base); returns where each sits."""
    points: dict[str, tuple[tuple[str, Any], ...]] = {}
    grid = doc["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise RecipeError("grid", "must map recipe places to non-empty lists of values", origin)
    base = _load_base(doc["base"], base_dir, origin)
    axes = [str(a) for a in grid]
    try:
        for a in axes:  # a place missing from the base is the sweep's error, not each member's
            _walk(base, a)
    except RecipeError as e:
        raise RecipeError("", str(e), origin) from None
    prefix = str(doc.get("grid_prefix") or "")
    for values in itertools.product(*(grid[a] for a in grid)):
        label = ",".join(f"{_short(a)}={_label(v)}" for a, v in zip(axes, values))
        name = _safe_name(f"{prefix}-{label}" if prefix else label)

        def make(values: tuple = values, label: str = label) -> list[Recipe]:
            doc_i = copy.deepcopy(base)
            for a, v in zip(axes, values):
                node, step = _walk(doc_i, a)
                node[step] = copy.deepcopy(v)
            return [parse_recipe(doc_i, yaml.safe_dump(doc_i, sort_keys=False), f"{origin} grid {label}")]

        add(name, f"grid ({label})", make)
        points[name] = tuple(zip(axes, values))
    return points
