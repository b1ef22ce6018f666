"""Local and shared POSIX file systems (``file``): the backend, and writeback while a file is written.

Atomic files are a hidden temporary file in the same directory, fsynced, then renamed. A shard
split into parts is staged in one preallocated file (``os.pwrite`` of each part at its offset,
fsynced by its worker) renamed into place once every part is in; its parts can be read back, so
a resume checks their bytes. Compare-and-swap runs every change under a short mutex
(``<name>.cas``, created with ``O_EXCL``) that makes check-then-write one step; the object itself
is always written whole to a temporary file and renamed into place, so a reader never sees a
half-written one. (Moving the object aside to check it, the first design, left a moment with no
object at all, in which a third process could create one: two winners.) A mutex older than
``_MUTEX_STALE_S`` belongs to a process that died inside those few lines and is broken.

Writeback: a shard (or part) is fsynced before the driver records it, and without help the kernel leaves most
of its pages dirty until then: the worker then waits at ``fsync`` for the whole file's writeback,
its math and the disk taking turns. Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` queues the
writeback of a range without waiting for it, so the disk works while the next tensors are computed
and the final ``fsync`` (still what makes the bytes durable) finds little left. Elsewhere this does
nothing and the ``fsync`` does it all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import NyxrayError, StorageError
from .base import Assembler, Backend, FileWriter, Part, PartJob, digest, tmp_name

if TYPE_CHECKING:
    from ..location import Location

STEP = 32 * 2**20  # bytes written between two writeback requests
SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


class Writeback:
    """Queues the writeback of ``fd``'s bytes from ``start`` on, every :data:`STEP` bytes written."""

    def __init__(self, fd: int, start: int = 0):
        self.fd, self.queued = fd, start
        self.call = _sync_file_range() if sys.platform.startswith("linux") else None

    def wrote(self, end: int) -> None:
        """The file's bytes up to ``end`` are written (to the page cache)."""
        if self.call is not None and end - self.queued >= STEP:
            self.call(self.fd, self.queued, end - self.queued, SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start
            self.queued = end


class LocalBackend(Backend):
    protocols: ClassVar[tuple[str, ...]] = ("file",)
    splittable: ClassVar[bool] = True
    readable_parts: ClassVar[bool] = True

    def read_range(self, path: str, start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def makedirs(self) -> None:
        try:
            os.makedirs(self.loc.root, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{self.loc.display}: cannot create the output directory: {e.strerror}") from None

    def open_atomic(self, name: str, part_size: int) -> LocalWriter:
        return LocalWriter(self.loc, name)

    def part_writer(self, name: str, job: PartJob) -> LocalPartWriter:
        return LocalPartWriter(self.loc, job.file, job.part.start)

    def assembler(self, name: str, staging: str, parts: list[Part]) -> LocalAssembler:
        return LocalAssembler(self.loc, name, staging, parts)

    def cas_create(self, name: str, data: bytes) -> str | None:
        path = self.loc.path(name)
        with _mutex(path):
            if os.path.exists(path):
                return None
            return _write_whole(path, data)

    def cas_replace(self, name: str, data: bytes, version: str) -> str | None:
        path = self.loc.path(name)
        with _mutex(path):
            if _version(path) != version:
                return None
            return _write_whole(path, data)

    def cas_delete(self, name: str, version: str) -> bool:
        path = self.loc.path(name)
        with _mutex(path):
            if _version(path) != version:
                return False
            os.unlink(path)
            return True


class LocalWriter(FileWriter):
    """A hidden temporary file in the final file's directory, fsynced and renamed on commit."""

    def __init__(self, loc: Location, name: str):
        self.loc, self.name, self.done, self.written = loc, name, False, 0
        self.final = loc.path(name)
        self.tmp = tmp_name(self.final)
        try:
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            self.f = open(self.tmp, "wb")
        except OSError as e:
            raise StorageError(f"{loc.url(name)}: cannot write: {e.strerror}") from None
        self.writeback = Writeback(self.f.fileno())

    def write(self, data: bytes | memoryview) -> None:
        super().write(data)
        self.writeback.wrote(self.written)

    def commit(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.final)
        except OSError as e:
            raise StorageError(f"{self.loc.url(self.name)}: cannot commit: {e.strerror}") from None
        self.done = True

    def _drop(self) -> None:
        self.f.close()
        os.unlink(self.tmp)


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


class LocalAssembler(Assembler):
    """Parts written at their offsets into a preallocated staging file, renamed into place at the end."""

    def adopt(self, upload_id: str, records: dict[int, dict]) -> bool:
        return self.loc.exists(self.staging)  # each recorded part's bytes are checked by its worker

    def begin(self) -> str:
        path = self.loc.path(self.staging)
        size = self.parts[-1].end
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)  # the space is there before any part is computed
                except OSError as e:
                    if e.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a file system without it
                        raise
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as e:
            raise NyxrayError(f"{self.loc.url(self.staging)}: cannot preallocate {size} bytes: {e.strerror}") from None
        return ""

    def job(self, upload_id: str, part: Part) -> PartJob:
        return PartJob(part, file=self.staging)

    def complete(self, upload_id: str, receipts: list[dict[str, Any]]) -> None:
        try:
            os.replace(self.loc.path(self.staging), self.loc.path(self.name))
        except OSError as e:
            raise NyxrayError(f"{self.loc.url(self.name)}: cannot move the assembled shard into place: {e.strerror}") from None


_MUTEX_STALE_S = 10.0


@contextlib.contextmanager
def _mutex(path: str) -> Iterator[None]:
    """Hold ``<path>.cas`` while checking and changing ``path`` (a few file operations)."""
    lock = f"{path}.cas"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    deadline = time.monotonic() + 4 * _MUTEX_STALE_S
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime > _MUTEX_STALE_S:
                    os.unlink(lock)  # its holder died mid-change
                    continue
            if time.monotonic() > deadline:
                raise StorageError(f"{lock}: held for over {4 * _MUTEX_STALE_S:.0f} s; remove it if no nyxray run is writing here") from None
            time.sleep(0.002)
    try:
        yield
    finally:
        os.unlink(lock)


def _version(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return digest(f.read())
    except FileNotFoundError:
        return None


def _write_whole(path: str, data: bytes) -> str:
    """Write ``path`` whole (a temporary file renamed into place); its version."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.new"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"{path}: cannot write: {e.strerror}") from None
    return digest(data)
