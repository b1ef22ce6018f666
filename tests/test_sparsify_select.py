"""The magnitude selections (TIES ``_largest``, breadcrumbs ``_middle``) against the sort they replay.

mergekit keeps the entries that ``torch.argsort`` / ``torch.sort`` (unstable, CPU) put before the cut;
nyxray replays only the partitions of that sort which hold the cut. Equal magnitudes are where the
two could part, so the inputs here are full of ties: bf16/f16 task vectors, a few integer levels.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from nyxray.methods import sparsify as sp


def largest_by_sort(x: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * x.numel()))
    order = torch.argsort(x.abs().reshape(-1).float(), descending=True)
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(x.shape)


def middle_by_sort(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = x.numel()
    kept = int(density * n)
    below = max(0, n - kept - int(gamma * n))
    order = torch.sort(x.abs().reshape(-1).float()).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[below : below + kept]] = True
    return keep.reshape(x.shape)


def tied(shape: tuple[int, ...], dtype: torch.dtype, kind: int, g: torch.Generator) -> torch.Tensor:
    """Task-vector-like values with many equal magnitudes (and both signs of each)."""
    if kind == 0:
        return (torch.randint(-3, 4, shape, generator=g)).to(dtype)  # 7 levels, zeros included
    if kind == 1:
        return (1e-3 * torch.randn(shape, generator=g)).to(dtype)
    return (torch.randint(-40, 41, shape, generator=g) * 0.125).to(dtype)


SHAPES = [(5,), (16,), (17,), (33,), (1000,), (64, 48), (257, 129), (70001,)]
DENSITIES = [1e-4, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999]


def test_self_check_passes_on_this_torch() -> None:
    # On this project's pinned CPU torch the replay is active; if a build ever sorts otherwise,
    # the check turns it off and everything still equals the sort (the tests below).
    assert sp._self_check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_largest_equals_the_sort(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{shape}".encode()))
    for kind in range(3):
        x = tied(shape, dtype, kind, g)
        for density in DENSITIES:
            assert torch.equal(sp._largest(x, density), largest_by_sort(x, density)), (kind, density)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_middle_equals_the_sort(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1 + zlib.crc32(f"{dtype}{shape}".encode()))
    for kind in range(3):
        x = tied(shape, dtype, kind, g)
        for density, gamma in [(0.9, 0.01), (0.5, 0.1), (0.3, 0.3), (0.01, 0.0), (0.99, 0.005), (0.7, 0.5)]:
            assert torch.equal(sp._middle(x, density, gamma), middle_by_sort(x, density, gamma)), (kind, density, gamma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_above_2_to_the_20(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    x = tied((1536, 1024), dtype, 1, g)  # 1.5 Mi entries, bf16: thousands of equal magnitudes per value
    for density in (0.05, 0.5, 0.95):
        assert torch.equal(sp._largest(x, density), largest_by_sort(x, density))
    assert torch.equal(sp._middle(x, 0.9, 0.01), middle_by_sort(x, 0.9, 0.01))


def test_sorted_prefix_every_cut_of_a_small_tied_array() -> None:
    g = torch.Generator().manual_seed(3)
    for n in (17, 31, 100, 400):
        w = torch.randint(0, 4, (n,), generator=g).float()
        order = torch.sort(w).indices
        for k in range(n + 1):
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(torch.from_numpy(sp._sorted_prefix(w.numpy(), k)), expected), (n, k)


def test_nan_falls_back_to_the_sort() -> None:
    x = (1e-3 * torch.randn(5000, generator=torch.Generator().manual_seed(5))).to(torch.bfloat16)
    x[::97] = float("nan")
    assert not sp._replay_allowed(x.abs().float())
    assert torch.equal(sp._largest(x, 0.3), largest_by_sort(x, 0.3))


def test_sorted_descending_input_still_matches() -> None:
    # already ordered and reverse ordered inputs: the median-of-three's worst patterns
    for w in (torch.arange(50000).float(), torch.arange(50000).flip(0).float(), torch.arange(50000).remainder(5).float()):
        for density in (0.1, 0.5, 0.9):
            assert torch.equal(sp._largest(w, density), largest_by_sort(w, density))


def test_a_replay_that_gives_up_falls_back_to_the_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    # where introsort would heap-sort the range (depth limit), the replay returns None after having
    # permuted the keys it consumed: the sort must then run on fresh keys
    def gives_up(keys, k, descending=False, *, consume=False):
        if consume:
            keys[:] = keys[::-1].copy()
        return None

    monkeypatch.setattr(sp, "_sorted_prefix", gives_up)
    x = tied((300, 7), torch.bfloat16, 1, torch.Generator().manual_seed(11))
    assert torch.equal(sp._largest(x, 0.4), largest_by_sort(x, 0.4))
    assert torch.equal(sp._middle(x, 0.8, 0.05), middle_by_sort(x, 0.8, 0.05))
