"""SLERP against an independent float64 reference, and its edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from nyxray.methods._slerp import COLINEAR, slerp


def reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Textbook SLERP in float64 on flattened vectors (lerp when nearly colinear)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = x.norm(), y.norm()
    d = float(torch.dot(x / nx, y / ny).clamp(-1, 1))
    if abs(d) > COLINEAR:
        return ((1 - t) * x + t * y).reshape(a.shape)
    th = math.acos(d)
    return ((math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)).reshape(a.shape)


@pytest.mark.parametrize("shape", [(257, 129), (3000, 700)])  # the second spans two 2**20 chunks
@pytest.mark.parametrize("t", [0.13, 0.5, 0.8712])
def test_slerp_matches_float64_reference(shape, t):
    g = torch.Generator().manual_seed(hash((shape, t)) % 2**31)
    a = (0.02 * torch.randn(shape, generator=g)).bfloat16()
    b = (0.02 * torch.randn(shape, generator=g)).bfloat16()
    ref = reference(a, b, t)
    exact = slerp(a, b, t, torch.float32)  # the arithmetic alone, before rounding to bf16
    assert (exact.double() - ref).norm() / ref.norm() < 1e-6
    out = slerp(a, b, t, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == a.shape
    # stored in bf16: within bf16's own rounding of the exact value (relative 2**-8 per element)
    assert (out.double() - ref).norm() / ref.norm() < 3e-3
    # each element is the float32 result rounded to nearest: never further than half a bf16 ulp
    assert ((out.double() - exact.double()).abs() <= exact.double().abs() * 2**-8).all()
    # and it is a real interpolation, not a copy of either input
    assert not torch.equal(out, a) and not torch.equal(out, b)


def test_t0_gives_base_and_t1_gives_other():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, 33, generator=g).bfloat16()
    b = torch.randn(1000, 33, generator=g).bfloat16()
    assert torch.equal(slerp(a, b, 0.0, torch.bfloat16), a)
    assert torch.equal(slerp(a, b, 1.0, torch.bfloat16), b)


def test_colinear_inputs_take_the_lerp_branch():
    g = torch.Generator().manual_seed(2)
    a = (1 + 0.001 * torch.randn(4096, generator=g)).float()
    b = 1.5 * a  # same direction, different norm: slerp would keep the unnormalised lerp
    out = slerp(a, b, 0.25, torch.float32)
    assert torch.allclose(out, 0.75 * a + 0.25 * b, rtol=1e-6, atol=0)


def test_zero_norm_tensor_is_not_divided():
    a = torch.zeros(64)
    b = torch.randn(64, generator=torch.Generator().manual_seed(3))
    out = slerp(a, b, 0.5, torch.float32)
    assert torch.isfinite(out).all()
    # cos = 0 with a zero vector: theta = pi/2, coefficients sin(pi/4)/1 each
    assert torch.allclose(out, math.sin(math.pi / 4) * b, rtol=1e-6)


def test_antiparallel_is_lerp_not_nan():
    a = torch.randn(100, generator=torch.Generator().manual_seed(4))
    out = slerp(a, -a, 0.3, torch.float32)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, 0.7 * a - 0.3 * a, atol=1e-6)


def test_reused_buffers_and_chunkwise_conversion_give_the_same_bits(monkeypatch):
    """The per-thread buffers carry stale data between tensors, and tensors above the whole-tensor
    cache are converted chunk by chunk: neither may change a single output bit."""
    import threading

    from nyxray.methods import _slerp as ops

    g = torch.Generator().manual_seed(7)
    pairs = [(torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16()) for shape in [(3000, 701), (5, 7), (1100, 1000)]]

    def run() -> list[torch.Tensor]:
        return [slerp(a, b, 0.37, torch.bfloat16) for a, b in pairs]

    fresh: list = []
    thread = threading.Thread(target=lambda: fresh.extend(run()))  # a thread with no buffers yet
    thread.start()
    thread.join()
    big_first = run()  # this thread's buffers: grown by the biggest pair, then reused by smaller ones
    monkeypatch.setattr(ops._Chunks, "CACHE_ELEMENTS", 1 << 16)
    chunked = run()
    for x, y, z in zip(fresh, big_first, chunked):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
        assert torch.equal(x.view(torch.int16), z.view(torch.int16))


def test_free_buffers_releases_this_threads_work_memory():
    from nyxray.methods import _slerp as ops

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2000, 600, generator=g).bfloat16(), torch.randn(2000, 600, generator=g).bfloat16()
    before = slerp(a, b, 0.4, torch.bfloat16)
    pool = ops._Buffers.get(torch.float32, a.device)
    assert pool._bufs  # the buffers outlive the call: the next tensor reuses them
    ops.free_buffers()
    assert ops._Buffers.get(torch.float32, a.device) is not pool
    assert torch.equal(slerp(a, b, 0.4, torch.bfloat16).view(torch.int16), before.view(torch.int16))
