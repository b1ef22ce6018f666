"""The driver's side of sub-shard parts (:mod:`nyxray.parts`): split the units of large shards into
parts, begin each shard's assembly, take in finished parts, complete or abort the assembly.

A part is a work unit like any other to the scheduler. Assembling a shard:

- locally, :class:`LocalAssembly` keeps ``.nyxray/parts/<shard>/``: ``layout.json`` (the plan id
  and the parts' byte ranges), the preallocated assembly file ``<shard>.partial`` and one record
  per finished part (``part-NNNNN.json``: size, sha256, tensors), written once the worker fsynced
  the part. The file is renamed to the shard's name once every part is in. The folder is resume
  state, not a killed writer's leftover (``remove_partial_writes`` leaves it): a resumed run with
  the same plan and layout checks each recorded part's bytes and recomputes only the others; a
  different plan or unit size starts the shard afresh. ``finalize`` removes ``.nyxray`` at commit.
- on S3, :class:`S3Assembly` is one multipart upload: begun here, parts put by the workers,
  completed here, aborted when the run fails, so no pending upload is left. A failed run's
  uploads are aborted, so a resumed run recomputes a split shard's every part (within a run, a
  part lost with its worker is redone alone).
"""

from __future__ import annotations

import contextlib
import json
import os

from .errors import NyxrayError
from .execute.unit import Unit, UnitResult
from .multipart import abort, begin, complete
from .parts import PARTS_DIR, Part, PartJob, cuts, layout, min_part, s3_numbers, splittable
from .plan import ShardPlan
from .storage import Location


class Assembly:
    """One shard of one output, assembled from parts computed by different workers."""

    def __init__(self, out: Location, shard: ShardPlan, parts: list[Part]):
        self.out, self.shard, self.parts = out, shard, parts
        self.results: dict[int, UnitResult] = {}
        self.records: dict[int, dict] = {}  # part index -> record of an earlier run's part (resume)
        self.done = False

    def job(self, part: Part) -> PartJob:
        raise NotImplementedError

    def take(self, r: UnitResult) -> UnitResult | None:
        """Take a finished part; returns the whole shard's result once its last part is in."""
        assert r.part is not None
        p = self.parts[r.part]
        if r.size != p.size:
            raise NyxrayError(f"{self.out.url(self.shard.name)}: part {p.index + 1}/{p.count} wrote {r.size} bytes, expected {p.size}")
        self.results[p.index] = r
        if len(self.results) < len(self.parts):
            return None
        self.finish()
        self.done = True
        rs = [self.results[p.index] for p in self.parts]
        return UnitResult(
            self.shard.name,
            self.shard.size,
            "",
            [t for r in rs for t in r.tensors],
            sum(r.bytes_read for r in rs),
            sum(r.bytes_written for r in rs),
            sum(r.busy_s for r in rs),
            parts=[{"start": p.start, "end": p.end, "sha256": r.sha256} for p, r in zip(self.parts, rs)],
        )

    def finish(self) -> None:
        """Make the shard appear under its final name, whole."""
        raise NotImplementedError

    def abort(self) -> None:
        """The run failed: leave nothing under the final name (and, on S3, no pending upload)."""


class LocalAssembly(Assembly):
    """Parts written at their offsets into a preallocated file, renamed into place at the end."""

    def __init__(self, out: Location, shard: ShardPlan, parts: list[Part], plan_id: str):
        super().__init__(out, shard, parts)
        self.dir = f"{PARTS_DIR}/{shard.name}"
        self.file = f"{self.dir}/{shard.name}.partial"
        want = {"plan_id": plan_id, "size": shard.size, "parts": [[p.start, p.end] for p in parts]}
        if self._read(f"{self.dir}/layout.json") == want and out.exists(self.file):
            for name in out.listdir(self.dir):
                rec = self._read(f"{self.dir}/{name}") if name.startswith("part-") else None
                if rec:
                    self.records[rec["part"]] = rec
            return
        out.delete_tree(self.dir)
        out.write_atomic(f"{self.dir}/layout.json", json.dumps(want).encode())
        self._preallocate()

    def _read(self, name: str) -> dict | None:
        with contextlib.suppress(NyxrayError, ValueError, UnicodeDecodeError):
            return json.loads(self.out.read(name)) if self.out.exists(name) else None
        return None

    def _preallocate(self) -> None:
        path = self.out.path(self.file)
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.shard.size)  # the space is there before any part is computed
                except OSError as e:
                    if e.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a file system without it
                        raise
                    os.ftruncate(fd, self.shard.size)
            finally:
                os.close(fd)
        except OSError as e:
            raise NyxrayError(f"{self.out.url(self.file)}: cannot preallocate {self.shard.size} bytes: {e.strerror}") from None

    def job(self, part: Part) -> PartJob:
        return PartJob(part, file=self.file)

    def take(self, r: UnitResult) -> UnitResult | None:
        if not r.reused:  # the worker fsynced it: a resumed run may trust this record after checking the bytes
            self.out.write_atomic(f"{self.dir}/part-{r.part:05d}.json", json.dumps(r.record()).encode())
        return super().take(r)

    def finish(self) -> None:
        try:
            os.replace(self.out.path(self.file), self.out.path(self.shard.name))
        except OSError as e:
            raise NyxrayError(f"{self.out.url(self.shard.name)}: cannot move the assembled shard into place: {e.strerror}") from None
        self.out.delete_tree(self.dir)


class S3Assembly(Assembly):
    """The parts of one multipart upload: begun here, put by workers, completed or aborted here."""

    def __init__(self, out: Location, shard: ShardPlan, parts: list[Part]):
        super().__init__(out, shard, parts)
        self.numbers = s3_numbers(parts)
        self.path, self.url = out.path(shard.name), out.url(shard.name)
        self.upload_id = begin(out.fs, self.path, self.url, out.options)

    def job(self, part: Part) -> PartJob:
        return PartJob(part, upload_id=self.upload_id, first_number=self.numbers[part.index])

    def finish(self) -> None:
        etags = {n: tag for r in self.results.values() for n, tag in (r.receipt or {}).get("etags", [])}
        complete(self.out.fs, self.path, self.upload_id, etags, self.shard.size, self.url, self.out.options)

    def abort(self) -> None:
        abort(self.out.fs, self.path, self.upload_id, self.url, self.out.options)


class Assemblies:
    """Every shard being assembled in a run, by (output, shard name)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], Assembly] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def open(self, out: Location, shard: ShardPlan, parts: list[Part], plan_id: str) -> Assembly:
        asm = LocalAssembly(out, shard, parts, plan_id) if out.is_local else S3Assembly(out, shard, parts)
        self.by_key[(out.display, shard.name)] = asm
        return asm

    def split(self, units: list[Unit], unit_size: int, plan_ids: dict[str, str]) -> list[Unit]:
        """Replace each unit whose shard holds more than ``unit_size`` bytes by its parts (one unit
        per part, the siblings' same parts with it) and begin their assemblies (call :meth:`abort`
        if this fails: uploads may have begun). A shard recorded by an earlier run stays one unit
        (its bytes are checked, not recomputed); so does a shard at a location that cannot
        assemble parts. ``plan_ids``: each output's plan id (by display name)."""
        work: list[Unit] = []
        for u in units:
            members = [u, *u.siblings]
            at = cuts(u.shard, unit_size, max(min_part(m.out) for m in members))
            layouts = [layout(m.shard, at) for m in members]
            if len(at) < 2 or any(m.expected is not None or not splittable(m.out) for m in members) or not all(map(_valid, members, layouts)):
                work.append(u)
                continue
            asms = [self.open(m.out, m.shard, parts, plan_ids[m.out.display]) for m, parts in zip(members, layouts)]
            for i in range(len(at)):
                units_i = [Unit(m.out, m.label, m.shard, a.records.get(i), part=a.job(a.parts[i])) for m, a in zip(members, asms)]
                units_i[0].siblings = units_i[1:]
                work.append(units_i[0])
        return work

    def take(self, unit: Unit, r: UnitResult) -> UnitResult | None:
        return self.by_key[(unit.out.display, unit.path)].take(r)

    def abort(self) -> None:
        """Abort every unfinished assembly (best effort: the run's own error is the one to report)."""
        for asm in self.by_key.values():
            if not asm.done:
                with contextlib.suppress(Exception):
                    asm.abort()


def _valid(member: Unit, parts: list[Part]) -> bool:
    """Whether every part but the last is large enough for the member's storage (S3: 5 MiB)."""
    return all(p.size >= min_part(member.out) for p in parts[:-1])
