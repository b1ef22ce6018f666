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
which of them survive is whatever ``torch.sort`` leaves at the cut. On the CPU that sort is the C++
standard library's introsort over (value, index) pairs; :func:`_sorted_prefix` replays only the
partitions that contain the cut (a quickselect with the very same pivots and swaps), so it picks the
same entries in O(n) instead of sorting all of them. It is used only where it is provably the same
(CPU, no NaN, this torch build checked once against its own sort); otherwise the sort runs as before.

The random rules draw uniform numbers from the given CPU generator and keep an entry when its draw
is below its probability (same distribution as ``torch.bernoulli``). They run entirely on the CPU
and move the result to the tensor's device afterwards, so their bits do not depend on the device.
They keep mergekit's probabilities exactly, including its work dtype on the CPU (bf16 stays bf16,
so DARE's probability is ``density`` rounded to bf16; other dtypes work in float32).

Whole-tensor sums (the rescale) split across torch threads: their bits are mergekit's
``--num-threads 1`` only on one thread, so callers run this on one (the family's ``merge`` does).
"""

from __future__ import annotations

import numpy as np
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
    w = x.abs().reshape(-1).float()
    if _replay_allowed(w):
        keep = _sorted_prefix(w.numpy(), k, descending=True, consume=True)
        if keep is not None:
            return torch.from_numpy(keep).reshape(x.shape)
        w = x.abs().reshape(-1).float()  # the replay permuted it
    order = torch.argsort(w, descending=True)
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
    w = x.abs().reshape(-1).float()
    if _replay_allowed(w):
        upto = _sorted_prefix(w.numpy(), below + kept)
        under = _sorted_prefix(w.numpy(), below, consume=True) if upto is not None else None
        if under is not None:
            return torch.from_numpy(upto & ~under).reshape(x.shape)
        w = x.abs().reshape(-1).float()
    order = torch.sort(w).indices
    keep = torch.zeros(n, dtype=torch.bool, device=x.device)
    keep[order[below : below + kept]] = True
    return keep.reshape(x.shape)


_LEAF = 16  # introsort leaves runs of at most this many to its final (stable) insertion sort
_replay_checked: bool | None = None  # whether this torch build's CPU sort is the one replayed


def _replay_allowed(w: torch.Tensor) -> bool:
    """Whether :func:`_sorted_prefix` gives exactly ``torch.sort``'s cut for the float32 keys ``w``:
    a CPU tensor without NaN (NaN orders apart), on a torch build whose sort passed the self-check."""
    global _replay_checked
    if w.device.type != "cpu" or w.numel() == 0 or bool(w.max().isnan()):  # max propagates NaN
        return False
    if _replay_checked is None:
        _replay_checked = _self_check()
    return _replay_checked


def _self_check() -> bool:
    """Compare the replay with this torch build's own sort on tensors full of ties, both directions.

    A build whose CPU sort is another algorithm (e.g. a vectorised quicksort for float32) orders
    ties differently: then every selection falls back to the sort itself.
    """
    g = torch.Generator().manual_seed(20261204)
    for n, levels in ((2000, 7), (70001, 300)):
        w = torch.randint(0, levels, (n,), generator=g).float()
        for k in (1, n // 3, n // 2 + 1, n - 1):
            for descending in (False, True):
                order = torch.sort(w, descending=descending).indices[:k]
                expected = np.zeros(n, dtype=bool)
                expected[order.numpy()] = True
                got = _sorted_prefix(w.numpy(), k, descending)
                if got is None or not np.array_equal(got, expected):
                    return False
    return True


def _sorted_prefix(keys: np.ndarray, k: int, descending: bool = False, *, consume: bool = False) -> np.ndarray | None:
    """Mask of the entries that an unstable ``torch.sort`` (``descending`` or not) of the 1-D float32
    ``keys`` (no NaN) on the CPU puts at positions ``[0, k)``; None where the replay cannot follow.
    ``consume``: permute ``keys`` itself instead of a copy.

    That sort is introsort on (key, index) pairs: while a range holds more than 16 entries, take the
    median of its second, middle and last entries into its first place, partition the rest around it
    (scan from the left for an entry not before the pivot, from the right for one not after it, swap,
    repeat until the scans cross), then sort the part right of the cut and loop on the left one; after
    2*floor(log2 n) levels a range is heap-sorted instead (None here). A final insertion sort, stable,
    orders each remaining run of at most 16. Entries never cross a cut, so only the range holding
    position ``k`` matters: this replays its partitions exactly and leaves the others alone. The scans
    are vectorised: the j-th left stop swaps with the j-th right stop while the former lies left of
    the latter.
    """
    n = keys.shape[0]
    keep = np.zeros(n, dtype=bool)
    if k <= 0:
        return keep
    if k >= n:
        keep[:] = True
        return keep
    vals = keys if consume else keys.copy()
    idx = np.arange(n, dtype=np.int64 if n >= 2**31 else np.int32)
    whole = idx  # the full arrangement; ``vals``/``idx`` are views of the range holding position k
    before = np.greater if descending else np.less  # the sort's comparison
    stop_left = np.less_equal if descending else np.greater_equal  # not before the pivot
    stop_right = np.greater_equal if descending else np.less_equal  # not after the pivot
    start, rel, depth = 0, k, 2 * (n.bit_length() - 1)
    while True:
        m = vals.shape[0]
        if rel == m:  # the cut falls between two ranges
            keep[whole[: start + m]] = True
            return keep
        if m <= _LEAF:
            keep[whole[:start]] = True
            keep[idx[np.argsort(-vals if descending else vals, kind="stable")[:rel]]] = True
            return keep
        if depth == 0:
            return None
        depth -= 1
        mid = m // 2
        a, b, c = vals[1], vals[mid], vals[m - 1]
        if before(a, b):
            pick = mid if before(b, c) else (m - 1 if before(a, c) else 1)
        elif before(a, c):
            pick = 1
        else:
            pick = m - 1 if before(b, c) else mid
        vals[0], vals[pick] = vals[pick], vals[0]
        idx[0], idx[pick] = idx[pick], idx[0]
        pivot = vals[0]
        body, body_idx = vals[1:], idx[1:]  # positions below are counted from 1
        left = np.flatnonzero(stop_left(body, pivot))  # where the left scan stops, in order
        right = np.flatnonzero(stop_right(body, pivot))[::-1]  # where the right scan stops, in order
        # the stops pair up while the left one lies before the right one (left rises, right falls)
        lo, hi = 0, min(left.shape[0], right.shape[0])
        while lo < hi:
            j = (lo + hi) // 2
            if left[j] < right[j]:
                lo = j + 1
            else:
                hi = j
        swaps = lo
        # the left scan ends on its next stop, or on the last right stop (now holding a left entry)
        cut = int(left[swaps]) if swaps < left.shape[0] else m
        if swaps:
            cut = min(cut, int(right[swaps - 1]))
        cut += 1
        ls, rs = left[:swaps], right[:swaps]
        del left, right
        moved = body_idx[ls]
        body_idx[ls] = body_idx[rs]
        body_idx[rs] = moved
        if rel <= cut:
            body[ls] = body[rs]  # the right part is never looked at again: only the left one is swapped
            vals, idx = vals[:cut], idx[:cut]
        else:
            body[rs] = body[ls]
            vals, idx = vals[cut:], idx[cut:]
            start += cut
            rel -= cut


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
