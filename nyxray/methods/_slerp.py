"""The SLERP kernel on torch (CPU or CUDA), exactly as mergekit 0.1.5 computes it.

SLERP treats each tensor as one flat vector. Bit-exactness with mergekit depends on the order of
the float32 reductions, so the norm and the dot product of a tensor are always computed whole, in
chunks of 2**20 elements, in one place: never split a tensor's reduction across workers. A big
tensor may come in pieces, one pass at a time (:func:`slerp_chunks`): the reductions are the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

import torch

from .base import ChunkSource

CHUNK = 1 << 20
EPS = 1e-8
COLINEAR = 0.9995


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Spherical interpolation of ``a`` (t=0) and ``b`` (t=1), as one flat vector each.

    Bit for bit what mergekit 0.1.5 computes (run with ``--num-threads 1``): per 2**20-element
    chunk a norm and a dot product, each combined over chunks with one stacked reduction; the
    coefficients as float32 tensors; the output stored chunk by chunk in ``out_dtype``.
    """
    (out,) = slerp_chunks(_Chunks.whole(a, "a"), _Chunks.whole(b, "b"), t, out_dtype)  # one piece: the whole tensor
    return out.reshape(a.shape)


def slerp_chunks(fa: _Chunks, fb: _Chunks, t: float, out_dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """:func:`slerp` over inputs given as passes of pieces (:class:`_Chunks`): a pass for the norms,
    one for the dot product of the normalised inputs (it needs the norms: mergekit divides before
    it multiplies), then the output, one [1, m] tensor per piece of ``fa``'s last pass.

    Every elementwise step writes into this thread's reused buffers (:class:`_Buffers`): a fresh
    4 MiB temporary per step costs more in page faults than the arithmetic itself.
    """
    buf, device = fa.buf, fa.device

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
    tt = torch.tensor([[t]], dtype=buf.work, device=device)
    linear = dot.abs() > COLINEAR
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    for pa, pb in zip(fa.pieces(), fb.pieces()):
        out = torch.empty((1, pa.n), dtype=out_dtype, device=device)
        for (i, j), ca, cb in zip(pa.spans, pa, pb):
            x, y = buf.scratch(j - i)
            torch.mul(ca, coef_a, out=x)  # IEEE products and sums commute: same bits as coef_a * ca + ...
            torch.mul(cb, coef_b, out=y)
            out[:, i:j] = x.add_(y)
        yield out


def chunks_of(source: ChunkSource, name: str) -> _Chunks:
    """A chunked merge's input (a pass of [1, m] pieces per call) as the kernel iterates it."""
    work = torch.float64 if source.dtype == torch.float64 else torch.float32
    return _Chunks(source.chunks, _Buffers.get(work, torch.device(source.device)), name)


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
    """A tensor as [1, <=2**20] chunks in the work dtype, one pass per iteration.

    ``source()`` starts a pass over the tensor's pieces ([1, m] tensors, m a multiple of 2**20 but
    the last). SLERP passes over each input three times (norm, dot, mix). A tensor in memory up to
    ``CACHE_ELEMENTS`` is converted once, whole, into a reused buffer; bigger ones, and pieces read
    pass by pass, are converted chunk by chunk on every pass into a one-chunk buffer, keeping memory
    at the inputs (or one piece) plus the buffers.
    """

    CACHE_ELEMENTS = 1 << 23

    def __init__(self, source: Callable[[], Iterable[torch.Tensor]], buf: _Buffers, name: str):
        self.source, self.buf, self.name = source, buf, name
        self.device = buf.device

    @classmethod
    def whole(cls, x: torch.Tensor, name: str) -> _Chunks:
        flat = x.reshape(1, -1)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        buf = _Buffers.get(work, x.device)
        if flat.dtype != work and flat.shape[1] <= cls.CACHE_ELEMENTS:
            flat = buf.take(name, flat.shape[1]).copy_(flat)
        return cls(lambda: (flat,), buf, name)

    def pieces(self) -> Iterator[_Piece]:
        """One pass, piece by piece: each iterates its chunks in the work dtype."""
        return (_Piece(p, self) for p in self.source())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (c for p in self.pieces() for c in p)


class _Piece:
    """One [1, m] piece of a pass, as [1, <=2**20] chunks in the work dtype (converted on the fly)."""

    def __init__(self, flat: torch.Tensor, of: _Chunks):
        self.flat, self.of, self.n = flat, of, flat.shape[1]
        self.spans = [(i, min(i + CHUNK, self.n)) for i in range(0, self.n, CHUNK)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.flat.dtype == self.of.buf.work:
            return (self.flat[:, i:j] for i, j in self.spans)
        return (self.of.buf.take(self.of.name + "-chunk", j - i).copy_(self.flat[:, i:j]) for i, j in self.spans)
