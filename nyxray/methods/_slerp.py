"""The SLERP kernel on torch (CPU or CUDA), exactly as mergekit 0.1.5 computes it.

SLERP treats each tensor as one flat vector. Bit-exactness with mergekit depends on the order of
the float32 reductions, so the norm and the dot product of a tensor are always computed whole, in
chunks of 2**20 elements, in one place: never split a tensor's reduction across workers.
"""

from __future__ import annotations

import threading

import torch

CHUNK = 1 << 20
EPS = 1e-8
COLINEAR = 0.9995


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Spherical interpolation of ``a`` (t=0) and ``b`` (t=1), as one flat vector each.

    Bit for bit what mergekit 0.1.5 computes (run with ``--num-threads 1``): per 2**20-element
    chunk a norm and a dot product, each combined over chunks with one stacked reduction; the
    coefficients as float32 tensors; the output stored chunk by chunk in ``out_dtype``.
    Every elementwise step writes into this thread's reused buffers (:class:`_Buffers`): a fresh
    4 MiB temporary per step costs more in page faults than the arithmetic itself.
    """
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    buf = _Buffers.get(work, a.device)
    fa, fb = _Chunks(a, work, buf, "a"), _Chunks(b, work, buf, "b")

    def norm(x: _Chunks) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(c, dim=1, keepdim=True) for c in x]
        total = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(total > EPS, total, torch.ones_like(total))

    na, nb = norm(fa), norm(fb)
    parts = []
    # A chunk's sum splits across torch threads: its bits are mergekit --num-threads 1's only on
    # one thread, which every executor's workers use (nyxray/execute/runtime.py).
    for ca, cb in zip(fa, fb):
        x, y = buf.scratch(ca.shape[1])
        torch.div(ca, na, out=x)
        torch.div(cb, nb, out=y)
        parts.append(x.mul_(y).sum(dim=1, keepdim=True))
    dot = torch.stack(parts).sum(dim=0).clamp(-1.0, 1.0)
    tt = torch.tensor([[t]], dtype=work, device=a.device)
    linear = dot.abs() > COLINEAR
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty((1, fa.n), dtype=out_dtype, device=a.device)
    for (i, j), ca, cb in zip(fa.spans, fa, fb):
        x, y = buf.scratch(j - i)
        torch.mul(ca, coef_a, out=x)  # IEEE products and sums commute: same bits as coef_a * ca + ...
        torch.mul(cb, coef_b, out=y)
        out[:, i:j] = x.add_(y)
    return out.reshape(a.shape)


class _Buffers:
    """One thread's work buffers for one (dtype, device), grown on demand and kept for reuse."""

    _local = threading.local()

    def __init__(self, work: torch.dtype, device: torch.device):
        self.work, self.device = work, device
        self._bufs: dict[str, torch.Tensor] = {}

    @classmethod
    def get(cls, work: torch.dtype, device: torch.device) -> _Buffers:
        pools = cls._local.__dict__.setdefault("pools", {})
        key = (work, str(device))
        if key not in pools:
            pools[key] = cls(work, device)
        return pools[key]

    def take(self, name: str, n: int) -> torch.Tensor:
        """A [1, n] view of buffer ``name``; its contents are whatever the last user left."""
        b = self._bufs.get(name)
        if b is None or b.shape[1] < n:
            b = self._bufs[name] = torch.empty((1, n), dtype=self.work, device=self.device)
        return b[:, :n]

    def scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take("x", n), self.take("y", n)

    @classmethod
    def free(cls) -> None:
        """Drop this thread's buffers (the local executor, done with a merge in a user's process)."""
        cls._local.__dict__.pop("pools", None)


def free_buffers() -> None:
    """Release the calling thread's SLERP work buffers (up to ~100 MB); they regrow on demand."""
    _Buffers.free()


class _Chunks:
    """A tensor as [1, n] chunks of 2**20 elements in the work dtype.

    SLERP passes over each input three times (norm, dot, mix). Up to ``CACHE_ELEMENTS`` the tensor
    is converted once, whole, into a reused buffer; bigger tensors are converted chunk by chunk on
    every pass into a one-chunk buffer, keeping memory at the inputs plus the buffers.
    """

    CACHE_ELEMENTS = 1 << 23

    def __init__(self, x: torch.Tensor, work: torch.dtype, buf: _Buffers, name: str):
        self.flat, self.buf, self.name = x.reshape(1, -1), buf, name
        self.n = self.flat.shape[1]
        self.spans = [(i, min(i + CHUNK, self.n)) for i in range(0, self.n, CHUNK)]
        self.whole = self.flat if self.flat.dtype == work else None
        if self.whole is None and self.n <= self.CACHE_ELEMENTS:
            self.whole = buf.take(name, self.n).copy_(self.flat)

    def __iter__(self):
        if self.whole is not None:
            return (self.whole[:, i:j] for i, j in self.spans)
        return (self.buf.take(self.name + "-chunk", j - i).copy_(self.flat[:, i:j]) for i, j in self.spans)
