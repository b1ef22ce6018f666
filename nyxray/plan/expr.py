"""Tensor expressions: what each output tensor is computed from.

The planner builds one small expression per output tensor whose leaves are byte ranges of source
files. Pipelines fuse because a later stage's inputs are simply earlier stages' expressions; a
passthrough output is its source leaf (plus a cast when dtypes differ), so it costs nothing.
Expressions are plain frozen dataclasses: they pickle to Ray actors and hash for deduplication.
Every node type answers ``shape``, ``leaves()`` and ``sig()`` itself; a function given anything
else raises instead of guessing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..io.location import Location
from ..io.safetensors import DTYPES


@dataclass(frozen=True)
class Leaf:
    """A source tensor's bytes: file ``file`` of model ``model`` at ``loc``, bytes [start, end)."""

    loc: Location
    file: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]
    model: str
    name: str

    def __hash__(self) -> int:
        return hash((self.loc.display, self.file, self.start, self.end, self.dtype, self.shape))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Leaf) and (self.loc.display, self.file, self.start, self.end, self.dtype, self.shape) == (
            other.loc.display,
            other.file,
            other.start,
            other.end,
            other.dtype,
            other.shape,
        )

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.loc.display, self.file, self.start, self.end)

    def leaves(self) -> list[Leaf]:
        return [self]

    def sig(self) -> str:
        return f"L({self.loc.display}/{self.file}:{self.start}-{self.end}:{self.dtype})"


@dataclass(frozen=True)
class Cast:
    """``child`` converted to ``dtype`` (round to nearest even, as torch's ``.to``)."""

    child: Expr
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.child.shape

    def leaves(self) -> list[Leaf]:
        return self.child.leaves()

    def sig(self) -> str:
        return f"C({self.child.sig()},{self.dtype})"


@dataclass(frozen=True)
class Merge:
    """One output tensor of a merge method (``nyxray.methods.registry``) over ``inputs``.

    ``inputs`` are in the slice's source order and share one dtype; ``dtype`` is the result's
    (the inputs', or float32 for methods that widen). ``base`` indexes the base model's input. ``params`` are the shared values and ``per_input``
    the per-input ones (each a tuple aligned as the method's scope says), resolved for this
    tensor. ``seed`` seeds this tensor's own random generator (random methods only).
    """

    method: str
    inputs: tuple[Expr, ...]
    base: int | None
    params: tuple[tuple[str, Any], ...]
    per_input: tuple[tuple[str, tuple[Any, ...]], ...]
    seed: int | None
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inputs[0].shape

    def leaves(self) -> list[Leaf]:
        return [leaf for e in self.inputs for leaf in e.leaves()]

    def sig(self) -> str:
        values = ",".join(f"{k}={v!r}" for k, v in self.params + self.per_input)
        inputs = ",".join(e.sig() for e in self.inputs)
        return f"M({self.method},[{inputs}],base={self.base},{values},seed={self.seed},{self.dtype})"


@dataclass(frozen=True)
class Join:
    """Tensors of one dtype laid end to end, read as one tensor of ``shape``: how mergekit reads a
    fused MoE tensor (every expert's pieces, expert after expert) from a checkpoint that stores
    one tensor per expert."""

    parts: tuple[Expr, ...]
    shape: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    def leaves(self) -> list[Leaf]:
        return [leaf for e in self.parts for leaf in e.leaves()]

    def sig(self) -> str:
        return f"J([{','.join(e.sig() for e in self.parts)}],{self.shape})"


@dataclass(frozen=True, eq=False)
class RowTable:
    """How the inputs of one vocabulary-indexed tensor become the output vocabulary's rows
    (planned in :mod:`nyxray.plan.vocab`, applied in :mod:`nyxray.execute.rows`).

    Output rows start at zero. ``fills`` are the rows given to an input that lacks its token (or
    whose token is forced): (row, sources, average), where sources are (input, source row) pairs,
    averaged when ``average``, else the one source's row (none: zeros). Then each input's own rows
    are copied over, as runs (output row, source row, count) in ``own[input]``. Rows past ``vocab``
    (padding) are the mean of the first ``vocab``. ``digest`` stands for the whole table."""

    rows: int
    vocab: int
    own: tuple[tuple[tuple[int, int, int], ...], ...]
    fills: tuple[tuple[int, tuple[tuple[int, int], ...], bool], ...]
    digest: str

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowTable) and self.digest == other.digest


@dataclass(frozen=True)
class Rows:
    """Input ``index`` of ``group`` (the inputs of one merge, one dtype) in the output vocabulary."""

    group: tuple[Expr, ...]
    index: int
    table: RowTable

    @property
    def dtype(self) -> str:
        return self.group[self.index].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.table.rows,) + self.group[self.index].shape[1:]

    def leaves(self) -> list[Leaf]:
        return [leaf for e in self.group for leaf in e.leaves()]  # a missing token's row may come from any input

    def sig(self) -> str:
        return f"R({self.index},{self.table.digest},[{','.join(e.sig() for e in self.group)}])"


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter applied to one weight: ``child + scale * (b @ a)`` (:mod:`nyxray.plan.lora`).

    ``child`` is the weight as the adapter's model is loaded for the adapter (its leaf, cast to
    the LoRA merge dtype when that differs); ``a`` (r x in) and ``b`` (out x r) are the adapter's
    tensors; the result keeps ``child``'s dtype, as peft's ``merge_and_unload`` does.
    """

    child: Expr
    a: Leaf
    b: Leaf
    scale: float

    @property
    def dtype(self) -> str:
        return self.child.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.child.shape

    def leaves(self) -> list[Leaf]:
        return [*self.child.leaves(), self.a, self.b]

    def sig(self) -> str:
        return f"A({self.child.sig()},{self.a.sig()},{self.b.sig()},{self.scale!r})"


Expr = Leaf | Cast | Merge | Join | Rows | Lora
NODES = (Leaf, Cast, Merge, Join, Rows, Lora)


def _node(e: Expr) -> Expr:
    if not isinstance(e, NODES):
        raise TypeError(f"not a tensor expression: {type(e).__name__}")
    return e


def shape_of(e: Expr) -> tuple[int, ...]:
    return _node(e).shape


def leaves(e: Expr) -> list[Leaf]:
    return _node(e).leaves()


def leaf_bytes(exprs: Iterable[Expr]) -> int:
    """Source bytes these expressions read, each distinct range once."""
    return sum(leaf.end - leaf.start for leaf in {leaf for e in exprs for leaf in leaves(e)})


def signature(e: Expr) -> str:
    """A text that changes whenever what ``e`` computes changes (the plan fingerprint uses it)."""
    return _node(e).sig()


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPES[dtype][0]
    for d in shape:
        n *= d
    return n


def cast(e: Expr, dtype: str | None) -> Expr:
    """``e`` as ``dtype``; no node when it already is (so passthrough stays a byte copy)."""
    if dtype is None or e.dtype == dtype:
        return e
    return Cast(e, dtype)


_FLOAT_RANK = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}


def promote(dtypes: list[str]) -> str:
    """The common dtype of a merge's inputs, as ``torch.promote_types`` gives it for floats."""
    kinds = set(dtypes)
    if len(kinds) == 1:
        return dtypes[0]
    if not kinds <= set(_FLOAT_RANK):
        raise ValueError(f"cannot merge tensors of dtypes {sorted(kinds)}")
    top = max(_FLOAT_RANK[d] for d in kinds)
    return {1: "F32", 2: "F32", 3: "F64"}[top]  # F16 with BF16 promotes to F32
