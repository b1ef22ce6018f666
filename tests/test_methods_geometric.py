"""The geometric methods' math against independent float64 references, and their invariants.

Bit-parity with mergekit 0.1.5 is tests/golden/method_parity.py's job (it needs mergekit's venv);
here the math itself is checked: each method on float64 inputs against a textbook formulation of
what it computes, plus the edge cases the methods handle on purpose. Inputs are a base plus
fine-tunes (base + small noise), as in real merges.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from nyxray.methods import registry
from nyxray.methods._geometry import single_threaded


def call(name: str, tensors: list[torch.Tensor], base: int | None, generator: torch.Generator | None = None, **values: Any) -> torch.Tensor:
    """Run a method as the planner would: values set here, the registry's defaults for the rest."""
    return registry.merge_tensors(name, tensors, base, generator, **values)


def models(shape: tuple[int, ...], count: int, dtype: torch.dtype = torch.float64, seed: int = 0, noise: float = 0.05) -> list[torch.Tensor]:
    """A base then count - 1 fine-tunes (base + noise * the base's scale * N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in [base] + [base + noise * 0.02 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count - 1)]]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def textbook_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of two vectors in float64: sin((1-t)th)/sin(th) a + sin(t th)/sin(th) b."""
    th = math.acos(float((unit(a) * unit(b)).sum().clamp(-1, 1)))
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def close(x: torch.Tensor, y: torch.Tensor, rel: float = 1e-10) -> bool:
    return bool((x - y).norm() <= rel * y.norm())


# --- model stock -------------------------------------------------------------------------------


def model_stock_reference(base: torch.Tensor, tuned: list[torch.Tensor], rows: bool) -> torch.Tensor:
    """Model stock: ratio t = k cos / (1 + (k-1) cos), cos the mean pairwise cosine of the offsets."""
    k = len(tuned)
    flat = [(w - base).reshape(base.shape[0] if rows else 1, -1) for w in tuned]
    pairs = [(a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)) for i, a in enumerate(flat) for b in flat[i + 1 :]]
    cos = torch.stack(pairs).mean(0)
    ratio = k * cos / (1 + (k - 1) * cos)
    t = ratio.reshape(-1, *([1] * (base.dim() - 1))) if rows else float(ratio)
    return t * (sum(tuned) / k) + (1 - t) * base


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [3, 5])
def test_model_stock_matches_reference(filter_wise, count):
    base, *tuned = models((48, 40), count, seed=count)
    out = call("model_stock", [base, *tuned], 0, filter_wise=filter_wise)
    assert close(out, model_stock_reference(base, tuned, filter_wise))


def test_model_stock_base_anywhere_and_norm_vectors():
    base, *tuned = models((64,), 4, seed=3)
    for rows in (False, True):  # a 1-D tensor filter-wise is one row: the same as per tensor
        out = call("model_stock", [tuned[0], base, *tuned[1:]], 1, filter_wise=rows)
        assert close(out, model_stock_reference(base, tuned, False))


def test_model_stock_opposite_offsets_keep_the_base():
    base, *_ = models((32, 8), 1)
    d = 0.001 * torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = call("model_stock", [base, base + d, base - d], 0)  # cos = -1: 1 + cos = 0, no finite ratio
    assert torch.equal(out, base)


# --- NuSLERP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[0.3, 0.7], [2.0, 1.0]])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_flattened_is_slerp_of_offsets(weights, with_base):
    base, a, b = models((24, 20), 3, seed=4)
    t = weights[1] / sum(weights)
    if with_base:
        out = call("nuslerp", [base, a, b], 0, weight=weights)
        ref = base + textbook_slerp(a - base, b - base, t)
    else:
        out = call("nuslerp", [a, b], None, weight=weights)
        ref = textbook_slerp(a, b, t)
    assert close(out, ref)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_row_or_column(row_wise):
    base, a, b = models((12, 10), 3, seed=5)
    out = call("nuslerp", [base, a, b], 0, weight=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=row_wise)
    da, db = a - base, b - base
    if row_wise:  # along the first axis: one SLERP per column
        ref = torch.stack([textbook_slerp(da[:, j], db[:, j], 0.75) for j in range(10)], dim=1)
    else:
        ref = torch.stack([textbook_slerp(da[i], db[i], 0.75) for i in range(12)])
    assert close(out, base + ref)


def test_nuslerp_weights_summing_to_zero_take_the_midpoint():
    base, a, b = models((16, 16), 3, seed=6)
    assert close(call("nuslerp", [base, a, b], 0, weight=[1.0, -1.0]), base + textbook_slerp(a - base, b - base, 0.5))


def test_nuslerp_colinear_offsets_interpolate_linearly():
    base, a, _ = models((16, 16), 3, seed=7)
    d = a - base
    out = call("nuslerp", [base, base + d, base + 3 * d], 0, weight=[1.0, 1.0])
    assert close(out, base + 2 * d)


# --- Multi-SLERP -------------------------------------------------------------------------------

EPS_SHIFT = 1e-6  # Multi-SLERP divides by |x| + eps (1e-8): directions move by about eps / |x|


def test_multislerp_is_the_normalised_weighted_mean_direction_with_the_mean_norm():
    """Projecting the unit inputs on the plane tangent at their normalised weighted mean, the
    weighted tangents cancel exactly, so Multi-SLERP lands on that mean: direction
    normalise(sum w_i x_i / |x_i|), length sum w_i |x_i| (weights normalised)."""
    base, *tuned = models((30, 20), 4, seed=8)
    w = [0.5, 0.3, 0.2]
    out = call("multislerp", [base, *tuned], 0, weight=w)
    offsets = [x - base for x in tuned]
    ref = unit(sum(wi * unit(x) for wi, x in zip(w, offsets))) * sum(wi * x.norm() for wi, x in zip(w, offsets))
    assert close(out - base, ref, EPS_SHIFT)


def test_multislerp_of_two_with_equal_weights_is_the_slerp_midpoint_direction():
    _, a, b = models((30, 20), 3, seed=9)
    out = call("multislerp", [a, b], None, weight=[1.0, 1.0])
    assert close(out, unit(textbook_slerp(unit(a), unit(b), 0.5)) * (a.norm() + b.norm()) / 2, EPS_SHIFT)


def test_multislerp_unnormalised_weights_scale_the_length():
    _, a, b, c = models((10, 10), 4, seed=10)
    w = [1.0, 2.0, 3.0]
    normalised = call("multislerp", [a, b, c], None, weight=w)
    raw = call("multislerp", [a, b, c], None, weight=w, normalize_weights=False)
    assert close(raw, 6.0 * normalised, 1e-6)  # only the norm average sees the weights' sum


def test_multislerp_single_model_and_antipodes():
    base, a = models((8, 8), 2)
    assert call("multislerp", [base, a], 0, weight=[1.0]) is a  # the model itself, not base + offset
    assert close(call("multislerp", [a, -a], None, weight=[1.0, 3.0]), -a)  # mean direction -a, mean norm |a|
    balanced = call("multislerp", [a, -a], None, weight=[1.0, 1.0])  # no mean direction: linear instead
    assert torch.equal(balanced, torch.zeros_like(a))
    with pytest.raises(ValueError, match="weights"):
        call("multislerp", [a, -a, 2 * a, -2 * a], None, weight=[1.0, 1.0, 1.0, 1.0])


# --- Karcher mean ------------------------------------------------------------------------------


def test_karcher_of_two_is_the_geodesic_midpoint_with_the_mean_norm():
    _, a, b = models((20, 20), 3, seed=11)
    out = call("karcher", [a, b], None)
    assert close(out, unit(textbook_slerp(unit(a), unit(b), 0.5)) * (a.norm() + b.norm()) / 2)


def test_karcher_of_several_zeroes_the_riemannian_gradient():
    xs = models((20, 20), 4, seed=12, noise=3.0)  # well spread directions: several iterations needed
    out = call("karcher", xs, None, max_iter=100, tol=1e-12)
    m = unit(out)
    grad = torch.zeros_like(m)
    for u in map(unit, xs):  # the log map of each input at m, summed
        c = float((m * u).sum())
        grad += math.acos(c) / math.sqrt(1 - c * c) * (u - c * m)
    assert grad.norm() < 1e-9
    assert math.isclose(float(out.norm()), float(sum(x.norm() for x in xs) / 4), rel_tol=1e-12)
    one_step = call("karcher", xs, None, max_iter=1)
    assert not close(one_step, out, 1e-9)  # max_iter does bound the iteration


def test_karcher_counts_the_base_and_passes_one_input_through():
    xs = models((8, 8), 3, seed=13)
    assert torch.equal(call("karcher", xs, 0), call("karcher", xs, None))
    assert call("karcher", xs[:1], None) is xs[0]


def test_karcher_zero_input_counts_in_the_scale_only():
    _, a, b = models((8, 8), 3, seed=14)
    out = call("karcher", [a, b, torch.zeros_like(a)], None)
    assert close(out, unit(textbook_slerp(unit(a), unit(b), 0.5)) * (a.norm() + b.norm()) / 3)


# --- NearSwap ----------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1e-4, 1e-3])
def test_nearswap_rule(t):
    base, other = models((64, 64), 2, seed=15)
    out = call("nearswap", [base, other], 0, t=t)
    share = (t / (base - other).abs().clamp(min=1e-6)).clamp(max=1)
    assert torch.allclose(out, share * other + (1 - share) * base, rtol=0, atol=1e-15)
    near = (base - other).abs() <= t
    assert near.any() and (~near).any()
    assert torch.equal(out[near], other[near])  # within t: the other model's value, exactly


# --- Arcee Fusion ------------------------------------------------------------------------------


def arcee_reference(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Importance = |other - base| * KL(softmax(other) || softmax(base)) per row; keep the other
    model where importance >= median + 1.5 IQR, quartiles at sorted index floor(q (n - 1))."""
    p, q = other.softmax(-1) + 1e-8, base.softmax(-1) + 1e-8
    importance = (other - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = importance.reshape(-1).sort().values
    q1, med, q3 = (s[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    return torch.where(importance >= med + 1.5 * (q3 - q1), other, base)


def test_arcee_fusion_matches_reference():
    base, other = models((40, 50), 2, seed=16, noise=20.0)
    out = call("arcee_fusion", [base, other], 0)
    ref = arcee_reference(base, other)
    assert torch.equal(out, ref)
    assert 0 < int((out == other).sum()) < out.numel()


def test_arcee_fusion_samples_large_tensors_with_the_group_generator_only():
    base, other = models((1001, 1000), 2, dtype=torch.float32, seed=17)
    state = torch.random.get_rng_state()
    runs = [call("arcee_fusion", [base, other], 0, generator=torch.Generator().manual_seed(s)) for s in (5, 5)]
    assert torch.equal(torch.random.get_rng_state(), state)  # torch's global generator untouched
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="generator"):
        call("arcee_fusion", [base, other], 0)


# --- RAM, RAM+ ---------------------------------------------------------------------------------


def sparse_task_vectors(count: int, n: int = 1500) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes whose task vectors are each nonzero on a random ~half of the elements."""
    g = torch.Generator().manual_seed(count)
    base = 0.02 * torch.randn(n, dtype=torch.float64, generator=g)
    deltas = [0.001 * torch.randn(n, dtype=torch.float64, generator=g) * (torch.rand(n, dtype=torch.float64, generator=g) < 0.5) for _ in range(count)]
    return base, [base + d for d in deltas]


def ram_reference(base: torch.Tensor, tuned: list[torch.Tensor], eps: float, r: float | None = None, alpha: float = 0.0) -> torch.Tensor:
    """Element by element: no touching model -> base; one -> its update (times its RAM+ factor);
    several -> the mean of their updates."""
    d = torch.stack([w - base for w in tuned])
    touched = d.abs() > eps
    counts = touched.sum(0)
    factor = torch.ones(len(tuned), 1, dtype=torch.float64)
    if r is not None:
        for i in range(len(tuned)):
            shared, unique = int((touched[i] & (counts > 1)).sum()), int((touched[i] & (counts == 1)).sum())
            factor[i] = 1 + r * min(max(shared / max(unique, eps), 0.0), alpha)
    out = base.clone()
    for j in range(base.numel()):
        who = touched[:, j].nonzero().reshape(-1)
        if len(who) == 1:
            out[j] += float(d[who[0], j] * factor[who[0], 0])
        elif len(who) > 1:
            out[j] += float(d[who, j].mean())
    return out


@pytest.mark.parametrize("eps", [1e-5, 5e-4])
def test_ram_matches_reference(eps):
    base, tuned = sparse_task_vectors(3)
    out = call("ram", [base, *tuned], 0, epsilon=eps)
    assert torch.allclose(out, ram_reference(base, tuned, eps), rtol=0, atol=1e-15)


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 2.0)])
def test_ramplus_tl_matches_reference(r, alpha):
    base, tuned = sparse_task_vectors(3)
    out = call("ramplus_tl", [tuned[0], base, *tuned[1:]], 1, r=r, alpha=alpha)
    # the factor 1 + r * rho is float32 (as in mergekit): updates of ~1e-3 move by ~1e-3 * 2**-23
    assert torch.allclose(out, ram_reference(base, tuned, 1e-5, r, alpha), rtol=0, atol=1e-9)
    assert not torch.allclose(out, ram_reference(base, tuned, 1e-5), rtol=0, atol=1e-6)  # the factor is applied


def test_ram_base_alone_is_the_base():
    (base,) = models((8,), 1)
    assert call("ram", [base], 0) is base and call("ramplus_tl", [base], 0) is base


# --- result dtypes, threads --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,extra",
    [
        ("model_stock", {}),
        ("nuslerp", {"weight": [1.0, 1.0]}),
        ("multislerp", {"weight": [1.0, 1.0]}),
        ("karcher", {}),
        ("nearswap", {"t": 1e-3}),
        ("ram", {}),
        ("arcee_fusion", {}),
        ("ramplus_tl", {}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_result_dtype_is_the_declared_one(name, extra, dtype):
    """The planner takes each output's dtype from the declaration: the inputs' dtype, or at least
    float32 with ``float32_result`` (arcee_fusion's mask and ramplus_tl's factor are float32)."""
    xs = models((16, 16), 3 if name not in ("nearswap", "arcee_fusion") else 2, dtype=dtype, seed=18)
    out = call(name, xs, None if name == "karcher" else 0, **extra)
    widened = registry.get(name).float32_result  # type: ignore[union-attr]
    assert out.dtype == (torch.promote_types(dtype, torch.float32) if widened else dtype)
    assert out.shape == xs[0].shape


def test_whole_tensor_sums_do_not_depend_on_the_thread_count():
    xs = models((1 << 20,), 3, dtype=torch.float32, seed=19)  # differs at 4 threads without single_threaded
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 4):
            torch.set_num_threads(n)
            outs.append(call("karcher", xs, None))
            assert torch.get_num_threads() == n  # restored by single_threaded
        assert torch.equal(outs[0], outs[1])
    finally:
        torch.set_num_threads(threads)
    assert single_threaded(lambda: torch.tensor(float(torch.get_num_threads())))() == 1.0
