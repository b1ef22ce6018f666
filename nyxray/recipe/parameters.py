"""Parameter settings: filters, gradients and precedence, evaluated as mergekit does.

A setting is a scalar, a gradient list, or a list of ``{filter, value}`` conditionals scanned in
order (first match wins; a filter is a plain case-sensitive substring of the tensor name; no
filter or ``"*"`` always matches). A gradient ``[v0 .. vn-1]`` at position ``t`` in [0, 1] is the
piecewise-linear ``(1 - f) * v[i0] + f * v[i1]`` in double precision; the exact form matters for
the last bit, so do not replace it with ``numpy.interp``. A
a list of booleans is not interpolated: it selects the element at ``floor(t * (n - 1))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .parse import Setting


def gradient(values: Sequence[float], t: float) -> float:
    """Value of the gradient list ``values`` at position ``t``."""
    n = len(values)
    s = t * (n - 1)
    i0 = math.floor(s)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * values[i0] + f * values[i1]


def filter_matches(flt: str | None, tensor_name: str) -> bool:
    return flt is None or flt == "*" or flt in tensor_name


def coerce(value: Any, kind: type) -> Any:
    """A resolved value as ``kind``: integral floats become ints, ints become floats."""
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _value(value: Any, t: float, kind: type) -> Any:
    if not isinstance(value, list):
        return value
    if not any(isinstance(v, bool) for v in value):
        return gradient(value, t)
    return value[math.floor(t * (len(value) - 1))]


@dataclass(frozen=True)
class Resolved:
    """A parameter's value for one tensor and where it came from (for ``nyxray plan``)."""

    value: Any
    source: str  # key path of the setting that gave it, e.g. "parameters.t[2]"


def evaluate(setting: Setting, tensor_name: str, t: float, kind: type = float) -> tuple[Any, int | None] | None:
    """Evaluate one setting; ``None`` when no conditional matches (precedence falls through).

    Returns (value, index of the matching conditional or None for a plain value).
    """
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for i, cond in enumerate(setting):
            if filter_matches(cond["filter"], tensor_name):
                return coerce(_value(cond["value"], t, kind), kind), i
        return None
    return coerce(_value(setting, t, kind), kind), None


def resolve(name: str, levels: Sequence[tuple[str, dict[str, Setting]]], tensor_name: str, t: float, kind: type = float) -> Resolved | None:
    """Resolve parameter ``name`` through ``levels`` (highest precedence first: (key path, params)).

    ``kind`` is the parameter's type (float, int or bool); an integer parameter accepts integral
    numbers (a gradient between integers may give one that is not: :func:`coerce` says so).
    """
    for path, params in levels:
        if name in params:
            hit = evaluate(params[name], tensor_name, t, kind)
            if hit is not None:
                value, index = hit
                where = f"{path}.{name}" if path else name
                return Resolved(value, where if index is None else f"{where}[{index}]")
    return None
