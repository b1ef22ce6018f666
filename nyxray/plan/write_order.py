"""The order in which mergekit 0.1.5 writes a merge's tensors, which fixes the shard layout.

mergekit schedules a graph of tasks (load each input tensor once, gather a tensor's inputs, merge,
save) with a topological sort that always takes the ready task with the smallest key
(label, priority, node number). A task's label is the largest input tensor name it depends on,
and node numbers come from the order in which the graph is discovered by popping a Python ``set``
of integer task ids. Tied labels (repeated or overlapping layer ranges) are therefore broken by
that discovery order; sorting by name alone is not enough. This module rebuilds the same graph
and the same walk, from the behaviour observed on mergekit 0.1.5's outputs (see
``tests/golden``), to give the same order.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

# Task priorities (smaller runs first among equal labels).
_LOAD, _GATHER, _MERGE, _SAVE, _WRITER, _FINAL, _ROOT = 1000, 10, 0, -1000, -10000, 0, 0


class _Graph:
    """mergekit's task graph for a merge: nodes are ints numbered in creation order, as mergekit's
    ids are, since that numbering (through a set's layout) fixes the discovery order."""

    def __init__(self) -> None:
        self.deps: dict[int, list[int]] = {}
        self.label: dict[int, str] = {}
        self.prio: dict[int, int] = {}
        self.count = 0

    def new(self, label: str | None = None, prio: int | None = None, deps: list[int] | None = None) -> int:
        node = self.count
        self.count += 1
        if label is not None and prio is not None:
            self.label[node], self.prio[node] = label, prio
        if deps is not None:
            self.deps[node] = deps
        return node


def _build(inputs: Sequence[Sequence[tuple[str, str, str]]]) -> tuple[_Graph, list[int], int, int]:
    """The graph of ``inputs``, its save tasks (one per output, in order), the final task, the root."""
    g = _Graph()
    loads: dict[tuple[str, str], int] = {}
    saves: list[int] = []
    writer = -1
    for i, ins in enumerate(inputs):
        save = g.new()
        if i == 0:
            writer = g.new("", _WRITER, [])
        merge, gather = g.new(), g.new()
        mine = []
        for model, name, label in ins:
            if (model, name) not in loads:
                loads[model, name] = g.new(label, _LOAD, [])
            mine.append(loads[model, name])
        top = max(label for _, _, label in ins)
        g.deps[save], g.deps[merge], g.deps[gather] = [writer, merge], [gather], mine
        for node, p in ((save, _SAVE), (merge, _MERGE), (gather, _GATHER)):
            g.label[node], g.prio[node] = top, p
        saves.append(save)
    final = g.new("", _FINAL, [writer, *saves])
    root = g.new("", _ROOT)
    return g, saves, final, root


def _discover(g: _Graph, saves: list[int], final: int, root: int) -> list[tuple[int, int]]:
    """The graph's edges in the order mergekit finds them: popping a set of ints (CPython's order)."""
    todo = set([*saves, final])  # built exactly so: a set's layout (hence pop order) depends on it
    explored: set[int] = set()
    edges: list[tuple[int, int]] = []
    while todo:
        x = todo.pop()
        if x in explored:
            continue
        explored.add(x)
        for d in g.deps[x]:
            todo.add(d)
            edges.append((d, x))
    return edges + [(root, s) for s in saves] + [(root, final)]


def _sorted_saves(g: _Graph, edges: list[tuple[int, int]], saves: list[int]) -> list[int]:
    """The positions of the save tasks in the topological walk that always takes the smallest
    ready (label, priority, discovery number)."""
    number: dict[int, int] = {}
    for u, v in edges:
        number.setdefault(u, len(number))
        number.setdefault(v, len(number))
    succ: dict[int, list[int]] = {x: [] for x in number}
    indegree = dict.fromkeys(number, 0)
    for u, v in dict.fromkeys(edges):
        succ[u].append(v)
        indegree[v] += 1
    ready = [(g.label[x], g.prio[x], number[x], x) for x, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    position = {s: i for i, s in enumerate(saves)}
    order: list[int] = []
    while ready:
        *_, x = heapq.heappop(ready)
        if x in position:
            order.append(position[x])
        for v in succ[x]:
            indegree[v] -= 1
            if indegree[v] == 0:
                heapq.heappush(ready, (g.label[v], g.prio[v], number[v], v))
    return order


def write_order(inputs: Sequence[Sequence[tuple[str, str, str]]]) -> list[int]:
    """Indices of the outputs in write order.

    ``inputs[i]`` are the (model, input tensor name, label) of output ``i``, in source order,
    where the label is the name the tensor is stored under in its checkpoint (an alias, a tied
    twin), or "" for one assembled by a layout conversion (mergekit's load task then has no
    name to be labelled by); the outputs are given in planning order: pre-weights, then each
    slice's layers (each layer's tensors in the architecture's order), then post-weights, module
    by module.
    """
    if not inputs:
        return []
    g, saves, final, root = _build(inputs)
    return _sorted_saves(g, _discover(g, saves, final, root), saves)
