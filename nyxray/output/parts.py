"""Sub-shard parts: a shard larger than the unit size is computed as several parts by different
workers and assembled into one file, so parallelism and balance do not depend on the shard size.

A part is a contiguous run of the shard's tensors in file order, so its bytes are a contiguous
byte range of the file; the header is known from the plan, so every part's offset is known before
any tensor is computed. Part 0 starts at byte 0 and carries the header. The layout
(:func:`layout`) closes a part before the tensor that would take it past the unit size, but never
below ``min_part`` bytes (S3 refuses parts under 5 MiB but the last), so a part holds at most
``max(unit size, min_part + its largest tensor)`` bytes of output (part 0: plus the header); a tensor larger than the unit
size is a part of its own.

Where a part's bytes go (:class:`PartJob`, carried by the work unit to the worker):

- a local or shared file system: at its offset (``os.pwrite``) into the shard's assembly file,
  which the driver preallocated under ``.nyxray/parts/<shard>/`` and renames into place once every
  part is in (:mod:`nyxray.output.assemble`); the worker fsyncs its bytes before it reports;
- S3: as consecutive part numbers of the shard's one multipart upload, begun and completed (or
  aborted) by the driver; every S3 part but the file's last is at least 5 MiB. The worker's
  receipt (the ETag of each S3 part number) goes into the driver's record of the part.

Resume is per part on both (:mod:`nyxray.output.assemble`): the driver records the layout and each
part it takes under ``.nyxray/parts/<shard>/``, and the same command after a crash redoes only
the parts not recorded. Locally the recorded parts' bytes are checked in the assembly file; on
S3 a killed run's pending upload is adopted once ListParts shows every recorded part's ETags
and sizes in it (a failed run's uploads are aborted: its shards begin afresh).

Hashing: each worker hashes its own part while writing it (the bytes are hashed once, as for a
whole shard). A split shard's record keeps one sha256 per part, ``parts: [{start, end, sha256}]``
covering the file from byte 0 to its size; :func:`digest_mismatch` checks every range, so verify
reads and checks every byte, as strong as one sha256 of the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import NyxrayError, StorageError
from ..io.backends.local import Writeback
from ..io.backends.s3 import MIN_PART, PartUploader
from ..io.location import DEFAULT_PART, Location
from ..plan.stages import ShardPlan, parse_size

DEFAULT_UNIT_SIZE = 256 * 2**20
MIN_UNIT_SIZE = 10**6
MAX_S3_PARTS = 10_000
PARTS_DIR = ".nyxray/parts"  # under the output: one folder per split shard (layout, part records, the assembly file)


def parse_unit_size(value: int | str | None) -> int:
    """``unit_size`` (bytes, or a size with K/M/B suffixes) -> bytes; None is the default."""
    if value is None:
        return DEFAULT_UNIT_SIZE
    try:
        n = parse_size(value)
    except NyxrayError:
        raise NyxrayError(f"unit_size={value!r}: expected bytes or a size such as 256M or 1B") from None
    if n < MIN_UNIT_SIZE:
        raise NyxrayError(f"unit_size={value!r}: expected at least {MIN_UNIT_SIZE} bytes (1M)")
    return n


def splittable(out: Location) -> bool:
    """Whether shards at ``out`` can be assembled from parts: a file system that takes writes at an
    offset, or S3's multipart uploads. Elsewhere a shard is one unit."""
    return out.is_local or out.protocol in ("s3", "s3a")


def min_part(out: Location) -> int:
    return MIN_PART if out.protocol in ("s3", "s3a") else 1


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count``: the shard's tensors ``first..last-1`` in file order, bytes ``start..end-1``."""

    index: int
    count: int
    first: int
    last: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def cuts(shard: ShardPlan, unit_size: int, smallest: int) -> list[int]:
    """Tensor positions (file order) where parts begin: 0 first. A part closes before the tensor
    that would take it past ``unit_size`` once it holds at least ``smallest`` bytes."""
    out, start = [0], 0
    for i, e in enumerate(shard.entries):
        if i > out[-1] and e.start - start >= smallest and e.end - start > unit_size:
            out.append(i)
            start = e.start
    return out


def layout(shard: ShardPlan, at: list[int]) -> list[Part]:
    """The parts of ``shard`` that begin at tensor positions ``at`` (see :func:`cuts`)."""
    bounds = [*at, len(shard.entries)]
    n = len(at)
    return [Part(k, n, a, b, 0 if k == 0 else shard.entries[a].start, shard.entries[b - 1].end) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def s3_pieces(size: int) -> tuple[int, int]:
    """(S3 part size, count) for a part of ``size`` bytes: even pieces of at least 16 MiB (the
    writer's default part), so that the part's last S3 part is not small either."""
    n = max(1, size // DEFAULT_PART)
    piece = -(-size // n)
    return piece, -(-size // piece)


def s3_numbers(parts: list[Part]) -> list[int]:
    """The first S3 part number of each part: consecutive blocks, in file order."""
    first, out = 1, []
    for p in parts:
        out.append(first)
        first += s3_pieces(p.size)[1]
    if first - 1 > MAX_S3_PARTS:
        raise NyxrayError(f"a shard of {parts[-1].end} bytes needs {first - 1} S3 parts (at most {MAX_S3_PARTS}); use a larger --unit-size")
    return out


@dataclass(frozen=True)
class PartJob:
    """What a worker needs to put one part's bytes in place: the part, and where its bytes go
    (``file``: the assembly file's name under the output; or ``upload_id``/``first_number``)."""

    part: Part
    file: str = ""
    upload_id: str = ""
    first_number: int = 0

    def open(self, out: Location, name: str) -> LocalPartWriter | S3PartWriter:
        if self.upload_id:
            return S3PartWriter(out, name, self)
        return LocalPartWriter(out, self.file, self.part.start)


class LocalPartWriter:
    """Writes a part at its offset in the preallocated assembly file (``os.pwrite``), fsynced on commit."""

    receipt: dict[str, Any] | None = None

    def __init__(self, out: Location, name: str, offset: int):
        self.url, self.offset, self.written = out.url(name), offset, 0
        try:
            self.fd = os.open(out.path(name), os.O_WRONLY)
        except OSError as e:
            raise StorageError(f"{self.url}: cannot write a part: {e.strerror} (the driver preallocates this file)") from None
        self.writeback = Writeback(self.fd, offset)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self.fd, view, self.offset + self.written)
                self.written += n
                view = view[n:]
            self.writeback.wrote(self.offset + self.written)
        except OSError as e:
            raise StorageError(f"{self.url}: write failed at byte {self.offset + self.written}: {e.strerror}") from None

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise StorageError(f"{self.url}: cannot commit a part: {e.strerror}") from None
        finally:
            os.close(self.fd)

    def discard(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass  # already closed by a failed commit


class S3PartWriter:
    """Puts a part as consecutive S3 part numbers of the shard's upload; ``receipt`` holds the ETags."""

    def __init__(self, out: Location, name: str, job: PartJob):
        piece, _ = s3_pieces(job.part.size)
        self.up = PartUploader(out.fs, out.path(name), piece, out.url(name), out.options, upload_id=job.upload_id, first_number=job.first_number)
        self.written = 0
        self.receipt: dict[str, Any] | None = None

    def write(self, data: bytes | memoryview) -> None:
        self.up.write(data)
        self.written += len(memoryview(data).cast("B"))

    def commit(self) -> None:
        self.receipt = {"etags": sorted(self.up.flush().items())}

    def discard(self) -> None:
        self.up.cancel()  # the driver aborts the upload


def ranges(rec: dict) -> list[tuple[int, int, str]]:
    """The byte ranges a shard record vouches for, each with its sha256: every part, or the file."""
    if "parts" in rec:
        return [(p["start"], p["end"], p["sha256"]) for p in rec["parts"]]
    return [(0, rec["size"], rec["sha256"])]


def digest_mismatch(out: Location, name: str, rec: dict) -> bool:
    """Whether the bytes of ``name`` (of the record's size) differ from the record's sha256(s). A
    parts record must cover the file from 0 to its size without gap or overlap."""
    spans = ranges(rec)
    if [s for s, _, _ in spans] != [0, *(e for _, e, _ in spans[:-1])] or spans[-1][1] != rec["size"]:
        return True
    return any(out.sha256(name, end, start=start) != digest for start, end, digest in spans)
