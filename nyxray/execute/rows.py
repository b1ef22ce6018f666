"""A vocabulary-indexed tensor in the output vocabulary: its rows permuted, taken from the right
input and filled for missing tokens, as the plan's :class:`~nyxray.plan.expr.RowTable` says.

The arithmetic is mergekit 0.1.5's, op for op, in the inputs' dtype: an average starts from zeros
and adds each source row in input order, then divides by the count; padding rows are
``torch.mean`` over the token rows. The caller runs it on the CPU, where mergekit computed it, so
a reduction on another device cannot change a bit.
"""

from __future__ import annotations

import torch

from ..plan.expr import RowTable


def _fill_row(inputs: list[torch.Tensor], sources: tuple[tuple[int, int], ...], average: bool) -> torch.Tensor:
    if not average:
        k, row = sources[0]
        return inputs[k][row]
    acc = torch.zeros(inputs[0].shape[1:], dtype=inputs[0].dtype)
    for k, row in sources:
        acc = acc + inputs[k][row]
    acc /= len(sources)
    return acc


def permute_rows(inputs: list[torch.Tensor], index: int, table: RowTable) -> torch.Tensor:
    """Input ``index`` of ``inputs`` (all of one dtype, vocabulary on axis 0) in the output vocabulary."""
    own = inputs[index]
    out = torch.zeros((table.rows, *own.shape[1:]), dtype=own.dtype)
    for row, sources, average in table.fills:
        if sources:
            out[row] = _fill_row(inputs, sources, average)
    for start, src, n in table.own[index]:
        out[start : start + n] = own[src : src + n]
    if table.rows > table.vocab:
        out[table.vocab :] = torch.mean(out[: table.vocab], dim=0)
    return out
