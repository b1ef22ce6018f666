"""Big tensors in bounded chunks: a tensor whose inputs exceed ``STREAM_BYTES`` is read, computed and
written span by span of its flat elements, so a unit's memory follows the span size, not the
largest tensor (a 7B model's embeddings: 262 MB per input).

Two kinds of expression stream, bit for bit as they compute whole:

* **element-wise** ones (copies, casts, and merges whose method declares ``elementwise``): each
  span of the output is the expression over the same span of its inputs, computed in one pass;
* a merge with a **chunked** form (``Method.chunked``: SLERP) over element-wise inputs: its
  kernel takes passes over its inputs (norms, then the dot product, then the output). Inputs up to
  ``KEEP_BYTES`` are read once and kept for the later passes; bigger ones are read again on
  each pass (three times for SLERP), so memory stays at a few spans whatever the tensor's size.

Anything else (a whole-tensor method such as TIES, a node this module does not know) is read
whole by the unit as before. :func:`read_spans` is the one read path of a streamed tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ..io.location import Range, read_ranges
from ..io.safetensors import DTYPES
from ..methods import registry
from ..plan.expr import Cast, Expr, Leaf, Merge, leaf_bytes, leaves

# Elements per span: a multiple of SLERP's 2**20-element reduction chunk (and of any vector
# width), so each span's elements round exactly as in a whole-tensor pass.
CHUNK_ELEMENTS = 4 << 20
STREAM_BYTES = 64 * 2**20  # a row whose inputs exceed this streams (the unit's read batch size)
KEEP_BYTES = 512 * 2**20  # a multi-pass merge's inputs up to this are read once, not once per pass

OnRead = Callable[[int], None]  # told the bytes each read fetched (in the consuming thread)


def in_spans(row: list[Expr]) -> bool:
    """Whether a row (one tensor position across a sweep's members) is computed span by span."""
    if leaf_bytes(row) <= STREAM_BYTES:
        return False
    return all(_elementwise(e) for e in row) or (len(row) == 1 and _chunked(row[0]))


def _elementwise(e: Expr) -> bool:
    if isinstance(e, Leaf):
        return True
    if isinstance(e, Cast):
        return _elementwise(e.child)
    if isinstance(e, Merge):
        method = registry.get(e.method)
        return method is not None and method.elementwise and all(_elementwise(x) for x in e.inputs)
    return False  # a node this module does not know: read whole


def _chunked(e: Expr) -> bool:
    if not isinstance(e, Merge):
        return False
    method = registry.get(e.method)
    return method is not None and bool(method.chunked) and all(_elementwise(x) for x in e.inputs)


def restrict(e: Expr, i: int, j: int) -> Expr:
    """Element-wise ``e`` over its flat elements [i, j): a 1-D expression over those leaf bytes."""
    if isinstance(e, Leaf):
        size = DTYPES[e.dtype][0]
        return replace(e, start=e.start + i * size, end=e.start + j * size, shape=(j - i,))
    if isinstance(e, Cast):
        return replace(e, child=restrict(e.child, i, j))
    if isinstance(e, Merge):
        return replace(e, inputs=tuple(restrict(x, i, j) for x in e.inputs))
    raise TypeError(f"cannot restrict {type(e).__name__} to a span")


def read_spans(exprs: list[Expr], on_read: OnRead) -> Iterator[tuple[list[Expr], dict]]:
    """The read path of a streamed tensor: per span of its elements, ``exprs`` restricted to it and
    the bytes of their leaves (keyed as :func:`evaluate` looks them up); the next span is read
    ahead on a thread while the caller computes this one."""
    n = math.prod(exprs[0].shape)
    spans = [(i, min(i + CHUNK_ELEMENTS, n)) for i in range(0, n, CHUNK_ELEMENTS)]

    def fetch(span: tuple[int, int]) -> tuple[list[Expr], dict, int]:
        parts = [restrict(e, *span) for e in exprs]
        uniq = list(dict.fromkeys(leaf for e in parts for leaf in leaves(e)))
        data, fetched = read_ranges([Range(leaf.loc, leaf.file, leaf.start, leaf.end) for leaf in uniq])
        return parts, {leaf.key: d for leaf, d in zip(uniq, data)}, fetched

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nyxray-span") as pool:
        ahead = pool.submit(fetch, spans[0])
        for k in range(len(spans)):
            parts, data, fetched = ahead.result()
            if k + 1 < len(spans):
                ahead = pool.submit(fetch, spans[k + 1])
            on_read(fetched)
            yield parts, data


def stream_row(row: list[Expr], device: str, on_read: OnRead) -> Iterator[list[memoryview]]:
    """The row's output bytes span by span: per span, one piece per member of the row."""
    if all(_elementwise(e) for e in row):
        for parts, data in read_spans(row, on_read):
            yield [data[e.key] if isinstance(e, Leaf) else _evaluate(e, data, device) for e in parts]
        return
    from .evaluate import merge_chunks  # imports torch: a copy never gets here

    (e,) = row
    keep = leaf_bytes(row) <= KEEP_BYTES
    for piece in merge_chunks(e, [_Passes(x, on_read, keep) for x in e.inputs], device):
        yield [piece]


def _evaluate(e: Expr, data: dict, device: str) -> memoryview:
    from .evaluate import evaluate  # imports torch on first use only

    return evaluate(e, data, device)


class _Passes:
    """One input of a chunked merge: each call is a new pass over its spans, read from storage, or
    (``keep``) read on the first pass and kept for the next ones."""

    def __init__(self, expr: Expr, on_read: OnRead, keep: bool):
        self.expr, self.on_read, self.keep = expr, on_read, keep
        self.kept: list[tuple[Expr, dict]] | None = None

    def __call__(self) -> Iterator[tuple[Expr, dict]]:
        if self.kept is not None:
            yield from self.kept
            return
        got = []
        for (part,), data in read_spans([self.expr], self.on_read):
            if self.keep:
                got.append((part, data))
            yield part, data
        self.kept = got if self.keep else None
