"""Evaluating an expression on torch (CPU or CUDA): its leaves' bytes in, the result's bytes out.

Leaves become tensors over the read bytes, casts are torch casts, and a merge calls its method's
function from the catalogue (:mod:`nyxray.methods`; SLERP's kernel is :mod:`nyxray.methods._slerp`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial

import torch

from ..methods import registry
from ..methods.base import ChunkSource, Group
from ..plan.expr import Cast, Expr, Join, Leaf, Lora, Merge, Rows
from .rows import permute_rows

# safetensors dtype name -> torch dtype
TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}


def evaluate(e: Expr, data: Mapping[tuple, memoryview], device: str = "cpu") -> memoryview:
    """Compute an expression from its leaves' bytes; the result's raw bytes, as safetensors stores them."""
    return _bytes(_tensor(e, data, device))


def merge_chunks(e: Merge, inputs: list[Callable[[], Iterable[tuple[Expr, Mapping]]]], device: str) -> Iterator[memoryview]:
    """``e`` by its method's chunked form (``Method.chunked``), its output's bytes piece by piece.

    ``inputs[k]()`` starts a pass over input k: its expression restricted to each span in turn
    with that span's leaf bytes (:mod:`.stream`)."""

    def pieces(passes: Callable[[], Iterable[tuple[Expr, Mapping]]]) -> Iterator[torch.Tensor]:
        return (_tensor(part, data, device).reshape(1, -1) for part, data in passes())

    sources = [ChunkSource(TORCH_DTYPES[x.dtype], device, partial(pieces, p)) for x, p in zip(e.inputs, inputs)]
    for out in registry.function(registry.METHODS[e.method], "chunked")(_group(e, sources), TORCH_DTYPES[e.dtype]):
        yield _bytes(out)


def _bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _tensor(e: Expr, data: Mapping[tuple, memoryview], device: str) -> torch.Tensor:
    if isinstance(e, Leaf):
        buf = data[e.key]
        # read-only input bytes: nothing writes to them (the pools silence torch's warning, .runtime)
        t = torch.frombuffer(buf, dtype=TORCH_DTYPES[e.dtype]) if len(buf) else torch.empty(0, dtype=TORCH_DTYPES[e.dtype])
        return t.reshape(e.shape).to(device)
    if isinstance(e, Cast):
        return _tensor(e.child, data, device).to(TORCH_DTYPES[e.dtype])
    if isinstance(e, Merge):
        return _merge(e, data, device)
    if isinstance(e, Join):
        return torch.cat([_tensor(p, data, device).reshape(-1) for p in e.parts]).reshape(e.shape)
    if isinstance(e, Rows):  # on the CPU, where mergekit permutes: its padding mean is a reduction
        return permute_rows([_tensor(x, data, "cpu") for x in e.group], e.index, e.table).to(device)
    if isinstance(e, Lora):
        return _lora(e, data).to(device)
    raise TypeError(f"unknown expression {type(e).__name__}")


def _merge(e: Merge, data: Mapping[tuple, memoryview], device: str) -> torch.Tensor:
    method = registry.METHODS[e.method]
    dtype = TORCH_DTYPES[e.dtype]
    tensors = [_tensor(x, data, device) for x in e.inputs]  # the planner cast them to one dtype
    out = registry.function(method)(_group(e, tensors))
    if out.dtype != dtype or out.shape != tensors[0].shape:
        raise TypeError(f"{e.method} returned {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(tensors[0].shape)}")
    return out


def _group(e: Merge, inputs: list) -> Group:
    """The method's view of ``e``: its inputs (tensors, or chunk sources) and resolved values."""
    generator = torch.Generator().manual_seed(e.seed) if e.seed is not None else None
    return Group(inputs, e.base, dict(e.params), {k: list(v) for k, v in e.per_input}, generator)


def _lora(e: Lora, data: Mapping[tuple, memoryview]) -> torch.Tensor:
    """The weight with its LoRA adapter merged, bit for bit as mergekit 0.1.5 gets it from peft's
    ``merge_and_unload``: the adapter's tensors in float32 (peft upcasts them on load), the delta
    ``(B @ A) * scale`` in float32, added in place to the weight in its load dtype. Always on the
    CPU, where mergekit merges adapters: a GPU's matmul rounds differently."""
    weight = _tensor(e.child, data, "cpu").clone()  # a leaf's tensor is a view of the read buffer
    a = _tensor(e.a, data, "cpu").float()
    b = _tensor(e.b, data, "cpu").float()
    weight += (b @ a) * e.scale
    return weight
