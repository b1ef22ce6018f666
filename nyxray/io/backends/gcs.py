"""Google Cloud Storage (``gs://``, gcsfs): the fsspec fallback, but a file is written at its final
name by gcsfs's own resumable upload, which only appears once closed and can be dropped unfinished
(no temporary object to copy and delete). Shards are not split into parts here (yet: GCS's XML
multipart API would make this backend splittable)."""

from __future__ import annotations

from typing import ClassVar

from .base import Backend, DirectWriter


class GCSBackend(Backend):
    protocols: ClassVar[tuple[str, ...]] = ("gs", "gcs")

    def open_atomic(self, name: str, part_size: int) -> DirectWriter:
        return DirectWriter(self.loc, name, part_size)
