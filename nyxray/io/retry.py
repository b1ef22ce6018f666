"""Retries of storage calls, and the redaction that keeps credentials out of their errors.

Its own module so that :mod:`nyxray.io.location` and :mod:`nyxray.io.backends.s3` (which storage's atomic
writer uses for S3) both import it without importing each other.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..errors import StorageError

T = TypeVar("T")

SECRET_KEYS = re.compile(r"(secret|token|password|passwd|key|credential|session)", re.I)
RETRIES = 3  # on top of the backend's own (botocore and s3fs each retry too): keep the product small


def redact(text: str, options: dict[str, Any] | None = None) -> str:
    """Remove credentials from a message: URL user-info and any secret option value."""
    text = re.sub(r"(\w+://)[^/@\s]*@", r"\1***@", text)
    for value in _secret_values(options or {}):
        text = text.replace(value, "***")
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _secret_values(options: dict[str, Any]) -> Iterable[str]:
    for k, v in options.items():
        if isinstance(v, dict):
            yield from _secret_values(v)
        elif isinstance(v, str) and len(v) >= 4 and SECRET_KEYS.search(str(k)) and not k.endswith("url"):
            yield v


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    text = f"{type(exc).__name__} {exc}"
    if re.search(r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|NoSuchBucket|NoSuchKey|Forbidden|\b40[0134]\b", text):
        return False
    if isinstance(exc, ConnectionRefusedError) or "Could not connect to the endpoint" in text:
        return False  # nothing listens there; the backend already retried
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or bool(
        re.search(
            r"SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttl|5\d\d|Connection|reset|timed out|ClientPayloadError|ServerDisconnected", text
        )
    )


def with_retries(fn: Callable[[], T], what: str, options: dict[str, Any] | None = None, retries: int = RETRIES) -> T:
    """Run ``fn``; retry transient errors with backoff; turn failures into StorageError."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own types
            if _is_transient(e) and attempt < retries:
                time.sleep(min(4.0, 0.1 * 2**attempt) * (0.5 + random.random()))
                continue
            raise StorageError(redact(f"{what}: {describe(e)}", options)) from None
    raise AssertionError("unreachable")


def describe(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, PermissionError):
        return f"access denied ({e})"
    return f"{type(e).__name__}: {e}"
