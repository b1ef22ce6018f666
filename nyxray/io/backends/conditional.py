"""Compare-and-swap on one small object of a :class:`~nyxray.io.location.Location` (the output lease).

Every change is conditional on what the caller last saw, so two processes can never both believe
they created or replaced the object:

* S3: ``PutObject`` with ``If-None-Match: *`` (create) or ``If-Match: <ETag>`` (replace), and
  ``DeleteObject`` with ``If-Match``. AWS S3 and SeaweedFS honour them (a refused condition is
  ``412 PreconditionFailed``; AWS may answer ``409`` to a concurrent conditional write, which is
  treated the same). A server that ignores the headers degrades to last-writer-wins.
* Local files: every change runs under a short mutex (``<name>.cas``, created with ``O_EXCL``)
  that makes check-then-write one step; the object itself is always written whole to a temporary
  file and renamed into place, so a reader never sees a half-written one. (Moving the object
  aside to check it, the first design, left a moment with no object at all, in which a third
  process could create one: two winners.) A mutex older than ``_MUTEX_STALE_S`` belongs to a
  process that died inside those few lines and is broken.
* Other fsspec backends: check, then write (best effort; not atomic).

A version is opaque: the ETag on S3, the sha256 of the content elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ...errors import StorageError
from ..location import Location, with_retries

S3 = ("s3", "s3a")


def create(loc: Location, name: str, data: bytes) -> str | None:
    """Write ``name`` only if it does not exist; its version, or None when it already exists."""
    if loc.protocol in S3:
        return _s3_put(loc, name, data, IfNoneMatch="*")
    if loc.is_local:
        return _local_create(loc.path(name), data)
    if loc.exists(name):
        return None
    loc.write_atomic(name, data)
    return _digest(data)


def read(loc: Location, name: str) -> tuple[bytes, str] | None:
    """``(content, version)`` of ``name``, or None when it does not exist."""
    if loc.protocol in S3:
        return _s3_get(loc, name)
    if not loc.exists(name):
        return None
    try:
        data = loc.read(name)
    except Exception:  # noqa: BLE001 - removed between the two calls
        return None
    return data, _digest(data)


def replace(loc: Location, name: str, data: bytes, version: str) -> str | None:
    """Overwrite ``name`` only if it is still at ``version``; the new version, or None."""
    if loc.protocol in S3:
        return _s3_put(loc, name, data, IfMatch=version)
    if loc.is_local:
        path = loc.path(name)
        with _mutex(path):
            if _local_version(path) != version:
                return None
            return _local_write(path, data)
    current = read(loc, name)
    if current is None or current[1] != version:
        return None
    loc.write_atomic(name, data)
    return _digest(data)


def delete(loc: Location, name: str, version: str) -> bool:
    """Remove ``name`` only if it is still at ``version``; whether it was removed."""
    if loc.protocol in S3:
        return _s3_call(loc, name, "delete_object", IfMatch=version) is not None
    if loc.is_local:
        path = loc.path(name)
        with _mutex(path):
            if _local_version(path) != version:
                return False
            os.unlink(path)
            return True
    current = read(loc, name)
    if current is None or current[1] != version:
        return False
    loc.delete(name)
    return True


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def _local_version(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return _digest(f.read())
    except FileNotFoundError:
        return None


def _local_write(path: str, data: bytes) -> str:
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
    return _digest(data)


def _local_create(path: str, data: bytes) -> str | None:
    with _mutex(path):
        if os.path.exists(path):
            return None
        return _local_write(path, data)


def _s3_key(loc: Location, name: str) -> tuple[str, str]:
    bucket, _, key = loc.path(name).partition("/")
    return bucket, key


def _s3_call(loc: Location, name: str, method: str, **kwargs: Any) -> dict | None:
    """A conditional S3 call; None when its condition does not hold (412, or 409 for a
    concurrent conditional write)."""
    bucket, key = _s3_key(loc, name)

    def call() -> dict | None:
        try:
            return loc.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except Exception as e:  # noqa: BLE001 - s3fs wraps botocore's errors in several ways
            if _refused(e):
                return None
            raise

    return with_retries(call, loc.url(name), loc.options)


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


def _s3_put(loc: Location, name: str, data: bytes, **condition: str) -> str | None:
    resp = _s3_call(loc, name, "put_object", Body=data, **condition)
    return None if resp is None else str(resp["ETag"])


def _s3_get(loc: Location, name: str) -> tuple[bytes, str] | None:
    """Content and ETag of one GET (so they belong together)."""
    from fsspec.asyn import sync

    bucket, key = _s3_key(loc, name)

    async def get() -> tuple[bytes, str] | None:
        try:
            resp = await loc.fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        async with resp["Body"] as body:
            return await body.read(), str(resp["ETag"])

    return with_retries(lambda: sync(loc.fs.loop, get), loc.url(name), loc.options)
