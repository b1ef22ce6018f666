"""Tensor expressions: what each output tensor is computed from.

The planner builds one small expression per output tensor whose leaves are byte ranges of source
files. Pipelines fuse because a later stage's inputs are simply earlier stages' expressions; a
passthrough output is its source leaf (plus a cast when dtypes differ), so it costs nothing.
Expressions are plain frozen dataclasses: they pickle to Ray actors and hash for deduplication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .safetensors_io import DTYPES
from .storage import Location


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
            other.loc.display, other.file, other.start, other.end, other.dtype, other.shape)

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.loc.display, self.file, self.start, self.end)


@dataclass(frozen=True)
class Cast:
    """``child`` converted to ``dtype`` (round to nearest even, as torch's ``.to``)."""

    child: "Expr"
    dtype: str


@dataclass(frozen=True)
class Slerp:
    """Spherical interpolation of ``a`` (the base, t=0) and ``b`` (t=1); result in ``dtype``."""

    a: "Expr"
    b: "Expr"
    t: float
    dtype: str


Expr = Union[Leaf, Cast, Slerp]


def dtype_of(e: Expr) -> str:
    return e.dtype


def shape_of(e: Expr) -> tuple[int, ...]:
    if isinstance(e, Leaf):
        return e.shape
    if isinstance(e, Cast):
        return shape_of(e.child)
    return shape_of(e.a)


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPES[dtype][0]
    for d in shape:
        n *= d
    return n


def cast(e: Expr, dtype: str | None) -> Expr:
    """``e`` as ``dtype``; no node when it already is (so passthrough stays a byte copy)."""
    if dtype is None or dtype_of(e) == dtype:
        return e
    return Cast(e, dtype)


def leaves(e: Expr) -> list[Leaf]:
    if isinstance(e, Leaf):
        return [e]
    if isinstance(e, Cast):
        return leaves(e.child)
    return leaves(e.a) + leaves(e.b)
