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
from .safetensors_io import DTYPES

CHUNK = 1 << 20
EPS = 1e-8
COLINEAR = 0.9995



def slerp(a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Spherical interpolation of ``a`` (t=0) and ``b`` (t=1), as one flat vector each.

    Arithmetic in float32 (float64 for float64 inputs) on the tensors' device; the result is
    stored in ``out_dtype`` chunk by chunk, so peak memory is the inputs, the output and one chunk.
    """
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    spans = [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([torch.linalg.vector_norm(x[i:j].to(work)) for i, j in spans])
        total = torch.linalg.vector_norm(parts)
        return torch.where(total > EPS, total, torch.ones_like(total))

    na, nb = norm(fa), norm(fb)
    dot = torch.zeros((), dtype=work, device=a.device)
    for i, j in spans:
        dot = dot + ((fa[i:j].to(work) / na) * (fb[i:j].to(work) / nb)).sum()
    dot = dot.clamp(-1.0, 1.0)
    tt = torch.tensor(t, dtype=work, device=a.device)
    if dot.abs().item() > COLINEAR:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca = torch.sin((1 - tt) * theta) / sin_theta
        cb = torch.sin(tt * theta) / sin_theta
    out = torch.empty(n, dtype=out_dtype, device=a.device)
    for i, j in spans:
        out[i:j] = ca * fa[i:j].to(work) + cb * fb[i:j].to(work)
    return out.reshape(a.shape)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate(e: Expr, data: Mapping[tuple, memoryview], device: str = "cpu") -> torch.Tensor | memoryview:
    """Compute an expression from its leaves' bytes. A bare leaf stays bytes (a zero-copy copy)."""
    if isinstance(e, Leaf):
        return data[e.key]
    return _tensor(e, data, device)


def _tensor(e: Expr, data: Mapping[tuple, memoryview], device: str) -> torch.Tensor:
    if isinstance(e, Leaf):
        buf = data[e.key]
        with warnings.catch_warnings():  # read-only input bytes: nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=DTYPES[e.dtype][0]) if len(buf) else torch.empty(0, dtype=DTYPES[e.dtype][0])
        return t.reshape(e.shape).to(device)
    if isinstance(e, Cast):
        return _tensor(e.child, data, device).to(DTYPES[e.dtype][0])
    if isinstance(e, Slerp):
        return slerp(_tensor(e.a, data, device), _tensor(e.b, data, device), e.t, DTYPES[e.dtype][0])
    raise TypeError(f"unknown expression {type(e).__name__}")


def to_bytes(x: torch.Tensor | memoryview) -> memoryview:
    """The raw little-endian bytes of a result, as safetensors stores them."""
    if isinstance(x, memoryview):
        return x
    flat = x.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
