"""Sub-shard parts: a shard larger than the unit size is computed as several parts by different
workers and assembled into one file, so parallelism and balance do not depend on the shard size.

A part is a contiguous run of the shard's tensors in file order, so its bytes are a contiguous
byte range of the file; the header is known from the plan, so every part's offset is known before
any tensor is computed. Part 0 starts at byte 0 and carries the header. The layout
(:func:`layout`) closes a part before the tensor that would take it past the unit size, but never
below the storage's ``min_part`` bytes (S3 refuses parts under 5 MiB but the last), so a part holds at most
``max(unit size, min_part + its largest tensor)`` bytes of output (part 0: plus the header); a tensor larger than the unit
size is a part of its own.

Where a part's bytes go (:class:`PartJob`, carried by the work unit to the worker) is the output
backend's (:mod:`nyxray.io.backends`: its part writer and assembler); today:

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

from ..errors import NyxrayError
from ..io.backends.base import Part, PartJob
from ..io.location import Location
from ..plan.stages import ShardPlan, parse_size

__all__ = ["DEFAULT_UNIT_SIZE", "MIN_UNIT_SIZE", "PARTS_DIR", "Part", "PartJob", "cuts", "digest_mismatch", "layout", "parse_unit_size", "ranges"]

DEFAULT_UNIT_SIZE = 256 * 2**20
MIN_UNIT_SIZE = 10**6
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
