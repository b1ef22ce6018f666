"""The merge math on torch (CPU or CUDA): casts and SLERP, exactly as mergekit 0.1.5 computes them.

SLERP treats each tensor as one flat vector. Bit-exactness with mergekit depends on the order of
the float32 reductions, so the norm and the dot product of a tensor are always computed whole, in
chunks of 2**20 elements, in one place: never split a tensor's reduction across workers.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch

from .graph import Cast, Expr, Leaf, Slerp

# safetensors dtype name -> torch dtype
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
}
CHUNK = 1 << 20
EPS = 1e-8
COLINEAR = 0.9995



def slerp(a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Spherical interpolation of ``a`` (t=0) and ``b`` (t=1), as one flat vector each.

    Bit for bit what mergekit 0.1.5 computes (run with ``--num-threads 1``): per 2**20-element
    chunk a norm and a dot product, each combined over chunks with one stacked reduction; the
    coefficients as float32 tensors; the output stored chunk by chunk in ``out_dtype``.
    """
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    fa, fb = _Chunks(a, work), _Chunks(b, work)

    def norm(x: _Chunks) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(c, dim=1, keepdim=True) for c in x]
        total = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(total > EPS, total, torch.ones_like(total))

    na, nb = norm(fa), norm(fb)
    with _single_thread():  # a chunk's sum splits across threads: fix the order, fix the bits
        parts = [((ca / na) * (cb / nb)).sum(dim=1, keepdim=True) for ca, cb in zip(fa, fb)]
    dot = torch.stack(parts).sum(dim=0).clamp(-1.0, 1.0)
    tt = torch.tensor([[t]], dtype=work, device=a.device)
    linear = dot.abs() > COLINEAR
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty((1, fa.n), dtype=out_dtype, device=a.device)
    for (i, j), ca, cb in zip(fa.spans, fa, fb):
        out[:, i:j] = coef_a * ca + coef_b * cb
    return out.reshape(a.shape)


class _Chunks:
    """A tensor as [1, n] chunks of 2**20 elements in the work dtype.

    SLERP passes over each input three times (norm, dot, mix). Up to ``CACHE_ELEMENTS`` the
    converted chunks are kept, so each element is converted once; bigger tensors are converted
    chunk by chunk on every pass, keeping memory at the inputs plus one chunk.
    """

    CACHE_ELEMENTS = 1 << 23

    def __init__(self, x: torch.Tensor, work: torch.dtype):
        self.flat, self.work = x.reshape(1, -1), work
        self.n = self.flat.shape[1]
        self.spans = [(i, min(i + CHUNK, self.n)) for i in range(0, self.n, CHUNK)]
        self.cached = [self.flat[:, i:j].to(work) for i, j in self.spans] if self.n <= self.CACHE_ELEMENTS else None

    def __iter__(self):
        if self.cached is not None:
            return iter(self.cached)
        return (self.flat[:, i:j].to(self.work) for i, j in self.spans)


class _single_thread:
    """Run a block with one torch thread (reductions then have one fixed order), then restore."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.threads != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.threads != 1:
            torch.set_num_threads(self.threads)


def evaluate(e: Expr, data: Mapping[tuple, memoryview], device: str = "cpu") -> memoryview:
    """Compute an expression from its leaves' bytes; the result's raw bytes, as safetensors stores them."""
    flat = _tensor(e, data, device).detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _tensor(e: Expr, data: Mapping[tuple, memoryview], device: str) -> torch.Tensor:
    if isinstance(e, Leaf):
        buf = data[e.key]
        with warnings.catch_warnings():  # read-only input bytes: nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=TORCH_DTYPES[e.dtype]) if len(buf) else torch.empty(0, dtype=TORCH_DTYPES[e.dtype])
        return t.reshape(e.shape).to(device)
    if isinstance(e, Cast):
        return _tensor(e.child, data, device).to(TORCH_DTYPES[e.dtype])
    if isinstance(e, Slerp):
        return slerp(_tensor(e.a, data, device), _tensor(e.b, data, device), e.t, TORCH_DTYPES[e.dtype])
    raise TypeError(f"unknown expression {type(e).__name__}")
