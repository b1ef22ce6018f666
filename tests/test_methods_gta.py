"""The task arithmetic family, linear and SCE against independent float64 references; DARE and DELLA
by their properties (reproducible, seed-dependent, expected density, rescale, thread count).

Bit parity with mergekit itself is checked by tests/golden/method_parity.py (mergekit's venv).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nyxray.methods import registry
from nyxray.methods.sparsify import sparsify

F64 = torch.float64


def run(method: str, tensors: list[torch.Tensor], base: int | None = 0, seed: int | None = None, **given: Any) -> torch.Tensor:
    """The method's math through its registry entry, unset parameters at their declared defaults;
    ``given`` values for per-input parameters may be scalars (one for every input of the scope)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return registry.merge_tensors(method, tensors, base, generator, **given)


def models(count: int, shape: tuple[int, ...] = (64, 48), dtype: torch.dtype = F64, seed: int = 0) -> list[torch.Tensor]:
    """A base and ``count - 1`` fine-tunes (base + noise): never zeros, distinct magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(shape, generator=g, dtype=F64)
    return [t.to(dtype) for t in [base, *(base + 0.002 * torch.randn(shape, generator=g, dtype=F64) for _ in range(count - 1))]]


def top_fraction(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Reference TIES trim: the int(density * n) (at least 1) largest |delta| kept, by a full ranking."""
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    rank = flat.abs().tolist()
    kept = sorted(range(len(rank)), key=lambda i: -rank[i])[:k]
    out = torch.zeros_like(flat)
    out[kept] = flat[kept]
    return out.reshape(delta.shape)


# --- deterministic methods against float64 references ------------------------------------------


@pytest.mark.parametrize("normalize, lam", [(False, 1.0), (True, 0.6)])
def test_task_arithmetic_is_base_plus_weighted_task_vectors(normalize: bool, lam: float) -> None:
    base, *tuned = models(4)
    weights = [0.5, -0.25, 0.75]
    mixed = sum(w * (t - base) for w, t in zip(weights, tuned))
    expected = base + lam * (mixed / sum(weights) if normalize else mixed)
    out = run("task_arithmetic", [base, *tuned], weight=weights, normalize=normalize, **{"lambda": lam})
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_task_arithmetic_base_anywhere_and_alone() -> None:
    base, a, b = models(3)
    weights = [0.3, 0.7]
    expected = base + 0.3 * (a - base) + 0.7 * (b - base)
    torch.testing.assert_close(run("task_arithmetic", [a, base, b], base=1, weight=weights), expected, rtol=0, atol=1e-15)
    assert run("task_arithmetic", [base], weight=[]) is base


def test_weights_summing_to_zero_divide_by_one() -> None:
    """mergekit's guard: a zero weight sum leaves the mixed task vector undivided (no inf/nan)."""
    base, a, b = models(3)
    out = run("task_arithmetic", [base, a, b], weight=[0.5, -0.5], normalize=True)
    torch.testing.assert_close(out, base + 0.5 * (a - base) - 0.5 * (b - base), rtol=0, atol=1e-15)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_the_weighted_mean(normalize: bool) -> None:
    tensors = models(4, seed=1)
    weights = [0.4, -0.1, 0.5, 0.7]
    total = sum(w * t for w, t in zip(weights, tensors))
    expected = total / sum(weights) if normalize else total
    torch.testing.assert_close(run("linear", tensors, base=None, weight=weights, normalize=normalize), expected, rtol=1e-14, atol=0)


def test_linear_accumulates_in_float32_for_bf16() -> None:
    """Four bf16 inputs summed in float32 and rounded once: within half a bf16 ulp of the exact mean."""
    tensors = models(4, dtype=torch.bfloat16, seed=2)
    weights = [0.25, 0.25, 0.25, 0.25]
    out = run("linear", tensors, base=None, weight=weights)
    exact = sum(t.double() for t in tensors) / 4
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.to(torch.bfloat16))


@pytest.mark.parametrize("densities", [[1.0, 1.0, 1.0], [0.3, 0.5, 0.8]])
def test_ties_trims_elects_the_sign_and_averages_the_agreeing(densities: list[float]) -> None:
    base, *tuned = models(4, shape=(24, 20), seed=3)
    weights = [1.0, -0.5, 0.7]
    trimmed = [w * top_fraction(t - base, d) for w, t, d in zip(weights, tuned, densities)]
    elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0).to(F64)
    agree = [torch.sign(d) == elected for d in trimmed]
    num = sum(d * a for d, a in zip(trimmed, agree))
    den = sum(w * a.to(F64) for w, a in zip(weights, agree))
    expected = base + num / torch.where(den == 0, 1.0, den)
    out = run("ties", [base, *tuned], weight=weights, density=densities)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert torch.equal(run("ties", [base, *tuned], weight=weights, density=densities, int8_mask=True), out)


def test_ties_with_rescale_keeps_each_task_vectors_l1() -> None:
    base, other = models(2, seed=4)
    out = run("ties", [base, other], weight=[1.0], density=0.25, rescale=True)
    assert (out - base).abs().sum().item() == pytest.approx((other - base).abs().sum().item(), rel=1e-12)
    assert ((out - base) != 0).sum().item() == int(0.25 * base.numel())


@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.9, 0.01), (0.7, 0.5)])
def test_breadcrumbs_drops_the_right_fraction_at_both_ends(density: float, gamma: float) -> None:
    base, other = models(2, shape=(40, 25), seed=5)
    delta = other - base
    out = run("breadcrumbs", [base, other], weight=[1.0], density=density, gamma=gamma) - base
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    below = max(0, n - keep - top)  # density + gamma > 1: fewer outliers dropped
    order = sorted(range(n), key=lambda i: abs(delta.reshape(-1)[i].item()))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[order[below : below + keep]] = True
    assert torch.equal(out.reshape(-1) != 0, kept)
    torch.testing.assert_close(out.reshape(-1)[kept], delta.reshape(-1)[kept], rtol=0, atol=1e-15)


@pytest.mark.parametrize("select_topk", [1.0, 0.4])
def test_sce_reference(select_topk: float) -> None:
    base, *tuned = models(4, shape=(30, 20), seed=6)
    tvs = torch.stack([t - base for t in tuned])
    if select_topk < 1:
        var = tvs.var(dim=0, unbiased=False).reshape(-1)
        k = int(int((var != 0).sum()) * select_topk)
        mask = torch.zeros_like(var, dtype=torch.bool)
        mask[sorted(range(var.numel()), key=lambda i: -var[i].item())[:k]] = True
        tvs = tvs * mask.reshape(base.shape)
    squares = tvs.square().reshape(3, -1).mean(dim=1)
    w = (squares / squares.sum()).reshape(3, 1, 1)
    elected = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).to(F64)
    erased = w * (torch.sign(tvs) == elected)
    expected = base + (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(run("sce", [base, *tuned], select_topk=select_topk), expected, rtol=0, atol=1e-15)


def test_sce_equal_weights_when_task_vectors_are_tiny() -> None:
    base, a, b = models(3, seed=7)
    a, b = base + (a - base) * 1e-3, base + (b - base) * 1e-3  # mean squares sum < 1e-6
    tvs = torch.stack([a - base, b - base])
    agree = torch.sign(tvs) == torch.where(tvs.sum(0) >= 0, 1.0, -1.0).to(F64)
    expected = base + (tvs * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(run("sce", [base, a, b]), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties", "della", "linear", "sce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_result_has_the_inputs_dtype(method: str, dtype: torch.dtype) -> None:
    tensors = models(3, shape=(16, 8), dtype=dtype)
    given = {"weight": [0.5, 0.5, 0.5] if method == "linear" else [0.5, 0.5]}
    if method in ("ties", "breadcrumbs_ties", "dare_ties", "della"):
        given["density"] = 0.5
    out = run(method, tensors, base=None if method == "linear" else 0, seed=0, **given)
    assert out.dtype == dtype and out.shape == tensors[0].shape


# --- the random ones: DARE and DELLA -------------------------------------------------------------

BIG = (400, 500)


@pytest.mark.parametrize("method, extra", [("dare_ties", {}), ("della", {"epsilon": 0.1})])
def test_random_methods_are_reproducible_and_seeded(method: str, extra: dict[str, Any]) -> None:
    tensors = models(3, shape=(64, 64), dtype=torch.bfloat16, seed=8)
    args = dict(weight=[0.6, 0.4], density=0.4, **extra)
    first = run(method, tensors, seed=123, **args)
    assert torch.equal(first.view(torch.int16), run(method, tensors, seed=123, **args).view(torch.int16))
    assert not torch.equal(first, run(method, tensors, seed=124, **args))


def test_random_sparsification_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        sparsify(torch.ones(4), "random", density=0.5, rescale=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dare_keeps_density_and_rescale_keeps_l1(dtype: torch.dtype) -> None:
    base, other = models(2, shape=BIG, seed=9)
    delta = (other - base).to(dtype)
    g = torch.Generator().manual_seed(0)
    plain = sparsify(delta, "random", density=0.3, rescale=False, generator=g)
    kept = (plain != 0).double().mean().item()
    assert kept == pytest.approx(torch.tensor(0.3, dtype=dtype).item(), abs=0.005)
    assert torch.equal(plain[plain != 0], delta[plain != 0])  # kept entries unchanged without rescale
    # in expectation, the kept entries' L1 is density times the whole's
    assert plain.double().abs().sum().item() / delta.double().abs().sum().item() == pytest.approx(0.3, abs=0.01)
    scaled = sparsify(delta, "random", density=0.3, rescale=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(scaled != 0, plain != 0)  # same draws for the same seed
    assert scaled.double().abs().sum().item() == pytest.approx(delta.double().abs().sum().item(), rel=0.01)


def test_della_keeps_density_and_favours_large_magnitudes() -> None:
    base, other = models(2, shape=BIG, seed=10)
    delta = other - base
    density, epsilon = 0.5, 0.2
    out = sparsify(delta, "della_magprune", density=density, epsilon=epsilon, rescale=False, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert kept.double().mean().item() == pytest.approx(density, abs=0.005)
    # per row, keep probability rises linearly with the |delta| rank: from 0.3 (smallest) to 0.7 (largest)
    rank = delta.abs().argsort(dim=1).argsort(dim=1)
    low, high = kept[rank < BIG[1] // 4].double().mean().item(), kept[rank >= 3 * BIG[1] // 4].double().mean().item()
    assert low == pytest.approx(density - 0.75 * epsilon, abs=0.01)
    assert high == pytest.approx(density + 0.75 * epsilon, abs=0.01)
    scaled = sparsify(delta, "della_magprune", density=density, epsilon=epsilon, rescale=True, generator=torch.Generator().manual_seed(1))
    assert scaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


def test_della_one_dimensional_and_its_limits() -> None:
    norm = 1 + 0.01 * torch.randn(4096, generator=torch.Generator().manual_seed(2))
    out = sparsify(norm, "della_magprune", density=0.6, epsilon=0.1, rescale=False, generator=torch.Generator().manual_seed(3))
    assert out.shape == norm.shape and (out != 0).double().mean().item() == pytest.approx(0.6, abs=0.03)
    with pytest.raises(ValueError, match="epsilon"):
        sparsify(norm, "della_magprune", density=0.9, epsilon=0.15, rescale=False, generator=torch.Generator())
    with pytest.raises(ValueError, match="2 entries per row"):
        sparsify(torch.ones(8, 1), "della_magprune", density=0.5, epsilon=0.1, rescale=False, generator=torch.Generator())


@pytest.mark.parametrize("method, extra", [("dare_linear", {}), ("della_linear", {"epsilon": 0.1})])
def test_random_bits_do_not_depend_on_the_thread_count(method: str, extra: dict[str, Any]) -> None:
    tensors = models(3, shape=(1100, 1000), dtype=torch.float32, seed=11)  # whole-tensor float32 sums split across threads
    args = dict(weight=[0.6, 0.4], density=0.3, **extra)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(method, tensors, seed=5, **args)
        torch.set_num_threads(2)
        two = run(method, tensors, seed=5, **args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
