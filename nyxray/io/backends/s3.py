"""S3 multipart uploads with several parts in flight at once.

s3fs's file object uploads a file's parts one after another, so a shard moves at the speed of one
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

import hashlib
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ...errors import StorageError
from ..retry import with_retries

MIN_PART = 5 * 2**20  # S3 refuses smaller parts (except the last)
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
