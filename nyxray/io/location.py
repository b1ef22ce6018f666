"""One storage interface over fsspec: locations, ranged and coalesced reads, atomic writes.

Every byte nyxray moves goes through :class:`Location`: local paths, ``file://``, ``s3://``
(s3fs), ``gs://``, ``memory://`` and any other fsspec URL, and Hugging Face repos (resolved by
:mod:`nyxray.plan.sources` to a cache snapshot or an ``hf://`` location). A Location pickles as
(protocol, root, options), so Ray actors rebuild the filesystem on their side.

Errors are turned into :class:`StorageError` messages that name the URL and never carry
credentials. Transient failures (connection resets, throttling, 5xx) are retried with capped
exponential backoff and jitter (:mod:`nyxray.io.retry`).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..errors import StorageError
from .backends.local import Writeback
from .retry import describe, redact, with_retries

COALESCE_CAP = 64 * 2**20  # bytes: one ranged request never asks for more
DEFAULT_PART = 16 * 2**20  # multipart upload part size


@dataclass
class Location:
    """A directory-like place in some storage: ``protocol`` + ``root`` + fsspec ``options``."""

    protocol: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)
    display: str = ""

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/") if self.root not in ("/", "") else self.root
        if not self.display:
            self.display = self.root if self.protocol == "file" else f"{self.protocol}://{self.root}"
        self._fs: Any = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fs"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fs = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                self._fs = fsspec.filesystem(self.protocol, **self.options)
            except (ImportError, ValueError, TypeError) as e:
                raise StorageError(redact(f"{self.display}: cannot use storage {self.protocol!r}: {e}", self.options)) from None
        return self._fs

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"{self.display}: refusing a name that escapes the location: {name!r}")
        return f"{self.root}/{name}" if name else self.root

    def url(self, name: str) -> str:
        return f"{self.display}/{name}" if name else self.display

    def child(self, name: str) -> Location:
        return Location(self.protocol, self.path(name), self.options, self.url(name))

    # -- reads ---------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return with_retries(lambda: bool(self.fs.exists(self.path(name))), self.url(name), self.options)

    def size(self, name: str) -> int:
        return with_retries(lambda: int(self.fs.size(self.path(name))), self.url(name), self.options)

    def read(self, name: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self.path(name)), self.url(name), self.options)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        data = with_retries(lambda: self._read_range(self.path(name), start, end), self.url(name), self.options)
        if len(data) != end - start:
            raise StorageError(f"{self.url(name)}: short read at bytes {start}-{end} ({len(data)} bytes; truncated file?)")
        return data

    def _read_range(self, path: str, start: int, end: int) -> bytes:
        if self.is_local:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        if start == end:
            return b""
        if hasattr(self.fs, "_cat_file"):  # async backends (s3fs, gcsfs, http): exact ranged GET
            return self.fs.cat_file(path, start=start, end=end)
        with self.fs.open(path, "rb", cache_type="none") as f:
            f.seek(start)
            return f.read(end - start)

    def sha256(self, name: str, size: int, piece: int = 64 * 2**20, start: int = 0) -> str:
        """sha256 of bytes ``start..size-1`` of a file (default: the first ``size``), read in pieces (bounded memory)."""
        h = hashlib.sha256()
        for at in range(start, size, piece):
            h.update(self.read_range(name, at, min(size, at + piece)))
        return h.hexdigest()

    def listdir(self, name: str = "") -> list[str]:
        """Base names of the files directly under ``name`` (empty when it does not exist)."""
        path = self.path(name)

        def ls() -> list[str]:
            self.fs.invalidate_cache(path)  # object-store listings are cached; resume needs the truth
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))

        return with_retries(ls, self.url(name), self.options)

    # -- writes --------------------------------------------------------------------------------
    def open_atomic(self, name: str, part_size: int | None = None) -> AtomicWriter:
        """A writer for ``name``. Multipart uploads use ``part_size`` bytes per part, else the
        ``default_block_size`` storage option, else 16 MiB."""
        return AtomicWriter(self, name, part_size or int(self.options.get("default_block_size", DEFAULT_PART)))

    def write_atomic(self, name: str, data: bytes) -> None:
        w = self.open_atomic(name)
        try:
            w.write(data)
        except BaseException:
            w.discard()
            raise
        w.commit()

    def delete(self, name: str) -> None:
        def rm() -> None:
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

        with_retries(rm, self.url(name), self.options)

    def delete_tree(self, name: str) -> None:
        """Remove ``name`` and everything under it (nothing when absent)."""

        def rm() -> None:
            try:
                self.fs.rm(self.path(name), recursive=True)
            except FileNotFoundError:
                pass

        with_retries(rm, self.url(name), self.options)

    def remove_partial_writes(self, keep: Iterable[str] = ()) -> int:
        """Drop what killed writers left under this location: hidden ``.nyxray-*.tmp`` files, and
        on S3 the pending (never completed, so invisible) multipart uploads, except those whose
        upload id is in ``keep`` (a killed run's uploads that this run may adopt: its driver then
        adopts or aborts each, :mod:`nyxray.output.assemble`). Only call this when no writer of this
        location is running (under its lease). Returns how many were removed."""
        removed = 0
        for f in self.listdir():
            if f.startswith(".") and ".nyxray-" in f and f.endswith(".tmp"):
                self.delete(f)
                removed += 1
        if self.protocol in ("s3", "s3a"):
            bucket, _, prefix = self.root.partition("/")
            under = f"{prefix}/" if prefix else ""  # the location's keys (all of the bucket at its root)
            kept = set(keep)

            def pending() -> list[dict]:
                ups, kw = [], {"Bucket": bucket, "Prefix": under}
                while True:
                    page = self.fs.call_s3("list_multipart_uploads", **kw)
                    ups += page.get("Uploads", []) or []
                    if not page.get("IsTruncated") or not page.get("NextKeyMarker"):
                        return ups
                    kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page.get("NextUploadIdMarker", ""))

            def abort() -> int:
                n = 0
                for up in pending():
                    if up["Key"].startswith(under) and up["UploadId"] not in kept:
                        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                        n += 1
                return n

            removed += with_retries(abort, self.display, self.options)
        return removed

    def makedirs(self) -> None:
        if self.is_local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise StorageError(f"{self.display}: cannot create the output directory: {e.strerror}") from None


class AtomicWriter:
    """Streams one file; it becomes visible under its final name only on :meth:`commit`.

    Local files: a hidden temporary file in the same directory, fsynced, then renamed. S3: nyxray's
    own multipart upload (:mod:`nyxray.io.backends.s3`, parts sent concurrently); gcsfs: its file's
    upload. Either is completed on commit and aborted on discard, so an interrupted shard never
    appears. Other backends: a temporary name, then a move.
    """

    def __init__(self, loc: Location, name: str, part_size: int):
        self.loc, self.name, self.done = loc, name, False
        self.final = loc.path(name)
        self.written = 0
        if loc.is_local:
            d = os.path.dirname(self.final)
            self.tmp = os.path.join(d, f".{os.path.basename(self.final)}.nyxray-{uuid.uuid4().hex[:8]}.tmp")
            try:
                os.makedirs(d, exist_ok=True)
                self.f: Any = open(self.tmp, "wb")
            except OSError as e:
                raise StorageError(f"{loc.url(name)}: cannot write: {e.strerror}") from None
            self.writeback: Writeback | None = Writeback(self.f.fileno())
            return
        self.writeback = None
        self.direct = loc.protocol in ("s3", "s3a", "gs", "gcs")
        head, _, base = self.final.rpartition("/")
        self.tmp = self.final if self.direct else f"{head}/.{base}.nyxray-{uuid.uuid4().hex[:8]}.tmp"
        if loc.protocol in ("s3", "s3a"):
            from .backends.s3 import MultipartUpload  # parts in flight concurrently (s3fs sends them one by one)

            self.f = MultipartUpload(loc.fs, self.final, part_size, loc.url(name), loc.options)
            return
        kwargs = {"block_size": part_size} if self.direct else {}
        self.f = with_retries(lambda: loc.fs.open(self.tmp, "wb", **kwargs), loc.url(name), loc.options)

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise StorageError(redact(f"{self.loc.url(self.name)}: write failed: {describe(e)}", self.loc.options)) from None
        self.written += len(data)
        if self.writeback is not None:
            self.writeback.wrote(self.written)

    def commit(self) -> None:
        url = self.loc.url(self.name)
        if self.loc.is_local:
            try:
                self.f.flush()
                os.fsync(self.f.fileno())
                self.f.close()
                os.replace(self.tmp, self.final)
            except OSError as e:
                raise StorageError(f"{url}: cannot commit: {e.strerror}") from None
        else:
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
            if self.loc.is_local:
                self.f.close()
                os.unlink(self.tmp)
            elif self.direct and hasattr(self.f, "discard"):
                self.f.discard()  # aborts the multipart upload
                self.f.closed = True  # else a gcsfs file's finaliser would try to upload the (gone) buffer
            else:
                self.f.close()
                self.loc.fs.rm_file(self.tmp)
        except Exception:  # noqa: BLE001 - best effort: the final name was never written
            pass


def location(url: str, options: dict[str, Any] | None = None) -> Location:
    """Turn a path or fsspec URL into a Location (no I/O)."""
    options = dict(options or {})
    if "://" not in url:
        return Location("file", os.path.abspath(os.path.expanduser(url)), {}, os.path.abspath(os.path.expanduser(url)))
    protocol, rest = url.split("://", 1)
    protocol = protocol.lower()
    if protocol == "file":
        return Location("file", "/" + rest.lstrip("/"), {})
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{redact(url)}: unsupported storage {protocol!r} ({e})") from None
    root = cls._strip_protocol(url)
    display = redact(url).rstrip("/")
    if protocol in ("s3", "s3a"):
        options = s3_options(options)
    return Location(protocol, root, options, display)


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


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--storage-option``) -> options; dotted keys nest, values are YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise StorageError(f"--storage-option {pair.split('=')[0]!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
        if not isinstance(node[parts[-1]], (str, int, float, bool, type(None))):
            node[parts[-1]] = value
    return out


@dataclass(frozen=True)
class Range:
    """A byte range of one file of one location."""

    loc: Location
    name: str
    start: int
    end: int


def read_ranges(ranges: list[Range], cap: int = COALESCE_CAP, threads: int = 8) -> tuple[list[bytes], int]:
    """Read many ranges: adjacent ranges of a file are coalesced into requests of at most ``cap``
    bytes, which run concurrently. Returns the data of each range, in order, and bytes fetched."""
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i].loc.display, ranges[i].name, ranges[i].start))
    groups: list[list[int]] = []
    for i in order:
        r = ranges[i]
        if groups:
            g = ranges[groups[-1][0]]
            last = ranges[groups[-1][-1]]
            if (g.loc.display, g.name) == (r.loc.display, r.name) and last.end == r.start and r.end - g.start <= cap:
                groups[-1].append(i)
                continue
        groups.append([i])

    def fetch(group: list[int]) -> bytes:
        first, last = ranges[group[0]], ranges[group[-1]]
        return first.loc.read_range(first.name, first.start, last.end)

    out: list[bytes] = [b""] * len(ranges)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups)))) as pool:
        blobs = list(pool.map(fetch, groups))
    fetched = 0
    for group, blob in zip(groups, blobs):
        fetched += len(blob)
        base = ranges[group[0]].start
        view = memoryview(blob)
        for i in group:
            out[i] = view[ranges[i].start - base : ranges[i].end - base]  # type: ignore[assignment]
    return out, fetched
