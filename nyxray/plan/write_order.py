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


def write_order(inputs: Sequence[Sequence[tuple[str, str]]]) -> list[int]:
    """Indices of the outputs in write order.

    ``inputs[i]`` are the (model, input tensor name) pairs of output ``i``, in source order, and
    the outputs are given in planning order: pre-weights, then each slice's layers (each layer's
    tensors in the architecture's order), then post-weights.
    """
    n = len(inputs)
    if n == 0:
        return []
    next_id = 0

    def new() -> int:
        nonlocal next_id
        next_id += 1
        return next_id - 1

    deps: dict[int, list[int]] = {}
    label: dict[int, str] = {}
    prio: dict[int, int] = {}
    loads: dict[tuple[str, str], int] = {}
    saves: list[int] = []
    writer = -1
    for i, ins in enumerate(inputs):
        save = new()
        if i == 0:
            writer = new()
            deps[writer], label[writer], prio[writer] = [], "", _WRITER
        merge, gather = new(), new()
        mine = []
        for key in ins:
            if key not in loads:
                loads[key] = new()
                deps[loads[key]], label[loads[key]], prio[loads[key]] = [], key[1], _LOAD
            mine.append(loads[key])
        top = max(name for _, name in ins)
        deps[save], deps[merge], deps[gather] = [writer, merge], [gather], mine
        for node, p in ((save, _SAVE), (merge, _MERGE), (gather, _GATHER)):
            label[node], prio[node] = top, p
        saves.append(save)
    final = new()
    deps[final], label[final], prio[final] = [writer, *saves], "", _FINAL
    root = new()
    label[root], prio[root] = "", _ROOT

    # Discover the graph the way mergekit does: popping a set of ints (CPython's order).
    todo = set([*saves, final])  # built exactly so: a set's layout (hence pop order) depends on it
    explored: set[int] = set()
    edges: list[tuple[int, int]] = []
    while todo:
        x = todo.pop()
        if x in explored:
            continue
        explored.add(x)
        for d in deps[x]:
            todo.add(d)
            edges.append((d, x))
    edges += [(root, s) for s in saves] + [(root, final)]

    number: dict[int, int] = {}
    for u, v in edges:
        number.setdefault(u, len(number))
        number.setdefault(v, len(number))
    succ: dict[int, list[int]] = {x: [] for x in number}
    indegree = dict.fromkeys(number, 0)
    for u, v in dict.fromkeys(edges):
        succ[u].append(v)
        indegree[v] += 1
    ready = [(label[x], prio[x], number[x], x) for x, d in indegree.items() if d == 0]
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
                heapq.heappush(ready, (label[v], prio[v], number[v], v))
    return order
