"""A checkpoint's tensors under the names its architecture declares.

mergekit 0.1.5 reads a declared tensor by its name, else by an alias (GPT-2's names without
``transformer.``), else through transformers 5's conversion of older layouts: a renamed tensor
(Mixtral's ``block_sparse_moe.gate``) or a fused MoE tensor assembled from one tensor per expert.
It writes the declared names. Converted tensors matter beyond their bytes: mergekit schedules a
tensor by the checkpoint name it was read under, and a converted one has none (see
:mod:`nyxray.plan.write_order`), so :func:`adapt` says which they are.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..expr import Expr, Join, shape_of
from .record import Architecture, Experts, Module


def _experts(m: Module, index: int, spec: Experts, config: dict, tensors: Mapping[str, Expr]) -> Expr | None:
    """The fused tensor of layer ``index``: per expert, its parts end to end; None if a part is missing."""
    n = spec.count(config)
    parts = [tensors.get(m.layer_name(index, p.format(e=e))) for e in range(n) for p in spec.parts]
    if any(p is None for p in parts):
        return None
    first = shape_of(parts[0])  # type: ignore[arg-type]
    rows = sum(shape_of(p)[0] for p in parts[: len(spec.parts)])  # type: ignore[arg-type]
    return Join(tuple(parts), (n, rows, *first[1:]))  # type: ignore[arg-type]


def _converted(m: Module, config: dict, tensors: Mapping[str, Expr]) -> dict[str, Expr]:
    out: dict[str, Expr] = {}
    if not (m.renamed or m.experts):
        return out
    for i in range(m.num_layers(config)):
        for suffix, stored in m.renamed:
            e = tensors.get(m.layer_name(i, stored))
            if e is not None:
                out[m.layer_name(i, suffix)] = e
        for suffix, spec in m.experts:
            fused = _experts(m, i, spec, config, tensors)
            if fused is not None:
                out[m.layer_name(i, suffix)] = fused
    return {k: v for k, v in out.items() if k not in tensors}


def adapt(arch: Architecture, config: dict, tensors: Mapping[str, Expr]) -> tuple[dict[str, Expr], frozenset[str]]:
    """``tensors`` plus each declared name found under an alias or a convertible layout, and the
    names that came from a conversion."""
    out = dict(tensors)
    converted: dict[str, Expr] = {}
    for m in arch.modules:
        for canonical, stored in m.aliases:
            for name, e in tensors.items():
                if name.startswith(stored) and not name.startswith(canonical):
                    out.setdefault(canonical + name[len(stored) :], e)
        converted.update(_converted(m, config, tensors))
    out.update(converted)
    return out, frozenset(converted)
