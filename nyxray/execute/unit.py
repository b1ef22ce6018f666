"""One work unit: read the inputs of one output shard, compute its tensors, stream the shard out.

The three steps overlap: a reader pool prefetches the next batches of input ranges (coalesced,
concurrent) while the current tensors are computed, and a writer thread streams finished tensors
to storage and hashes them. Memory in flight is bounded by ``PREFETCH`` batches of about
``BATCH_BYTES`` of inputs plus ``WRITE_QUEUE`` finished tensors, whatever the model's size.
The unit is deterministic: a retry writes the same bytes under the same name.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..graph import leaves
from ..ops import evaluate, to_bytes
from ..plan import ShardPlan
from ..storage import Location, Range, read_ranges

BATCH_BYTES = 64 * 2**20
PREFETCH = 2
WRITE_QUEUE = 4


@dataclass
class Unit:
    """A shard to produce at ``out``; ``label`` says which output (stage or sweep member) it is for.

    ``expected`` is the record of an earlier run's copy of this shard (size, sha256, tensors): if
    the file is still there with exactly those bytes it is reused instead of recomputed.
    """

    out: Location
    label: str
    shard: ShardPlan
    expected: dict | None = None

    @property
    def path(self) -> str:
        return self.shard.name

    @property
    def read_bytes(self) -> int:
        return sum(leaf.end - leaf.start for t in self.shard.tensors for leaf in set(leaves(t.expr)))


@dataclass
class UnitResult:
    """The small manifest a unit returns to the driver (never tensor data)."""

    path: str
    size: int
    sha256: str
    tensors: dict[str, str]
    bytes_read: int
    bytes_written: int
    busy_s: float
    reused: bool = False
    worker: dict = field(default_factory=dict)


def _batches(shard: ShardPlan) -> list[list]:
    out: list[list] = [[]]
    size = 0
    for t in shard.in_file_order():
        n = sum(leaf.end - leaf.start for leaf in leaves(t.expr))
        if out[-1] and size + n > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += n
    return [b for b in out if b]


def _reusable(unit: Unit) -> UnitResult | None:
    """The earlier copy of this shard, if it is still there byte for byte."""
    exp = unit.expected
    if not exp or not unit.out.exists(unit.path) or unit.out.size(unit.path) != exp["size"]:
        return None
    h = hashlib.sha256()
    for start in range(0, exp["size"], BATCH_BYTES):
        h.update(unit.out.read_range(unit.path, start, min(exp["size"], start + BATCH_BYTES)))
    if h.hexdigest() != exp["sha256"]:
        return None
    return UnitResult(unit.path, exp["size"], exp["sha256"], exp["tensors"], 0, 0, 0.0, reused=True)


def run_unit(unit: Unit, device: str = "cpu", on_progress: Callable[[int, int], None] | None = None) -> UnitResult:
    """Produce one shard at ``unit.out``/``unit.path`` and return its manifest.

    ``on_progress(bytes_read, bytes_written)`` is called as data moves (for the progress bar).
    """
    started = time.monotonic()
    reused = _reusable(unit)
    if reused is not None:
        return reused
    out = unit.out
    shard = unit.shard
    batches = _batches(shard)
    fetched_total = 0

    def fetch(batch: list) -> tuple[dict, int]:
        uniq = list(dict.fromkeys(leaf for t in batch for leaf in leaves(t.expr)))
        data, fetched = read_ranges([Range(l.loc, l.file, l.start, l.end) for l in uniq])
        if on_progress:
            on_progress(fetched, 0)
        return {l.key: d for l, d in zip(uniq, data)}, fetched

    writer = out.open_atomic(unit.path)
    file_hash = hashlib.sha256()
    tensor_hashes: dict[str, str] = {}
    q: "queue.Queue[tuple[str, object] | None]" = queue.Queue(maxsize=WRITE_QUEUE)
    write_error: list[BaseException] = []

    def write_loop() -> None:
        try:
            writer.write(shard.header)
            file_hash.update(shard.header)
            while (item := q.get()) is not None:
                name, data = item
                writer.write(data)  # type: ignore[arg-type]
                file_hash.update(data)  # type: ignore[arg-type]
                tensor_hashes[name] = hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]
                if on_progress:
                    on_progress(0, len(data))  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - surfaced to the unit's caller below
            write_error.append(e)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    wthread = threading.Thread(target=write_loop, name="nyxray-writer", daemon=True)
    wthread.start()
    try:
        with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="nyxray-read") as pool:
            pending: list[Future] = [pool.submit(fetch, b) for b in batches[:PREFETCH]]
            for i, batch in enumerate(batches):
                data, fetched = pending[i].result()
                fetched_total += fetched
                if i + PREFETCH < len(batches):
                    pending.append(pool.submit(fetch, batches[i + PREFETCH]))
                for t in batch:
                    if write_error:
                        raise write_error[0]
                    q.put((t.name, to_bytes(evaluate(t.expr, data, device))))
                pending[i] = None  # type: ignore[call-overload]  # free the batch's buffers
                del data
        q.put(None)
        wthread.join()
        if write_error:
            raise write_error[0]
        writer.commit()
    except BaseException:
        if wthread.is_alive():
            q.put(None)  # the writer drains the queue after an error, or ends at this marker
            wthread.join()
        writer.discard()
        raise
    return UnitResult(
        path=unit.path,
        size=writer.written,
        sha256=file_hash.hexdigest(),
        tensors=tensor_hashes,
        bytes_read=fetched_total,
        bytes_written=writer.written,
        busy_s=time.monotonic() - started,
    )
