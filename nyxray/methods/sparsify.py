"""Sparsification of a task vector: which entries of ``delta`` survive, and the optional L1 rescale.

Four rules, as mergekit 0.1.5 applies them inside the task arithmetic family:

- ``magnitude`` (TIES): keep the ``density`` fraction of largest |delta|;
- ``magnitude_outliers`` (breadcrumbs): drop the ``gamma`` fraction of largest |delta|, then the
  smallest, keeping ``density``;
- ``random`` (DARE): keep each entry with probability ``density``;
- ``della_magprune`` (DELLA): keep each entry with a probability from ``density - epsilon`` (the
  smallest of its row) to ``density + epsilon`` (the largest).

The deterministic rules repeat mergekit's torch operations in order and dtype, so their bits equal
mergekit's on the CPU. That includes its unstable sort: equal magnitudes are frequent in bf16, and
which of them survive is whatever ``torch.sort`` leaves at the cut, so the sort call stays as it is.

The random rules draw uniform numbers from the given CPU generator and keep an entry when its draw
is below its probability (same distribution as ``torch.bernoulli``). They run entirely on the CPU
and move the result to the tensor's device afterwards, so their bits do not depend on the device.
They keep mergekit's probabilities exactly, including its work dtype on the CPU (bf16 stays bf16,
so DARE's probability is ``density`` rounded to bf16; other dtypes work in float32).

Whole-tensor sums (the rescale) split across torch threads: their bits are mergekit's
``--num-threads 1`` only on one thread, so callers run this on one (the family's ``merge`` does).
"""

from __future__ import annotations

import torch

METHODS = ("magnitude", "magnitude_outliers", "random", "della_magprune")
_RESCALE_EPS = 1e-7  # below this L1 norm (before or after masking) the rescale is skipped, as in mergekit


def sparsify(
    delta: torch.Tensor,
    method: str,
    *,
    density: float,
    rescale: bool,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``delta`` with all but the kept entries zeroed (rescaled to its L1 norm if ``rescale``).

    Returns a tensor of ``delta``'s dtype and device; ``delta`` itself when ``density >= 1``
    (nothing dropped, nothing drawn). ``generator`` (a CPU generator) is required by the random rules.
    """
    if density >= 1:
        return delta
    if method == "magnitude":
        return _masked(delta, _largest(delta, density), rescale)
    if method == "magnitude_outliers":
        return _masked(delta, _middle(delta, density, gamma), rescale)
    if method in ("random", "della_magprune"):
        if generator is None:
            raise ValueError(f"{method} sparsification draws random numbers: it needs a generator")
        work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
        x = delta.to("cpu", work)
        if method == "random":
            keep = _draw(x.shape, torch.full((), density, dtype=work), generator)
        else:
            keep = _draw(x.shape, _della_probabilities(x, density, epsilon), generator)
        return _masked(x, keep, rescale).to(delta.device, delta.dtype)
    raise ValueError(f"unknown sparsification {method!r}; expected one of {', '.join(METHODS)}")


def _masked(x: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``x`` where ``keep``, else zero; if ``rescale``, scaled so its L1 norm is ``x``'s again.

    The norms are sums in ``x``'s dtype, the factor their quotient in that dtype, as in mergekit.
    """
    kept = x * keep
    if not rescale:
        return kept
    before = x.abs().sum()
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def _largest(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask of the ``int(density * n)`` (at least one) largest |x|."""
    k = max(1, int(density * x.numel()))
    order = torch.argsort(x.abs().reshape(-1).float(), descending=True)
    keep = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    keep[order[:k]] = True
    return keep.reshape(x.shape)


def _middle(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep mask of ``int(density * n)`` entries by |x|, just below the ``int(gamma * n)`` largest.

    When density and gamma together exceed the whole, the outliers dropped shrink first: the
    smallest entries are dropped only as far as needed (never a negative count).
    """
    n = x.numel()
    kept = int(density * n)
    below = max(0, n - kept - int(gamma * n))
    order = torch.sort(x.abs().reshape(-1).float()).indices
    keep = torch.zeros(n, dtype=torch.bool, device=x.device)
    keep[order[below : below + kept]] = True
    return keep.reshape(x.shape)


def _della_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability, linear in the entry's |x| rank within its row (dim 1; a 1-D
    tensor is one row): ``density - epsilon`` for the smallest, ``density + epsilon`` for the largest.
    Computed in ``x``'s dtype (mergekit's CPU work dtype), so bf16 rounds the normalized ranks.
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}")
    rows = x if x.ndim >= 2 else x.reshape(1, -1)
    if rows.shape[1] < 2:
        raise ValueError(f"della: ranks need at least 2 entries per row, got shape {tuple(x.shape)}")
    ranks = torch.argsort(rows.abs(), dim=1).argsort(dim=1).to(x.dtype) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(x.shape)


def _draw(shape: torch.Size, probability: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli keep mask: one float32 uniform draw per entry (CPU, serial, so independent of the
    thread count), kept when below its probability."""
    return torch.rand(shape, generator=generator) < probability
