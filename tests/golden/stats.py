"""Statistics that compare random methods' outputs (DARE, DELLA) where bits cannot be compared.

Used both by ``make_golden.py`` (on mergekit's outputs) and by ``tests/test_golden.py`` (on
nyxray's), so the two sides measure exactly the same thing.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file


def load_model_tensors(out_dir: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out_dir, f)))
    return tensors


def sumsq_distance(got: dict[str, torch.Tensor], dense: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, sum((got - dense)**2) in float64."""
    return {name: float(((t.double() - dense[name].double()) ** 2).sum()) for name, t in sorted(got.items())}


def departures(got: dict[str, torch.Tensor], base: dict[str, torch.Tensor], names: list[str]) -> dict[str, dict[str, float]]:
    """Per tensor of ``names``, how far a merge moved from its base: the fraction of elements that
    differ from the base, and the float64 sum of squared differences (arcee_fusion's sampled quartiles
    pick which elements move, so these are what can be compared when the bits cannot)."""
    out = {}
    for name in names:
        d = got[name].double() - base[name].double()
        out[name] = {"moved": float((d != 0).double().mean()), "sumsq": float((d**2).sum())}
    return out
