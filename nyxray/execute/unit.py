"""One work unit: read the inputs of one output shard, compute its tensors, stream the shard out.

The three steps overlap: a reader pool prefetches the next batches of input ranges (coalesced,
concurrent) while the current tensors are computed, and a writer thread streams finished tensors
to storage and hashes them. Memory in flight is bounded by ``PREFETCH`` batches of about
``BATCH_BYTES`` of inputs plus ``WRITE_QUEUE`` finished tensors (or pieces), whatever the model's
size: a tensor whose inputs exceed a batch is read, computed and written in spans (:mod:`.stream`).
The unit is deterministic: a retry writes the same bytes under the same name.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..io.location import Location, Range, read_ranges
from ..output.parts import PartJob, digest_mismatch
from ..plan.expr import Expr, Leaf, leaf_bytes, leaves
from ..plan.stages import ShardPlan
from ..plan.tensor import PlannedTensor
from .stream import in_spans, stream_row

BATCH_BYTES = 64 * 2**20
PREFETCH = 2
WRITE_QUEUE = 4


@dataclass
class Unit:
    """A shard to produce at ``out``; ``label`` says which output (stage or sweep member) it is for.

    ``expected`` is the record of an earlier run's copy of this shard (size, sha256, tensors): if
    the file is still there with exactly those bytes it is reused instead of recomputed.
    ``siblings`` are shards of other outputs with the same tensors in the same file order (a
    sweep's members): they are computed in the same pass, so each input byte is read once for all.
    ``part``: only one part of the shard (a run of its tensors, :mod:`nyxray.output.parts`) is produced,
    and ``expected`` is then that part's record (on S3, one the driver already found in the
    pending upload it adopted: :mod:`nyxray.output.assemble`).
    """

    out: Location
    label: str
    shard: ShardPlan
    expected: dict | None = None
    siblings: list[Unit] = field(default_factory=list)
    part: PartJob | None = None

    @property
    def path(self) -> str:
        return self.shard.name

    def in_file_order(self) -> list[PlannedTensor]:
        """The tensors this unit writes, in file order: the shard's, or its part's."""
        order = self.shard.in_file_order()
        return order[self.part.part.first : self.part.part.last] if self.part else order

    @property
    def head(self) -> bytes:
        """The header bytes this unit writes: the shard's, in its first part only."""
        return self.shard.header if self.part is None or self.part.part.index == 0 else b""

    @property
    def read_bytes(self) -> int:
        """Source bytes the unit reads: for its tensors and its siblings', each byte once."""
        return _leaf_bytes([self, *self.siblings])

    @property
    def own_read_bytes(self) -> int:
        """Source bytes this shard (or part) alone needs: what finding it intact saves reading."""
        return _leaf_bytes([self])

    @property
    def needs_math(self) -> bool:
        """Whether any tensor is computed (cast or SLERP) rather than copied byte for byte."""
        return any(not isinstance(t.expr, Leaf) for u in [self, *self.siblings] for t in u.in_file_order())

    @property
    def write_bytes(self) -> int:
        return sum(u.part.part.size if u.part else u.shard.size for u in [self, *self.siblings])

    @property
    def size(self) -> int:
        """Bytes the unit moves (reads and writes): the scheduler hands out the largest first."""
        return self.write_bytes + self.read_bytes

    @property
    def title(self) -> str:
        part = f" part {self.part.part.index + 1}/{self.part.part.count}" if self.part else ""
        return f"shard {self.label}{self.shard.name}{part}"


@dataclass
class UnitResult:
    """The small manifest a unit returns to the driver (never tensor data).

    For a part (``part``: its index) ``size`` and ``sha256`` are the part's and ``receipt`` holds
    what the driver needs to assemble the shard (S3: the ETags of its parts). A shard assembled
    from parts has one sha256 per part (``parts``) and no sha256 of the file.
    """

    path: str
    size: int
    sha256: str
    tensors: list[str]  # names, in file order
    bytes_read: int
    bytes_written: int
    busy_s: float
    reused: bool = False
    hash_s: float = 0.0  # of busy_s, the writer thread's time in sha256 (this shard or part only)
    siblings: list[UnitResult] = field(default_factory=list)
    part: int | None = None
    receipt: dict | None = None
    parts: list[dict] | None = None
    parts_reused: int = 0  # a shard assembled from parts: how many were an earlier run's

    @classmethod
    def from_record(cls, path: str, rec: dict) -> UnitResult:
        """A shard (or part) found intact as recorded: reused, nothing moved."""
        return cls(
            path,
            rec["size"],
            rec.get("sha256", ""),
            list(rec["tensors"]),
            0,
            0,
            0.0,
            reused=True,
            part=rec.get("part"),
            receipt=rec.get("receipt"),
            parts=rec.get("parts"),
        )

    def record(self) -> dict:
        """What the output protocol keeps of a written shard or part (state records, the manifest)."""
        digest = {"parts": self.parts} if self.parts is not None else {"sha256": self.sha256}
        return {"size": self.size, **digest, "tensors": self.tensors, **({"part": self.part} if self.part is not None else {})}

    @property
    def unit_bytes_written(self) -> int:
        """Bytes the whole unit wrote: this shard and its siblings'."""
        return self.bytes_written + sum(r.bytes_written for r in self.siblings)

    @property
    def unit_hash_s(self) -> float:
        """Seconds the whole unit spent hashing its output: this shard and its siblings'."""
        return self.hash_s + sum(r.hash_s for r in self.siblings)


def _leaf_bytes(units: list[Unit]) -> int:
    return leaf_bytes(t.expr for u in units for t in u.in_file_order())


def _reusable(unit: Unit) -> UnitResult | None:
    """The earlier copy of this shard (or part, in the assembly file), if it is still there byte for byte."""
    exp = unit.expected
    if not exp:
        return None
    if unit.part and unit.part.upload_id:
        pass  # an S3 part: the driver checked its ETags in the upload it adopted (a pending upload cannot be read)
    elif unit.part:
        p = unit.part.part
        intact = unit.out.exists(unit.part.file) and unit.out.size(unit.part.file) >= p.end
        if not intact or unit.out.sha256(unit.part.file, p.end, start=p.start) != exp["sha256"]:
            return None
    elif not unit.out.exists(unit.path) or unit.out.size(unit.path) != exp["size"] or digest_mismatch(unit.out, unit.path, exp):
        return None
    return UnitResult.from_record(unit.path, exp)


class _ShardStream:
    """Writes one shard from a bounded queue on its own thread, hashing as it goes."""

    def __init__(self, unit: Unit, on_progress: Callable[[int, int], None] | None):
        self.unit, self.on_progress = unit, on_progress
        self.writer = unit.part.open(unit.out, unit.path) if unit.part else unit.out.open_atomic(unit.path)
        self.file_hash = hashlib.sha256()  # the only pass over the output bytes besides the write
        self.hash_s = 0.0
        self.tensor_names: list[str] = []
        self.q: queue.Queue[tuple[str | None, object] | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="nyxray-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            self._emit(self.unit.head)
            while (item := self.q.get()) is not None:
                name, data = item
                self._emit(data)
                if name is not None:
                    self.tensor_names.append(name)
                if self.on_progress:
                    self.on_progress(0, len(data))
        except BaseException as e:  # noqa: BLE001 - surfaced by put() / close()
            self.error = e
            while self.q.get() is not None:  # drain so the producer never blocks
                pass

    def _emit(self, data) -> None:
        self.writer.write(data)
        t = time.perf_counter()
        self.file_hash.update(data)
        self.hash_s += time.perf_counter() - t

    def put(self, name: str | None, data: memoryview) -> None:
        """Queue a tensor's bytes, or a piece of them: ``name`` with its first piece, None with the next."""
        if self.error:
            raise self.error
        self.q.put((name, data))

    def close(self) -> None:
        """Finish the stream: wait for the writer; raise its error, if any."""
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        if self.error:
            raise self.error

    def commit(self) -> UnitResult:
        self.close()
        self.writer.commit()
        w = self.writer.written
        part = self.unit.part.part.index if self.unit.part else None
        receipt = getattr(self.writer, "receipt", None)
        return UnitResult(self.unit.path, w, self.file_hash.hexdigest(), self.tensor_names, 0, w, 0.0, part=part, receipt=receipt, hash_s=self.hash_s)

    def discard(self) -> None:
        try:
            self.close()
        except BaseException:  # noqa: BLE001 - already failing; the first error is the one reported
            pass
        self.writer.discard()


def _compute(expr: Expr, data: dict, device: str) -> memoryview:
    if isinstance(expr, Leaf):
        return data[expr.key]  # a copy: the source bytes as they are
    from .evaluate import evaluate  # imports torch on first use only

    return evaluate(expr, data, device)


def _batches(rows: list[list]) -> list[list[list]]:
    """Group rows (the same tensor position across outputs) into read batches of ~BATCH_BYTES; a
    streamed row (:mod:`.stream`) is a batch of its own, read by its stream, not by the batch reader."""
    out: list[list[list]] = [[]]
    size = 0
    for row in rows:
        n = leaf_bytes(t.expr for t in row)
        alone = in_spans([t.expr for t in row])
        if out[-1] and (alone or size + n > BATCH_BYTES or _streamed(out[-1])):
            out.append([])
            size = 0
        out[-1].append(row)
        size += n
    return [b for b in out if b]


def _streamed(batch: list[list]) -> bool:
    return len(batch) == 1 and in_spans([t.expr for t in batch[0]])


def _put_batch(outs: list[_ShardStream], batch: list[list], data: dict | None, device: str, on_read: Callable[[int], None]) -> None:
    """Compute a batch's tensors and queue them for writing: whole, or a streamed row piece by piece."""
    if data is None:
        (row,) = batch
        for k, pieces in enumerate(stream_row([t.expr for t in row], device, on_read)):
            for stream, t, piece in zip(outs, row, pieces):
                stream.put(None if k else t.name, piece)
        return
    for row in batch:
        for stream, t in zip(outs, row):
            stream.put(t.name, _compute(t.expr, data, device))


def run_unit(unit: Unit, device: str = "cpu", on_progress: Callable[[int, int], None] | None = None) -> UnitResult:
    """Produce the unit's shard (and its siblings') and return the manifest(s).

    ``on_progress(bytes_read, bytes_written)`` is called as data moves (for the progress bar).
    Process-wide settings (torch threads, the cyclic GC, the heap) belong to the worker pool
    (:mod:`.runtime`), never to a unit: units run side by side in one process.
    """
    started = time.monotonic()
    members = [unit, *unit.siblings]
    results: list[UnitResult | None] = [_reusable(u) for u in members]
    todo = [u for u, r in zip(members, results) if r is None]
    fetched_total = 0

    def read(n: int) -> None:  # a stream's reads, counted in this thread
        nonlocal fetched_total
        fetched_total += n
        if on_progress:
            on_progress(n, 0)

    if todo:
        orders = [u.in_file_order() for u in todo]
        rows = [list(r) for r in zip(*orders)]

        def fetch(batch: list[list]) -> dict:
            if _streamed(batch):
                return {"data": None, "fetched": 0}  # its stream reads it, span by span
            uniq = list(dict.fromkeys(leaf for row in batch for t in row for leaf in leaves(t.expr)))
            data, fetched = read_ranges([Range(leaf.loc, leaf.file, leaf.start, leaf.end) for leaf in uniq])
            if on_progress:
                on_progress(fetched, 0)
            return {"data": {leaf.key: d for leaf, d in zip(uniq, data)}, "fetched": fetched}

        streams: list[_ShardStream] = []
        try:
            streams = [_ShardStream(u, on_progress) for u in todo]
            batches = _batches(rows)
            with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="nyxray-read") as pool:
                pending: list[Future | None] = [pool.submit(fetch, b) for b in batches[:PREFETCH]]
                for i, batch in enumerate(batches):
                    got = pending[i].result()  # type: ignore[union-attr]
                    pending[i] = None  # free the batch's buffers once computed
                    fetched_total += got["fetched"]
                    if i + PREFETCH < len(batches):
                        pending.append(pool.submit(fetch, batches[i + PREFETCH]))
                    _put_batch(streams, batch, got["data"], device, read)
                    del got
            done = iter(s.commit() for s in streams)
            results = [r if r is not None else next(done) for r in results]
        except BaseException:
            for s in streams:
                s.discard()
            raise
    first = results[0]
    assert first is not None
    first.bytes_read = fetched_total  # shared reads are counted once, on the primary shard
    first.busy_s = time.monotonic() - started
    first.siblings = [r for r in results[1:] if r is not None]
    return first
