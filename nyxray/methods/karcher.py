"""Karcher mean: the point on the unit sphere minimising the summed squared geodesic distances to
the inputs' directions, found by Riemannian gradient steps, scaled by the inputs' mean norm.

Every input counts equally, the base model too (mergekit 0.1.5 ignores the base role here). Norms
and the step length are taken in float32 (float64 for float64 inputs); the directions and the
iterate stay in the inputs' dtype, rounded after each step as mergekit rounds them.
"""

from __future__ import annotations

import torch

from ._geometry import single_threaded
from .base import Group


@single_threaded
def merge(group: Group) -> torch.Tensor:
    tensors = group.tensors
    if len(tensors) == 1:
        return tensors[0]
    return _karcher(tensors, [1.0 / len(tensors)] * len(tensors), group.params["max_iter"], group.params["tol"])


def _karcher(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    exact = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.to(exact))

    norms = [norm(t) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        return sum(t * 0 for t in tensors)  # zeros, built as mergekit builds them (signs included)
    kept_total = sum(alphas[i] for i in kept)
    weights = [alphas[i] / kept_total for i in kept]
    points = [units[i] for i in kept]

    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points):
        mean += w * u
    length = norm(mean)
    mean = points[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - cos * mean)  # log map, weighted
        step = norm(tangent)
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)  # exp map
        length = norm(mean)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(a * n for a, n in zip(alphas, norms))  # every input's norm, zero or not
    return scale * mean
