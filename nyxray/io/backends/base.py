"""The primitives a storage backend implements, and the fsspec fallback every other backend refines.

Everything above :mod:`nyxray.io.backends` (atomic writes, sub-shard parts and their assembly, the
output lease, cleanup at claim) is written once against :class:`Backend`, as fsspec builds its file
systems on a few methods. A backend is bound to one :class:`~nyxray.io.location.Location`:

- :meth:`Backend.open_atomic`: a writer whose file appears whole on ``commit`` or not at all;
- :meth:`Backend.part_writer` and :meth:`Backend.assembler` (begin / adopt / complete / abort):
  a shard assembled from parts written by different workers;
- ``cas_create`` / ``cas_read`` / ``cas_replace`` / ``cas_delete``: compare-and-swap on one small
  object (the output lease); a version is opaque to callers;
- :meth:`Backend.remove_partial_writes`: what killed writers left behind;
- capabilities, as class attributes: ``splittable``, ``min_part``, ``readable_parts``,
  ``pending_uploads``.

This base class is the fallback for any fsspec file system (``memory://``, ``hf://``, ...): a
temporary name moved into place, and compare-and-swap as check-then-write (best effort, not atomic).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ...errors import NyxrayError, StorageError
from ..retry import describe, redact, with_retries

if TYPE_CHECKING:
    from ..location import Location

DEFAULT_PART = 16 * 2**20  # bytes per part of an upload, unless the caller or the storage options say otherwise
TMP_MARK = ".nyxray-"  # hidden temporary names carry it (and end in .tmp): remove_partial_writes finds them


def tmp_name(path: str) -> str:
    """A hidden temporary name beside ``path`` (same directory, so a rename is cheap)."""
    head, _, base = path.rpartition("/")
    return f"{head}/.{base}{TMP_MARK}{uuid.uuid4().hex[:8]}.tmp"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


@dataclass(frozen=True)
class PartJob:
    """What a worker needs to put one part's bytes in place: the part, and where its bytes go.
    ``file``: a staging file under the output that takes the part at its offset (it can be read
    back, so a resume checks the bytes); or ``upload_id``/``first_number``: the store's own
    assembly and the first of the part's numbers in it (nothing of it can be read back)."""

    part: Part
    file: str = ""
    upload_id: str = ""
    first_number: int = 0

    def open(self, out: Location, name: str) -> PartWriter:
        return out.backend.part_writer(name, self)


class Writer(Protocol):
    """What every writer of a file or a part offers (``receipt``: what the driver must keep to
    complete an assembly with this part, or None)."""

    written: int

    def write(self, data: bytes | memoryview) -> None: ...
    def commit(self) -> None: ...
    def discard(self) -> None: ...


class PartWriter(Writer, Protocol):
    receipt: dict[str, Any] | None


class Assembler:
    """Begin, adopt, complete or abort the assembly of one shard ``name`` from ``parts`` (on the
    driver). ``staging``: a name under the output that a backend may use to stage the parts."""

    def __init__(self, loc: Location, name: str, staging: str, parts: list[Part]):
        self.loc, self.name, self.staging, self.parts = loc, name, staging, parts

    def adopt(self, upload_id: str, records: dict[int, dict]) -> bool:
        """Whether an earlier run's assembly of the same layout (``upload_id``, "" when the store
        gives none) still holds every recorded part; if so it is this one's now. One that is there
        but differs is aborted."""
        return False

    def begin(self) -> str:
        """Begin a new assembly; the id the store gives it ("" when none), recorded before any part is put."""
        raise NyxrayError(f"{self.loc.url(self.name)}: this storage cannot assemble a file from parts")

    def job(self, upload_id: str, part: Part) -> PartJob:
        raise NotImplementedError

    def complete(self, upload_id: str, receipts: list[dict[str, Any]]) -> None:
        """Make the shard appear under its final name, whole (``receipts``: the parts' writers')."""
        raise NotImplementedError

    def abort(self, upload_id: str) -> None:
        """Leave nothing pending in the store (staged parts that can be read back stay for a resume)."""


class Backend:
    """One storage's primitives, bound to a location (see the module docstring)."""

    protocols: ClassVar[tuple[str, ...]] = ()
    splittable: ClassVar[bool] = False  # a shard can be assembled from parts written by several workers
    min_part: ClassVar[int] = 1  # bytes: the smallest part but the last
    readable_parts: ClassVar[bool] = False  # parts of an unfinished assembly can be read back (a resume checks them)
    pending_uploads: ClassVar[bool] = False  # an unfinished assembly holds storage outside the files (to adopt or abort)
    assembler_class: ClassVar[type[Assembler]] = Assembler

    def __init__(self, loc: Location):
        self.loc = loc

    @classmethod
    def storage_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The fsspec options for a location from the user's (a backend may add defaults)."""
        return options

    # -- reads ---------------------------------------------------------------------------------
    def read_range(self, path: str, start: int, end: int) -> bytes:
        fs = self.loc.fs
        if start == end:
            return b""
        if hasattr(fs, "_cat_file"):  # async backends (s3fs, gcsfs, http): exact ranged GET
            return fs.cat_file(path, start=start, end=end)
        with fs.open(path, "rb", cache_type="none") as f:
            f.seek(start)
            return f.read(end - start)

    # -- whole files ---------------------------------------------------------------------------
    def makedirs(self) -> None:
        """Create the location (object stores need nothing)."""

    def open_atomic(self, name: str, part_size: int) -> Writer:
        return FileWriter(self.loc, name, part_size)

    def remove_partial_writes(self, keep: set[str]) -> int:
        """Remove hidden temporary files of killed writers (and a store's pending uploads, but
        those in ``keep``); how many. Only when no writer of this location runs."""
        removed = 0
        for f in self.loc.listdir():
            if f.startswith(".") and TMP_MARK in f and f.endswith(".tmp"):
                self.loc.delete(f)
                removed += 1
        return removed

    # -- parts ---------------------------------------------------------------------------------
    def part_writer(self, name: str, job: PartJob) -> PartWriter:
        raise NyxrayError(f"{self.loc.url(name)}: this storage cannot write a part of a file")

    def assembler(self, name: str, staging: str, parts: list[Part]) -> Assembler:
        return self.assembler_class(self.loc, name, staging, parts)

    # -- compare-and-swap on one small object --------------------------------------------------
    def cas_create(self, name: str, data: bytes) -> str | None:
        """Write ``name`` only if it does not exist; its version, or None when it already exists."""
        if self.loc.exists(name):
            return None
        self.loc.write_atomic(name, data)
        return digest(data)

    def cas_read(self, name: str) -> tuple[bytes, str] | None:
        """``(content, version)`` of ``name``, or None when it does not exist."""
        if not self.loc.exists(name):
            return None
        try:
            data = self.loc.read(name)
        except Exception:  # noqa: BLE001 - removed between the two calls
            return None
        return data, digest(data)

    def cas_replace(self, name: str, data: bytes, version: str) -> str | None:
        """Overwrite ``name`` only if it is still at ``version``; the new version, or None."""
        current = self.cas_read(name)
        if current is None or current[1] != version:
            return None
        self.loc.write_atomic(name, data)
        return digest(data)

    def cas_delete(self, name: str, version: str) -> bool:
        """Remove ``name`` only if it is still at ``version``; whether it was removed."""
        current = self.cas_read(name)
        if current is None or current[1] != version:
            return False
        self.loc.delete(name)
        return True


class FileWriter:
    """An fsspec file object that becomes the final file only on :meth:`commit`: under a temporary
    name moved into place, or (``direct``) written at the final name by a store whose upload only
    appears once closed and can be dropped unfinished."""

    direct = False

    def __init__(self, loc: Location, name: str, part_size: int):
        self.loc, self.name, self.done, self.written = loc, name, False, 0
        self.final = loc.path(name)
        self.tmp = self.final if self.direct else tmp_name(self.final)
        self.f = self._open(part_size)

    def _open(self, part_size: int) -> Any:
        kwargs = {"block_size": part_size} if self.direct else {}
        return with_retries(lambda: self.loc.fs.open(self.tmp, "wb", **kwargs), self.loc.url(self.name), self.loc.options)

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise StorageError(redact(f"{self.loc.url(self.name)}: write failed: {describe(e)}", self.loc.options)) from None
        self.written += len(data)

    def commit(self) -> None:
        url = self.loc.url(self.name)
        try:
            self.f.close()
        except StorageError:
            self.discard()
            raise
        except Exception as e:  # noqa: BLE001
            self.discard()
            raise StorageError(redact(f"{url}: upload failed: {describe(e)}", self.loc.options)) from None
        if not self.direct:
            with_retries(lambda: self.loc.fs.mv(self.tmp, self.final), url, self.loc.options)
        self.done = True

    def discard(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._drop()
        except Exception:  # noqa: BLE001 - best effort: the final name was never written
            pass

    def _drop(self) -> None:
        self.f.close()
        self.loc.fs.rm_file(self.tmp)


class DirectWriter(FileWriter):
    """Written at the final name by a store whose upload appears whole on close and is dropped by
    ``discard`` (no temporary object to copy and delete)."""

    direct = True

    def _drop(self) -> None:
        if not hasattr(self.f, "discard"):
            super()._drop()
            return
        self.f.discard()
        self.f.closed = True  # else a store file's finaliser would try to upload the (gone) buffer
