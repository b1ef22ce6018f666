"""Compare-and-swap on one small object of a :class:`~nyxray.storage.Location` (the output lease).

Every change is conditional on what the caller last saw, so two processes can never both believe
they created or replaced the object:

* S3: ``PutObject`` with ``If-None-Match: *`` (create) or ``If-Match: <ETag>`` (replace), and
  ``DeleteObject`` with ``If-Match``. AWS S3 and SeaweedFS honour them (a refused condition is
  ``412 PreconditionFailed``; AWS may answer ``409`` to a concurrent conditional write, which is
  treated the same). A server that ignores the headers degrades to last-writer-wins.
* Local files: create is ``link(2)`` of a complete temporary file (atomic and exclusive, so a
  reader never sees a half-written object); replace and delete first ``rename(2)`` the current
  object to a private name (only one process can win that), check it is still the version the
  caller saw, and put it back when it is not.
* Other fsspec backends: check, then write (best effort; not atomic).

A version is opaque: the ETag on S3, the sha256 of the content elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

from .errors import StorageError
from .storage import Location, with_retries

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
        tomb = _take(loc.path(name), version)
        if tomb is None:
            return None
        new = _local_create(loc.path(name), data)
        os.unlink(tomb)
        return new
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
        tomb = _take(loc.path(name), version)
        if tomb is not None:
            os.unlink(tomb)
        return tomb is not None
    current = read(loc, name)
    if current is None or current[1] != version:
        return False
    loc.delete(name)
    return True


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_create(path: str, data: bytes) -> str | None:
    try:
        return _link_new(path, data)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StorageError(f"{path}: cannot write: {e.strerror}") from None


def _link_new(path: str, data: bytes) -> str | None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.new"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return None
    finally:
        os.unlink(tmp)
    return _digest(data)


def _take(path: str, version: str) -> str | None:
    """Move ``path`` aside if it is at ``version``: the private name it now has, else None (and
    whatever was moved aside by mistake is put back, unless the name was taken again meanwhile)."""
    tomb = f"{path}.{uuid.uuid4().hex[:8]}.old"
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        return None
    with open(tomb, "rb") as f:
        if _digest(f.read()) == version:
            return tomb
    try:
        os.link(tomb, path)
    except FileExistsError:
        pass  # a newer object took the name: the one moved aside has lost (its owner will see it)
    os.unlink(tomb)
    return None


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
