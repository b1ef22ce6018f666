"""The driver's side of sub-shard parts (:mod:`nyxray.output.parts`): split the units of large shards into
parts, begin (or adopt) each shard's assembly, take in finished parts, complete or abort it.

A part is a work unit like any other to the scheduler. Every assembly keeps its resume state in the
output, under ``.nyxray/parts/<shard>/`` (:class:`Assembly`, the same for every storage; what
differs is the output backend's assembler, :mod:`nyxray.io.backends`):
``layout.json`` (the plan id, the shard's size and the parts' byte ranges; on S3 also the upload
id), written before any part is computed, and one record per part the driver took
(``part-NNNNN.json``: size, sha256, tensors; on S3 also the receipt, the ETags of the part's S3
part numbers), written before anything depends on the part. A resumed run whose plan id and
layout are the same takes the recorded parts as done, after checking them, and computes only the
others; anything else (another plan or ``--unit-size``, a failed check) starts the shard afresh.
The folder is resume state, not a killed writer's leftover; it goes once the shard is in place,
and ``finalize`` removes ``.nyxray`` at commit.

- Locally, the assembler preallocates ``<shard>.partial`` in that folder; each worker
  writes its part at its offset and fsyncs it before the driver records it; the file is renamed to
  the shard's name once every part is in. A resumed run's workers check each recorded part's
  bytes in the file (a reused part is read back and hashed, not recomputed).
- On S3, an assembly is one multipart upload: begun here (its id recorded in the layout
  before any part is put), parts put by the workers, completed here. A run that fails aborts its
  uploads and drops their records, so no pending upload is left and a rerun begins afresh without
  asking the store. A run killed outright leaves its upload pending with its records: the same
  command again adopts it (``remove_partial_writes`` spares the uploads recorded in layouts,
  :func:`recorded_uploads`, and aborts every other one), checks with ListParts that each recorded
  part's S3 part numbers are there with the recorded ETags and sizes, reuses those parts (neither
  recomputed nor read: nothing of a pending upload can be read back), puts the others into the same
  upload and completes it. If the upload is gone or anything differs, or with ``--overwrite``, the
  old upload is aborted, its records dropped and the shard begun afresh in a new upload. Within a
  run a part lost with its worker is redone alone.
"""

from __future__ import annotations

import contextlib
import json

from ..errors import NyxrayError
from ..execute.unit import Unit, UnitResult
from ..io.location import Location
from ..plan.stages import ShardPlan
from .parts import PARTS_DIR, Part, PartJob, cuts, layout

LAYOUT = "layout.json"


def _read(out: Location, name: str) -> dict | None:
    """A small JSON state file; None when absent or unreadable (a torn or foreign file is no state)."""
    with contextlib.suppress(NyxrayError, ValueError, UnicodeDecodeError):
        got = json.loads(out.read(name)) if out.exists(name) else None
        return got if isinstance(got, dict) else None
    return None


def recorded_uploads(out: Location) -> set[str]:
    """The upload ids recorded in the layouts under ``out``'s ``.nyxray/parts/``: a killed run's
    pending uploads that this run may adopt (claim keeps them from ``remove_partial_writes``)."""
    if not out.backend.pending_uploads:
        return set()
    ids = (_read(out, f"{PARTS_DIR}/{d}/{LAYOUT}") for d in out.listdir(PARTS_DIR))
    return {str(lay["upload_id"]) for lay in ids if lay and lay.get("upload_id")}


class Assembly:
    """One shard of one output, assembled from parts computed by different workers, with its
    resume state under ``.nyxray/parts/<shard>/`` (see the module docstring): begun afresh, or an
    earlier run's adopted when its layout is this one and the backend finds its parts intact."""

    def __init__(self, out: Location, shard: ShardPlan, parts: list[Part], plan_id: str):
        self.out, self.shard, self.parts = out, shard, parts
        self.dir = f"{PARTS_DIR}/{shard.name}"
        self.layout = {"plan_id": plan_id, "size": shard.size, "parts": [[p.start, p.end] for p in parts]}
        self.results: dict[int, UnitResult] = {}
        self.records: dict[int, dict] = {}  # part index -> record of an earlier run's part (resume)
        self.done = False
        self.assembler = out.backend.assembler(shard.name, f"{self.dir}/{shard.name}.partial", parts)
        old = self.recorded_layout()
        earlier = str(old.get("upload_id") or "")
        if self.same_layout(old):
            records = self.recorded_parts()
            if self.assembler.adopt(earlier, records):
                self.upload_id, self.records = earlier, records  # each part is checked before reuse
                return
        elif earlier:  # another layout: never to be completed
            with contextlib.suppress(Exception):
                self.assembler.abort(earlier)
        self.start()

    def recorded_layout(self) -> dict:
        """The layout an earlier run recorded for this shard (empty: none, or unreadable)."""
        return _read(self.out, f"{self.dir}/{LAYOUT}") or {}

    def same_layout(self, old: dict) -> bool:
        """Whether a recorded layout is this one: same plan, size and parts (other keys, such as an
        upload id, may come with it)."""
        return all(old.get(k) == v for k, v in self.layout.items())

    def recorded_parts(self) -> dict[int, dict]:
        """The part records an earlier run left (by part index; only records of this layout's parts)."""
        got = {}
        for name in self.out.listdir(self.dir):
            rec = _read(self.out, f"{self.dir}/{name}") if name.startswith("part-") else None
            p = rec.get("part") if rec else None
            if isinstance(p, int) and 0 <= p < len(self.parts) and rec.get("size") == self.parts[p].size:
                got[p] = rec
        return got

    def start(self) -> None:
        """Begin the shard afresh: drop an earlier run's state, begin the assembly, record this
        layout (with the store's id of the assembly, before any part is put)."""
        self.out.delete_tree(self.dir)
        self.upload_id = self.assembler.begin()
        extra = {"upload_id": self.upload_id} if self.upload_id else {}
        try:
            self.out.write_atomic(f"{self.dir}/{LAYOUT}", json.dumps({**self.layout, **extra}).encode())
        except BaseException:
            with contextlib.suppress(Exception):
                self.assembler.abort(self.upload_id)
            raise

    def job(self, part: Part) -> PartJob:
        return self.assembler.job(self.upload_id, part)

    def take(self, r: UnitResult) -> UnitResult | None:
        """Take a finished part (its record is written first); returns the whole shard's result
        once its last part is in."""
        assert r.part is not None
        p = self.parts[r.part]
        if r.size != p.size:
            raise NyxrayError(f"{self.out.url(self.shard.name)}: part {p.index + 1}/{p.count} wrote {r.size} bytes, expected {p.size}")
        if not r.reused:  # the part is durable (fsynced, or its S3 parts acknowledged): a resumed run may take it after checking
            rec = dict(r.record(), **({"receipt": r.receipt} if r.receipt else {}))
            self.out.write_atomic(f"{self.dir}/part-{r.part:05d}.json", json.dumps(rec).encode())
        self.results[p.index] = r
        if len(self.results) < len(self.parts):
            return None
        self.finish()
        self.done = True
        self.out.delete_tree(self.dir)  # the shard is in place: its parts are no longer resume state
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
            parts_reused=sum(r.reused for r in rs),
        )

    def finish(self) -> None:
        """Make the shard appear under its final name, whole."""
        self.assembler.complete(self.upload_id, [self.results[p.index].receipt or {} for p in self.parts])

    def abort(self) -> None:
        """The run failed: leave nothing under the final name, and nothing pending in the store.
        Parts that can be read back stay for a resume; others are dropped with their records, so
        a rerun begins the shard afresh, asking nothing."""
        if self.out.backend.readable_parts:
            return
        try:
            self.assembler.abort(self.upload_id)
        finally:
            self.out.delete_tree(self.dir)


class Assemblies:
    """Every shard being assembled in a run, by (output, shard name)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], Assembly] = {}
        self.pending_outs: dict[str, Location] = {}  # the run's outputs whose assemblies hold pending uploads, by display name

    def __len__(self) -> int:
        return len(self.by_key)

    def open(self, out: Location, shard: ShardPlan, parts: list[Part], plan_id: str) -> Assembly:
        asm = Assembly(out, shard, parts, plan_id)
        self.by_key[(out.display, shard.name)] = asm
        return asm

    def split(self, units: list[Unit], unit_size: int, plan_ids: dict[str, str]) -> list[Unit]:
        """Replace each unit whose shard holds more than ``unit_size`` bytes by its parts (one unit
        per part, the siblings' same parts with it) and begin or resume their assemblies (call
        :meth:`abort` if this fails: uploads may have begun). A part an earlier run recorded is a
        unit with that record as ``expected`` (reused, not recomputed). A shard recorded by an
        earlier run stays one unit (its bytes are checked, not recomputed); so does a shard at a
        location that cannot assemble parts. On S3 an earlier run's assembly of a shard that is not
        split now (recorded whole, or another unit size) is aborted and dropped. ``plan_ids``: each
        output's plan id (by display name)."""
        plans: list[tuple[Unit, list[Unit], list[list[Part]]]] = []
        for u in units:
            members = [u, *u.siblings]
            self.pending_outs.update((m.out.display, m.out) for m in members if m.out.backend.pending_uploads)
            at = cuts(u.shard, unit_size, max(m.out.backend.min_part for m in members))
            layouts = [layout(m.shard, at) for m in members]
            split = len(at) > 1 and all(m.expected is None and m.out.backend.splittable for m in members) and all(map(_valid, members, layouts))
            plans.append((u, members if split else [], layouts))
        for out in self.pending_outs.values():
            _drop_assemblies(out, keep={m.shard.name for _, members, _ in plans for m in members if m.out.display == out.display})
        work: list[Unit] = []
        for u, members, layouts in plans:
            if not members:
                work.append(u)
                continue
            asms = [self.open(m.out, m.shard, parts, plan_ids[m.out.display]) for m, parts in zip(members, layouts)]
            for i in range(len(asms[0].parts)):
                units_i = [Unit(m.out, m.label, m.shard, a.records.get(i), part=a.job(a.parts[i])) for m, a in zip(members, asms)]
                units_i[0].siblings = units_i[1:]
                work.append(units_i[0])
        return work

    def take(self, unit: Unit, r: UnitResult) -> UnitResult | None:
        return self.by_key[(unit.out.display, unit.path)].take(r)

    def abort(self) -> None:
        """Abort every unfinished assembly (best effort: the run's own error is the one to report);
        on S3 also any earlier run's upload this run kept for adoption but did not reach, so that a
        failed run leaves no pending upload. Local parts stay for a resume."""
        for asm in self.by_key.values():
            if not asm.done:
                with contextlib.suppress(Exception):
                    asm.abort()
        for out in self.pending_outs.values():
            with contextlib.suppress(Exception):
                _drop_assemblies(out, keep=set())


def _drop_assemblies(out: Location, keep: set[str]) -> None:
    """Abort the upload recorded for each shard under ``out``'s ``.nyxray/parts/`` but those in
    ``keep``, and drop its folder (an upload already gone is nothing to abort)."""
    for name in out.listdir(PARTS_DIR):
        if name in keep:
            continue
        d = f"{PARTS_DIR}/{name}"
        lay = _read(out, f"{d}/{LAYOUT}")
        if lay and lay.get("upload_id"):
            with contextlib.suppress(Exception):
                out.backend.assembler(name, "", []).abort(str(lay["upload_id"]))
        out.delete_tree(d)


def _valid(member: Unit, parts: list[Part]) -> bool:
    """Whether every part but the last is large enough for the member's storage (S3: 5 MiB)."""
    return all(p.size >= member.out.backend.min_part for p in parts[:-1])
