"""Storage backends: one module per storage, each implementing the primitives of :mod:`.base`.

The catalogue below is the one place that chooses a location's backend, by its protocol; any
other fsspec protocol gets the fallback (:class:`.base.Backend`). Adding a storage (GCS
multipart, a Hub backend) is one new module and one record here.
"""

from __future__ import annotations

from .base import Backend
from .gcs import GCSBackend
from .local import LocalBackend
from .s3 import S3Backend

BACKENDS: tuple[type[Backend], ...] = (LocalBackend, S3Backend, GCSBackend)


def backend_class(protocol: str) -> type[Backend]:
    """The backend of a location's ``protocol`` (the fsspec fallback when none is declared)."""
    for cls in BACKENDS:
        if protocol in cls.protocols:
            return cls
    return Backend
