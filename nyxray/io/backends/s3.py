"""S3 (``s3://``, ``s3a://``, s3fs): the backend, and every line of nyxray that knows S3.

- Atomic files and sub-shard parts are multipart uploads with several parts in flight (below);
  a shard split into parts is one upload, begun, adopted, completed or aborted by the driver
  (:class:`S3Assembler`); nothing of a pending upload can be read back.
- Compare-and-swap (the output lease): ``PutObject`` with ``If-None-Match: *`` (create) or
  ``If-Match: <ETag>`` (replace), and ``DeleteObject`` with ``If-Match``. AWS S3 and SeaweedFS
  honour them (a refused condition is ``412 PreconditionFailed``; AWS may answer ``409`` to a
  concurrent conditional write, which is treated the same). A server that ignores the headers
  degrades to last-writer-wins. A version is the ETag.
- Partial writes are pending multipart uploads (never completed, so invisible).

Multipart uploads with several parts in flight at once: s3fs's file object uploads a file's parts one after another, so a shard moves at the speed of one
request; against a remote store that is a fraction of what the link carries. Here the writer copies
each write into the current part buffer and hands every full part to a small thread pool: at most
``concurrency`` parts of an upload, and ``PROCESS_INFLIGHT`` parts of all uploads of the process,
are in flight: memory stays bounded whatever the shard size and however many shards a sweep writes
at once. The object appears only when :meth:`MultipartUpload.close` completes the upload (parts in
order); :meth:`MultipartUpload.discard` aborts it. A failed or killed writer never leaves a partial
object under the final name (a killed one leaves a pending upload, which
``Location.remove_partial_writes`` aborts, unless the next run adopts it: below).

The three phases are separate so that a shard split into parts (:mod:`nyxray.output.parts`) is one
upload: :func:`begin` on the driver, :class:`PartUploader` (``put part``, no other side effect) on
any worker, :func:`complete` or :func:`abort` on the driver. :func:`list_parts` lets the driver of
a resumed run check what a killed run's upload still holds before it adopts it
(:mod:`nyxray.output.assemble`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import NyxrayError, StorageError
from ..retry import with_retries
from .base import DEFAULT_PART, Assembler, Backend, DirectWriter, Part, PartJob

if TYPE_CHECKING:
    from ..location import Location

MIN_PART = 5 * 2**20  # S3 refuses smaller parts (except the last)
MAX_PARTS = 10_000  # part numbers of one upload
CONCURRENCY = 4  # parts in flight per upload
PROCESS_INFLIGHT = 8  # parts in flight in this process, all uploads together (a sweep writes K shards at once)
_SLOTS = threading.BoundedSemaphore(PROCESS_INFLIGHT)


class PartUploader:
    """Uploads one run of bytes as consecutive parts (numbers from ``first_number``) of an upload.

    It never creates, completes or aborts the upload: with ``upload_id`` given it is the ``put
    part`` phase of an upload the driver began and will complete (a sub-shard part on a worker:
    :mod:`nyxray.output.parts`); :class:`MultipartUpload` adds the other two phases for a whole object.
    Every part but the last of the run is ``part_size`` bytes.
    """

    def __init__(
        self,
        fs: Any,
        path: str,
        part_size: int,
        url: str,
        options: dict[str, Any],
        concurrency: int = CONCURRENCY,
        upload_id: str | None = None,
        first_number: int = 1,
    ):
        self.fs, self.path, self.url, self.options = fs, path, url, options
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_size = max(part_size, MIN_PART)
        self.part = bytearray(self.part_size)
        self.filled = 0
        self.size = 0
        self.upload_id = upload_id
        self.parts = first_number - 1  # the last part number used
        self.etags: dict[int, str] = {}
        self.inflight: deque[Future] = deque()
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="nyxray-upload")
        self.concurrency = concurrency
        self.closed = False  # as a file object's: set once completed or aborted

    def _call(self, method: str, **kwargs: Any) -> dict:
        return with_retries(lambda: self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs), self.url, self.options)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), self.part_size - self.filled)
            self.part[self.filled : self.filled + n] = view[:n]
            self.filled += n
            self.size += n
            view = view[n:]
            if self.filled == self.part_size:
                self._send(self.part)  # the pool owns this buffer now; the next part gets a new one
                self.part, self.filled = bytearray(self.part_size), 0

    def _begin(self) -> None:
        """Create the upload before its first part (only a whole object's writer may)."""
        raise AssertionError(f"{self.url}: a part uploader needs the upload id of an upload begun by the driver")

    def _send(self, body: bytearray) -> None:
        if self.upload_id is None:
            self._begin()
        while len(self.inflight) >= self.concurrency or (self.inflight and self.inflight[0].done()):
            self.inflight.popleft().result()  # back-pressure; raises the part's error
        _SLOTS.acquire()
        self.parts += 1
        try:
            part = self.pool.submit(self._upload_part, self.parts, body)
        except BaseException:
            _SLOTS.release()
            raise
        part.add_done_callback(lambda _: _SLOTS.release())  # also on cancel (discard)
        self.inflight.append(part)

    def _upload_part(self, number: int, body: bytearray) -> None:
        out = self._call("upload_part", UploadId=self.upload_id, PartNumber=number, Body=body)
        self.etags[number] = out["ETag"]

    def flush(self) -> dict[int, str]:
        """Send what is left and wait for every part: returns part number -> ETag."""
        try:
            if self.filled:
                self._send(self.part[: self.filled])
                self.filled = 0
            while self.inflight:
                self.inflight.popleft().result()
        finally:
            self.pool.shutdown(wait=True)
        return dict(self.etags)

    def cancel(self) -> None:
        """Stop sending (parts already sent stay in the upload until its owner aborts it)."""
        for f in self.inflight:
            f.cancel()
        self.pool.shutdown(wait=True)
        self.closed = True


class MultipartUpload(PartUploader):
    """One object written through S3's multipart API (``fs``: an s3fs filesystem), all three phases."""

    def __init__(self, fs: Any, path: str, part_size: int, url: str, options: dict[str, Any], concurrency: int = CONCURRENCY):
        super().__init__(fs, path, part_size, url, options, concurrency)

    def _begin(self) -> None:
        self.upload_id = begin(self.fs, self.path, self.url, self.options)

    def close(self) -> None:
        """Upload what is left and complete the upload: the object appears whole, now. (A file
        object's ``close``, so that callers treat it like s3fs's.)"""
        if self.upload_id is None:  # a small object: one PUT
            try:
                self._call("put_object", Body=bytes(self.part[: self.filled]))
            finally:
                self.pool.shutdown(wait=True)
        else:
            etags = self.flush()
            complete(self.fs, self.path, self.upload_id, etags, self.size, self.url, self.options)
        self.closed = True

    def discard(self) -> None:
        """Abort: no object appears; parts already sent are dropped by the store."""
        self.cancel()
        if self.upload_id is not None:
            abort(self.fs, self.path, self.upload_id, self.url, self.options)


def _call(fs: Any, path: str, url: str, options: dict[str, Any], method: str, **kwargs: Any) -> dict:
    bucket, key, _ = fs.split_path(path)
    return with_retries(lambda: fs.call_s3(method, Bucket=bucket, Key=key, **kwargs), url, options)


def begin(fs: Any, path: str, url: str, options: dict[str, Any]) -> str:
    """Create a multipart upload for ``path``; returns its upload id."""
    return _call(fs, path, url, options, "create_multipart_upload")["UploadId"]


def complete(fs: Any, path: str, upload_id: str, etags: dict[int, str], size: int, url: str, options: dict[str, Any]) -> None:
    """Complete the upload from its parts (number -> ETag): the object appears whole, now."""
    parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
    try:
        _call(fs, path, url, options, "complete_multipart_upload", UploadId=upload_id, MultipartUpload={"Parts": parts})
    except StorageError:
        # A retry after a lost answer is told NoSuchUpload (the first attempt did complete it):
        # success if the object there is this very upload.
        if not _landed(fs, path, parts, size):
            raise
    fs.invalidate_cache(path)


def abort(fs: Any, path: str, upload_id: str, url: str, options: dict[str, Any]) -> None:
    """Abort the upload: no object appears; its parts are dropped by the store."""
    _call(fs, path, url, options, "abort_multipart_upload", UploadId=upload_id)


def list_parts(fs: Any, path: str, upload_id: str, url: str, options: dict[str, Any]) -> dict[int, list[tuple[str, int]]] | None:
    """The parts an upload holds (ListParts, every page): part number -> ``(ETag, size)`` of each
    copy listed (a store may list a part number sent twice more than once); None when the upload
    does not exist (aborted or completed)."""
    bucket, key, _ = fs.split_path(path)
    out: dict[int, list[tuple[str, int]]] = {}
    marker = 0

    def page() -> dict | None:
        try:
            return fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=upload_id, **({"PartNumberMarker": marker} if marker else {}))
        except FileNotFoundError:  # NoSuchUpload
            return None

    while True:
        got = with_retries(page, url, options)
        if got is None:
            return None
        for p in got.get("Parts", []) or []:
            out.setdefault(int(p["PartNumber"]), []).append((str(p["ETag"]).strip('"'), int(p["Size"])))
        nxt = int(got.get("NextPartNumberMarker") or 0)
        if not got.get("IsTruncated") or nxt <= marker:
            return out
        marker = nxt


def _landed(fs: Any, path: str, parts: list[dict], size: int) -> bool:
    """Whether the object at the key is this upload: S3's multipart ETag is the MD5 of the
    parts' MD5s, "-", the part count; no other write produces it."""
    digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
    expected = f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except Exception:  # noqa: BLE001 - not there (or unreadable): it did not land
        return False
    return str(info.get("ETag", "")).strip('"') == expected and int(info.get("size", -1)) == size


def s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options from the user's plus the environment: endpoint, retries with backoff."""
    out = dict(options)
    endpoint = out.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    ck = dict(out.get("client_kwargs") or {})
    if endpoint:
        ck.setdefault("endpoint_url", endpoint)
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        ck.setdefault("region_name", region)
    if ck:
        out["client_kwargs"] = ck
    cfg = dict(out.get("config_kwargs") or {})
    cfg.setdefault("retries", {"max_attempts": 5, "mode": "standard"})
    cfg.setdefault("connect_timeout", 5)
    cfg.setdefault("read_timeout", 60)
    out["config_kwargs"] = cfg
    return out


class S3Backend(Backend):
    protocols: ClassVar[tuple[str, ...]] = ("s3", "s3a")
    splittable: ClassVar[bool] = True
    min_part: ClassVar[int] = MIN_PART
    pending_uploads: ClassVar[bool] = True

    @classmethod
    def storage_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return s3_options(options)

    def open_atomic(self, name: str, part_size: int) -> S3Writer:
        return S3Writer(self.loc, name, part_size)

    def part_writer(self, name: str, job: PartJob) -> S3PartWriter:
        return S3PartWriter(self.loc, name, job)

    def assembler(self, name: str, staging: str, parts: list[Part]) -> S3Assembler:
        return S3Assembler(self.loc, name, staging, parts)

    def remove_partial_writes(self, keep: set[str]) -> int:
        """Also abort the location's pending multipart uploads but those whose id is in ``keep``."""
        removed = super().remove_partial_writes(keep)
        bucket, _, prefix = self.loc.root.partition("/")
        under = f"{prefix}/" if prefix else ""  # the location's keys (all of the bucket at its root)

        def abort_pending() -> int:
            n = 0
            for up in self._pending(bucket, under):
                if up["Key"].startswith(under) and up["UploadId"] not in keep:
                    self.loc.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
            return n

        return removed + with_retries(abort_pending, self.loc.display, self.loc.options)

    def _pending(self, bucket: str, under: str) -> list[dict]:
        ups, kw = [], {"Bucket": bucket, "Prefix": under}
        while True:
            page = self.loc.fs.call_s3("list_multipart_uploads", **kw)
            ups += page.get("Uploads", []) or []
            if not page.get("IsTruncated") or not page.get("NextKeyMarker"):
                return ups
            kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page.get("NextUploadIdMarker", ""))

    def cas_create(self, name: str, data: bytes) -> str | None:
        return self._put(name, data, IfNoneMatch="*")

    def cas_read(self, name: str) -> tuple[bytes, str] | None:
        """Content and ETag of one GET (so they belong together)."""
        from fsspec.asyn import sync

        bucket, key = self._key(name)
        fs = self.loc.fs

        async def get() -> tuple[bytes, str] | None:
            try:
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None
            async with resp["Body"] as body:
                return await body.read(), str(resp["ETag"])

        return with_retries(lambda: sync(fs.loop, get), self.loc.url(name), self.loc.options)

    def cas_replace(self, name: str, data: bytes, version: str) -> str | None:
        return self._put(name, data, IfMatch=version)

    def cas_delete(self, name: str, version: str) -> bool:
        return self._conditional(name, "delete_object", IfMatch=version) is not None

    def _key(self, name: str) -> tuple[str, str]:
        bucket, _, key = self.loc.path(name).partition("/")
        return bucket, key

    def _put(self, name: str, data: bytes, **condition: str) -> str | None:
        resp = self._conditional(name, "put_object", Body=data, **condition)
        return None if resp is None else str(resp["ETag"])

    def _conditional(self, name: str, method: str, **kwargs: Any) -> dict | None:
        """A conditional S3 call; None when its condition does not hold (412, or 409 for a
        concurrent conditional write)."""
        bucket, key = self._key(name)

        def call() -> dict | None:
            try:
                return self.loc.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
            except Exception as e:  # noqa: BLE001 - s3fs wraps botocore's errors in several ways
                if _refused(e):
                    return None
                raise

        return with_retries(call, self.loc.url(name), self.loc.options)


def _refused(e: BaseException) -> bool:
    """Whether an S3 error says "your condition does not hold" (s3fs keeps botocore's error as
    the cause of the OSError it raises)."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None) or {}
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return True
    return False


class S3Writer(DirectWriter):
    """A whole file as nyxray's own multipart upload (s3fs sends a file's parts one by one)."""

    def _open(self, part_size: int) -> MultipartUpload:
        return MultipartUpload(self.loc.fs, self.final, part_size, self.loc.url(self.name), self.loc.options)


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
    if first - 1 > MAX_PARTS:
        raise NyxrayError(f"a shard of {parts[-1].end} bytes needs {first - 1} S3 parts (at most {MAX_PARTS}); use a larger --unit-size")
    return out


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


class S3Assembler(Assembler):
    """The parts of one multipart upload: begun (or a killed run's adopted) here, put by workers,
    completed or aborted here. A pending upload cannot be read: adoption checks with ListParts
    that each recorded part's S3 part numbers are there with the recorded ETags and sizes."""

    def __init__(self, loc: Location, name: str, staging: str, parts: list[Part]):
        super().__init__(loc, name, staging, parts)
        self.numbers = s3_numbers(parts)
        self.path, self.url = loc.path(name), loc.url(name)

    def adopt(self, upload_id: str, records: dict[int, dict]) -> bool:
        if not upload_id:
            return False
        listed = list_parts(self.loc.fs, self.path, upload_id, self.url, self.loc.options)
        if listed is None:
            return False  # gone (aborted or completed): nothing to adopt or abort
        if self._holds(listed, records):
            return True
        with contextlib.suppress(Exception):  # parts that differ from their records: never to be completed
            self.abort(upload_id)
        return False

    def _holds(self, listed: dict[int, list[tuple[str, int]]], records: dict[int, dict]) -> bool:
        """Whether an upload's ``listed`` parts (ListParts) hold every recorded part: each of the
        part's S3 part numbers with the recorded ETag and the size the layout gives it."""
        for i, rec in records.items():
            piece, count = s3_pieces(self.parts[i].size)
            first = self.numbers[i]
            sizes = {first + k: min(piece, self.parts[i].size - k * piece) for k in range(count)}
            try:
                etags = {int(n): str(tag).strip('"') for n, tag in rec["receipt"]["etags"]}
            except (KeyError, TypeError, ValueError):
                return False
            if set(etags) != set(sizes) or any(not listed.get(n) or any(got != (etags[n], sizes[n]) for got in listed[n]) for n in sizes):
                return False
        return True

    def begin(self) -> str:
        return begin(self.loc.fs, self.path, self.url, self.loc.options)

    def job(self, upload_id: str, part: Part) -> PartJob:
        return PartJob(part, upload_id=upload_id, first_number=self.numbers[part.index])

    def complete(self, upload_id: str, receipts: list[dict[str, Any]]) -> None:
        etags = {n: tag for r in receipts for n, tag in r.get("etags", [])}
        complete(self.loc.fs, self.path, upload_id, etags, self.parts[-1].end, self.url, self.loc.options)

    def abort(self, upload_id: str) -> None:
        abort(self.loc.fs, self.path, upload_id, self.url, self.loc.options)
